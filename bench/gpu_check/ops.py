"""Per-op timings: each fused op against what it replaces, fwd and fwd+bwd, interleaved rounds.

A case builds its inputs, one callable per provider ("fast" is ours, the rest are the PyTorch
code it replaces), and the FLOPs / minimum bytes of one call. Times are medians of
``vit.tools.bench.timing.time_interleaved`` rounds; ratios are provider time / fast time.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastvit_kernels as fk
from fastvit_kernels import reference
from vit.tools.bench.timing import sync, time_interleaved

# The fast provider each baseline is compared with ("fast" unless named here): timm's
# permute + SDPA starts from the packed qkv tensor, as packed_attention does.
FAST_COUNTERPART = {"timm-permute-sdpa": "fast-packed"}
# Providers that compute something else (the bare GEMM has no GELU): no value comparison.
OTHER_FUNCTION = {"linear"}


@dataclass(frozen=True)
class Shapes:
    """The op shapes of one model: forwards at ``batch``, forward + backward at ``train_batch``
    (the end-to-end batches, so that the end-to-end runs reuse these autotunings)."""

    name: str
    batch: int
    train_batch: int
    img: int
    patch: int
    dim: int
    hidden: int
    heads: int
    chans: int = 3

    @property
    def tokens(self) -> int:
        return (self.img // self.patch) ** 2 + 1


def _rand(device, dtype, *shape, scale=1.0, grad=False):
    return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(grad)


def _triton(fn):
    def run(*args):
        with fk.backend("triton"):
            return fn(*args)
    return run


def _sdpa_pinned(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v)
    return run


def _timm_attention(heads):
    """What timm's Attention does around SDPA: split the packed qkv, permute, SDPA, permute back."""
    def run(qkv):
        b, n, width = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width // 3)
    return run


def cases(s: Shapes, device, dtype, attention_shapes=()):
    """(op, shape label, make) for every op at shapes ``s``, then attention at each (B, H, N, d).

    make(grad) -> (providers {name: (fn, inputs)}, FLOPs, minimum bytes) of one call.
    """
    m, d, h, es = s.batch * s.tokens, s.dim, s.hidden, torch.finfo(dtype).bits // 8

    def layer_norm(grad):
        x = _rand(device, dtype, m, d, grad=grad)
        w, b = _rand(device, dtype, d, grad=grad), _rand(device, dtype, d, grad=grad)
        return ({"fast": (_triton(fk.layer_norm), (x, w, b)),
                 "eager": (lambda x, w, b: F.layer_norm(x, (d,), w, b, 1e-6), (x, w, b))},
                None, (5 if grad else 2) * m * d * es)

    def add_layer_norm(grad):
        x, r = _rand(device, dtype, m, d, grad=grad), _rand(device, dtype, m, d, grad=grad)
        w, b = _rand(device, dtype, d, grad=grad), _rand(device, dtype, d, grad=grad)

        def eager(x, r, w, b):
            total = x + r
            return F.layer_norm(total, (d,), w, b, 1e-6), total
        return ({"fast": (_triton(fk.add_layer_norm), (x, r, w, b)), "eager": (eager, (x, r, w, b))},
                None, (8 if grad else 4) * m * d * es)

    def linear_gelu(grad):
        x, w = _rand(device, dtype, m, d, grad=grad), _rand(device, dtype, h, d, scale=d ** -0.5, grad=grad)
        b = _rand(device, dtype, h, grad=grad)
        return ({"fast": (_triton(fk.linear_gelu), (x, w, b)),
                 "eager": (lambda x, w, b: F.gelu(F.linear(x, w, b)), (x, w, b)),
                 "linear": (F.linear, (x, w, b))},
                2 * m * d * h * (3 if grad else 1), None)

    def patch_embed(grad):
        grid, fan_in = s.img // s.patch, s.chans * s.patch ** 2
        images = _rand(device, dtype, s.batch, s.chans, s.img, s.img)
        w = _rand(device, dtype, d, s.chans, s.patch, s.patch, scale=fan_in ** -0.5, grad=grad)
        b, pos = _rand(device, dtype, d, grad=grad), _rand(device, dtype, 1, s.tokens, d, scale=0.02, grad=grad)
        cls = _rand(device, dtype, 1, 1, d, scale=0.02, grad=grad)
        args = (images, w, b, pos, cls)
        return ({"fast": (_triton(fk.patch_embed), args), "eager": (reference.patch_embed, args)},
                2 * s.batch * grid * grid * d * fan_in * (2 if grad else 1), None)

    for op, make in (("layer_norm", layer_norm), ("add_layer_norm", add_layer_norm),
                     ("linear_gelu", linear_gelu), ("patch_embed", patch_embed)):
        yield op, s.name, make
    for shape in attention_shapes:
        yield "attention", "x".join(map(str, shape)), _attention_case(shape, device, dtype)


