"""The command line of ``fastvit train`` and what it resolves to: options, presets, the model config."""

from __future__ import annotations

import argparse
import json
import os

from vit.config import PRESETS, ViTConfig, get_config
from vit.factory import model_class

from .errors import TrainError

DESCRIPTION = "``fastvit train``: mixed-precision ViT training, one process or many under torchrun."

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
                      "clip_grad", "label_smoothing", "amp", "seed", "fsdp", "mean", "std", "layer_decay",
                      "head_lr_scale", "freeze_backbone")


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
    parser = argparse.ArgumentParser(prog="fastvit train", description=DESCRIPTION,
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
    add("--init", group=m, metavar="PATH",
        help="fine-tune from these weights: a timm / Hugging Face / fastvit checkpoint file or a HF "
        "snapshot directory. A checkpoint that carries its config (fastvit metadata, config.json) "
        "gives the model, overridden by --model / --img-size / ... / --set; the classifier is "
        "re-initialized for the data's classes, the position embedding resampled, the patch "
        "embedding adapted to the channels; drop_path_rate defaults to the fine-tuning recipe's")

    d = parser.add_argument_group("data")
    add("--data", group=d, default="digits", help="digits | synthetic | PATH to an ImageFolder directory")
    add("--synthetic-size", group=d, type=int, default=512, help="images in the synthetic set")
    add("--num-classes", group=d, type=int, default=1000, help="classes of the synthetic set (digits and "
        "ImageFolder data bring their own: a different value is refused)")
    add("--val-fraction", group=d, type=float, default=0.1,
        help="held-out share of an ImageFolder without train/ and val/ folders")
    add("--mean", group=d, type=float, nargs="+", metavar="M",
        help="normalization mean per channel (default: the --init checkpoint's preprocessor_config.json, "
        "else ImageNet's)")
    add("--std", group=d, type=float, nargs="+", metavar="S", help="normalization std per channel (with --mean)")
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

    f = parser.add_argument_group("fine-tuning")
    add("--layer-decay", group=f, type=float, metavar="D",
        help="layer-wise lr decay (BEiT): block i gets lr * D ** (depth - i), the embedding lr * D ** (depth + 1)")
    add("--head-lr-scale", group=f, type=float, metavar="S", help="multiply the head's learning rate by S")
    add("--freeze-backbone", group=f, action="store_true", default=False,
        help="train the classifier only (a linear probe)")

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
    """The options, checked; ``args.explicit`` names those typed on the command line."""
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
    if args.layer_decay is not None and not 0.0 < args.layer_decay <= 1.0:
        parser.error(f"--layer-decay must be in (0, 1], got {args.layer_decay}")
    if args.head_lr_scale is not None and args.head_lr_scale <= 0:
        parser.error(f"--head-lr-scale must be > 0, got {args.head_lr_scale}")
    if (args.mean is None) != (args.std is None):
        parser.error("--mean and --std go together: give both or neither")
    if args.std is not None and min(args.std) <= 0:
        parser.error(f"--std must be > 0, got {args.std}")
    return args


def saved_args(args) -> dict:
    """The options worth storing in a training state (JSON-like values only)."""
    return {k: v for k, v in vars(args).items() if k not in ("explicit", "resume")}


def merge_resume_args(args, saved: dict):
    """Options not typed on this command line come from the saved state; typed ones must agree
    with it where they change the trajectory."""
    conflicts = []
    for key, value in saved.items():
        if key not in args.explicit:
            setattr(args, key, value)
        elif key in TRAJECTORY_OPTIONS and normal(getattr(args, key)) != normal(value):
            conflicts.append(f"--{key.replace('_', '-')} is {getattr(args, key)!r}, the checkpoint has {value!r}")
    if conflicts:
        raise TrainError("checkpoint mismatch: cannot resume exactly with changed options: " + "; ".join(conflicts))
    return args


def normal(value):
    """``value`` as it comes back from JSON (tuples become lists): how saved values compare."""
    return json.loads(json.dumps(value))


def resolve_config(args, num_classes: int, checkpoint: ViTConfig | None = None) -> ViTConfig:
    """Preset + command-line overrides + the dataset's number of classes. ``checkpoint``: the
    config stored with the --init weights, which replaces the preset unless --model was typed."""
    overrides = {}
    if checkpoint is not None and "model" not in getattr(args, "explicit", ()):
        base = checkpoint
    elif args.model in TRAIN_PRESETS:
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
        return base.replace(**overrides) if isinstance(base, ViTConfig) else get_config(base, **overrides)
    except (TypeError, ValueError) as exc:
        raise TrainError(f"invalid model configuration: {exc}") from exc


def resolve_model_class(fast: bool | None):
    """``--no-fast``: the reference vit.ViT; otherwise (the default) vit.fast.ViT."""
    return model_class(fast is not False), fast is not False
