"""``fastvit train``: mixed-precision ViT training, one process or many under torchrun.

    python -m vit.train --steps 600                      # digits, small ViT, CPU
    python -m vit.train --data synthetic --model vit_base_patch16_224 --amp bf16 --steps 50
    torchrun --nproc_per_node=8 -m vit.train --data /imagenet --model vit_base_patch16_224 \\
        --amp bf16 --fsdp --batch-size 1024 --out runs/b16
    python -m vit.train --resume runs/b16                # continue exactly where it stopped

Scale: under torchrun every rank runs this same file; DDP (gloo on CPU, nccl on CUDA) or
``--fsdp`` (FSDP2 ``fully_shard`` per block + root, with a ``MixedPrecisionPolicy``).
``--batch-size`` is the *global* batch: each of N ranks takes a contiguous 1/N slice of
the same seeded batch, so the loss curve does not depend on N. Only rank 0 writes.

Model: ``vit.fast.ViT`` by default (or ``--fast``); ``--no-fast`` the reference ``vit.ViT``.

Output directory (``--out``)::

    metrics.jsonl                    one JSON record per logged step and per evaluation
    checkpoints/step_00000100/       model.safetensors (vit.from_pretrained loads it)
                                     train_state.pt (optimizer, schedule, scaler, RNG, step)
    checkpoints/latest               name of the newest complete checkpoint
    model.safetensors, summary.json  final weights and summary

Checkpoints are written into a temporary directory that is renamed into place, and
``latest`` is replaced atomically afterwards, so a crash at any moment leaves the
previous checkpoint intact. ``train_state.pt`` holds only tensors, numbers, strings,
lists and dicts: it loads with ``torch.load(weights_only=True)``.

Exit status: 0 done, 1 a clear error (bad input, corrupted or mismatched checkpoint,
empty dataset, too many non-finite steps in a row), 2 bad command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint as ckpt
from ._io import atomic_torch_save, atomic_write_text
from .progress import Progress
from . import data as vdata
from .config import PRESETS, ViTConfig, get_config
from .factory import model_class

STATE_FORMAT = 1
STATE_FILE = "train_state.pt"
WEIGHTS_FILE = "model.safetensors"
# Test hook: SIGKILL this process right after the given step (exercises exact resume).
SIGKILL_ENV = "FASTVIT_TRAIN_SIGKILL_AT_STEP"

# Small models for CPU runs, on top of the presets in vit.config.
TRAIN_PRESETS: dict[str, tuple[str, dict]] = {
    # 70k parameters, 16x16 gray input, mean-pooled tokens: ~97% on digits after the
    # default 400 steps of batch 64 (about 30 s on one CPU core).
    "vit_digits": ("vit_tiny_patch16_224", dict(img_size=16, patch_size=4, in_chans=1, embed_dim=64,
                                                depth=2, num_heads=4, mlp_ratio=2.0, global_pool="avg")),
}

# Options that change the optimization trajectory: resuming with a different value is
# not "continuing where it stopped", so it is refused.
TRAJECTORY_OPTIONS = ("model", "set", "img_size", "patch_size", "embed_dim", "depth", "num_heads",
                      "mlp_ratio", "data", "synthetic_size", "num_classes", "val_fraction", "steps",
                      "batch_size", "accum_steps", "lr", "min_lr", "warmup_steps", "weight_decay",
                      "clip_grad", "label_smoothing", "amp", "seed", "fsdp")


class TrainError(RuntimeError):
    """A failure with a message meant for the user (no traceback needed)."""


# ---------------------------------------------------------------------------- arguments

def _parse_set(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass  # a bare string, e.g. global_pool=avg
    return [key.strip(), value]


def build_parser(with_defaults: bool = True) -> argparse.ArgumentParser:
    """The command line. ``with_defaults=False`` leaves unset options out of the namespace,
    which is how resume tells what the user typed from what it should restore."""
    parser = argparse.ArgumentParser(prog="fastvit train", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)

    def add(*flags, default=None, **kwargs):
        parser_group = kwargs.pop("group")
        parser_group.add_argument(*flags, default=default if with_defaults else argparse.SUPPRESS, **kwargs)

    m = parser.add_argument_group("model")
    add("--model", group=m, default="vit_digits",
        help=f"preset: {', '.join([*TRAIN_PRESETS, *PRESETS])} (default vit_digits)")
    for flag, kind in (("--img-size", int), ("--patch-size", int), ("--embed-dim", int), ("--depth", int),
                       ("--num-heads", int), ("--mlp-ratio", float)):
        add(flag, group=m, type=kind, help="override the preset's value")
    add("--set", group=m, type=_parse_set, action="append", default=[], metavar="KEY=VALUE",
        help="override any ViTConfig field (JSON value), e.g. --set drop_path_rate=0.1")
    add("--fast", group=m, action=argparse.BooleanOptionalAction,
        help="vit.fast.ViT (--fast: required; default: if available) or the reference (--no-fast)")
    add("--backend", group=m, choices=("auto", "triton", "cpp", "torch"),
        help="kernel backend of the fast model (default: FASTVIT_BACKEND or auto)")
    add("--init", group=m, metavar="PATH", help="start from these weights (a checkpoint file)")

    d = parser.add_argument_group("data")
    add("--data", group=d, default="digits", help="digits | synthetic | PATH to an ImageFolder directory")
    add("--synthetic-size", group=d, type=int, default=512, help="images in the synthetic set")
    add("--num-classes", group=d, type=int, default=1000, help="classes of the synthetic set (digits and "
        "ImageFolder data bring their own: a different value is refused)")
    add("--val-fraction", group=d, type=float, default=0.1,
        help="held-out share of an ImageFolder without train/ and val/ folders")
    add("--workers", group=d, type=int, default=min(4, os.cpu_count() or 1),
        help="DataLoader worker processes for ImageFolder data")

    o = parser.add_argument_group("optimization")
    add("--steps", group=o, type=int, default=400, help="optimizer steps")
    add("--batch-size", group=o, type=int, default=64, help="global batch size (all ranks together)")
    add("--accum-steps", group=o, type=int, default=1, help="micro-batches per optimizer step")
    add("--lr", group=o, type=float, default=2e-3, help="peak AdamW learning rate")
    add("--min-lr", group=o, type=float, default=1e-5, help="learning rate at the end of the cosine")
    add("--warmup-steps", group=o, type=int, help="linear warmup (default 5%% of --steps)")
    add("--weight-decay", group=o, type=float, default=0.05,
        help="AdamW decay, not applied to norms, biases, pos_embed, cls_token")
    add("--clip-grad", group=o, type=float, default=1.0, help="max gradient norm (0: no clipping)")
    add("--label-smoothing", group=o, type=float, default=0.1)
    add("--amp", group=o, choices=("bf16", "fp16", "none"), default="none",
        help="autocast dtype (fp16 adds a gradient scaler)")
    add("--max-bad-steps", group=o, type=int, default=20,
        help="stop after this many non-finite (skipped) steps in a row")
    add("--seed", group=o, type=int, default=0)

    s = parser.add_argument_group("scale and speed")
    add("--fsdp", group=s, action="store_true", default=False,
        help="FSDP2 (fully_shard per block and root) instead of DDP under torchrun")
    add("--grad-checkpointing", group=s, action="store_true", default=False,
        help="recompute block activations in backward")
    add("--compile", group=s, action="store_true", default=False, help="torch.compile the model")
    add("--device", group=s, choices=("auto", "cpu", "cuda"), default="auto")
    add("--threads", group=s, type=int,
        help="CPU threads per process (default: torch's choice; 1 is fastest for tiny models on a busy CPU)")

    r = parser.add_argument_group("evaluation, logging, checkpoints")
    add("--eval-every", group=r, type=int, default=100, help="evaluate every N steps (0: only at the end)")
    add("--eval-batch-size", group=r, type=int, default=256, help="per-rank evaluation batch")
    add("--log-every", group=r, type=int, default=10, help="metrics record every N steps")
    add("--ckpt-every", group=r, type=int, default=100, help="checkpoint every N steps (0: only at the end)")
    add("--keep-checkpoints", group=r, type=int, default=2, help="newest checkpoints kept")
    add("--out", group=r, default="runs/train", help="output directory")
    add("--resume", group=r, metavar="DIR", help="a run directory or one of its checkpoints")
    add("--progress", group=r, choices=("auto", "bar", "lines", "none"), default="auto",
        help="progress display (auto: a bar on a terminal, lines otherwise)")
    return parser


def parse_args(argv: list[str] | None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.explicit = set(vars(build_parser(with_defaults=False).parse_args(argv)))
    for name in ("steps", "batch_size", "accum_steps", "log_every", "eval_batch_size", "keep_checkpoints",
                 "max_bad_steps", "synthetic_size", "num_classes"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.threads is not None and args.threads <= 0:
        parser.error(f"--threads must be > 0, got {args.threads}")
    for name in ("eval_every", "ckpt_every", "workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.lr <= 0 or args.min_lr < 0 or args.weight_decay < 0 or args.clip_grad < 0:
        parser.error("--lr must be > 0 and --min-lr, --weight-decay, --clip-grad >= 0")
    if not 0.0 <= args.label_smoothing < 1.0:
        parser.error(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.warmup_steps is not None and args.warmup_steps < 0:
        parser.error(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
    return args


def saved_args(args) -> dict:
    """The options worth storing in a checkpoint (JSON-like values only)."""
    return {k: v for k, v in vars(args).items() if k not in ("explicit", "resume")}


# ------------------------------------------------------------------------ distribution

class Dist:
    """Rank, world size and device of this process (one process without torchrun)."""

    def __init__(self, device_choice: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
        if cuda and not torch.cuda.is_available():
            raise TrainError("--device cuda was requested but CUDA is not available")
        if cuda:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if cuda else "gloo"
            kwargs = {"device_id": self.device} if cuda else {}
            dist.init_process_group(backend=backend, **kwargs)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------- model

def resolve_config(args, num_classes: int) -> ViTConfig:
    """Preset + command-line overrides + the dataset's number of classes."""
    overrides = {}
    if args.model in TRAIN_PRESETS:
        base, overrides = TRAIN_PRESETS[args.model]
        overrides = dict(overrides)
    elif args.model in PRESETS:
        base = args.model
    else:
        raise TrainError(f"unknown --model {args.model!r}; known: {', '.join([*TRAIN_PRESETS, *PRESETS])}")
    for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    for key, value in args.set:
        overrides[key] = tuple(value) if isinstance(value, list) else value
    overrides["num_classes"] = num_classes
    try:
        return get_config(base, **overrides)
    except (TypeError, ValueError) as exc:
        raise TrainError(f"invalid model configuration: {exc}") from exc