def _attention_case(shape, device, dtype):
    b, heads, n, hd = shape

    def make(grad):
        q, k, v = (_rand(device, dtype, b, heads, n, hd, grad=grad) for _ in range(3))
        qkv = _rand(device, dtype, b, n, 3 * heads * hd, grad=grad)
        providers = {"fast": (_triton(fk.attention), (q, k, v)),
                     "fast-packed": (_triton(lambda t: fk.packed_attention(t, heads)), (qkv,)),
                     "sdpa": (F.scaled_dot_product_attention, (q, k, v)),
                     "timm-permute-sdpa": (_timm_attention(heads), (qkv,))}
        for name, backend in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION"),
                              ("sdpa-efficient", "EFFICIENT_ATTENTION")):
            providers[name] = (_sdpa_pinned(backend), (q, k, v))
        return providers, 4 * b * heads * n * n * hd * (3.5 if grad else 1), None
    return make


def _step(fn, inputs, grad: bool):
    """A no-argument call: forward under no_grad, or forward + backward of every input that needs it."""
    if not grad:
        def fwd():
            with torch.no_grad():
                return fn(*inputs)
        return fwd
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    grads = [torch.randn_like(o) for o in outs]

    def fwd_bwd():
        result = fn(*inputs)
        return torch.autograd.grad(result if isinstance(result, tuple) else (result,), wrt, grads)
    return fwd_bwd


def _rel_diff(a, b) -> float:
    a, b = (a[0] if isinstance(a, tuple) else a).float(), (b[0] if isinstance(b, tuple) else b).float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_case(op: str, shape: str, make, direction: str, device, rounds: int) -> dict:
    """Time every provider of one case; a provider that cannot run is recorded with its error."""
    grad = direction == "fwd+bwd"
    providers, flops, nbytes = make(grad)
    row = {"op": op, "shape": shape, "case": f"{op} {shape}", "direction": direction,
           "flops": flops, "bytes": nbytes, "providers": {}, "fast_speedup": {}}
    steps, fast_out = {}, None
    fast_inputs = providers["fast"][1]
    for name, (fn, inputs) in providers.items():
        try:
            start = time.perf_counter()
            steps[name] = _step(fn, inputs, grad)
            steps[name]()   # the first call: compilation, autotuning, or the error of a backend that cannot run
            sync(device)
            first_call_s = time.perf_counter() - start
            same_inputs = len(inputs) == len(fast_inputs) and all(a is b for a, b in zip(inputs, fast_inputs))
            if not grad and name not in OTHER_FUNCTION and same_inputs:
                with torch.no_grad():
                    out = fn(*inputs)
                if name == "fast":
                    fast_out = out
                elif fast_out is not None:
                    row["providers"][name] = {"rel_diff_vs_fast": _rel_diff(fast_out, out)}
            row["providers"].setdefault(name, {})["first_call_s"] = first_call_s
        except Exception as exc:  # e.g. a pinned SDPA backend that cannot run this shape
            steps.pop(name, None)
            row["providers"][name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    times = time_interleaved(steps, torch.device(device), rounds=rounds, warmup=2)
    for name, samples in times.items():
        median = statistics.median(samples)
        entry = row["providers"].setdefault(name, {})
        entry.update(median_us=median * 1e6, rounds=len(samples),
                     spread=(max(samples) - min(samples)) / median if median else None)
        if flops:
            entry["tflops"] = flops / median / 1e12
        if nbytes:
            entry["gb_per_s"] = nbytes / median / 1e9
    for name, entry in row["providers"].items():
        ours = row["providers"].get(FAST_COUNTERPART.get(name, "fast"), {}).get("median_us")
        if not name.startswith("fast") and ours and entry.get("median_us"):
            row["fast_speedup"][name] = entry["median_us"] / ours
    return row
