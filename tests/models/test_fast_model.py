"""vit.fast.ViT against the reference vit.ViT, on every backend that can run here.

Parity follows DESIGN.md's rule (tests/parity.py) against the reference model run in
fp64; the model-level fp32 bound is the issue's 1e-4 relative. The Triton backend on CPU
runs under the interpreter, which is slow: it gets a tiny image and only the tests that
matter (fp32 logits and gradients, fp16 autocast, torch.compile).
"""

from __future__ import annotations

import contextlib
import copy
import functools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fastvit_kernels as fk
import vit
from fastvit_kernels import _dispatch
from fastvit_kernels.testing import assert_parity, rand
from vit import weights as ckpt
from vit.fast import MODEL_OPS
from vit.fast import ViT as FastViT

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODEL_RTOL = 1e-4  # the fp32 bound for whole-model logits and gradients

# head_dim 32: every backend's attention supports it; 17 tokens (16 patches + class)
CFG = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)


def _backends_here() -> list[str]:
    return [name for name, info in fk.available_backends().items()
            if info.available and DEVICE.type in info.devices]


BACKENDS = _backends_here()


def _interpreted(name: str) -> bool:
    return name == "triton" and DEVICE.type == "cpu"


NATIVE = [b for b in BACKENDS if not _interpreted(b)]  # backends cheap enough for every test


def _lowp_cases() -> list:
    """(backend, dtype) pairs: bf16 and fp16 on CUDA; on CPU bf16, and fp16 for the
    interpreter (it cannot do bf16 tl.dot)."""
    cases = []
    for name in BACKENDS:
        if DEVICE.type == "cuda":
            dtypes = (torch.bfloat16, torch.float16)
        else:
            dtypes = (torch.float16,) if _interpreted(name) else (torch.bfloat16,)
        cases += [pytest.param(name, dt, id=f"{name}-{str(dt).split('.')[-1]}") for dt in dtypes]
    return cases


def _config(backend: str | None = None, **overrides) -> dict:
    cfg = {**CFG, **overrides}
    if backend is not None and _interpreted(backend):
        cfg["img_size"] = 16  # 5 tokens: the interpreter's cost grows with every program
    return cfg


@contextlib.contextmanager
def on_backend(name: str):
    """Run the fused ops on backend ``name``, requested explicitly (so it raises if it
    cannot run a call). A backend that lacks some ops entirely runs those on torch,
    so that a partly written backend is still tested on the ops it has."""
    missing = set(MODEL_OPS) - set(fk.available_backends()[name].ops)
    if not missing:
        with fk.backend(name):
            yield
        return
    real_resolve = _dispatch.resolve

    def resolve(op, device, *args, **kwargs):
        with fk.backend("torch" if op in missing else name):
            return real_resolve(op, device, *args, **kwargs)

    with mock.patch.object(_dispatch, "resolve", resolve):
        yield


def _perturbed_reference(**cfg) -> vit.ViT:
    """A reference model whose every parameter matters (LayerNorms off (1, 0), biases
    off 0), so a swapped or ignored parameter cannot go unnoticed."""
    ref = vit.ViT(**cfg)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref.to(DEVICE)


def _pair(backend: str | None = None, **overrides):
    """(fast, reference, reference in fp64) with the same weights, on DEVICE."""
    cfg = _config(backend, **overrides)
    ref = _perturbed_reference(**cfg)
    fast = FastViT(**cfg).to(DEVICE)
    fast.load_state_dict(ref.state_dict(), strict=True)
    return fast, ref, copy.deepcopy(ref).double()


def _images(model, batch: int = 2, hw=None, dtype=torch.float32):
    height, width = hw or model.config.img_hw
    return rand(batch, 3, height, width, device=DEVICE, dtype=dtype)


def _grads(model, images, upstream):
    """Gradients of <model(images), upstream> w.r.t. every parameter and the images."""
    model.zero_grad(set_to_none=True)
    images = images.detach().clone().requires_grad_(True)
    model(images).backward(upstream.to(images.dtype))
    grads = {name.removeprefix("_orig_mod."): p.grad for name, p in model.named_parameters()}
    grads["images"] = images.grad
    return grads


