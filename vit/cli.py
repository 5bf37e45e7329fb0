"""``fastvit`` command line: ``fastvit bench`` (the main job)."""

from __future__ import annotations

import argparse
import sys
import time

import torch

import fastvit_kernels
from vit.config import get_config
from vit.factory import model_class


def _time(model, images, steps: int) -> float:
    with torch.inference_mode():
        model(images)  # warm-up
        start = time.perf_counter()
        for _ in range(steps):
            model(images)
        return steps * images.shape[0] / (time.perf_counter() - start)


def bench(args) -> int:
    print("backends:")
    infos = fastvit_kernels.available_backends()
    for name, info in infos.items():
        print(f"  {name:7s} {info}")
    torch.manual_seed(0)
    cfg = get_config(args.model, num_classes=10)
    reference = model_class(False)(cfg).eval()
    images = torch.randn(args.batch_size, cfg.in_chans, *cfg.img_hw)
    with torch.inference_mode():
        expected = reference(images)
    print(f"\n{args.model}, batch {args.batch_size}, fp32, cpu")
    print(f"  {'provider':18s} {'img/s':>8s} {'max |diff|':>11s}")
    print(f"  {'reference eager':18s} {_time(reference, images, args.steps):8.1f} {0.0:11.2e}")
    try:
        fast_cls = model_class(True)
    except NotImplementedError as exc:
        print(f"  (fast model not measured: {exc})")
        return 0
    fast = fast_cls(cfg).eval()
    fast.load_state_dict(reference.state_dict())
    for name, info in infos.items():
        if not info.available or "cpu" not in info.devices:
            continue
        with fastvit_kernels.backend(name), torch.inference_mode():
            diff = (fast(images) - expected).abs().max().item()
            print(f"  {'fast/' + name:18s} {_time(fast, images, args.steps):8.1f} {diff:11.2e}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="run a small ViT through every available backend")
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
