"""Build models by preset name or from local checkpoints (timm, Hugging Face or ours)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from . import weights
from .config import ViTConfig, get_config

logger = logging.getLogger("vit")


def model_class(fast: bool):
    """The reference ``vit.ViT`` or, with ``fast=True``, ``vit.fast.ViT``."""
    if fast:
        from .fast import ViT as FastViT

        return FastViT
    from .model import ViT

    return ViT


def config_from_hf(hf: dict) -> ViTConfig:
    """Translate a Hugging Face ViT ``config.json`` dict into a ViTConfig."""
    if hf.get("model_type", "vit") != "vit":
        raise ValueError(f"expected a Hugging Face ViT config (model_type 'vit'), got {hf.get('model_type')!r}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"only exact GELU ('gelu') is supported, config has hidden_act={hf['hidden_act']!r}")
    hidden = hf.get("hidden_size", 768)
    architectures = hf.get("architectures") or []
    classifier = not architectures or any("Classification" in a for a in architectures)
    num_labels = hf.get("num_labels", len(hf.get("id2label") or {}) or 2)
    return ViTConfig(
        img_size=hf.get("image_size", 224),
        patch_size=hf.get("patch_size", 16),
        in_chans=hf.get("num_channels", 3),
        num_classes=num_labels if classifier else 0,
        embed_dim=hidden,
        depth=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        mlp_ratio=hf.get("intermediate_size", 4 * hidden) / hidden,
        qkv_bias=hf.get("qkv_bias", True),
        norm_eps=hf.get("layer_norm_eps", 1e-12),
        proj_drop_rate=hf.get("hidden_dropout_prob", 0.0),
        pos_drop_rate=hf.get("hidden_dropout_prob", 0.0),
        attn_drop_rate=hf.get("attention_probs_dropout_prob", 0.0),
    )


def _weights_file(path: Path) -> Path:
    if path.is_file():
        return path
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path} holds neither model.safetensors nor pytorch_model.bin")


def read_config(path) -> ViTConfig:
    """The ViTConfig stored with a checkpoint: a HF snapshot's config.json or our metadata."""
    path = Path(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{path} is a directory without a config.json")
        return config_from_hf(json.loads(config_file.read_text()))
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    meta = weights.load_metadata(path)
    if weights.CONFIG_METADATA_KEY not in meta:
        raise ValueError(f"{path} carries no model config; use vit.create_model(name, pretrained=path)")
    return ViTConfig.from_dict(json.loads(meta[weights.CONFIG_METADATA_KEY]))


def checkpoint_grid(path) -> tuple[int, int] | None:
    """The patch grid the checkpoint at ``path`` was trained at, when it says so (a HF
    config.json or our metadata); None otherwise (a square grid is then inferred)."""
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
    state = weights.convert_state_dict(weights.load(file))
    report = weights.load_into(model, state, source=str(file), grid=checkpoint_grid(path))
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
        config = read_config(pretrained).replace(**overrides)
    model = model_class(fast)(config)
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model


def from_pretrained(path, *, fast: bool = False, **overrides) -> torch.nn.Module:
    """A ViT built from the config stored with the checkpoint at ``path`` (with ``overrides``,
    e.g. ``num_classes``, ``img_size``, ``in_chans``), weights fitted as in ``create_model``."""
    model = model_class(fast)(read_config(path).replace(**overrides))
    return load_pretrained(model, path)
