"""vit.fast.ViT in use: loading timm / Hugging Face weights, training, torch.compile, DDP / FSDP2.

Same rule and helpers as test_fast_model.py (``fast_cases``).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from fast_cases import (
    BACKENDS,
    CFG,
    DEVICE,
    MODEL_RTOL,
    NATIVE,
    _config,
    _grads,
    _images,
    _pair,
    _perturbed_reference,
    on_backend,
)

import vit
from fastvit_kernels.testing import assert_parity, rand
from vit import weights as ckpt
from vit.fast import ViT as FastViT


# ------------------------------------------------------------------- checkpoints
def _hf_checkpoint_model(**overrides):
    from test_weights import _hf_model  # the checkpoints the weights tests use

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


@functools.cache
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
