"""vit.fast.ViT against the reference vit.ViT, on every backend that can run here.

Parity follows the rule in fastvit_kernels/testing.py against the reference model run in
fp64; the model-level fp32 bound is the issue's 1e-4 relative. The Triton backend on CPU
runs under the interpreter, which is slow: it gets a tiny image and only the tests that
matter (fp32 logits and gradients, fp16 autocast, torch.compile).
"""

from __future__ import annotations

import pytest
import torch
from fast_cases import (
    BACKENDS,
    CFG,
    DEVICE,
    MODEL_RTOL,
    NATIVE,
    _grads,
    _images,
    _interpreted,
    _lowp_cases,
    _pair,
    dispatched_ops,
    grads_vs_reference,
    on_backend,
    same_seed_training_grads,
)

import fastvit_kernels as fk
import vit
from fastvit_kernels.testing import assert_parity, rand
from vit.fast import MODEL_OPS
from vit.fast import ViT as FastViT


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
    into the final norm), one packed attention and one linear_gelu per block, the other
    Linear layers (qkv, proj, fc2; the head) on the linear op."""
    calls = [op for op, _ in dispatched_ops(FastViT(**CFG), rand(2, 3, 32, 32))]
    depth = CFG["depth"]
    assert calls.count("patch_embed") == 1 and calls[0] == "patch_embed"
    assert calls.count("layer_norm") == 1  # block 0's norm1: nothing to add yet
    assert calls.count("add_layer_norm") == 2 * depth
    assert calls.count("packed_attention") == depth and calls.count("linear_gelu") == depth
    assert calls.count("linear") == 3 * depth + 1
    assert calls[-2:] == ["add_layer_norm", "linear"]  # the final norm fuses the last residual add; the head


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
    assert model.ops() == tuple(op for op in MODEL_OPS if op != "attention")  # no MAP head
    assert set(resolved) == set(model.ops()) and set(resolved.values()) <= set(fk.BACKENDS)
    with fk.backend("torch"):
        assert model.backends() == dict.fromkeys(model.ops(), "torch")
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
    got, want = grads_vs_reference(fast, ref_hi, _images(fast), on_backend(backend))
    assert got.keys() == want.keys()
    for name in want:
        assert_parity(f"grad {name}", got[name], want[name], rtol=MODEL_RTOL)


@pytest.mark.parametrize("backend", NATIVE)
def test_dynamic_img_size_other_resolution(backend):
    """A non-square size the model was not built for: the resampled pos-embed is fused."""
    fast, _, ref_hi = _pair(backend, dynamic_img_size=True)
    x = _images(fast, hw=(24, 40))
    got, want = grads_vs_reference(fast, ref_hi, x, on_backend(backend))
    with on_backend(backend), torch.no_grad():
        logits = fast.eval()(x)
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
    got, want, x, upstream = same_seed_training_grads(fast, ref, checkpointing)
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


