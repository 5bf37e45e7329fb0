"""The parity rule (ARCHITECTURE.md, "Numerics"), stated once for op tests, model tests and ``fastvit bench``.

A fast result is compared with the reference computed in high precision (fp32 for
low-precision inputs, fp64 for fp32 inputs):

* fp32: max |fast - ref| <= rtol * max |ref|, rtol = ``FP32_RTOL`` for one op and
  ``MODEL_RTOL`` for a whole model's logits and gradients.
* fp16 / bf16: max |fast - ref| <= 2 * max |ref_lowp - ref| + one ulp of the output's
  magnitude, where ref_lowp is the reference run in the same low precision.
* NaN or inf never passes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

FP32_RTOL = 1e-5  # one op
MODEL_RTOL = 1e-4  # a whole model's logits and gradients


def high_precision(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def upcast(*tensors, dtype=None):
    """Detached copies in high precision (keeping requires_grad for backward)."""
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        u = t.detach().to(dtype or high_precision(t.dtype))
        out.append(u.requires_grad_(t.requires_grad))
    return out


def rand(*shape, dtype=torch.float32, device="cpu", mean=0.0, std=1.0, requires_grad=False):
    """Random normal inputs with a chosen mean and scale (LayerNorm bugs hide at 0/1)."""
    t = torch.randn(*shape, dtype=torch.float32, device=device) * std + mean
    return t.to(dtype).requires_grad_(requires_grad)


def tolerance(ref_hi: torch.Tensor, ref_lowp: torch.Tensor | None, dtype: torch.dtype,
              rtol: float = FP32_RTOL) -> float:
    """The largest max |fast - ref_hi| the rule allows for a result in ``dtype``."""
    scale = ref_hi.double().abs().max().item() if ref_hi.numel() else 0.0
    if dtype in (torch.float32, torch.float64):
        return rtol * scale
    if ref_lowp is None:
        raise ValueError(f"a low-precision reference is needed for {dtype}")
    base = (ref_lowp.double() - ref_hi.double()).abs().max().item() if ref_hi.numel() else 0.0
    return 2 * base + torch.finfo(dtype).eps * scale


@dataclass
class Parity:
    """One comparison's verdict; ``detail`` says why it failed."""

    ok: bool
    max_diff: float
    tolerance: float
    what: str = "output"
    detail: str = ""


def compare(what: str, fast, ref_hi: torch.Tensor, tol: float) -> Parity:
    """``fast`` against ``ref_hi`` with an explicit tolerance (see ``tolerance``)."""
    if not isinstance(fast, torch.Tensor):
        return Parity(False, float("inf"), tol, what, f"{what}: expected a tensor, got {type(fast).__name__}")
    if fast.shape != ref_hi.shape:
        return Parity(False, float("inf"), tol, what,
                      f"{what}: shape {tuple(fast.shape)}, expected {tuple(ref_hi.shape)}")
    if not torch.isfinite(fast).all():
        return Parity(False, float("nan"), tol, what, f"{what}: NaN or inf values")
    if fast.numel() == 0:
        return Parity(True, 0.0, tol, what)
    diff = (fast.detach().double() - ref_hi.double()).abs().max().item()
    ok = diff <= tol
    return Parity(ok, diff, tol, what, "" if ok else f"{what}: max |diff| {diff:.3e} > tolerance {tol:.3e}")


def assert_parity(name: str, fast, ref_hi, ref_lowp=None, rtol: float = FP32_RTOL) -> None:
    """Check one output (or gradient) by the parity rule; ``ref_lowp`` needed below fp32."""
    assert fast is not None, f"{name}: missing"
    assert fast.shape == ref_hi.shape, f"{name}: shape {tuple(fast.shape)} != {tuple(ref_hi.shape)}"
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    if fast.numel() == 0:
        return
    err = (fast.double() - ref_hi.double()).abs().max().item()
    scale = ref_hi.double().abs().max().item()
    if fast.dtype in (torch.float32, torch.float64):
        assert err <= rtol * scale, f"{name}: max abs err {err:.3e} > {rtol:g} * {scale:.3e}"
        return
    assert ref_lowp is not None, f"{name}: a low-precision reference is needed for {fast.dtype}"
    base = (ref_lowp.double() - ref_hi.double()).abs().max().item()
    ulp = torch.finfo(fast.dtype).eps * scale
    tol = 2 * base + ulp
    assert err <= tol, (f"{name} ({fast.dtype}): max abs err {err:.3e} > 2 * reference's own "
                        f"error {base:.3e} + ulp {ulp:.1e}")


