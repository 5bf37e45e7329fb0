"""What a run reports: ``metrics.jsonl`` records, evaluation (loss, top-1), the opening line
and the final summary (``summary.json``)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vit._io import atomic_write_text


class Metrics:
    """Append-only JSONL on rank 0; on resume, records after the resumed step are dropped
    (they will be produced again)."""

    def __init__(self, path: Path, enabled: bool, start_step: int):
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _record_step(line) <= start_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                          for k, v in record.items()}  # strict JSON: NaN/inf become null
                handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def _record_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn last line (the process was killed while writing) is dropped


@torch.no_grad()
def evaluate(module: torch.nn.Module, data, dist_, autocast) -> dict:
    """Loss and top-1 over the whole eval split (each rank a share, summed across ranks)."""
    device = dist_.device
    module.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for images, labels, valid in data.eval_batches():
        with autocast():
            logits = module(images)
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        loss_sum += (losses * valid).sum().double()
        correct += ((logits.argmax(-1) == labels) & valid).sum().double()
        count += valid.sum().double()
    module.train()
    loss_sum, correct, count = dist_.sum(torch.stack([loss_sum, correct, count])).tolist()
    return {"eval_loss": loss_sum / max(count, 1), "eval_acc": correct / max(count, 1), "eval_images": int(count)}


def opening_line(t, params: int) -> str:
    """What is trained, on what, how: the first line a run prints."""
    args, cfg = t.args, t.cfg
    mode = "FSDP2" if t.sharded else "DDP" if t.dist.enabled else "single process"
    return (f"fastvit train: {'vit.fast.ViT' if t.fast else 'vit.ViT'} {getattr(t, 'model_name', args.model)} "
            f"({params / 1e6:.2f}M params, img {cfg.img_hw[0]}x{cfg.img_hw[1]}, patch "
            f"{cfg.patch_size}, dim {cfg.embed_dim}, depth {cfg.depth}), data {args.data} "
            f"({len(t.data.train)} train / {len(t.data.test)} eval), {mode} x{t.dist.world_size} "
            f"on {t.device.type}, amp {args.amp}, global batch {args.batch_size}, "
            f"steps {t.start_step}->{args.steps}")


def summarize(t, *, params: int, wall: float, first_step_s: float | None, loss: float, result: dict,
              weights_path: Path) -> dict:
    """``summary.json``: the run's conditions, speed and final numbers."""
    args = t.args
    trained = args.steps - t.start_step
    timed = first_step_s is not None and trained > 1 and wall > first_step_s
    summary = {
        "model": getattr(t, "model_name", args.model), "fast": t.fast, "params": params, "data": args.data,
        "world_size": t.dist.world_size, "fsdp": t.sharded, "amp": args.amp,
        "device": t.device.type, "global_batch": args.batch_size, "steps": args.steps,
        "steps_this_run": trained, "resumed_from": t.start_step or None,
        "wall_s": wall, "total_train_s": t.elapsed_before + wall,
        # the first step (compilation, warm caches) is left out of the rate
        "img_per_s": (trained - 1) * args.batch_size / (wall - first_step_s) if timed else None,
        "final_loss": loss, "skipped_steps": t.skipped_steps, **result, "best_eval_acc": t.best_acc,
        "weights": str(weights_path),
    }
    notes = [note for note in getattr(t, "init_notes", ()) if note]
    if notes:  # what --init loaded and re-initialized, the drop path and normalization used
        summary["init"] = "; ".join(notes)
    if t.device.type == "cuda":
        summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(t.device) / 2**30
    return summary


def closing_line(s: dict) -> str:
    return (f"done: {s['steps']} steps ({s['steps_this_run']} this run) in {s['wall_s']:.1f} s"
            + (f", {s['img_per_s']:.0f} img/s" if s["img_per_s"] else "")
            + (f", peak memory {s['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in s else "")
            + f"; final loss {s['final_loss']:.4f}; eval top-1 {s['eval_acc'] * 100:.2f}% "
            f"(loss {s['eval_loss']:.4f}, {s['eval_images']} images); skipped steps "
            f"{s['skipped_steps']}; weights {s['weights']}")
