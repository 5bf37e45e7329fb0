"""A list of images of different sizes through the models (issue 20, ``vit.packing``): the same
logits, features and gradients as running each image alone, for the reference and the fast
model, across the ViT family's knobs; clear errors for bad lists; the pos_embed cache."""

from __future__ import annotations

import contextlib

import pytest
import torch
from fast_cases import (
    BACKENDS,
    CFG,
    DEVICE,
    FAMILIES,
    NATIVE,
    _interpreted,
    _perturbed_reference,
    dispatched_ops,
    preferring,
)

import vit
from fastvit_kernels.testing import FP32_RTOL, assert_parity, rand
from vit.fast import ViT as FastViT
from vit.packing import PackedTokens, PosEmbedCache
from vit.weights import resample_pos_embed

# Every knob of the family, plus the plain ViT and average pooling.
KNOBS = {"vit": {}, "avg": dict(global_pool="avg"), **FAMILIES}
# Patch 8: sizes (h, w) in pixels; (8, 8) is a 1-patch image, (32, 32) the config's own size.
SIZES = [(32, 32), (8, 8), (16, 40), (32, 32), (24, 16), (48, 8)]


def _models(family: str, fast: bool, **overrides):
    """A model (eval) with every parameter perturbed, on DEVICE; dynamic_img_size so that each
    image can also run alone at its own size."""
    cfg = {**CFG, **KNOBS[family], "dynamic_img_size": True, **overrides}
    ref = _perturbed_reference(**cfg)
    if not fast:
        return ref.eval()
    model = FastViT(**cfg).to(DEVICE)
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.eval()


def _images(sizes=SIZES, requires_grad=False):
    return [rand(3, h, w, device=DEVICE).requires_grad_(requires_grad) for h, w in sizes]


def _run(model, backend):
    """The fused ops on ``backend`` where it takes the call (fast model); nothing for the reference."""
    return preferring(backend) if backend is not None else contextlib.nullcontext()


def _cases():
    cases = [pytest.param(f, None, id=f"ref-{f}") for f in KNOBS]
    cases += [pytest.param(f, b, id=f"fast-{b}-{f}") for b in NATIVE for f in KNOBS]
    return cases


# ------------------------------------------------------------------------ forward
@pytest.mark.parametrize("family,backend", _cases())
def test_list_equals_each_image_alone(family, backend, one_thread):
    model = _models(family, fast=backend is not None)
    images = _images()
    with _run(model, backend), torch.no_grad():
        logits = model(images)
        packed = model.forward_features(images)
        pooled = model.forward_head(packed, pre_logits=True)
        alone = [model.forward_features(x[None]) for x in images]
        alone_logits = torch.cat([model.forward_head(t) for t in alone])
        alone_pooled = torch.cat([model.forward_head(t, pre_logits=True) for t in alone])
    assert isinstance(packed, PackedTokens) and len(packed) == len(images)
    assert logits.shape == (len(images), CFG["num_classes"])
    assert_parity("logits", logits, alone_logits, rtol=FP32_RTOL)
    assert_parity("pooled", pooled, alone_pooled, rtol=FP32_RTOL)
    for i, (tokens, ref) in enumerate(zip(packed.split(), alone)):
        assert_parity(f"tokens of image {i}", tokens, ref[0], rtol=FP32_RTOL)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if _interpreted(b)])
def test_list_on_the_interpreted_triton_backend(backend, one_thread):
    """The fast model's varlen attention under the Triton interpreter, forward and backward (a
    small pack: it is slow)."""
    model = _models("dinov2-reg", fast=True)
    images = _images([(16, 16), (8, 8), (8, 24)])
    with preferring(backend):
        packed = _grads(model, lambda: model(images).square().sum())
        logits = model(images).detach()
    alone = _grads(model, lambda: sum(model(x[None]).square().sum() for x in images))  # auto: cpp / torch
    with torch.no_grad():
        assert_parity("logits", logits, torch.cat([model(x[None]) for x in images]), rtol=FP32_RTOL)
    for name in alone:
        assert_parity(f"grad {name}", packed[name], alone[name], rtol=FP32_RTOL)


def test_fast_model_runs_varlen_attention_on_a_list(one_thread):
    calls = [op for op, _ in dispatched_ops(_models("vit", fast=True), _images())]
    assert calls.count("varlen_packed_attention") == CFG["depth"]
    assert "packed_attention" not in calls  # no per-image attention on the pack
    assert calls.count("patch_embed") == 5  # one call per image size (two 32x32 images share one)