def resolve_model_class(fast: bool | None):
    """``--no-fast``: the reference vit.ViT; otherwise (the default) vit.fast.ViT."""
    return model_class(fast is not False), fast is not False


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for weight matrices, none for norms, biases, pos_embed, cls_token."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in ("pos_embed", "cls_token"):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class WarmupCosine:
    """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then cosine to ``floor`` at ``total``.

    The rate is a closed-form function of the step: its state is the step alone.
    """

    def __init__(self, peak: float, floor: float, warmup: int, total: int):
        self.peak, self.floor, self.warmup, self.total = peak, floor, warmup, total
        self.step = 0

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.floor + 0.5 * (self.peak - self.floor) * (1.0 + math.cos(math.pi * progress))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        self.step = step
        rate = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = rate
        return rate

    def state_dict(self) -> dict:
        return {"peak": self.peak, "floor": self.floor, "warmup": self.warmup, "total": self.total,
                "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("peak", "floor", "warmup", "total"):
            if state[key] != mine[key]:
                raise TrainError(f"checkpoint mismatch: the schedule's {key} was {state[key]}, now {mine[key]}")
        self.step = int(state["step"])


# -------------------------------------------------------------------------------- data

class Data:
    """Train/eval splits plus the per-rank batches of every step."""

    def __init__(self, args, cfg_in_chans: int, img_hw, dist_: Dist):
        self.args, self.dist = args, dist_
        self.device = dist_.device
        source = args.data
        try:
            self._read(args, source, cfg_in_chans, img_hw)
        except ImportError as exc:
            raise TrainError(str(exc)) from exc
        except ValueError as exc:  # DataError and the image spec checks (e.g. in_chans=2)
            raise TrainError(f"--data {source}: {exc}") from exc
        self.num_classes = self.train.num_classes
        if ("num_classes" in getattr(args, "explicit", ()) and source != "synthetic"
                and args.num_classes != self.num_classes):
            raise TrainError(f"--num-classes {args.num_classes} does not match --data {source}, which has "
                             f"{self.num_classes} classes (--num-classes is for --data synthetic)")
        try:
            self.per_epoch = vdata.batches_per_epoch(len(self.train), args.batch_size)
        except vdata.DataError as exc:
            raise TrainError(str(exc)) from exc

    def _read(self, args, source: str, cfg_in_chans: int, img_hw) -> None:
        self.class_names = None
        if source == "digits":
            train, test = vdata.load_digits(cfg_in_chans, img_hw)
            self.train, self.test = train.to(self.device), test.to(self.device)
            self.class_names = [str(i) for i in range(10)]
        elif source == "synthetic":
            self.train = vdata.synthetic(cfg_in_chans, img_hw, args.num_classes, args.synthetic_size,
                                         seed=args.seed).to(self.device)
            self.test = vdata.synthetic(cfg_in_chans, img_hw, args.num_classes,
                                        max(1, args.synthetic_size // 4), seed=args.seed + 1).to(self.device)
        else:
            if not Path(source).exists():
                raise TrainError(f"--data {source!r} is neither 'digits', 'synthetic' nor an existing directory")
            if not Path(source).is_dir():
                raise TrainError(f"--data {source!r} is a file, not a directory "
                                 "(expected root/<class>/<image>)")
            self.train, self.test = vdata.load_image_folder(source, cfg_in_chans, img_hw, seed=args.seed,
                                                            val_fraction=args.val_fraction)
            self.class_names = list(self.train.classes)

    def _load(self, dataset, index_lists, epoch: int = -1):
        """Yield (images, labels) on the device for each list of indices.

        The DataLoader gets its own generator (seeded by seed, epoch, rank): without one it
        draws its workers' base seed from the global RNG, so the dropout stream would depend
        on when loaders were created and a resumed run would diverge."""
        if isinstance(dataset, vdata.TensorData):
            for idx in index_lists:
                idx = torch.as_tensor(idx, device=self.device)
                yield dataset.images[idx], dataset.labels[idx]
            return
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[list(map(int, i)) for i in index_lists],
                                             num_workers=self.args.workers,
                                             pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(
                                                 vdata.mix_seed(self.args.seed, epoch, self.dist.rank)))
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))

    def train_batches(self, start_step: int):
        """This rank's batch for every step from ``start_step`` on (forever): ``vdata.batch_indices``."""
        args, rank, world = self.args, self.dist.rank, self.dist.world_size
        step = start_step
        while True:
            epoch, position = divmod(step, self.per_epoch)
            indices = [vdata.batch_indices(len(self.train), args.batch_size, args.seed, s, rank, world)
                       for s in range(step, (epoch + 1) * self.per_epoch)]
            if isinstance(self.train, vdata.ImageFolder):
                self.train.epoch = epoch  # read by the workers started below
            yield from self._load(self.train, indices, epoch)
            step = (epoch + 1) * self.per_epoch

    def eval_batches(self):
        """(images, labels, valid) chunks of this rank's equal-length share of the eval set."""
        idx, valid = vdata.eval_indices(len(self.test), self.dist.rank, self.dist.world_size)
        size = self.args.eval_batch_size
        chunks = [idx[i:i + size] for i in range(0, len(idx), size)]
        for i, (images, labels) in enumerate(self._load(self.test, chunks)):
            yield images, labels, valid[i * size:(i + 1) * size].to(self.device)


