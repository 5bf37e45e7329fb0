"""Build models by preset name or from local checkpoints (timm, Hugging Face or ours)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from . import hf, weights
from .config import PRESETS, ViTConfig, get_config
from .hf import config_from_hf

logger = logging.getLogger("vit")


def model_class(fast: bool):
    """The reference ``vit.ViT`` or, with ``fast=True``, ``vit.fast.ViT``."""
    if fast:
        from .fast import ViT as FastViT

        return FastViT
    from .model import ViT

    return ViT


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    for name in names:
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path} holds none of {', '.join(names)}")


def read_config(path, **overrides) -> ViTConfig:
    """The ViTConfig of the checkpoint at ``path``, with ``overrides`` applied: a HF snapshot's
    config.json (also beside a weights file), our safetensors metadata, or else what the
    weights' shapes say (``config_from_state_dict``)."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is a directory without a config.json")
        return config_from_hf(json.loads(config_file.read_text())).replace(**overrides)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta = weights.load_metadata(path)
    if weights.CONFIG_METADATA_KEY in meta:
        return ViTConfig.from_dict(json.loads(meta[weights.CONFIG_METADATA_KEY])).replace(**overrides)
    beside = path.parent / "config.json"
    if beside.is_file():  # a weights file of a HF snapshot
        return config_from_hf(json.loads(beside.read_text())).replace(**overrides)
    raw = weights.load(path)
    return config_from_state_dict(weights.convert_state_dict(raw), hf_layout=weights.detect_layout(raw) == "hf",
                                  source=str(path), **overrides)


def config_from_state_dict(state_dict: dict, *, hf_layout: bool = False, source: str = "state_dict",
                           **overrides) -> ViTConfig:
    """A ViTConfig for weights in our layout, from their shapes and the parameters present
    (LayerScale, registers, distillation token, CLIP's norm_pre, SigLIP's attn_pool ...).

    Shapes do not tell ``num_heads``, the activation or the LayerNorm eps: ``overrides`` give
    them, else (activation and eps) the family's transformers defaults for Hugging Face
    weights, else the preset of the same structure (e.g. ``vit_base_patch14_dinov2``).
    Without a source for ``num_heads`` a ValueError says to pass it.
    """
    sd = state_dict
    conv = sd.get("patch_embed.proj.weight")
    if conv is None or conv.dim() != 4:
        raise ValueError(f"{source}: no patch_embed.proj.weight (D, C, P, P) to infer a ViT config from")
    dim, in_chans, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    fields = dict(
        patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=depth,
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim if "blocks.0.mlp.fc1.weight" in sd else 4.0,
        qkv_bias="blocks.0.attn.qkv.bias" in sd, class_token="cls_token" in sd,
        reg_tokens=sd["reg_token"].shape[1] if "reg_token" in sd else 0, distilled="dist_token" in sd,
        pre_norm="norm_pre.weight" in sd,
        init_values=1e-5 if "blocks.0.ls1.gamma" in sd else None,
        global_pool="map" if "attn_pool.latent" in sd else "avg" if "fc_norm.weight" in sd else "token",
        num_classes=sd["head.weight"].shape[0] if "head.weight" in sd else 0,
    )
    prefix = int(fields["class_token"]) + fields["reg_tokens"] + int(fields["distilled"])
    tokens = sd["pos_embed"].shape[1] if "pos_embed" in sd else prefix + 1
    # pos_embed covers the prefix tokens and a square grid, or (no_embed_class) the grid
    # only; registers come without position embeddings when both would fit (timm's models)
    with_prefix = math.isqrt(max(tokens - prefix, 0))
    grid_only = math.isqrt(tokens)
    if with_prefix and with_prefix ** 2 == tokens - prefix and not (fields["reg_tokens"] and grid_only ** 2 == tokens):
        side, fields["no_embed_class"] = with_prefix, False
    elif grid_only ** 2 == tokens:
        side, fields["no_embed_class"] = grid_only, True
    else:
        raise ValueError(f"{source}: pos_embed has {tokens} rows: neither {prefix} prefix tokens plus a "
                         "square grid nor a square grid; pass img_size= to create_model with a preset")
    fields["img_size"] = side * patch

    preset = _matching_preset(fields)
    guessed = {}
    if preset is not None:
        guessed = {k: getattr(PRESETS[preset], k) for k in ("num_heads", "act_layer", "norm_eps", "init_values")}
        guessed["init_values"] = guessed["init_values"] if fields["init_values"] else None
    if hf_layout:  # transformers' family defaults beat timm's (HF CLIP: QuickGELU; HF DeiT: eps 1e-12)
        guessed.update(hf.family_defaults(hf.detect_family(sd)))
    fields = {**fields, **guessed, **overrides}
    if "num_heads" not in fields:
        raise ValueError(f"{source} carries no config and matches no preset: pass num_heads= (the weights do "
                         "not tell it), or use vit.create_model(preset_name, pretrained=path)")
    logger.info("%s: config inferred from the weights%s", source, f" and preset {preset}" if preset else "")
    return ViTConfig(**fields)