@pytest.mark.parametrize("fast", [False, True], ids=["ref", "fast"])
def test_list_needs_no_dynamic_img_size(fast, one_thread):
    """A list is the mixed-size API: a model built for one size takes it (and still refuses
    a tensor batch of another size)."""
    dynamic = _models("vit", fast)
    fixed = type(dynamic)(**{**CFG, "dynamic_img_size": False}).to(DEVICE).eval()
    fixed.load_state_dict(dynamic.state_dict())
    images = _images()
    with torch.no_grad():
        assert_parity("logits", fixed(images), dynamic(images), rtol=FP32_RTOL)
    with pytest.raises(ValueError, match="dynamic_img_size=True"):
        fixed(images[2][None])


def test_one_image_list_and_same_size_list_equal_the_tensor_batch(one_thread):
    model = _models("dinov2", fast=True)
    images = _images([(32, 32)] * 3)
    with torch.no_grad():
        assert_parity("logits", model(images), model(torch.stack(images)), rtol=FP32_RTOL)
        assert_parity("one image", model(images[:1]), model(images[0][None]), rtol=FP32_RTOL)


# ------------------------------------------------------------------------ training
def _grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,backend", [c for c in _cases() if c.values[0] in ("vit", "dinov2-reg",
                                                                                   "siglip", "deit-distilled",
                                                                                   "clip")])
def test_packed_step_gradients_equal_the_sum_of_per_image_steps(family, backend, one_thread):
    model = _models(family, fast=backend is not None).train()
    images = _images(requires_grad=True)
    targets = torch.randint(0, CFG["num_classes"], (len(images),), device=DEVICE)

    def packed_loss():
        return torch.nn.functional.cross_entropy(model(images), targets, reduction="sum")

    def per_image_loss():
        return sum(torch.nn.functional.cross_entropy(model(x[None]), t[None], reduction="sum")
                   for x, t in zip(images, targets))

    with _run(model, backend):
        packed = _grads(model, packed_loss)
        packed_images = [x.grad.clone() for x in images]
        for x in images:
            x.grad = None
        alone = _grads(model, per_image_loss)
    assert packed.keys() == alone.keys() and len(packed) == len(list(model.parameters()))
    for name in alone:
        assert_parity(f"grad {name}", packed[name], alone[name], rtol=FP32_RTOL)
    for i, x in enumerate(images):
        assert_parity(f"grad image {i}", packed_images[i], x.grad, rtol=FP32_RTOL)


@pytest.mark.parametrize("fast", [False, True], ids=["ref", "fast"])
def test_packed_step_with_gradient_checkpointing(fast, one_thread):
    model = _models("dinov2", fast).train()
    images = _images()
    model(images).square().sum().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing()
    model(images).square().sum().backward()
    for name, p in model.named_parameters():
        assert_parity(f"grad {name}", p.grad, plain[name], rtol=FP32_RTOL)


@pytest.mark.parametrize("fast", [False, True], ids=["ref", "fast"])
def test_drop_path_drops_whole_images_of_a_pack(fast):
    """Stochastic depth on a pack masks each image's tokens together, as for a batch."""
    model = _models("vit", fast, drop_path_rate=0.5).train()
    drop = model.blocks[-1].drop_path1  # rate 0.5 (the rates rise to drop_path_rate)
    packed = model.embed_packed(_images())
    seen = set()
    for _ in range(4):
        out = drop(torch.ones_like(packed.tokens), packed.layout)
        for values in (torch.unique(t) for t in torch.split(out[0], packed.layout.lengths)):
            assert len(values) == 1 and values.item() in (0.0, 2.0), values
            seen.add(values.item())
    assert seen == {0.0, 2.0}


