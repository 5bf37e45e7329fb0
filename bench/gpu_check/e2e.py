"""End to end: img/s of one model, fast vs eager vs torch.compile(reference) vs Hugging Face.

Built on ``vit.tools.bench`` (providers, parity, timing): every provider is parity-checked
against the fp32 reference on a few images first, and only those that pass are timed.
Inference for every provider first, then training (fwd + bwd + fused AdamW on CUDA).
"""

from __future__ import annotations

import time

import torch

from vit.model import ViT, count_flops
from vit.tools.bench import providers as registry
from vit.tools.bench.parity import check_parity, reference_outputs
from vit.tools.bench.timing import PeakMemory, inference_step, release_memory, time_steps, train_step

PARITY_IMAGES = 8


def run_model(rec, deadline, *, label: str, config, providers: list[str], dtype, device,
              batches: dict, steps: int, warmup: int, peak_tflops: float, estimates: dict) -> None:
    """Append one row per (mode, provider) to rec.results["e2e"], saving after each.

    batches: {"inference": B, "train": B}; estimates: {provider: seconds a mode is expected
    to need, compilation included}: a provider that does not fit what is left is skipped.
    """
    torch.manual_seed(0)
    reference = ViT(config).to(device).eval()
    n = PARITY_IMAGES
    images = torch.randn(n, config.in_chans, *config.img_hw, device=device)
    labels = torch.randint(0, config.num_classes, (n,), device=device)
    ref = reference_outputs(reference, images, labels, dtype, with_grads=True)
    flops_fwd = count_flops(config)
    passed = {}
    for mode, batch in batches.items():
        x = torch.randn(batch, config.in_chans, *config.img_hw, device=device)
        y = torch.randint(0, config.num_classes, (batch,), device=device)
        eager_ips = None
        for name in providers:
            # "running" until timed: a section stopped at its deadline leaves it "interrupted"
            row = {"model": label, "mode": mode, "batch": batch, "provider": name, "status": "running"}
            rec.results["e2e"].append(row)
            provider = registry.get_provider(name)
            reason = registry.unavailable_reason(name, device, config)
            if reason is None and not deadline.allows(estimates.get(name, 10)):
                reason = f"budget: {deadline.left():.0f} s left, ~{estimates.get(name, 10)} s needed"
            if reason is None and name not in passed:
                try:
                    checks = check_parity(provider.build(reference), ref, dtype, provider.context)
                    passed[name] = all(c.ok for c in checks)
                    row["parity"] = "; ".join(f"{c.what} {c.max_diff:.1e}<={c.tolerance:.1e}"
                                              f"{'' if c.ok else ' FAILED'}" for c in checks)
                except Exception as exc:
                    passed[name], reason = False, f"parity: {type(exc).__name__}: {str(exc)[:200]}"
                release_memory(device)
            if reason or not passed.get(name):
                row.update(status="skipped" if reason else "parity-failed", reason=reason or row.get("parity"))
            else:
                _time(row, provider, reference, x, y, mode, dtype, device, steps, warmup)
                if row["status"] == "ok":
                    row["mfu"] = row["img_per_s"] * flops_fwd * (3 if mode == "train" else 1) / (peak_tflops * 1e12)
                    eager_ips = row["img_per_s"] if name == "eager" else eager_ips
            rec.log(f"e2e {label} {mode} {name}: {row['status']} "
                    f"{row.get('img_per_s', 0):.1f} img/s {row.get('reason') or ''}")
            _ratios(rec.results["e2e"], label, mode)
            rec.save()


def _time(row, provider, reference, x, y, mode, dtype, device, steps, warmup) -> None:
    memory = PeakMemory(device)
    module = step = None
    start = time.perf_counter()
    try:
        memory.baseline()
        module = provider.build(reference)
        if mode == "inference":
            step = inference_step(module, x, dtype, provider.context)
        else:
            step = train_step(module, x, y, dtype, provider.context, fused=device.type == "cuda")
        timing = time_steps(step, device, warmup=warmup, steps=steps, label=f"{row['provider']} {mode}",
                            target_s=0.0, memory=memory)
        row.update(status="ok", img_per_s=row["batch"] / timing["median_s"], median_ms=timing["median_s"] * 1e3,
                   steps=timing["steps"], warmup_s=timing["warmup_s"], peak_mem_mb=timing["peak_mem_mb"])
    except Exception as exc:
        row.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    finally:
        module = step = None
        release_memory(device)
        row["elapsed_s"] = time.perf_counter() - start


def _ratios(rows: list[dict], label: str, mode: str) -> None:
    """fast_speedup: fast img/s over this row's img/s, for every row of (label, mode)."""
    group = [r for r in rows if r["model"] == label and r["mode"] == mode]
    fast = next((r for r in group if r["provider"] == "fast" and r.get("img_per_s")), None)
    for r in group:
        if fast and r.get("img_per_s"):
            r["fast_speedup"] = fast["img_per_s"] / r["img_per_s"]
