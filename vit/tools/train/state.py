"""The resumable training state (``--ckpt-every``, ``--resume``): what it holds, how it is found,
read, written and restored.

    <out>/checkpoints/step_00000100/   model.safetensors (vit.from_pretrained loads it)
                                       train_state.pt (optimizer, schedule, scaler, RNG, step)
    <out>/checkpoints/latest           name of the newest complete state

A state is written into a temporary directory renamed into place, then ``latest`` is replaced
atomically, so a crash at any moment leaves the previous state intact. ``train_state.pt`` holds
only tensors, numbers, strings, lists and dicts: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from vit import weights as weights_io
from vit._io import atomic_torch_save, atomic_write_text
from vit.tools import data as vdata

from .args import normal, saved_args
from .dist import full_optimizer_state, full_weights, load_optimizer_state, to_cpu
from .errors import TrainError

STATE_FORMAT = 1
STATE_FILE = "train_state.pt"
WEIGHTS_FILE = "model.safetensors"


def find_state(path) -> Path:
    """The state directory named by --resume: a run directory (its latest) or a step directory."""
    path = Path(path)
    if (path / STATE_FILE).exists() or (path / WEIGHTS_FILE).exists() and path.parent.name == "checkpoints":
        return path  # a step directory (read_state says what is missing)
    root = path / "checkpoints"
    complete = sorted(p for p in root.glob("step_*") if (p / STATE_FILE).is_file())
    latest = root / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        target = root / name
        if (target / STATE_FILE).is_file():
            return target
        if not complete:
            raise TrainError(f"{latest} names {name!r}, but {target / STATE_FILE} is missing and no other "
                             "complete checkpoint is left: the checkpoint directory was damaged")
        print(f"fastvit train: warning: {latest} names {name!r}, but {target / STATE_FILE} is missing; "
              f"resuming from the newest complete checkpoint {complete[-1].name}", file=sys.stderr, flush=True)
        return complete[-1]
    if complete:  # killed between writing a state and pointing ``latest`` at it
        return complete[-1]
    if not path.exists():
        raise TrainError(f"--resume {path}: no such directory")
    raise TrainError(f"--resume {path}: neither a checkpoint directory (with {STATE_FILE}) nor a run "
                     "directory with checkpoints/latest")


def read_state(directory: Path) -> tuple[dict, dict]:
    """(train_state, weights) of one state directory, validated; TrainError otherwise."""
    state_path, weights_path = directory / STATE_FILE, directory / WEIGHTS_FILE
    for path in (state_path, weights_path):
        if not path.is_file():
            raise TrainError(f"checkpoint {directory} is incomplete: {path.name} is missing")
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise TrainError(f"checkpoint file {state_path} is corrupted or unreadable "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TrainError(f"{state_path} is not a fastvit training state (format {STATE_FORMAT})")
    missing = [k for k in ("step", "args", "model_config", "optimizer", "schedule", "rng") if k not in state]
    if missing:
        raise TrainError(f"{state_path} is missing {missing}: corrupted or from another program")
    try:
        weights = weights_io.load(weights_path)
        meta = weights_io.load_metadata(weights_path)
    except Exception as exc:
        raise TrainError(f"checkpoint file {weights_path} is corrupted or unreadable "
                         f"({type(exc).__name__}: {exc})") from exc
    if meta.get("step") != str(state["step"]):
        raise TrainError(f"checkpoint mismatch in {directory}: weights are from step {meta.get('step')}, "
                         f"the training state from step {state['step']}")
    return state, weights


def weights_metadata(step: int, class_names: list[str] | None) -> dict:
    """Safetensors metadata: the step, and the class names ``fastvit predict`` shows."""
    meta = {"step": str(step)}
    if class_names:
        meta["id2label"] = json.dumps({str(i): n for i, n in enumerate(class_names)})
    return meta


def save_state(trainer, step: int, elapsed: float) -> Path | None:
    """Every rank takes part (collectives); rank 0 writes step_N/ then points ``latest`` at it."""
    t = trainer
    weights = full_weights(t.module, sharded=t.sharded)
    optimizer = full_optimizer_state(t.module, t.optimizer, sharded=t.sharded)
    rngs = t.dist.gather(rng_state(t.device))
    if not t.dist.main:
        return None
    state = {
        "format": STATE_FORMAT, "step": step,
        "epoch": step // t.data.per_epoch, "batch_in_epoch": step % t.data.per_epoch,
        "num_train_samples": len(t.data.train),
        "args": saved_args(t.args), "model_config": normal(t.cfg.to_dict()),
        "optimizer": optimizer, "schedule": t.schedule.state_dict(),
        "scaler": t.scaler.state_dict() if t.scaler is not None else None,
        "rng": [to_cpu(r) for r in rngs], "world_size": t.dist.world_size,
        "skipped_steps": t.skipped_steps, "bad_in_row": t.bad_in_row,
        "best_acc": t.best_acc, "elapsed": elapsed,
    }
    root = t.out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:08d}"
    tmp, final = root / f".{name}.tmp", root / name
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights_io.save(weights, tmp / WEIGHTS_FILE, config=t.cfg,
                    metadata=weights_metadata(step, t.data.class_names))
    atomic_torch_save(state, tmp / STATE_FILE)
    if final.exists():  # the same step written again after a resume
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", name + "\n")
    kept = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in kept[:-t.args.keep_checkpoints]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def restore_state(trainer, state: dict, directory: Path) -> None:
    """Optimizer, schedule, scaler, RNG and counters of ``state`` into the trainer (weights are
    loaded before the model is wrapped)."""
    t = trainer
    try:
        load_optimizer_state(t.module, t.optimizer, state["optimizer"], sharded=t.sharded)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise TrainError(f"checkpoint mismatch: the optimizer state in {directory} does not fit "
                         f"this model ({type(exc).__name__}: {exc})") from exc
    t.schedule.load_state_dict(state["schedule"])
    if t.scaler is not None:
        if not state.get("scaler"):
            raise TrainError(f"checkpoint mismatch: {directory} has no gradient-scaler state for --amp fp16")
        t.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    if len(rng) == t.dist.world_size:
        set_rng_state(rng[t.dist.rank], t.device)
    else:
        t.say(f"note: the checkpoint's RNG states are for {len(rng)} processes, this run has "
              f"{t.dist.world_size}: dropout streams are reseeded (weights, optimizer and data "
              "order are restored exactly)")
        torch.manual_seed(vdata.mix_seed(t.args.seed, 1 + t.dist.rank, t.start_step))
    t.skipped_steps = int(state.get("skipped_steps", 0))
    t.bad_in_row = int(state.get("bad_in_row", 0))
    t.best_acc = state.get("best_acc")
    t.elapsed_before = float(state.get("elapsed", 0.0))


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": [list(t) if isinstance(t, tuple) else t
                                                         for t in random.getstate()]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