# ------------------------------------------------------------------------- checkpoints

def find_checkpoint(path) -> Path:
    """The checkpoint directory named by --resume: a run directory (its latest) or a step directory."""
    path = Path(path)
    if (path / STATE_FILE).exists() or (path / WEIGHTS_FILE).exists() and path.parent.name == "checkpoints":
        return path  # a step directory (read_checkpoint says what is missing)
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        name = latest.read_text().strip()
        target = path / "checkpoints" / name
        if (target / STATE_FILE).is_file():
            return target
        steps = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / STATE_FILE).is_file())
        if not steps:
            raise TrainError(f"{latest} names {name!r}, but {target / STATE_FILE} is missing and no other "
                             "complete checkpoint is left: the checkpoint directory was damaged")
        print(f"fastvit train: warning: {latest} names {name!r}, but {target / STATE_FILE} is missing; "
              f"resuming from the newest complete checkpoint {steps[-1].name}", file=sys.stderr, flush=True)
        return steps[-1]
    steps = sorted(p for p in (path / "checkpoints").glob("step_*") if (p / STATE_FILE).is_file())
    if steps:  # killed between writing a checkpoint and pointing ``latest`` at it
        return steps[-1]
    if not path.exists():
        raise TrainError(f"--resume {path}: no such directory")
    raise TrainError(f"--resume {path}: neither a checkpoint directory (with {STATE_FILE}) nor a run "
                     "directory with checkpoints/latest")


