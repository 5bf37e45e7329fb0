"""Timing and peak memory: the one synchronized step timer of ``fastvit bench`` and ``bench/``."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from ..progress import Progress

# With --steps not given, time each provider for about this long (at least MIN_STEPS
# steps): enough for a stable median, and bounded when the machine is slow or busy.
TARGET_SECONDS = {"cpu": 4.0, "cuda": 3.0}
MIN_STEPS, MAX_STEPS = 3, 200
# fastvit bench's interleaved rounds (one step of every provider each), --steps not given:
# about this many seconds for all providers together, MIN_ROUNDS..MAX_ROUNDS rounds.
ROUND_TARGET_SECONDS = {"cpu": 20.0, "cuda": 15.0}
MIN_ROUNDS, MAX_ROUNDS = 5, 200


def sync(device=None) -> None:
    """Wait for queued CUDA work (a no-op on CPU), so that a timer sees the work done."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: torch.dtype):
    """torch.autocast for bf16/fp16, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- memory
def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def release_memory(device: torch.device) -> None:
    """Free what the last provider left: Python garbage, CUDA cache, glibc's free heap pages."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:  # hand freed heap pages back so that the next provider's RSS baseline is fair
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def keep_freed_memory() -> bool:
    """Stop glibc from handing large freed buffers back to the kernel (Linux/glibc only);
    ``fastvit bench`` and ``bench/`` call it on CPU. It lasts for the rest of the process.

    By default glibc serves multi-MB tensors with mmap or trims them off the heap when
    freed, so the next call page-faults its output in again; whether that happens depends
    on the allocation history, which other providers in the same run change. It swung one
    op's time by up to 10x between identical runs here (2-core VM), for eager and fastvit
    alike, and a ViT-S training step's fast-cpp/eager ratio from 1.12x to 1.02x when
    ``compile`` was timed in the same rounds. Fixed thresholds keep freed memory in the
    process, as jemalloc/tcmalloc (PyTorch's CPU tuning advice) do, so both sides of every
    ratio are timed on resident memory. FASTVIT_BENCH_DEFAULT_MALLOC=1 keeps glibc's
    defaults. Returns whether the setting took.
    """
    if platform.system() != "Linux" or os.environ.get("FASTVIT_BENCH_DEFAULT_MALLOC") == "1":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
        big = 1 << 30
        return bool(libc.mallopt(m_trim_threshold, big)) and bool(libc.mallopt(m_mmap_threshold, 32 << 20))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        return False


class PeakMemory:
    """Peak memory a provider adds above ``baseline()``, between ``start()`` and ``stop()``, MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at the baseline.
    CPU: the process's peak resident set size (VmHWM, reset at ``start``) above the
    baseline RSS -- approximate; None where the kernel does not offer it. Nothing runs
    during the timed steps (no sampling thread).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self._base: int | None = None
        self._armed = False

    def baseline(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            release_memory(self.device)
            rss = _proc_status_kib("VmRSS")
            self._base = None if rss is None else rss * 1024

    def start(self) -> None:
        """Start recording the peak (called after warm-up: compilation transients excluded)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._armed = self._base is not None and _reset_peak_rss()

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        peak = _proc_status_kib("VmHWM") if self._armed else None
        if peak is None:
            return None
        return max(peak * 1024 - self._base, 0) / 2**20


# ------------------------------------------------------------------------------ steps
def inference_step(module, images, dtype, context):
    """One forward pass, as a user would run inference."""
    module.eval()

    def step():
        with torch.inference_mode(), context(), autocast(images.device, dtype):
            return module(images)

    return step


def train_step(module, images, labels, dtype, context, fused: bool | None = None):
    """One training step: forward, cross-entropy, backward, AdamW step (``fused=True``: the
    single-kernel CUDA AdamW; None: PyTorch's default implementation)."""
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4, fused=fused)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with context():
            with autocast(images.device, dtype):
                loss = F.cross_entropy(module(images), labels)
            loss.backward()
            optimizer.step()
        return loss

    return step


