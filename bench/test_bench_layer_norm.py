"""LayerNorm and residual-add + LayerNorm, forward and backward: fastvit vs eager.

Providers: each fastvit backend that runs on this device (``triton`` on CUDA, ``cpp``
on CPU when built, ``torch`` = the reference through the dispatcher), and ``eager``:
``F.layer_norm`` (after a separate ``x + residual`` for the fused op), the baseline.

``gb_per_s`` counts the bytes the op must move at least, the same for every provider:
layer_norm forward reads x and writes y (2 rows of traffic per row), backward reads x
and dy and writes dx (3); add_layer_norm forward reads x and residual and writes
normed and summed (4), backward reads summed, dnormed, dsummed and writes one dx (4).
Weight, bias and the fp32 statistics are left out (under 1% at these widths).

CPU: small shapes in fp32 (the Triton interpreter is never benchmarked). CUDA: ViT-B
(256 x 197 tokens, width 768) and ViT-L/384 (64 x 577, 1024) in bf16.
"""

import pytest
import torch
import torch.nn.functional as F
from benchutil import DEVICE, ON_CUDA, available, measure

import fastvit_kernels as fk

EPS = 1e-6
if ON_CUDA:
    SHAPES = [(256 * 197, 768, torch.bfloat16), (64 * 577, 1024, torch.bfloat16)]
else:
    SHAPES = [(8 * 197, 384, torch.float32)]
PROVIDERS = ["eager", "triton", "cpp", "torch"]
# rows of traffic per row of input: (op, pass) -> count (see the module docstring)
TRAFFIC = {("layer_norm", "fwd"): 2, ("layer_norm", "bwd"): 3,
           ("add_layer_norm", "fwd"): 4, ("add_layer_norm", "bwd"): 4}


def _eager(op):
    if op == "layer_norm":
        return lambda x, residual, w, b: F.layer_norm(x, x.shape[-1:], w, b, EPS)

    def add_then_norm(x, residual, w, b):
        summed = x + residual
        return F.layer_norm(summed, summed.shape[-1:], w, b, EPS), summed
    return add_then_norm


def _fastvit(op, name):
    def run(x, residual, w, b):
        with fk.backend(name):
            if op == "layer_norm":
                return fk.layer_norm(x, w, b, EPS)
            return fk.add_layer_norm(x, residual, w, b, EPS)
    return run


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}-{str(s[2])[6:]}")
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
def test_layer_norm(benchmark, op, direction, shape, provider):
    if provider != "eager":
        reason = available(provider)
        if reason:
            pytest.skip(reason)
    rows, width, dtype = shape
    fn = _eager(op) if provider == "eager" else _fastvit(op, provider)
    grad = direction == "bwd"
    x = torch.randn(rows, width, device=DEVICE, dtype=dtype).mul_(2.0).add_(1.0).requires_grad_(grad)
    residual = torch.randn(rows, width, device=DEVICE, dtype=dtype).requires_grad_(grad)
    w = torch.randn(width, device=DEVICE, dtype=dtype).requires_grad_(grad)
    b = torch.randn(width, device=DEVICE, dtype=dtype).requires_grad_(grad)
    group = f"{op}-{direction}-{rows}x{width}-{str(dtype)[6:]}"
    nbytes = TRAFFIC[(op, direction)] * x.numel() * x.element_size()

    if direction == "fwd":
        with torch.no_grad():
            measure(benchmark, lambda: fn(x, residual, w, b), provider=provider, group=group,
                    nbytes=nbytes)
        return

    outs = fn(x, residual, w, b)
    outs = outs if isinstance(outs, tuple) else (outs,)
    upstream = [torch.randn_like(o) for o in outs]
    inputs = (x, w, b) if op == "layer_norm" else (x, residual, w, b)
    # autograd.grad instead of .backward(): no .grad accumulation in the timed region.
    measure(benchmark, lambda: torch.autograd.grad(outs, inputs, upstream, retain_graph=True),
            provider=provider, group=group, nbytes=nbytes)