_STRUCTURE = ("patch_size", "embed_dim", "depth", "class_token", "reg_tokens", "distilled", "pre_norm", "global_pool")


def _matching_preset(fields: dict) -> str | None:
    """The first preset with the same structure (and, if any has it, the same classifier width)."""
    same = [name for name, cfg in PRESETS.items()
            if all(getattr(cfg, k) == fields[k] for k in _STRUCTURE)
            and abs(cfg.mlp_ratio - fields["mlp_ratio"]) < 1e-3
            and (cfg.init_values is None) == (fields["init_values"] is None)]
    exact = [name for name in same if PRESETS[name].num_classes == fields["num_classes"]]
    return (exact or same or [None])[0]


def checkpoint_grid(path) -> tuple[int, int] | None:
    """The patch grid the checkpoint at ``path`` was trained at, when it says so (a HF
    config.json or our metadata); None otherwise (a square grid is then inferred)."""
    path = Path(path)
    if path.is_file() and weights.CONFIG_METADATA_KEY not in weights.load_metadata(path) \
            and not (path.parent / "config.json").is_file():
        return None  # a bare state_dict: its grid is inferred from its pos_embed anyway
    try:
        return read_config(path).grid_size
    except (FileNotFoundError, ValueError):
        return None


def load_checkpoint(model: torch.nn.Module, path) -> weights.LoadReport:
    """Load a timm / HF / our checkpoint (file or HF snapshot directory) into ``model``,
    fitted to it as for fine-tuning (see ``vit.weights.fit_state_dict``): a classifier
    of another size or none is re-initialized, the position embedding resampled, the patch
    embedding adapted to the channel count. Any other mismatch raises a ValueError naming
    the keys. Returns what was loaded, re-initialized, resampled or adapted."""
    path = Path(path)
    file = _weights_file(path)
    notes = []
    state = weights.convert_state_dict(weights.load(file), notes=notes)
    report = weights.load_into(model, state, source=str(file), grid=checkpoint_grid(path))
    report.notes.extend(notes)
    logger.info("%s", report)
    return report


def load_pretrained(model: torch.nn.Module, path) -> torch.nn.Module:
    """``load_checkpoint`` that returns the model (the report goes to the ``vit`` logger)."""
    load_checkpoint(model, path)
    return model


def create_model(name: str, *, fast: bool = False, pretrained=None, **overrides) -> torch.nn.Module:
    """A ViT from the preset ``name`` (e.g. "vit_base_patch16_224") with config overrides.

    ``pretrained`` is a local checkpoint: a .safetensors/.pth file in timm, HF or our
    layout, or a HF snapshot directory (config.json + model.safetensors). For a snapshot
    directory with a config.json, the snapshot's config wins over the preset's (its
    ``layer_norm_eps``, number of labels, sizes ...), with ``overrides`` applied on top;
    ``name`` must still be a known preset. The weights are fitted for fine-tuning
    (``load_checkpoint``): e.g. ``num_classes=10, img_size=384, in_chans=1`` from an
    RGB 224 px ImageNet checkpoint gives a new 10-class head, resampled position
    embeddings and a 1-channel patch embedding.
    """
    config = get_config(name, **overrides)  # validates the preset name and the overrides
    if pretrained is not None and Path(pretrained).is_dir() and (Path(pretrained) / "config.json").is_file():
        config = read_config(pretrained, **overrides)
    model = model_class(fast)(config)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def from_pretrained(path, *, fast: bool = False, **overrides) -> torch.nn.Module:
    """A ViT built from the config stored with the checkpoint at ``path`` (with ``overrides``,
    e.g. ``num_classes``, ``img_size``, ``in_chans``), weights fitted as in ``create_model``."""
    model = model_class(fast)(read_config(path, **overrides))
    return load_pretrained(model, path)
