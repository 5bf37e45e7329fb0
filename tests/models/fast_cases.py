"""Shared by the fast-model tests: the small config, the backends that can run here, model
pairs with the same weights, and the helpers that run them."""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import pytest
import torch

import fastvit_kernels as fk
import vit
from fastvit_kernels import _dispatch
from fastvit_kernels.testing import MODEL_RTOL, rand  # noqa: F401  -- MODEL_RTOL re-exported for the tests
from vit.fast import MODEL_OPS
from vit.fast import ViT as FastViT

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

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


def grads_vs_reference(fast, ref_hi, x, context):
    """(fast, reference) gradients of every parameter and the images, for one upstream
    gradient: the fast model run under ``context`` (a backend choice), its fp64 twin on x.double()."""
    upstream = rand(x.shape[0], CFG["num_classes"], device=DEVICE)
    with context:
        got = _grads(fast, x, upstream)
    return got, _grads(ref_hi, x.double(), upstream.double())


def same_seed_training_grads(fast, ref, checkpointing: bool, seed: int = 7):
    """Both models in training mode (fast with or without activation checkpointing) and their
    gradients for the same images and upstream, each from the same seed, so dropout and
    drop-path draw the same masks. Returns (fast's, reference's, images, upstream)."""
    fast.train(), ref.train()
    fast.set_grad_checkpointing(checkpointing)
    x = _images(fast, batch=4)
    upstream = rand(4, CFG["num_classes"], device=DEVICE)
    torch.manual_seed(seed)
    got = _grads(fast, x, upstream)
    torch.manual_seed(seed)
    return got, _grads(ref, x, upstream), x, upstream


# The ViT family (issue 18), at CFG's size: one config per family's knobs.
FAMILIES = {
    "dinov2": dict(init_values=1e-5),
    "dinov2-reg": dict(init_values=1e-5, reg_tokens=4, no_embed_class=True),
    "clip": dict(pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu"),
    "siglip": dict(class_token=False, global_pool="map", act_layer="gelu_tanh"),
    "deit-distilled": dict(distilled=True),
    "deit3": dict(no_embed_class=True, init_values=1e-6),
}


@contextlib.contextmanager
def preferring(name: str):
    """Run the fused ops on backend ``name`` where it can run the call, else on torch (as
    ``auto`` falls back): a backend that declines some arguments (LayerScale, register
    tokens, QuickGELU before it implements them) is still tested on every call it takes."""
    real_resolve = _dispatch.resolve

    def resolve(op, device, *args, **kwargs):
        with fk.backend(name):
            try:
                return real_resolve(op, device, *args, **kwargs)
            except fk.BackendUnavailableError:
                pass
        with fk.backend("torch"):
            return real_resolve(op, device, *args, **kwargs)

    with mock.patch.object(_dispatch, "resolve", resolve):
        yield


def dispatched_ops(model, x) -> list[tuple[str, tuple]]:
    """The (op, args) of every fused op dispatched in one eval forward of ``model`` on ``x``
    (an image batch, or a list of images)."""
    calls = []
    real = _dispatch.dispatch

    def spy(op, device, *args, **kwargs):
        calls.append((op, args))
        return real(op, device, *args, **kwargs)

    with mock.patch.object(_dispatch, "dispatch", spy), torch.no_grad():
        model.eval()(x)
    return calls
