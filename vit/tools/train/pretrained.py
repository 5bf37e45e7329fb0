"""``--init``: the checkpoint a run fine-tunes from, its config, its normalization and its weights.

A checkpoint may carry a config (fastvit's safetensors metadata, a Hugging Face snapshot's
``config.json``): the model is then built from it (``args.resolve_config``), and a snapshot's
``preprocessor_config.json`` gives the mean/std the data is normalized with. The weights are
fitted to the model as ``vit.load_checkpoint`` does (new classifier, resampled position
embedding, adapted patch embedding); any other mismatch is a TrainError naming the keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vit import weights as weights_io
from vit.config import ViTConfig
from vit.factory import load_checkpoint, read_config
from vit.tools.preprocess import PREPROCESSOR_FILE, Preprocess, stored_preprocess

from .errors import TrainError
from .finetune import finetune_drop_path


@dataclass
class InitSource:
    path: Path
    config: ViTConfig | None  # the config stored with the weights, if any
    preprocess: Preprocess | None  # from a preprocessor_config.json beside the weights, if any


def inspect(path) -> InitSource:
    """What ``--init PATH`` holds besides the weights; a TrainError for an unreadable file."""
    path = Path(path)
    if not path.exists():
        raise TrainError(f"--init {path}: no such file or directory")
    try:
        if path.is_dir():
            config = read_config(path) if (path / "config.json").is_file() else None
        else:  # a corrupt or truncated file fails here, with its name
            has_config = weights_io.CONFIG_METADATA_KEY in weights_io.load_metadata(path)
            config = read_config(path) if has_config else None
        preprocess = stored_preprocess(path)
    except (ValueError, TypeError, OSError) as exc:
        raise TrainError(f"--init {path}: {exc}") from exc
    return InitSource(path, config, preprocess)


def finetune_config(args, cfg: ViTConfig) -> tuple[ViTConfig, str]:
    """``cfg`` with the fine-tuning drop-path rate unless ``--set drop_path_rate=`` was given,
    and a note saying which rate is used."""
    if any(key == "drop_path_rate" for key, _ in args.set):
        return cfg, f"drop_path_rate {cfg.drop_path_rate} (--set)"
    rate = finetune_drop_path(cfg.embed_dim)
    return cfg.replace(drop_path_rate=rate), f"drop_path_rate {rate} (fine-tuning default for width {cfg.embed_dim})"


def _per_channel(values, channels: int, name: str) -> list[float]:
    """One value per channel: a single value is repeated, three (RGB) are averaged for gray."""
    values = [float(v) for v in values]
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if len(values) == 3 and channels == 1:
        return [sum(values) / 3]
    raise TrainError(f"{name} has {len(values)} values, the model takes {channels}-channel images "
                     f"(give 1 or {channels})")


def resolve_normalization(args, in_chans: int, source: InitSource | None) -> str | None:
    """Set ``args.mean`` / ``args.std`` (saved with the run, restored on resume): the typed
    --mean/--std, else the --init checkpoint's preprocessor config, else None (ImageNet's).
    Only the mean/std are taken from a preprocessor config: the data keeps its own resizing
    (to the model's image size) and scales pixels to [0, 1]. Returns a note for the run's
    output, or None when the defaults are used."""
    if args.mean is not None:
        args.mean = _per_channel(args.mean, in_chans, "--mean")
        args.std = _per_channel(args.std, in_chans, "--std")
        return f"normalization mean {args.mean} std {args.std} (--mean/--std)"
    if source is None or source.preprocess is None:
        return None
    where = f"{PREPROCESSOR_FILE} of {source.path}"
    if source.preprocess.normalize:
        args.mean = _per_channel(source.preprocess.mean, in_chans, f"image_mean in {where}")
        args.std = _per_channel(source.preprocess.std, in_chans, f"image_std in {where}")
    else:  # do_normalize false: the model was trained on [0, 1] pixels
        args.mean, args.std = [0.0] * in_chans, [1.0] * in_chans
    return f"normalization mean {args.mean} std {args.std} (from {where})"


def load(module: torch.nn.Module, source: InitSource) -> weights_io.LoadReport:
    """The checkpoint's weights fitted into ``module``; a TrainError names what does not fit."""
    try:
        return load_checkpoint(module, source.path)
    except (ValueError, TypeError, OSError) as exc:
        raise TrainError(f"checkpoint mismatch in {source.path}: {exc}") from exc