# ------------------------------------------------------------- forward + backward of one op
def _as_tuple(result) -> tuple:
    return result if isinstance(result, (tuple, list)) else (result,)


def forward_backward(fn: Callable, inputs: Sequence, grads_out: Sequence[torch.Tensor]):
    """Outputs of ``fn(*inputs)`` and the gradients of the inputs that require grad."""
    outs = _as_tuple(fn(*inputs))
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if not wrt:
        return list(outs), []
    return list(outs), list(torch.autograd.grad(outs, wrt, grads_out))


def on_backend(op: str, backend: str) -> Callable:
    """The public ``fastvit_kernels.<op>`` run on one backend (its checks and dispatch included)."""
    import fastvit_kernels as fk

    public = getattr(fk, op)

    def run(*args, **kwargs):
        with fk.backend(backend):
            return public(*args, **kwargs)

    return run


def check_op(name: str, fast_fn: Callable, ref_fn: Callable, inputs: Sequence,
             grads_out: Sequence[torch.Tensor] | None = None, rtol: float = FP32_RTOL) -> dict:
    """Outputs and input gradients of ``fast_fn(*inputs)`` against ``ref_fn`` by the parity rule.

    inputs: tensors (some requiring grad; non-tensor arguments pass through) in the op's
    dtype. grads_out: upstream gradients in the outputs' dtypes (drawn with ``rand`` when not
    given); the high-precision reference gets exact upcasts of the same values. Returns the
    fast results by name: ``out0, out1, ...`` and ``grad0, grad1, ...``.
    """
    detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in inputs]
    if grads_out is None:
        with torch.no_grad():
            probe = _as_tuple(fast_fn(*detached))
        grads_out = [rand(*o.shape, dtype=o.dtype, device=o.device) for o in probe]
    outs, grads = forward_backward(fast_fn, inputs, grads_out)

    def again(cast):  # index tensors (varlen attention's cu_seqlens) pass through as they are
        fresh = [cast(t) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs]
        return forward_backward(ref_fn, fresh, [cast(g) for g in grads_out])

    hi_outs, hi_grads = again(lambda t: upcast(t)[0])
    low_outs, low_grads = [None] * len(hi_outs), [None] * len(hi_grads)
    if any(o.dtype not in (torch.float32, torch.float64) for o in outs):
        low_outs, low_grads = again(lambda t: t.detach().clone().requires_grad_(t.requires_grad))
    assert len(outs) == len(hi_outs), f"{name}: {len(outs)} outputs, the reference has {len(hi_outs)}"
    results = {}
    for i, (fast, hi, low) in enumerate(zip(outs, hi_outs, low_outs)):
        assert_parity(f"{name} out{i}", fast, hi, low, rtol)
        results[f"out{i}"] = fast
    for i, (fast, hi, low) in enumerate(zip(grads, hi_grads, low_grads)):
        assert_parity(f"{name} grad{i}", fast, hi, low, rtol)
        results[f"grad{i}"] = fast
    return results


def check_backend(backend: str, op: str, inputs: Sequence, grads_out: Sequence[torch.Tensor] | None = None,
                  dtype: torch.dtype | None = None) -> dict:
    """``check_op`` of the public op on one backend against ``reference.<op>``; with ``dtype``,
    also that every output and gradient is in it. inputs: the op's arguments, in order."""
    from fastvit_kernels import reference

    results = check_op(f"{op}[{backend}]", on_backend(op, backend), getattr(reference, op), inputs, grads_out)
    for name, value in results.items():
        if dtype is not None:
            assert value.dtype == dtype, f"{op}[{backend}] {name}: dtype {value.dtype}, expected {dtype}"
    return results
