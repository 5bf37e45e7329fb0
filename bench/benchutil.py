"""Shared benchmark helpers: device choice, synchronized timing, derived figures.

Import them as ``from benchutil import measure``.

Conventions every benchmark follows, so that ``bench/report.py`` can turn a
``--benchmark-json`` file into ratios:

* ``benchmark.group`` names one comparison (op, pass, shape, dtype); every provider
  measured for it shares the group.
* ``benchmark.extra_info["provider"]`` names what was timed; the PyTorch composition a
  user would otherwise write is ``"eager"``, the baseline for ratios.
* Derived figures go in ``extra_info`` too: ``img_per_s``, ``tflops``, ``gb_per_s``,
  ``peak_mem_mb`` where they apply.

Warm-up (compilation, autotuning, caches) happens in ``warmup_rounds`` and is not
measured; CUDA work is synchronized inside the timed function.
"""

from __future__ import annotations

import os

import torch

from vit.tools.bench.timing import keep_freed_memory, sync

if not torch.cuda.is_available():
    # Triton kernels only run on CPU under the interpreter, which is far too slow to
    # benchmark: CPU benchmarks measure the cpp and torch backends.
    os.environ.pop("TRITON_INTERPRET", None)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"


MALLOC_TUNED = keep_freed_memory()


def measure(benchmark, fn, *, provider: str, group: str, flops: float | None = None,
            nbytes: float | None = None, items: int | None = None, rounds: int | None = None,
            warmup: int | None = None):
    """Time ``fn()`` with pytest-benchmark in pedantic mode and record derived figures.

    flops: floating-point operations per call (-> tflops); nbytes: bytes moved per
    call (-> gb_per_s); items: images per call (-> img_per_s). Returns fn's last result.
    """
    rounds = rounds or (30 if ON_CUDA else 5)
    warmup = warmup if warmup is not None else (5 if ON_CUDA else 1)
    benchmark.group = group
    benchmark.extra_info["provider"] = provider
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if ON_CUDA else "cpu"
    if not ON_CUDA:
        benchmark.extra_info["malloc_tuned"] = MALLOC_TUNED
    result = {}

    def timed():
        result["out"] = fn()
        sync()

    if ON_CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=warmup)
    median = benchmark.stats.stats.median  # what bench/report.py compares, robust to stalled rounds
    if flops is not None:
        benchmark.extra_info["tflops"] = flops / median / 1e12
    if nbytes is not None:
        benchmark.extra_info["gb_per_s"] = nbytes / median / 1e9
    if items is not None:
        benchmark.extra_info["img_per_s"] = items / median
    if ON_CUDA:
        benchmark.extra_info["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result.get("out")


def available(backend_name: str) -> str | None:
    """None if ``backend_name`` can run on DEVICE here, else the reason (for pytest.skip)."""
    import fastvit_kernels

    info = fastvit_kernels.available_backends()[backend_name]
    if not info.available:
        return info.reason
    if DEVICE.type not in info.devices:
        return f"{backend_name} does not run on {DEVICE.type} tensors"
    return None