# ------------------------------------------------------------------------ structure
@pytest.mark.parametrize("overrides", [
    {}, dict(global_pool="avg"), dict(class_token=False, global_pool="avg"),
    dict(qkv_bias=False, fc_norm=True), dict(num_classes=0),
])
def test_state_dict_identical_and_loads_strict_both_ways(overrides):
    cfg = {**CFG, **overrides}
    ref, fast = vit.ViT(**cfg), FastViT(**cfg)
    ref_sd, fast_sd = ref.state_dict(), fast.state_dict()
    assert list(fast_sd) == list(ref_sd)
    assert {k: v.shape for k, v in fast_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    fast.load_state_dict(ref_sd, strict=True)
    ref.load_state_dict(fast.state_dict(), strict=True)
    for key, value in ref_sd.items():
        assert torch.equal(fast.state_dict()[key], value), key


def test_forward_path_is_the_fused_one():
    """One patch_embed, residual adds fused into the next norm (2 per block, the last one
    into the final norm), one packed attention and one linear_gelu per block."""
    model = FastViT(**CFG).eval()
    calls = []
    real = _dispatch.dispatch

    def spy(op, device, *args, **kwargs):
        calls.append(op)
        return real(op, device, *args, **kwargs)

    with mock.patch.object(_dispatch, "dispatch", spy), torch.no_grad():
        model(rand(2, 3, 32, 32))
    depth = CFG["depth"]
    assert calls.count("patch_embed") == 1 and calls[0] == "patch_embed"
    assert calls.count("layer_norm") == 1  # block 0's norm1: nothing to add yet
    assert calls.count("add_layer_norm") == 2 * depth
    assert calls.count("packed_attention") == depth and calls.count("linear_gelu") == depth
    assert calls[-1] == "add_layer_norm"  # the final norm fuses the last residual add


def test_fast_layers_match_reference_layers():
    """Each fast layer computes what the reference layer it replaces does."""
    fast, ref, _ = _pair()
    fast.eval(), ref.eval()
    images = _images(fast)
    tokens = ref.embed(images)
    pending = rand(*tokens.shape, device=DEVICE)
    with torch.no_grad():
        checks = {
            "patch_embed (patches only)": (fast.patch_embed(images), ref.patch_embed(images)),
            "embed (cls + pos fused)": (fast.embed(images), tokens),
            "norm": (fast.norm(tokens), ref.norm(tokens)),
            "attn": (fast.blocks[0].attn(tokens), ref.blocks[0].attn(tokens)),
            "mlp": (fast.blocks[0].mlp(tokens), ref.blocks[0].mlp(tokens)),
            "block (pair sums to output)": (sum(fast.blocks[1](tokens, pending)),
                                            ref.blocks[1](tokens + pending)),
            "run_blocks": (fast.run_blocks(tokens), ref.run_blocks(tokens)),
        }
    for name, (got, want) in checks.items():
        assert_parity(name, got, want.double(), rtol=MODEL_RTOL)


def test_backends_reports_resolution_and_repr_shows_it():
    model = FastViT(**CFG)
    resolved = model.backends()
    assert set(resolved) == set(MODEL_OPS) and set(resolved.values()) <= set(fk.BACKENDS)
    with fk.backend("torch"):
        assert model.backends() == dict.fromkeys(MODEL_OPS, "torch")
        assert "packed_attention=torch" in repr(model)
    for name in BACKENDS:
        implemented = set(fk.available_backends()[name].ops)
        with on_backend(name):
            for op, got in model.backends(DEVICE).items():
                assert got == (name if op in implemented else "torch"), (op, got)
    with pytest.raises(ValueError, match="unknown backend"):
        with fk.backend("nonsense"):
            pass


# ------------------------------------------------------------------- fp32 parity
def _pool_cases() -> list:
    """Every pooling on the native backends; the interpreter gets class-token pooling."""
    return [pytest.param(b, pool, id=f"{b}-{pool}") for b in BACKENDS
            for pool in ("token", "avg", "avg-no-cls") if pool == "token" or not _interpreted(b)]


@pytest.mark.parametrize("backend, pool", _pool_cases())
def test_logits_parity_eval(backend, pool):
    overrides = {"token": {}, "avg": dict(global_pool="avg"),
                 "avg-no-cls": dict(global_pool="avg", class_token=False)}[pool]
    fast, _, ref_hi = _pair(backend, **overrides)
    fast.eval(), ref_hi.eval()
    x = _images(fast, batch=3)
    with on_backend(backend), torch.no_grad():
        logits = fast(x)
        pooled = fast.forward_head(fast.forward_features(x), pre_logits=True)
    with torch.no_grad():
        assert_parity("logits", logits, ref_hi(x.double()), rtol=MODEL_RTOL)
        ref_pooled = ref_hi.forward_head(ref_hi.forward_features(x.double()), pre_logits=True)
    assert_parity("pre_logits", pooled, ref_pooled, rtol=MODEL_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_parity_every_parameter(backend):
    fast, _, ref_hi = _pair(backend, global_pool="avg")  # avg: every token's grad matters
    fast.train(), ref_hi.train()  # dropout rates are 0: training mode, deterministic
    x = _images(fast)
    upstream = rand(2, CFG["num_classes"], device=DEVICE)
    with on_backend(backend):
        got = _grads(fast, x, upstream)
    want = _grads(ref_hi, x.double(), upstream.double())
    assert got.keys() == want.keys()
    for name in want:
        assert_parity(f"grad {name}", got[name], want[name], rtol=MODEL_RTOL)


@pytest.mark.parametrize("backend", NATIVE)
def test_dynamic_img_size_other_resolution(backend):
    """A non-square size the model was not built for: the resampled pos-embed is fused."""
    fast, _, ref_hi = _pair(backend, dynamic_img_size=True)
    x = _images(fast, hw=(24, 40))
    upstream = rand(2, CFG["num_classes"], device=DEVICE)
    with on_backend(backend):
        got = _grads(fast, x, upstream)
        fast.eval()
        with torch.no_grad():
            logits = fast(x)
    want = _grads(ref_hi, x.double(), upstream.double())
    with torch.no_grad():
        assert_parity("logits", logits, ref_hi.eval()(x.double()), rtol=MODEL_RTOL)
    for name in ("pos_embed", "cls_token", "patch_embed.proj.weight", "images"):
        assert_parity(f"grad {name}", got[name], want[name], rtol=MODEL_RTOL)


# ---------------------------------------------------------- low precision (autocast)
@pytest.mark.parametrize("backend, dtype", _lowp_cases())
def test_autocast_parity_logits_and_gradients(backend, dtype):
    fast, ref, ref_hi = _pair(backend)
    fast.train(), ref.train(), ref_hi.train()
    x = _images(fast)
    upstream = rand(2, CFG["num_classes"], device=DEVICE)
    with torch.no_grad():
        want_logits = ref_hi(x.double())
    want = _grads(ref_hi, x.double(), upstream.double())
    with torch.autocast(DEVICE.type, dtype=dtype):
        with on_backend(backend):
            logits = fast(x)
            got = _grads(fast, x, upstream)
        ref_logits = ref(x)
        ref_lowp = _grads(ref, x, upstream)
    assert logits.dtype == ref_logits.dtype == dtype
    assert_parity("logits", logits, want_logits, ref_logits)
    for name in want:
        # fp32 gradients of a low-precision computation: judged in the compute dtype
        assert got[name].dtype == ref_lowp[name].dtype, name
        assert_parity(f"grad {name}", got[name].to(dtype), want[name], ref_lowp[name])


def _autocast_dtypes() -> list:
    if DEVICE.type == "cuda":
        return [torch.bfloat16, torch.float16]
    return [torch.bfloat16]


@pytest.mark.parametrize("dtype", _autocast_dtypes())
@pytest.mark.parametrize("pool, param_dtype", [("token", torch.float32), ("avg", torch.float32),
                                               ("token", torch.bfloat16)])
def test_autocast_output_dtypes_match_reference(dtype, pool, param_dtype):
    ref = vit.ViT(**CFG, global_pool=pool).to(DEVICE, param_dtype).eval()
    fast = FastViT(**CFG, global_pool=pool).to(DEVICE, param_dtype).eval()
    fast.load_state_dict(ref.state_dict())
    x = _images(ref, dtype=param_dtype)
    with torch.autocast(DEVICE.type, dtype=dtype), torch.no_grad():
        for model_out in (lambda m: m.embed(x), lambda m: m.forward_features(x),
                          lambda m: m.forward_head(m.forward_features(x), pre_logits=True),
                          lambda m: m(x)):
            assert model_out(fast).dtype == model_out(ref).dtype


# ------------------------------------------------------------- dropout, drop-path
@pytest.mark.parametrize("checkpointing", [False, True])
def test_dropout_and_drop_path_match_reference_in_training(checkpointing):
    """Dropout, attention dropout (the fused path falls back for it) and drop-path: the
    same modules at the same points, so the same seed draws the same masks. (Compared
    with the fp32 reference: masks drawn for fp64 tensors need not be the same ones.)"""
    fast, ref, _ = _pair(drop_path_rate=0.3, proj_drop_rate=0.2, attn_drop_rate=0.2,
                         pos_drop_rate=0.1, drop_rate=0.2)
    fast.train(), ref.train()
    fast.set_grad_checkpointing(checkpointing)
    x = _images(fast, batch=4)
    upstream = rand(4, CFG["num_classes"], device=DEVICE)
    torch.manual_seed(7)
    got = _grads(fast, x, upstream)
    torch.manual_seed(7)
    want = _grads(ref, x, upstream)
    for name in want:
        assert_parity(f"grad {name}", got[name], want[name].double(), rtol=MODEL_RTOL)
    torch.manual_seed(7)
    other = _grads(fast, x, upstream)["head.weight"]
    torch.manual_seed(8)
    assert not torch.allclose(other, _grads(fast, x, upstream)["head.weight"]), "masks ignored"


def test_dropout_only_in_training():
    fast = FastViT(**CFG, drop_path_rate=0.5, proj_drop_rate=0.5, attn_drop_rate=0.5,
                   drop_rate=0.5).to(DEVICE)
    x = _images(fast, batch=4)
    fast.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(x), fast(x))
        fast.train()
        assert not torch.allclose(fast(x), fast(x))


@pytest.mark.parametrize("backend", NATIVE)
def test_grad_checkpointing_gives_identical_gradients(backend):
    """Checkpoint units span a block plus the residual add it receives from the previous
    one: recomputation must reproduce the same gradients, masks included."""
    fast, _, _ = _pair(backend, drop_path_rate=0.2, proj_drop_rate=0.1)
    fast.train()
    x = _images(fast)
    upstream = rand(2, CFG["num_classes"], device=DEVICE)

    def grads(enable):
        fast.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        with on_backend(backend):
            return _grads(fast, x, upstream)

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    assert plain["patch_embed.proj.weight"].abs().sum() > 0  # flows through every block


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("images", [
    torch.randn(2, 1, 32, 32), torch.randn(2, 3, 30, 32), torch.randn(3, 32, 32),
    torch.randn(2, 3, 40, 40), torch.zeros(2, 3, 32, 32, dtype=torch.long), [[1.0]],
], ids=["channels", "not-divisible", "3d", "wrong-size", "integer", "not-a-tensor"])
def test_bad_images_same_errors_as_reference(images):
    with pytest.raises((ValueError, TypeError)) as ref_err:
        vit.ViT(**CFG)(images)
    with pytest.raises(type(ref_err.value)) as fast_err:
        FastViT(**CFG)(images)
    assert str(fast_err.value) == str(ref_err.value)


def test_bad_constructor_arguments_same_as_reference():
    with pytest.raises(TypeError, match="unknown ViTConfig field"):
        FastViT(**CFG, depht=3)
    with pytest.raises(TypeError, match="config must be a ViTConfig"):
        FastViT({"depth": 2})


# ------------------------------------------------------------------- checkpoints
def _hf_checkpoint_model(**overrides):
    from test_checkpoint import _hf_model  # the checkpoints the foundation tests use

    return _hf_model(**overrides)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_checkpoint_same_logits(qkv_bias):
    pytest.importorskip("transformers")
    hf = _hf_checkpoint_model(qkv_bias=qkv_bias)
    cfg = vit.factory.config_from_hf(hf.config.to_dict())
    fast = FastViT(cfg).eval()
    fast.load_state_dict(ckpt.convert_state_dict(hf.state_dict()), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (fast(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-4


def test_hf_snapshot_through_from_pretrained_fast(tmp_path):
    pytest.importorskip("transformers")
    hf = _hf_checkpoint_model()
    hf.save_pretrained(tmp_path)
    fast = vit.from_pretrained(tmp_path, fast=True).eval()
    ref = vit.from_pretrained(tmp_path).eval()
    assert isinstance(fast, FastViT) and fast.config == ref.config
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hf_logits = hf(pixel_values=x).logits
        assert (fast(x) - hf_logits).abs().max().item() <= 1e-4
        assert_parity("logits vs reference", fast(x), ref(x).double(), rtol=MODEL_RTOL)


def test_timm_layout_checkpoint_through_create_model_fast(tmp_path):
    ref = _perturbed_reference(**CFG).cpu().eval()
    timm_sd = {f"module.{k}": v for k, v in ref.state_dict().items()}  # DDP-style prefixes
    path = tmp_path / "w.safetensors"
    ckpt.save(ckpt.convert_state_dict(timm_sd, source="timm"), path, config=ref.config)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref(x)
        created = vit.create_model("vit_tiny_patch16_224", fast=True, pretrained=path, **CFG).eval()
        loaded = vit.from_pretrained(path, fast=True).eval()
        for fast in (created, loaded):
            assert isinstance(fast, FastViT)
            assert_parity("logits", fast(x), want.double(), rtol=MODEL_RTOL)
        # a checkpoint for another grid: pos_embed resampled on load, as the reference does
        big = dict(CFG, img_size=48)
        ref_big = vit.create_model("vit_tiny_patch16_224", pretrained=path, **big).eval()
        fast_big = vit.create_model("vit_tiny_patch16_224", fast=True, pretrained=path, **big).eval()
        torch.testing.assert_close(fast_big.pos_embed, ref_big.pos_embed, rtol=0, atol=0)
        x_big = torch.randn(2, 3, 48, 48)
        assert_parity("logits (48 px)", fast_big(x_big), ref_big(x_big).double(), rtol=MODEL_RTOL)


# ----------------------------------------------------------------------- training
TRAIN_SEED, TRAIN_STEPS, TRAIN_BATCH = 1234, 30, 8


def _training_run(model_class, img_size: int, backend=None) -> list[float]:
    """30 AdamW steps on a fixed batch, everything (init, data) from one seed."""
    torch.manual_seed(TRAIN_SEED)
    model = model_class(**dict(CFG, img_size=img_size)).to(DEVICE).train()
    images = rand(TRAIN_BATCH, 3, *model.config.img_hw, device=DEVICE)
    labels = torch.randint(0, CFG["num_classes"], (TRAIN_BATCH,), device=DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    losses = []
    with on_backend(backend) if backend else contextlib.nullcontext():
        for _ in range(TRAIN_STEPS):
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@functools.lru_cache(maxsize=None)
def _reference_losses(img_size: int) -> tuple[float, ...]:
    """The reference run is deterministic: computed once, shared by every backend."""
    return tuple(_training_run(vit.ViT, img_size))


@pytest.mark.parametrize("backend", NATIVE)
def test_adamw_training_loss_curves_agree(backend):
    img_size = _config(backend)["img_size"]
    inits = []
    for model_class in (vit.ViT, FastViT):
        torch.manual_seed(TRAIN_SEED)
        inits.append(model_class(**dict(CFG, img_size=img_size)).state_dict())
    for name in inits[0]:
        assert torch.equal(inits[0][name], inits[1][name]), f"{name}: same seed, different init"
    want = _reference_losses(img_size)
    got = _training_run(FastViT, img_size, backend)
    assert want[-1] < 0.5 * want[0], f"the run does not train: {want[0]:.3f} -> {want[-1]:.3f}"
    for step, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= 0.01 * abs(b), f"step {step}: fast loss {a:.5f} vs reference {b:.5f}"


# --------------------------------------------------------------------- compilation
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    """aot_eager traces forward and backward through AOTAutograd with fake tensors (the
    custom ops' fake kernels and autograd formulas), as inductor would; inductor itself
    takes ~45 s to compile this tiny model on this CPU, too long for CI."""
    fast, _, _ = _pair(backend)
    fast.train()
    x = _images(fast)
    upstream = rand(2, CFG["num_classes"], device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    with on_backend(backend):
        eager = _grads(fast, x, upstream)
        traced = _grads(compiled, x, upstream)
    for name in eager:
        torch.testing.assert_close(traced[name], eager[name], msg=name)


# ---------------------------------------------------------------------- wrapping
# A block returns its MLP branch unsummed, straight from fc2 (a view of the matmul's
# output); FSDP2 warns about view outputs because an in-place op on one would skip its
# hooks. The model never modifies them in place.
@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module:UserWarning")
def test_ddp_and_fsdp2_wrap_and_match(tmp_path):
    """Parameters are read at forward time: DDP and FSDP2 (fully_shard per block, then
    the root) give the plain model's outputs and gradients (one process, gloo)."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    plain = _perturbed_reference(**CFG).cpu()
    fast = FastViT(**CFG)
    fast.load_state_dict(plain.state_dict())
    x, upstream = torch.randn(2, 3, 32, 32), torch.randn(2, CFG["num_classes"])
    want = _grads(fast, x, upstream)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = DistributedDataParallel(copy.deepcopy(fast))
        got = _grads(ddp, x, upstream)
        for name in want:
            key = name if name == "images" else f"module.{name}"
            torch.testing.assert_close(got[key], want[name], msg=name)
        sharded = copy.deepcopy(fast)
        for block in sharded.blocks:
            fully_shard(block)
        fully_shard(sharded)
        got = _grads(sharded, x, upstream)
        for name in want:
            grad = got[name]
            grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            torch.testing.assert_close(grad, want[name], msg=name)
    finally:
        dist.destroy_process_group()
