"""Attention, forward and forward+backward: fastvit backends vs PyTorch SDPA.

Providers:

* ``eager``: ``F.scaled_dot_product_attention`` with PyTorch's own backend choice, the
  baseline for ratios;
* ``sdpa_flash`` / ``sdpa_efficient`` / ``sdpa_math`` / ``sdpa_cudnn``: the same call
  pinned to one backend with ``torch.nn.attention.sdpa_kernel`` (skipped, with PyTorch's
  reason, where that backend cannot run the shape / dtype / device);
* each fastvit backend that runs on this device (``triton`` on CUDA, ``cpp`` on CPU when
  built, ``torch`` = the reference through the dispatcher) on (B, H, N, d) inputs, and
  ``triton_packed``: ``packed_attention`` on the (B, N, 3*D) qkv tensor the model has
  (same FLOPs, no permutes around it).

``tflops`` counts 4*B*H*N*N*d per forward (two matmuls) and 2.5x that for the backward,
so 3.5x for forward+backward, whatever a provider actually computes (padding, recompute).

CPU: one small shape in fp32 (the Triton interpreter is never benchmarked). CUDA: ViT
shapes in bf16: ViT-B/16 at 224 (256, 12, 197, 64), ViT-L/16 at 384 (64, 16, 577, 64),
ViT-L/14 at 448 (32, 16, 1025, 64), ViT-H/14 at 224 (64, 16, 257, 80).
"""

import pytest
import torch
import torch.nn.functional as F
from benchutil import DEVICE, ON_CUDA, available, measure

import fastvit_kernels as fk

if ON_CUDA:
    SHAPES = [(256, 12, 197, 64), (64, 16, 577, 64), (32, 16, 1025, 64), (64, 16, 257, 80)]
    DTYPE = torch.bfloat16
else:
    SHAPES = [(2, 6, 197, 64)]
    DTYPE = torch.float32
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_efficient": "EFFICIENT_ATTENTION",
                 "sdpa_math": "MATH", "sdpa_cudnn": "CUDNN_ATTENTION"}
PROVIDERS = ["eager", *SDPA_BACKENDS, "triton", "triton_packed", "cpp", "torch"]
BACKWARD_FACTOR = 2.5


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name, None)
    if backend is None:
        pytest.skip(f"this PyTorch has no SDPBackend.{backend_name}")

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def _fastvit(name):
    def run(q, k, v):
        with fk.backend(name):
            return fk.attention(q, k, v)
    return run


def _fastvit_packed(heads):
    def run(qkv):
        with fk.backend("triton"):
            return fk.packed_attention(qkv, heads)
    return run


def _inputs(provider, shape, requires_grad):
    batch, heads, tokens, head_dim = shape
    if provider == "triton_packed":
        qkv = torch.randn(batch, tokens, 3 * heads * head_dim, device=DEVICE, dtype=DTYPE)
        return [qkv.requires_grad_(requires_grad)]
    return [torch.randn(shape, device=DEVICE, dtype=DTYPE).requires_grad_(requires_grad) for _ in range(3)]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_attention(benchmark, direction, shape, provider):
    batch, heads, tokens, head_dim = shape
    if provider == "eager":
        fn = F.scaled_dot_product_attention
    elif provider in SDPA_BACKENDS:
        fn = _sdpa(SDPA_BACKENDS[provider])
    elif provider == "triton_packed":
        reason = available("triton")
        if reason:
            pytest.skip(f"triton: {reason}")
        fn = _fastvit_packed(heads)
    else:
        reason = available(provider)
        if reason:
            pytest.skip(f"{provider}: {reason}")
        fn = _fastvit(provider)

    inputs = _inputs(provider, shape, requires_grad=direction != "fwd")
    try:  # a pinned SDPA backend raises when it cannot run this call: skip with its reason
        out = fn(*inputs)
    except RuntimeError as exc:
        pytest.skip(f"{provider} cannot run {shape} {DTYPE}: {str(exc).splitlines()[0]}")
    flops = 4 * batch * heads * tokens * tokens * head_dim

    if direction == "fwd":
        def step():
            with torch.no_grad():
                return fn(*inputs)
    else:
        flops *= 1 + BACKWARD_FACTOR
        grad_out = torch.randn_like(out)

        def step():
            return torch.autograd.grad(fn(*inputs), inputs, grad_out)

    group = f"attention-{direction}-{'x'.join(map(str, shape))}-{str(DTYPE)[6:]}"
    measure(benchmark, step, provider=provider, group=group, flops=flops)
    benchmark.extra_info["shape"] = list(shape)
    benchmark.extra_info["dtype"] = str(DTYPE)