def time_steps(step, device: torch.device, *, warmup: int, steps: int | None, label: str,
               target_s: float, memory: PeakMemory | None = None, stream=None) -> dict:
    """Run ``warmup`` untimed steps, then time ``steps`` (or enough for ``target_s``)."""
    # on a terminal a bar redrawn in place; elsewhere (logs, CI) only the finished line
    progress = Progress(warmup + (steps or MIN_STEPS), label=label, stream=stream)
    warm_start = time.perf_counter()
    for _ in range(warmup):
        step()
        sync(device)
        progress.update()
    warmup_s = time.perf_counter() - warm_start
    if memory is not None:
        memory.start()
    times: list[float] = []
    try:
        while True:
            start = time.perf_counter()
            step()
            sync(device)
            times.append(time.perf_counter() - start)
            if steps is None and len(times) == MIN_STEPS:
                # enough steps to fill target_s at the median pace so far (bounded)
                wanted = int(target_s / max(statistics.median(times), 1e-9))
                progress.total = warmup + min(max(wanted, MIN_STEPS), MAX_STEPS)
            progress.update()
            if len(times) >= progress.total - warmup:
                break
    finally:
        peak = memory.stop() if memory is not None else None
    median = statistics.median(times)
    progress.close(f"{median * 1e3:8.1f} ms/step")
    return {"steps": len(times), "warmup_steps": warmup, "warmup_s": warmup_s, "median_s": median,
            "mean_s": statistics.fmean(times), "min_s": min(times),
            "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
            "times_s": times, "peak_mem_mb": peak}


def time_interleaved(fns: dict, device: torch.device, *, rounds: int, warmup: int = 2,
                     min_round_s: float = 1e-3, reps: int | None = None,
                     on_round=None) -> dict[str, list[float]]:
    """Seconds per call of each of ``fns`` (name -> no-argument callable), A B A B interleaved.

    Warm-up calls (compilation, autotuning) come first and are not timed. Each round times
    every function once, over ``reps`` back-to-back calls (CUDA events on a GPU, the host
    clock after a synchronize on CPU), reps chosen from the warm-up so that a round lasts at
    least ``min_round_s`` (launch overhead and timer resolution stay small), unless ``reps``
    is given (then there is no calibration call: ``fastvit bench`` warms up on its own and
    times one step per round). ``on_round()`` is called after every round (progress).
    Interleaving spreads clock and thermal drift over all functions instead of handing it to one.
    """
    on_cuda = device.type == "cuda"
    counts = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        sync(device)
        if reps is not None:
            counts[name] = reps
            continue
        start = time.perf_counter()
        fn()
        sync(device)
        counts[name] = max(1, min(100, int(min_round_s / max(time.perf_counter() - start, 1e-7))))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if on_cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                for _ in range(counts[name]):
                    fn()
                end.record()
                end.synchronize()
                times[name].append(begin.elapsed_time(end) / 1e3 / counts[name])
            else:
                sync(device)
                start = time.perf_counter()
                for _ in range(counts[name]):
                    fn()
                sync(device)
                times[name].append((time.perf_counter() - start) / counts[name])
        if on_round is not None:
            on_round()
    return times


def ratio_spread(base_s: list[float], times_s: list[float]) -> dict:
    """Per-round speed ratios base time / provider time (>1: faster than the base), summarized.

    Both lists come from the same interleaved rounds, so round i of one is paired with round
    i of the other and the machine's drift cancels within a pair. Returns the median, min,
    max and quartiles (q1, q3) of the ratios, and ``rankable``: False when the interquartile
    range contains 1.0, i.e. the rounds do not agree on which of the two is faster.
    """
    if len(base_s) != len(times_s) or not base_s:
        raise ValueError(f"need the same non-zero number of rounds, got {len(base_s)} and {len(times_s)}")
    ratios = [b / t for b, t in zip(base_s, times_s)]
    if len(ratios) > 1:
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    else:
        q1 = q3 = ratios[0]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "q1": q1, "q3": q3, "rounds": len(ratios), "rankable": not (q1 <= 1.0 <= q3),
            "ratios": ratios}
