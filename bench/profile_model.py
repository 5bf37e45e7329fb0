"""Where a ViT forward spends its time on this machine: torch.profiler, per op.

    python bench/profile_model.py [--model vit_small_patch16_224] [--batch 8] [--iters 3]

Profiles the plain reference ``vit.ViT`` and ``vit.fast.ViT`` (same weights, inference,
fp32, the backend ``auto`` picks), their forwards interleaved, and prints each one's top ops, then the share of the
reference's time spent in the matrix products both models run identically (``addmm``,
``mm``, the patch convolution). That share bounds what fusing everything else can win:
with a fraction g of the time in identical GEMMs, no fast model is more than 1/g faster.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchutil  # noqa: E402,F401  -- same allocator setting as the benchmarks

from vit import ViT  # noqa: E402
from vit.config import get_config  # noqa: E402
from vit.fast import ViT as FastViT  # noqa: E402

GEMM_OPS = ("aten::addmm", "aten::addmm_", "aten::mm", "aten::mkldnn_convolution", "aten::convolution_overrideable")


def profile_alternating(models: dict, images: torch.Tensor, iters: int) -> dict:
    """{name: {op: self CPU us summed over iters}}, the models' forwards interleaved.

    Interleaving spreads the machine's slow spells (a shared VM) over both models
    instead of handing them to whichever ran second.
    """
    totals: dict[str, dict[str, float]] = {name: {} for name in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up: extension load, first allocations
            model(images)
        for _ in range(iters):
            for name, model in models.items():
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    model(images)
                for event in prof.key_averages():
                    totals[name][event.key] = totals[name].get(event.key, 0.0) + event.self_cpu_time_total
    return totals


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=6)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    cfg = get_config(args.model)
    ref = ViT(cfg).eval()
    fast = FastViT(cfg).eval()
    fast.load_state_dict(ref.state_dict(), strict=True)
    images = torch.randn(args.batch, cfg.in_chans, *cfg.img_hw)
    print(f"{args.model}, batch {args.batch}, fp32, {torch.get_num_threads()} threads, "
          f"{args.iters} forwards per model; fast model backends: {fast.backends()}")
    totals = profile_alternating({"reference": ref, "fast": fast}, images, args.iters)
    for name, times in totals.items():
        total = sum(times.values())
        gemm = sum(t for op, t in times.items() if op in GEMM_OPS)
        print(f"\n== {name}: {total / 1e3 / args.iters:.1f} ms per forward (profiled), "
              f"{100 * gemm / total:.1f}% in GEMMs ({', '.join(GEMM_OPS)})")
        for op, t in sorted(times.items(), key=lambda kv: -kv[1])[:10]:
            print(f"  {op:50s} {t / 1e3 / args.iters:9.2f} ms  {100 * t / total:5.1f}%")
        if name == "reference":
            print(f"Bound from the identical GEMMs alone: a fast model can be at most "
                  f"{total / gemm:.2f}x faster than this reference here.")


if __name__ == "__main__":
    main()
