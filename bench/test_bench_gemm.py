"""The fused GEMMs, forward and forward+backward: fastvit backends vs eager vs the bare GEMM.

Ops: ``linear_gelu`` (ViT MLP fc1) and ``patch_embed`` (projection + cls + pos).

Providers:

* ``eager``: the PyTorch composition a user would write (``F.gelu(F.linear(...))``;
  ``conv2d`` + flatten + cat + add), the baseline for ratios;
* ``gemm``: the matrix product alone (``x @ W.T``, cuBLAS on a GPU; for the embedding,
  ``patches @ W.T`` on a patch matrix built outside the timing): the speed of light
  for a fused epilogue;
* each fastvit backend that runs this op on this device: ``triton`` on CUDA, ``cpp``
  on CPU when built, ``torch`` = the reference through the dispatcher.

``tflops`` counts 2*M*N*K per forward GEMM; forward+backward counts the backward GEMMs
too (dX and dW for linear_gelu: 3x; dW only for patch_embed, whose images need no
gradient in training: 2x), whatever a provider actually computes.

CPU: small fp32 shapes (ViT-S/16, batch 8; the Triton interpreter is never
benchmarked). CUDA: ViT-B/16 in bf16: M = 256*197, K = 768, N = 3072 for the MLP and
256 images of 224x224 for the embedding.
"""

import pytest
import torch
from benchutil import DEVICE, ON_CUDA, available, measure

import fastvit_kernels as fk
from fastvit_kernels import reference

if ON_CUDA:
    DTYPE = torch.bfloat16
    LINEAR = (256 * 197, 768, 3072)        # M, K, N
    EMBED = (256, 3, 224, 16, 768)          # images, channels, size, patch, dim
else:
    DTYPE = torch.float32
    LINEAR = (8 * 197, 384, 1536)
    EMBED = (8, 3, 224, 16, 384)
PROVIDERS = ["eager", "gemm", "triton", "cpp", "torch"]


def _skip_unless_runs(provider: str, op: str) -> None:
    reason = available(provider)
    if reason is None and op not in fk.available_backends()[provider].ops:
        reason = f"does not implement {op}"
    if reason:
        pytest.skip(f"{provider}: {reason}")


def _rand(*shape, scale=1.0, requires_grad=False):
    t = torch.randn(*shape, device=DEVICE, dtype=torch.float32) * scale
    return t.to(DTYPE).requires_grad_(requires_grad)


def _time(benchmark, direction, fn, inputs, wrt, group, provider, flops, backward_factor):
    if direction == "fwd":
        def step():
            with torch.no_grad():
                return fn(*inputs)
    else:
        flops *= 1 + backward_factor
        grad_out = torch.randn_like(fn(*inputs))

        def step():
            return torch.autograd.grad(fn(*inputs), wrt, grad_out)
    measure(benchmark, step, provider=provider, group=group, flops=flops)
    benchmark.extra_info["dtype"] = str(DTYPE)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_linear_gelu(benchmark, direction, provider):
    m, k, n = LINEAR
    train = direction != "fwd"
    x = _rand(m, k, requires_grad=train)
    w = _rand(n, k, scale=k ** -0.5, requires_grad=train)
    b = _rand(n, requires_grad=train)
    inputs, wrt = [x, w, b], [x, w, b]
    if provider == "eager":
        fn = reference.linear_gelu
    elif provider == "gemm":
        fn, inputs, wrt = (lambda x, w: x @ w.T), [x, w], [x, w]
    else:
        _skip_unless_runs(provider, "linear_gelu")

        def fn(x, w, b):
            with fk.backend(provider):
                return fk.linear_gelu(x, w, b)
    group = f"linear_gelu-{direction}-{m}x{k}x{n}-{str(DTYPE)[6:]}"
    _time(benchmark, direction, fn, inputs, wrt, group, provider, 2 * m * n * k, backward_factor=2)
    benchmark.extra_info["shape"] = [m, k, n]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
def test_patch_embed(benchmark, direction, provider):
    batch, chans, size, patch, dim = EMBED
    grid = size // patch
    fan_in = chans * patch * patch
    train = direction != "fwd"
    images = _rand(batch, chans, size, size)
    w = _rand(dim, chans, patch, patch, scale=fan_in ** -0.5, requires_grad=train)
    b = _rand(dim, requires_grad=train)
    pos = _rand(1, grid * grid + 1, dim, scale=0.02, requires_grad=train)
    cls = _rand(1, 1, dim, scale=0.02, requires_grad=train)
    inputs, wrt = [images, w, b, pos, cls], [w, b, pos, cls]
    if provider == "eager":
        fn = reference.patch_embed
    elif provider == "gemm":
        patches = (images.reshape(batch, chans, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
                   .reshape(batch * grid * grid, fan_in).contiguous())
        fn, inputs, wrt = (lambda p, w: p @ w.reshape(dim, -1).T), [patches, w], [w]
    else:
        _skip_unless_runs(provider, "patch_embed")

        def fn(*args):
            with fk.backend(provider):
                return fk.patch_embed(*args)
    m = batch * grid * grid
    group = f"patch_embed-{direction}-{batch}x{chans}x{size}x{size}-p{patch}-d{dim}-{str(DTYPE)[6:]}"
    _time(benchmark, direction, fn, inputs, wrt, group, provider, 2 * m * dim * fan_in, backward_factor=1)
    benchmark.extra_info["shape"] = [batch, chans, size, size, patch, dim]
    benchmark.extra_info["img_per_s"] = batch / benchmark.stats.stats.mean
