"""The parity rule from DESIGN.md, in one place, for every op and model test.

Compare a fast result against the reference computed in high precision (fp32 for
low-precision inputs, fp64 for fp32 inputs):

* fp32: max |fast - ref| <= 1e-5 * max |ref|  (relative to the output's magnitude).
* fp16 / bf16: max |fast - ref| <= 2 * max |ref_lowp - ref| + one ulp of the output's
  magnitude, where ref_lowp is the reference op run in the same low precision. The ulp
  term only matters when the low-precision reference happens to be exact.
* NaN or inf never passes.
"""

from __future__ import annotations

import torch

FP32_RTOL = 1e-5


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


def rand(*shape, dtype=torch.float32, device="cpu", mean=0.0, std=1.0, requires_grad=False):
    """Random normal inputs with a chosen mean and scale (LayerNorm bugs hide at 0/1)."""
    t = torch.randn(*shape, dtype=torch.float32, device=device) * std + mean
    return t.to(dtype).requires_grad_(requires_grad)
