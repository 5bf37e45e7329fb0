"""Parity of a provider's logits and gradients against the fp32 reference model.

The rule is ``fastvit_kernels.testing``'s, with the whole-model fp32 bound ``MODEL_RTOL``;
the reference runs in fp32 with TF32 off, and for bf16/fp16 also under autocast (its own
low-precision error sets the tolerance).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fastvit_kernels import testing
from fastvit_kernels.testing import MODEL_RTOL, Parity
from vit.weights import convert_state_dict

from .timing import autocast

FP32_RTOL = MODEL_RTOL  # what an fp32 provider's logits and gradients may differ by, relative


def tolerance(ref_hi: torch.Tensor, ref_lowp: torch.Tensor | None, dtype: torch.dtype) -> float:
    """The parity rule's tolerance on max |out - ref_hi| for a whole model's outputs."""
    return testing.tolerance(ref_hi, ref_lowp, dtype, rtol=MODEL_RTOL)


def compare(out, ref_hi: torch.Tensor, tol: float, what: str = "logits") -> Parity:
    """Check one output against the reference by the parity rule."""
    return testing.compare(what, out, ref_hi, tol)


@contextlib.contextmanager
def exact_fp32():
    """No TF32 shortcuts while computing the fp32 reference on CUDA."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _canonical_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter gradients under our (timm) names, whatever wraps or renames them."""
    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p))
             for name, p in module.named_parameters()}
    return convert_state_dict(grads)


def _flat(grads: dict[str, torch.Tensor], keys) -> torch.Tensor:
    return torch.cat([grads[k].detach().double().flatten() for k in keys])


@dataclass
class Reference:
    """The fp32 reference's outputs on the parity inputs, and the tolerances they give."""

    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    logits_tol: float
    grads: torch.Tensor | None = None
    grad_keys: list[str] = field(default_factory=list)
    grads_tol: float = 0.0


def _loss_and_grads(module, images, labels, device, dtype, context):
    module.zero_grad(set_to_none=True)
    with context():
        with autocast(device, dtype):
            logits = module(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
    return logits.detach()


def reference_outputs(reference: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      dtype: torch.dtype, with_grads: bool) -> Reference:
    """Reference logits (and gradients) in fp32, and the tolerances for ``dtype``."""
    device = images.device
    reference.eval()
    with torch.no_grad(), exact_fp32():
        hi = reference(images)
    with torch.no_grad(), autocast(device, dtype):
        lowp = reference(images) if dtype != torch.float32 else None
    ref = Reference(images, labels, hi, tolerance(hi, lowp, dtype))
    if with_grads:
        with exact_fp32():
            _loss_and_grads(reference, images, labels, device, torch.float32, contextlib.nullcontext)
        grads_hi = _canonical_grads(reference)
        ref.grad_keys = sorted(grads_hi)
        ref.grads = _flat(grads_hi, ref.grad_keys)
        grads_lowp = None
        if dtype != torch.float32:
            _loss_and_grads(reference, images, labels, device, dtype, contextlib.nullcontext)
            grads_lowp = _flat(_canonical_grads(reference), ref.grad_keys)
        ref.grads_tol = tolerance(ref.grads, grads_lowp, dtype)
        reference.zero_grad(set_to_none=True)
    return ref


def check_parity(module: torch.nn.Module, ref: Reference, dtype: torch.dtype,
                 context=contextlib.nullcontext) -> list[Parity]:
    """Logits (and, if the reference has them, gradients) of ``module`` vs the reference."""
    device = ref.images.device
    module.eval()
    # fp32 is checked with PyTorch's TF32 shortcuts off, as the reference was computed
    exact = exact_fp32 if dtype == torch.float32 else contextlib.nullcontext
    # inference_mode, as the timed inference steps run: a compiled provider compiles here once
    with torch.inference_mode(), exact(), context(), autocast(device, dtype):
        out = module(ref.images)
    out = out.clone() if isinstance(out, torch.Tensor) else out  # an inference tensor cannot enter autograd
    checks = [compare(out, ref.logits, ref.logits_tol, "logits")]
    if ref.grads is not None and checks[0].ok:
        with exact():
            _loss_and_grads(module, ref.images, ref.labels, device, dtype, context)
        grads = _canonical_grads(module)
        missing = [k for k in ref.grad_keys if k not in grads]
        if missing:
            checks.append(Parity(False, math.inf, ref.grads_tol, "gradients",
                                 f"gradients: no gradient for {missing[:5]}"))
        else:
            checks.append(compare(_flat(grads, ref.grad_keys), ref.grads, ref.grads_tol, "gradients"))
        module.zero_grad(set_to_none=True)
    return checks