def read_checkpoint(directory: Path) -> tuple[dict, dict]:
    """(train_state, weights) of one checkpoint directory, validated; TrainError otherwise."""
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
        weights = ckpt.load(weights_path)
        meta = ckpt.load_metadata(weights_path)
    except Exception as exc:
        raise TrainError(f"checkpoint file {weights_path} is corrupted or unreadable "
                         f"({type(exc).__name__}: {exc})") from exc
    if meta.get("step") != str(state["step"]):
        raise TrainError(f"checkpoint mismatch in {directory}: weights are from step {meta.get('step')}, "
                         f"the training state from step {state['step']}")
    return state, weights


def merge_resume_args(args, state: dict):
    """Options not typed on this command line come from the checkpoint; typed ones must agree
    with it where they change the trajectory."""
    old = state["args"]
    conflicts = []
    for key, value in old.items():
        if key not in args.explicit:
            setattr(args, key, value)
        elif key in TRAJECTORY_OPTIONS and _normal(getattr(args, key)) != _normal(value):
            conflicts.append(f"--{key.replace('_', '-')} is {getattr(args, key)!r}, the checkpoint has {value!r}")
    if conflicts:
        raise TrainError("checkpoint mismatch: cannot resume exactly with changed options: " + "; ".join(conflicts))
    return args


