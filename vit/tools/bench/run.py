"""``fastvit bench``: parity first, then images per second for every provider.

For one model, batch and dtype: check every provider's logits (and with ``train`` its
gradients) against the fp32 reference on the same weights and images (``parity``); time
inference (and a training step) of those that pass, warm-up excluded (``timing``); print a
table and write results.json (+ results.png) (``report``). A provider that fails parity is
reported with its max |diff| and never timed.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict

import torch

import fastvit_kernels
from vit.model import ViT, count_flops

from . import providers as registry
from .parity import FP32_RTOL, check_parity, reference_outputs
from .report import environment, format_table, write
from .settings import Settings, make_settings
from .timing import TARGET_SECONDS, PeakMemory, inference_step, release_memory, time_steps, train_step


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def run(settings: Settings, stream=None) -> dict:
    """The whole job; returns what goes into results.json (progress goes to ``stream``)."""
    stream = stream or sys.stderr
    device, dtype = settings.device, settings.torch_dtype
    job_start = time.perf_counter()
    torch.manual_seed(settings.seed)
    reference = ViT(settings.config).to(device).eval()
    cfg = settings.config
    images = torch.randn(settings.batch_size, cfg.in_chans, *cfg.img_hw, device=device)
    labels = torch.randint(0, max(cfg.num_classes, 1), (settings.batch_size,), device=device)

    stream.write(f"parity vs the fp32 reference ({settings.dtype}"
                 f"{', logits + gradients' if settings.train else ', logits'}):\n")
    ref = reference_outputs(reference, images, labels, dtype, with_grads=settings.train)
    rows = []
    for name in settings.providers:
        provider = registry.get_provider(name)
        row = {"provider": name, "description": provider.description, "status": "ok",
               "reason": "", "parity": [], "inference": None, "train": None}
        rows.append(row)
        reason = registry.unavailable_reason(name, device, cfg)
        if reason:
            row.update(status="unavailable", reason=reason)
            stream.write(f"  {name:<14s} unavailable: {reason}\n")
            continue
        try:
            module = provider.build(reference)
            checks = check_parity(module, ref, dtype, provider.context)
        except Exception as exc:  # a provider that cannot even run is reported, not fatal
            row.update(status="error", reason=_error(exc))
            stream.write(f"  {name:<14s} error: {row['reason']}\n")
            continue
        finally:
            module = None
            release_memory(device)
        row["parity"] = [asdict(c) for c in checks]
        failed = [c for c in checks if not c.ok]
        if failed:
            row.update(status="parity-failed", reason="; ".join(c.detail for c in failed))
        summary = ", ".join(f"{c.what} max|diff| {c.max_diff:.2e} (tol {c.tolerance:.2e})" for c in checks)
        stream.write(f"  {name:<14s} {'ok    ' if not failed else 'FAILED'} {summary}\n")

    stream.write(f"timing ({settings.batch_size} images per step, warm-up "
                 f"{settings.warmup} step(s) not timed):\n")
    target = TARGET_SECONDS[device.type]
    for row in rows:
        if row["status"] != "ok":
            continue
        provider = registry.get_provider(row["provider"])
        for mode in ["inference"] + (["train"] if settings.train else []):
            memory = PeakMemory(device)
            try:
                memory.baseline()
                module = provider.build(reference)
                if mode == "inference":
                    step = inference_step(module, images, dtype, provider.context)
                else:
                    step = train_step(module, images, labels, dtype, provider.context)
                timing = time_steps(step, device, warmup=settings.warmup, steps=settings.steps,
                                    label=f"{row['provider']} {mode}", target_s=target,
                                    memory=memory, stream=stream)
            except Exception as exc:
                stream.write("\n")
                row.update(status="error", reason=f"{mode}: {_error(exc)}")
                break
            finally:
                module = step = None
                release_memory(device)
            timing["img_per_s"] = settings.batch_size / timing["median_s"]
            row[mode] = timing
    _add_ratios(rows)
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
            "gflops_per_image_forward": flops / 1e9, "memory_kind": PeakMemory(device).kind,
            "parity_rule": (f"fp32: max|diff| <= {FP32_RTOL:g} * max|ref|; low precision: "
                            "<= 2 * reference's own low-precision error + 1 ulp * max|ref|"),
            "timing": "median of timed steps; warm-up and compilation excluded; CUDA synchronized",
        },
        "results": rows,
        "elapsed_s": time.perf_counter() - job_start,
    }


def _add_ratios(rows: list[dict]) -> None:
    eager = next((r for r in rows if r["provider"] == "eager"), None)
    for row in rows:
        row["speedup_vs_eager"] = {}
        for mode in ("inference", "train"):
            base = eager and eager.get(mode)
            if row.get(mode) and base:
                row["speedup_vs_eager"][mode] = row[mode]["img_per_s"] / base["img_per_s"]


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
                         if registry.unavailable_reason(n, probe.device, probe.config) is None]
        settings = make_settings(providers=providers, **settings_kwargs)
    except ValueError as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    if args.list_providers:
        for name in registry.provider_names():
            reason = registry.unavailable_reason(name, settings.device, settings.config)
            default = "default" if name in registry.default_providers(settings.device, settings.config) else ""
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
