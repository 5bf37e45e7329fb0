"""``fastvit bench``: parity first, then images per second for every provider.

For one model, batch and dtype: check every provider's logits (and with ``train`` its
gradients) against the fp32 reference on the same weights and images (``parity``); warm up
those that pass, then time them interleaved -- each round one step of every provider in
turn, A B C A B C ..., so that the machine's drift lands on all of them alike -- and report
the median img/s and the median of the per-round ratios vs eager with their spread
(``timing``); print a table and write results.json (+ results.png) (``report``). A provider
that fails parity is reported with its max |diff| and never timed.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from dataclasses import asdict

import torch

import fastvit_kernels
from vit.model import ViT, count_flops

from ..progress import Progress
from . import providers as registry
from .parity import FP32_RTOL, check_parity, reference_outputs
from .report import environment, format_table, write
from .settings import Settings, make_settings
from .timing import (
    MAX_ROUNDS,
    MIN_ROUNDS,
    ROUND_TARGET_SECONDS,
    PeakMemory,
    inference_step,
    keep_freed_memory,
    ratio_spread,
    release_memory,
    sync,
    time_interleaved,
    train_step,
)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def run(settings: Settings, stream=None, modes: list[str] | None = None) -> dict:
    """The whole job; returns what goes into results.json (progress goes to ``stream``).

    ``modes``: what to time, of "inference" and "train" (default: inference, plus train when
    ``settings.train``; parity covers gradients whenever ``settings.train``).
    """
    if modes is None:
        modes = ["inference"] + (["train"] if settings.train else [])
    if "train" in modes and not settings.train:
        raise ValueError("timing 'train' needs settings.train (gradients are checked first)")
    stream = stream or sys.stderr
    device, dtype = settings.device, settings.torch_dtype
    job_start = time.perf_counter()
    malloc_tuned = device.type == "cpu" and keep_freed_memory()
    torch.manual_seed(settings.seed)
    reference = ViT(settings.config).to(device).eval()
    cfg = settings.config
    images = torch.randn(settings.batch_size, cfg.in_chans, *cfg.img_hw, device=device)
    labels = torch.randint(0, max(cfg.num_classes, 1), (settings.batch_size,), device=device)

    stream.write(f"parity vs the fp32 reference ({settings.dtype}"
                 f"{', logits + gradients' if settings.train else ', logits'}):\n")
    ref = reference_outputs(reference, images, labels, dtype, with_grads=settings.train)
    logits_only = dataclasses.replace(ref, grads=None)
    rows, built = [], {}  # built: the parity-checked modules, reused for inference timing
    for name in settings.providers:
        provider = registry.get_provider(name)
        row = {"provider": name, "description": provider.description, "status": "ok",
               "reason": "", "parity": [], "inference": None, "train": None,
               "speedup_vs_eager": {}, "vs_eager": {}, "setup_s": None}
        rows.append(row)
        reason = registry.unavailable_reason(name, device, cfg, settings.dtype)
        if reason:
            row.update(status="unavailable", reason=reason)
            stream.write(f"  {name:<14s} unavailable: {reason}\n")
            continue
        module, setup_start = None, time.perf_counter()
        try:
            module = provider.build(reference)
            checks = check_parity(module, ref if provider.trains else logits_only, dtype, provider.context)
            row["setup_s"] = time.perf_counter() - setup_start  # build + parity: compiling, exporting
        except Exception as exc:  # a provider that cannot even run is reported, not fatal
            row.update(status="error", reason=_error(exc))
            stream.write(f"  {name:<14s} error: {row['reason']}\n")
            module = None
            release_memory(device)
            continue
        row["parity"] = [asdict(c) for c in checks]
        failed = [c for c in checks if not c.ok]
        if failed:
            row.update(status="parity-failed", reason="; ".join(c.detail for c in failed))
            module = None
            release_memory(device)
        else:
            built[name] = module  # compiled / exported once, for parity and timing alike
            if settings.train and not provider.trains:
                row["reason"] = "inference only: no gradients checked, no training step"
        summary = ", ".join(f"{c.what} max|diff| {c.max_diff:.2e} (tol {c.tolerance:.2e})" for c in checks)
        stream.write(f"  {name:<14s} {'ok    ' if not failed else 'FAILED'} {summary}\n")

    for mode in modes:
        _time_mode(mode, rows, built, settings, reference, images, labels, stream)
        built = {}  # training builds fresh modules (a step changes the weights)
        release_memory(device)
    flops = count_flops(cfg)
    return {
        "schema": 1,
        **environment(device),
        "conditions": {
            "model": settings.model, "img_size": list(cfg.img_hw), "patch_size": cfg.patch_size,
            "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
            "num_classes": cfg.num_classes, "batch_size": settings.batch_size, "dtype": settings.dtype,
            "autocast": settings.dtype != "fp32", "device": str(device), "steps": settings.steps,
            "warmup": settings.warmup, "train": settings.train, "providers": settings.providers,
            "malloc_tuned": malloc_tuned,
            "gflops_per_image_forward": flops / 1e9, "memory_kind": PeakMemory(device).kind,
            "parity_rule": (f"fp32: max|diff| <= {FP32_RTOL:g} * max|ref|; low precision: "
                            "<= 2 * reference's own low-precision error + 1 ulp * max|ref|"),
            "timing": ("providers interleaved: each round times one step of every provider in turn; "
                       "img/s from the median step; vs eager: median of the per-round ratios "
                       "(eager step time / provider step time) with min, max, quartiles; rankable: "
                       "the ratios' interquartile range excludes 1.0; warm-up and compilation "
                       "excluded; CUDA synchronized"),
        },
        "results": rows,
        "elapsed_s": time.perf_counter() - job_start,
    }


def _time_mode(mode: str, rows: list[dict], built: dict, settings: Settings, reference, images, labels,
               stream) -> None:
    """Warm up every provider that passed parity, then time them interleaved (one step of each
    per round, ``timing.time_interleaved``); fills ``row[mode]``, ``vs_eager`` and ``speedup_vs_eager``."""
    device, dtype = settings.device, settings.torch_dtype
    stream.write(f"{mode}: warm-up ({settings.warmup} step(s) each, not timed), then "
                 f"one {settings.batch_size}-image step of every provider per round, in turn:\n")
    steps, info = {}, {}
    for row in rows:
        name = row["provider"]
        provider = registry.get_provider(name)
        if row["status"] != "ok" or (mode == "train" and not provider.trains):
            continue
        memory, module, step = PeakMemory(device), None, None
        try:
            memory.baseline()
            module = built.pop(name, None)
            if module is None:
                module = provider.build(reference)
            if mode == "inference":
                step = inference_step(module, images, dtype, provider.context)
            else:
                step = train_step(module, images, labels, dtype, provider.context)
            warm_start = time.perf_counter()
            for _ in range(settings.warmup):
                step()
                sync(device)
            warmup_s = time.perf_counter() - warm_start
            memory.start()  # the peak of one step after warm-up: compilation transients excluded
            one_start = time.perf_counter()
            step()
            sync(device)
            one_s = time.perf_counter() - one_start
            peak = memory.stop()
        except Exception as exc:
            row.update(status="error", reason=f"{mode}: {_error(exc)}")
            stream.write(f"  {name:<14s} error: {row['reason']}\n")
            module = step = None
            release_memory(device)
            continue
        stream.write(f"  {name:<14s} warm-up {warmup_s:6.1f} s, then {one_s * 1e3:8.1f} ms/step\n")
        steps[name] = _guarded(name, step)
        info[name] = {"warmup_steps": settings.warmup, "warmup_s": warmup_s, "peak_mem_mb": peak, "probe_s": one_s}
    if not steps:
        return
    rounds = settings.steps or min(max(int(ROUND_TARGET_SECONDS[device.type] /
                                           max(sum(i["probe_s"] for i in info.values()), 1e-9)),
                                       MIN_ROUNDS), MAX_ROUNDS)
    while steps:
        progress = Progress(rounds, label=f"{mode} x{len(steps)}", stream=stream)
        try:
            times = time_interleaved(steps, device, rounds=rounds, warmup=0, reps=1, on_round=progress.update)
            progress.close(f"{rounds} rounds")
            break
        except _StepFailed as exc:  # drop the provider that failed mid-run, time the others again
            progress.close("interrupted")
            row = next(r for r in rows if r["provider"] == exc.name)
            row.update(status="error", reason=f"{mode}: {_error(exc.__cause__)}")
            del steps[exc.name]
    else:
        return
    base = times.get("eager")
    for row in rows:
        name = row["provider"]
        if name not in times:
            continue
        t = times[name]
        extra = {k: v for k, v in info[name].items() if k != "probe_s"}
        row[mode] = {"steps": len(t), **extra, "median_s": statistics.median(t), "mean_s": statistics.fmean(t),
                     "min_s": min(t), "stdev_s": statistics.stdev(t) if len(t) > 1 else 0.0, "times_s": t,
                     "img_per_s": settings.batch_size / statistics.median(t)}
        if base is not None:
            row["vs_eager"][mode] = ratio_spread(base, t)
            row["speedup_vs_eager"][mode] = row["vs_eager"][mode]["median"]


class _StepFailed(Exception):
    def __init__(self, name: str):
        super().__init__(f"provider {name!r} failed during the timed rounds")
        self.name = name


def _guarded(name: str, step):
    """``step`` that names its provider when it raises, so one failure drops only that provider."""
    def call():
        try:
            return step()
        except Exception as exc:
            raise _StepFailed(name) from exc

    return call


def failed(results: dict) -> list[str]:
    """Providers that failed parity or errored."""
    return [r["provider"] for r in results["results"] if r["status"] in ("parity-failed", "error")]


def main(args, stdout, stderr) -> int:
    """The ``fastvit bench`` command (arguments parsed by ``vit.tools.cli``)."""
    try:
        settings_kwargs = dict(model=args.model, device=args.device, dtype=args.dtype,
                               batch_size=args.batch_size, img_size=args.img_size, steps=args.steps,
                               warmup=args.warmup, train=args.train, out=args.out, seed=args.seed)
        providers = args.providers
        if providers is not None and providers.strip() == "all":
            probe = make_settings(**{**settings_kwargs, "providers": ["eager"]})
            providers = [n for n in registry.provider_names()
                         if registry.unavailable_reason(n, probe.device, probe.config, probe.dtype) is None]
        settings = make_settings(providers=providers, **settings_kwargs)
    except ValueError as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    if args.list_providers:
        for name in registry.provider_names():
            reason = registry.unavailable_reason(name, settings.device, settings.config, settings.dtype)
            default = "default" if name in registry.default_providers(settings.device, settings.config,
                                                                      settings.dtype) else ""
            print(f"  {name:<12s} {'ok' if reason is None else 'unavailable':<12s} {default:<8s} "
                  f"{registry.get_provider(name).description}{'' if reason is None else ' -- ' + reason}",
                  file=stdout)
        return 0

    print("kernel backends:", file=stdout)
    for name, info in fastvit_kernels.available_backends().items():
        print(f"  {name:<7s} {info}", file=stdout)
    cfg = settings.config
    print(f"fastvit bench: {settings.model} {cfg.img_hw[0]}x{cfg.img_hw[1]}, batch {settings.batch_size}, "
          f"{settings.dtype}, {settings.device}"
          f"{f' ({torch.get_num_threads()} threads)' if settings.device.type == 'cpu' else ''}; "
          f"providers: {', '.join(settings.providers)}", file=stdout)
    stdout.flush()
    results = run(settings, stream=stderr)
    results["command"] = " ".join(["fastvit", *args.argv])
    print(format_table(results), file=stdout)
    written = write(results, settings.out)
    print(f"wrote {', '.join(str(p) for p in written)}"
          f"{'' if len(written) > 1 else ' (install matplotlib for the bar chart)'}", file=stdout)
    bad = failed(results)
    if bad:
        print(f"error: {', '.join(bad)} failed parity or could not run; not timed", file=stderr)
        return 1
    return 0