# ------------------------------------------------------------------------ errors
@pytest.mark.parametrize("images,error,match", [
    ([], ValueError, "non-empty list"),
    ([torch.zeros(3, 8, 8), "img.png"], TypeError, "image 1 must be a torch.Tensor, got str"),
    ([torch.zeros(1, 3, 8, 8)], ValueError, r"image 0 must be \(3, height, width\), got shape \(1, 3, 8, 8\)"),
    ([torch.zeros(3, 8, 8), torch.zeros(1, 8, 8)], ValueError, "image 1: expected 3 channels, got 1"),
    ([torch.zeros(3, 8, 12)], ValueError, "image 0 is 8x12: each side must be a positive multiple of the patch "
                                          "size 8"),
    ([torch.zeros(3, 0, 8)], ValueError, "image 0 is 0x8"),
    ([torch.zeros(3, 8, 8, dtype=torch.uint8)], TypeError, "image 0 must be a floating-point tensor"),
    ([torch.zeros(3, 8, 8), torch.zeros(3, 8, 8, dtype=torch.float64)], ValueError,
     "image 1 is torch.float64 on cpu, image 0 is torch.float32 on cpu"),
])
@pytest.mark.parametrize("fast", [False, True], ids=["ref", "fast"])
def test_bad_lists_are_refused_clearly(images, error, match, fast):
    model = (FastViT if fast else vit.ViT)(**CFG)
    with pytest.raises(error, match=match):
        model(images)


def test_list_into_forward_intermediates_says_where_lists_go():
    model = vit.ViT(**CFG)
    with pytest.raises(TypeError, match="a list of images goes through forward / forward_features"):
        model.forward_intermediates([torch.zeros(3, 32, 32)])


# ------------------------------------------------------------------------ pos_embed cache
def test_pos_embed_cache_is_reused_and_never_stale():
    model = vit.ViT(**{**CFG, "dynamic_img_size": True}).eval()
    image = [torch.randn(3, 16, 40)]
    with torch.no_grad():
        first = model.pos_embed_for((2, 5))
        assert model.pos_embed_for((2, 5)) is first  # cached
        before = model(image)
        model.pos_embed.mul_(2.0)  # an in-place change (an optimizer step)
        second = model.pos_embed_for((2, 5))
        assert second is not first
        torch.testing.assert_close(second, 2 * first)
        assert not torch.equal(model(image), before)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["pos_embed"].zero_()
        model.load_state_dict(state)
        assert model.pos_embed_for((2, 5)).abs().max() == 0
        model.pos_embed = torch.nn.Parameter(torch.ones_like(model.pos_embed))  # a new tensor
        torch.testing.assert_close(model.pos_embed_for((2, 5)), torch.ones(1, 11, CFG["embed_dim"]))
        model.double()
        assert model.pos_embed_for((2, 5)).dtype == torch.float64
    # with autograd on, nothing is cached: each call's result carries its own graph
    with torch.enable_grad():
        a, b = model.pos_embed_for((2, 5)), model.pos_embed_for((2, 5))
    assert a is not b and a.requires_grad


def test_pos_embed_cache_sees_half_float_round_trip():
    """``model.half().float()`` swaps ``param.data`` twice without a version bump; the new fp32
    data can land at the freed old address (glibc's malloc reuses the block), and the round
    trip changed the values: an entry keyed by address and version alone would be stale."""
    model = vit.ViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                    dynamic_img_size=True).eval()
    with torch.no_grad():
        model.pos_embed.normal_()
        model.pos_embed_for((2, 5))
        model.half().float()
        fresh = resample_pos_embed(model.pos_embed, (2, 5), model.config.grid_size, model.config.pos_prefix_tokens)
        assert torch.equal(model.pos_embed_for((2, 5)), fresh)


def test_pos_embed_cache_bounded_and_copied_empty():
    import copy

    cache = PosEmbedCache(max_entries=2)
    pos = torch.zeros(1, 5, 4)
    with torch.no_grad():
        for grid in [(1, 1), (1, 2), (2, 1)]:
            cache.get(pos, grid, lambda: torch.zeros(1))
    assert len(cache) == 2
    assert len(copy.deepcopy(cache)) == 0


def test_pack_offsets_are_checked_once_per_pack_under_inference_mode(monkeypatch):
    """The pack's cu_seqlens is a normal tensor even under inference_mode, so the attention
    op reads its values (a device sync on a GPU) once per forward, not once per block."""
    import fastvit_kernels as fk
    from fastvit_kernels import functional

    fast = FastViT(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=3).eval()
    checked = []
    real = functional._check_cu_seqlens
    monkeypatch.setattr(functional, "_check_cu_seqlens",
                        lambda cu, *a: checked.append(cu.is_inference()) or real(cu, *a))
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.dtype) or real_tolist(t))
    with torch.inference_mode(), fk.backend("torch"):
        fast([torch.randn(3, 16, 32), torch.randn(3, 32, 8)])
    assert len(checked) == 3 and not any(checked)  # one call per block, none an inference tensor
    # the op reads the offsets once; the torch backend's per-sequence loop reads them per block
    assert reads.count(torch.int32) == 1 + 3