def _normal(value):
    return json.loads(json.dumps(value))


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


# ---------------------------------------------------------------------------- trainer

class Trainer:
    def __init__(self, args, dist_: Dist, resume: tuple[Path, dict, dict] | None):
        self.args, self.dist = args, dist_
        self.device = dist_.device
        self.out = Path(args.out)
        self.say = print if dist_.main else (lambda *a, **k: None)
        if args.batch_size % dist_.world_size:
            raise TrainError(f"--batch-size {args.batch_size} (global) is not divisible by the "
                             f"{dist_.world_size} processes")
        per_rank = args.batch_size // dist_.world_size
        if per_rank % args.accum_steps:
            raise TrainError(f"the per-process batch {per_rank} (= {args.batch_size} / {dist_.world_size}) is "
                             f"not divisible by --accum-steps {args.accum_steps}")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
        if self.amp_dtype is torch.float16 and self.device.type == "cpu":
            self.say("note: fp16 autocast on CPU is slow and mostly for testing; prefer --amp bf16")

        # Data first: it decides the number of classes.
        preset_cfg = resolve_config(args, num_classes=1)
        self.data = Data(args, preset_cfg.in_chans, preset_cfg.img_hw, dist_)
        self.cfg = resolve_config(args, self.data.num_classes)
        cls, self.fast = resolve_model_class(args.fast)

        torch.manual_seed(args.seed)  # identical initial weights on every rank
        module = cls(self.cfg)
        self.start_step, state = 0, None
        if resume is not None:
            directory, state, weights = resume
            saved_cfg = state["model_config"]
            if _normal(saved_cfg) != _normal(self.cfg.to_dict()):
                diff = [f"{k}: {saved_cfg.get(k)!r} -> {v!r}" for k, v in _normal(self.cfg.to_dict()).items()
                        if saved_cfg.get(k) != v]
                raise TrainError(f"checkpoint mismatch: {directory} holds a model with a different "
                                 f"config ({'; '.join(diff)})")
            self._load_weights(module, weights, directory / WEIGHTS_FILE)
            if state.get("num_train_samples") != len(self.data.train):
                raise TrainError(f"checkpoint mismatch: it was trained on {state.get('num_train_samples')} images, "
                                 f"the dataset now has {len(self.data.train)}")
            self.start_step = int(state["step"])
        elif args.init:
            try:
                weights = ckpt.convert_state_dict(ckpt.load(args.init))
            except Exception as exc:
                raise TrainError(f"--init {args.init}: cannot read weights ({type(exc).__name__}: {exc})") from exc
            self._load_weights(module, weights, args.init)
        if args.grad_checkpointing:
            if not hasattr(module, "set_grad_checkpointing"):
                raise TrainError(f"{cls.__module__}.{cls.__name__} has no set_grad_checkpointing()")
            module.set_grad_checkpointing(True)
        module.to(self.device)
        self.module, self.model = self._wrap(module)
        self.optimizer = torch.optim.AdamW(param_groups(self.module, args.weight_decay), lr=args.lr,
                                           betas=(0.9, 0.999), eps=1e-8, foreach=True)
        warmup = args.warmup_steps if args.warmup_steps is not None else round(0.05 * args.steps)
        self.schedule = WarmupCosine(args.lr, args.min_lr, warmup, args.steps)
        self.scaler = None
        if self.amp_dtype is torch.float16:
            if args.fsdp and dist_.enabled:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                # Each rank holds a shard of the gradients: found-inf must be agreed on by all.
                self.scaler = ShardedGradScaler(self.device.type)
            else:
                self.scaler = torch.amp.GradScaler(self.device.type)
        self.skipped_steps, self.bad_in_row, self.best_acc, self.last_eval = 0, 0, None, None
        self.elapsed_before = 0.0
        if state is not None:
            self._load_state(state, directory)
        else:
            # Dropout / stochastic depth streams differ per rank, as separate GPUs would.
            torch.manual_seed(vdata.mix_seed(args.seed, 1 + dist_.rank))

    # -- setup helpers
    def _load_weights(self, module, weights: dict, source) -> None:
        try:
            ckpt.check_state_dict(module, weights)
        except ValueError as exc:
            raise TrainError(f"checkpoint mismatch in {source}: {exc}") from exc
        module.load_state_dict(weights, strict=True)

    def _wrap(self, module):
        """(the module that owns the parameters, the callable that trains)."""
        args = self.args
        if args.fsdp:
            if not self.dist.enabled:
                self.say("note: --fsdp with a single process: training unsharded")
            else:
                from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

                policy = MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=torch.float32)
                for block in module.blocks:
                    fully_shard(block, mp_policy=policy)
                fully_shard(module, mp_policy=policy)
        model = module
        if self.dist.enabled and not args.fsdp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if args.compile:
            model = torch.compile(model)
        return module, model

    def _sharded(self) -> bool:
        return self.args.fsdp and self.dist.enabled

    def _load_state(self, state: dict, directory: Path) -> None:
        try:
            if self._sharded():
                from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

                set_optimizer_state_dict(self.module, self.optimizer, state["optimizer"],
                                         options=StateDictOptions(full_state_dict=True))
            else:
                self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise TrainError(f"checkpoint mismatch: the optimizer state in {directory} does not fit "
                             f"this model ({type(exc).__name__}: {exc})") from exc
        self.schedule.load_state_dict(state["schedule"])
        if self.scaler is not None:
            if not state.get("scaler"):
                raise TrainError(f"checkpoint mismatch: {directory} has no gradient-scaler state for --amp fp16")
            self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            set_rng_state(rng[self.dist.rank], self.device)
        else:
            self.say(f"note: the checkpoint's RNG states are for {len(rng)} processes, this run has "
                     f"{self.dist.world_size}: dropout streams are reseeded (weights, optimizer and data "
                     "order are restored exactly)")
            torch.manual_seed(vdata.mix_seed(self.args.seed, 1 + self.dist.rank, self.start_step))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.bad_in_row = int(state.get("bad_in_row", 0))
        self.best_acc = state.get("best_acc")
        self.elapsed_before = float(state.get("elapsed", 0.0))

    # -- state out
    def full_weights(self) -> dict:
        """The full (unsharded) state_dict on CPU; a collective under FSDP."""
        if self._sharded():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def full_optimizer_state(self) -> dict:
        if self._sharded():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.module, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return _to_cpu(self.optimizer.state_dict())

    def _metadata(self, step: int) -> dict:
        """Safetensors metadata: the step, and the class names ``vit.predict.load_labels`` shows."""
        meta = {"step": str(step)}
        if self.data.class_names:
            meta["id2label"] = json.dumps({str(i): n for i, n in enumerate(self.data.class_names)})
        return meta

    def save_checkpoint(self, step: int, elapsed: float) -> Path | None:
        """Every rank takes part (collectives); rank 0 writes step_N/ then points ``latest`` at it."""
        weights = self.full_weights()
        optimizer = self.full_optimizer_state()
        rngs = self.dist.gather(rng_state(self.device))
        if not self.dist.main:
            return None
        state = {
            "format": STATE_FORMAT, "step": step,
            "epoch": step // self.data.per_epoch, "batch_in_epoch": step % self.data.per_epoch,
            "num_train_samples": len(self.data.train),
            "args": saved_args(self.args), "model_config": _normal(self.cfg.to_dict()),
            "optimizer": optimizer, "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": [_to_cpu(r) for r in rngs], "world_size": self.dist.world_size,
            "skipped_steps": self.skipped_steps, "bad_in_row": self.bad_in_row,
            "best_acc": self.best_acc, "elapsed": elapsed,
        }
        root = self.out / "checkpoints"
        root.mkdir(parents=True, exist_ok=True)
        name = f"step_{step:08d}"
        tmp, final = root / f".{name}.tmp", root / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        ckpt.save(weights, tmp / WEIGHTS_FILE, config=self.cfg, metadata=self._metadata(step))
        atomic_torch_save(state, tmp / STATE_FILE)
        if final.exists():  # the same step written again after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / "latest", name + "\n")
        kept = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in kept[:-self.args.keep_checkpoints]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    # -- the loop
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _no_sync(self, last: bool):
        """Skip the gradient all-reduce on all but the last micro-batch."""
        if not self.dist.enabled:
            return contextlib.nullcontext()
        if self.args.fsdp:
            self.module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        ddp = self.model._orig_mod if hasattr(self.model, "_orig_mod") else self.model
        return contextlib.nullcontext() if last else ddp.no_sync()

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, bool]:
        """One optimizer step over ``accum_steps`` micro-batches: (loss, grad norm, skipped)."""
        args = self.args
        total = torch.zeros((), device=self.device)
        micro = images.shape[0] // args.accum_steps
        for i in range(args.accum_steps):
            x, y = images[i * micro:(i + 1) * micro], labels[i * micro:(i + 1) * micro]
            with self._no_sync(i == args.accum_steps - 1):
                with self.autocast():
                    logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing) / args.accum_steps
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
        loss_value = self.dist.mean(total).item()
        grad_norm, skipped = float("nan"), True
        if math.isfinite(loss_value):
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                  args.clip_grad if args.clip_grad > 0 else float("inf"))
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)  # skips the update when a gradient overflowed
                self.scaler.update()
                skipped = self.scaler.get_scale() < scale
            elif math.isfinite(grad_norm):
                self.optimizer.step()
                skipped = False
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, skipped

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.module.eval()
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.float64)
        count = torch.zeros((), device=self.device, dtype=torch.float64)
        for images, labels, valid in self.data.eval_batches():
            with self.autocast():
                logits = self.module(images)
            losses = F.cross_entropy(logits.float(), labels, reduction="none")
            loss_sum += (losses * valid).sum().double()
            correct += ((logits.argmax(-1) == labels) & valid).sum().double()
            count += valid.sum().double()
        self.module.train()
        totals = self.dist.sum(torch.stack([loss_sum, correct, count]))
        loss_sum, correct, count = totals.tolist()
        return {"eval_loss": loss_sum / max(count, 1), "eval_acc": correct / max(count, 1), "eval_images": int(count)}

    def run(self) -> dict:
        args, say = self.args, self.say
        metrics = Metrics(self.out / "metrics.jsonl", self.dist.main, self.start_step)
        bar = Progress(args.steps, stream=sys.stdout, mode=args.progress if self.dist.main else "none",
                       quiet_mode="lines", width=30)
        kill_at = int(os.environ.get(SIGKILL_ENV, "-1"))
        params = sum(p.numel() for p in self.module.parameters())
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            mode = "FSDP2" if self._sharded() else "DDP" if self.dist.enabled else "single process"
            say(f"fastvit train: {'vit.fast.ViT' if self.fast else 'vit.ViT'} {args.model} "
                f"({params / 1e6:.2f}M params, img {self.cfg.img_hw[0]}x{self.cfg.img_hw[1]}, patch "
                f"{self.cfg.patch_size}, dim {self.cfg.embed_dim}, depth {self.cfg.depth}), data {args.data} "
                f"({len(self.data.train)} train / {len(self.data.test)} eval), {mode} x{self.dist.world_size} "
                f"on {self.device.type}, amp {args.amp}, global batch {args.batch_size}, "
                f"steps {self.start_step}->{args.steps}")
        self.module.train()
        batches = self.data.train_batches(self.start_step)
        start = time.perf_counter()
        window_start, window_images, first_step_time = start, 0, None
        loss = float("nan")
        step = self.start_step
        for step in range(self.start_step, args.steps):
            images, labels = next(batches)
            lr = self.schedule.apply(self.optimizer, step)
            loss, grad_norm, skipped = self.train_step(images, labels)
            if first_step_time is None:
                first_step_time = time.perf_counter() - start
                window_start, window_images = time.perf_counter(), 0
            else:
                window_images += args.batch_size
            done = step + 1
            if skipped:
                self.skipped_steps += 1
                self.bad_in_row += 1
                if self.bad_in_row >= args.max_bad_steps:
                    metrics.write({"step": done, "loss": loss, "grad_norm": grad_norm, "skipped": True})
                    latest = self.out / "checkpoints" / "latest"
                    kept = f"the last checkpoint ({latest.read_text().strip()}) is kept" if latest.exists() \
                        else "no checkpoint had been written yet"
                    raise TrainError(f"stopping at step {done}: the loss or gradients were non-finite for "
                                     f"{self.bad_in_row} consecutive steps (--max-bad-steps {args.max_bad_steps}); "
                                     f"{kept}. Try a lower --lr, --clip-grad, or --amp bf16 instead of fp16")
            else:
                self.bad_in_row = 0
            if done % args.log_every == 0 or done == args.steps:
                now = time.perf_counter()
                rate = window_images / (now - window_start) if window_images else float("nan")
                record = {"step": done, "epoch": step // self.data.per_epoch, "loss": loss, "lr": lr,
                          "grad_norm": grad_norm, "img_per_s": rate, "skipped_steps": self.skipped_steps}
                if self.scaler is not None:
                    record["loss_scale"] = self.scaler.get_scale()
                metrics.write(record)
                window_start, window_images = now, 0
            if args.eval_every and done % args.eval_every == 0 and done != args.steps:
                self._eval_and_log(done, metrics)
            bar.update(at=done, status=f"loss {loss:.4f} lr {lr:.2e}"
                       + (f" acc {self.last_eval * 100:.1f}%" if self.last_eval is not None else ""))
            if args.ckpt_every and done % args.ckpt_every == 0 and done != args.steps:
                self.save_checkpoint(done, self.elapsed_before + time.perf_counter() - start)
            if done == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        wall = time.perf_counter() - start
        result = self._eval_and_log(args.steps, metrics)
        self.save_checkpoint(args.steps, self.elapsed_before + wall)
        weights = self.full_weights()
        trained = args.steps - self.start_step
        summary = {
            "model": args.model, "fast": self.fast, "params": params, "data": args.data,
            "world_size": self.dist.world_size, "fsdp": self._sharded(), "amp": args.amp,
            "device": self.device.type, "global_batch": args.batch_size, "steps": args.steps,
            "steps_this_run": trained, "resumed_from": self.start_step or None,
            "wall_s": wall, "total_train_s": self.elapsed_before + wall,
            "img_per_s": (trained - 1) * args.batch_size / (wall - first_step_time)
            if first_step_time is not None and trained > 1 and wall > first_step_time else None,
            "final_loss": loss, "skipped_steps": self.skipped_steps, **result, "best_eval_acc": self.best_acc,
            "weights": str(self.out / WEIGHTS_FILE),
        }
        if self.device.type == "cuda":
            summary["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.dist.main:
            ckpt.save(weights, self.out / WEIGHTS_FILE, config=self.cfg, metadata=self._metadata(args.steps))
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            say(f"done: {args.steps} steps ({trained} this run) in {wall:.1f} s"
                + (f", {summary['img_per_s']:.0f} img/s" if summary["img_per_s"] else "")
                + (f", peak memory {summary['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in summary else "")
                + f"; final loss {loss:.4f}; eval top-1 {result['eval_acc'] * 100:.2f}% "
                f"(loss {result['eval_loss']:.4f}, {result['eval_images']} images); skipped steps "
                f"{self.skipped_steps}; weights {self.out / WEIGHTS_FILE}")
        return summary

    def _eval_and_log(self, step: int, metrics: "Metrics") -> dict:
        result = self.evaluate()
        self.last_eval = result["eval_acc"]
        self.best_acc = max(self.best_acc or 0.0, result["eval_acc"])
        metrics.write({"step": step, **result})
        return result


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


# ----------------------------------------------------------------------- metrics / bar

class Metrics:
    """Append-only JSONL on rank 0; on resume, records after the checkpoint's step are dropped
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


# -------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    dist_ = None
    try:
        resume = None
        if args.resume:
            directory = find_checkpoint(args.resume)
            try:
                state, weights = read_checkpoint(directory)
            except TrainError as exc:
                older = sorted(p for p in directory.parent.glob("step_*")
                               if p != directory and (p / STATE_FILE).is_file())
                hint = f" (an older checkpoint remains: --resume {older[-1]})" if older else ""
                raise TrainError(f"{exc}{hint}") from exc
            merge_resume_args(args, state)
            if "out" not in args.explicit:
                run_dir = directory.parent.parent if directory.parent.name == "checkpoints" else directory
                args.out = str(run_dir)
            resume = (directory, state, weights)
        dist_ = Dist(args.device)
        backend = contextlib.nullcontext()
        if args.backend:
            import fastvit_kernels

            backend = fastvit_kernels.backend(args.backend)
        threads = torch.get_num_threads()
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            with backend:
                Trainer(args, dist_, resume).run()
        finally:
            torch.set_num_threads(threads)  # main() may run inside a larger program (tests)
        return 0
    except (TrainError, ImportError) as exc:
        print(f"fastvit train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except ValueError as exc:  # a configuration the model or data code refuses
        print(f"fastvit train: error: invalid configuration: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist_ is not None:
            dist_.close()


if __name__ == "__main__":
    sys.exit(main())
