"""Checkpoint interop, as pure functions: key conversion, pos-embed resampling, safetensors.

``convert_state_dict`` turns timm and Hugging Face ViT state_dicts into our layout (which
is timm's). Loading never unpickles arbitrary objects: ``.safetensors`` is read with
safetensors, ``.bin`` / ``.pth`` / ``.pt`` only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ._io import atomic_write

CONFIG_METADATA_KEY = "fastvit_config"

# --------------------------------------------------------------------- pos-embed resampling


def resample_pos_embed(pos_embed: torch.Tensor, new_size, old_size=None,
                       num_prefix_tokens: int = 1, interpolation: str = "bicubic",
                       antialias: bool = True) -> torch.Tensor:
    """Resample a (1, prefix + H*W, D) position embedding to a new patch grid.

    The grid part is interpolated in fp32 (bicubic, as timm does) and cast back; the
    prefix (class) tokens are kept as they are. ``old_size`` defaults to a square grid.
    Resampling to the same grid returns the input unchanged.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, tokens, dim), got {tuple(pos_embed.shape)}")
    new_size = (new_size, new_size) if isinstance(new_size, int) else tuple(new_size)
    grid_tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_size is None:
        side = math.isqrt(grid_tokens)
        if side * side != grid_tokens:
            raise ValueError(f"cannot infer a square grid from {grid_tokens} position tokens; "
                             "pass old_size=(rows, cols)")
        old_size = (side, side)
    old_size = (old_size, old_size) if isinstance(old_size, int) else tuple(old_size)
    if old_size[0] * old_size[1] != grid_tokens:
        raise ValueError(f"old_size {old_size} has {old_size[0] * old_size[1]} positions but "
                         f"pos_embed has {grid_tokens} (after {num_prefix_tokens} prefix tokens)")
    if new_size == old_size:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.float().reshape(1, old_size[0], old_size[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias,
                         align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_size[0] * new_size[1], dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


# ------------------------------------------------------------------------ key conversion

_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers

_HF_EMBED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
# Per-block names: encoder.layer.N.<old> (transformers < 5) or layers.N.<new> (>= 5).
_HF_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
    "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2,
}
# Parts of HF checkpoints that an image classifier does not use.
_HF_UNUSED = ("embeddings.mask_token", "pooler.dense.weight", "pooler.dense.bias")
_HF_BLOCK_KEY = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")


def detect_layout(state_dict: dict) -> str:
    """'hf' for Hugging Face ViT keys, 'timm' for timm's (= ours)."""
    keys = [_strip(k) for k in state_dict]
    if any("embeddings.patch_embeddings" in k for k in keys):
        return "hf"
    if any(k.startswith("patch_embed.") or k.startswith("blocks.") for k in keys):
        return "timm"
    sample = ", ".join(sorted(keys)[:5])
    raise ValueError(f"cannot tell the layout of this state_dict (keys like: {sample}); "
                     "expected timm's 'patch_embed.proj.weight' or Hugging Face's "
                     "'vit.embeddings.patch_embeddings.projection.weight'")


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def convert_state_dict(state_dict: dict, source: str = "auto") -> dict:
    """A timm or Hugging Face ViT state_dict in our (timm's) layout.

    ``source`` is "auto", "timm" or "hf". Hugging Face's separate query/key/value
    projections are concatenated into one qkv Linear. Keys this function does not
    understand raise a ValueError rather than being dropped.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if source not in ("auto", "timm", "hf"):
        raise ValueError(f"source must be 'auto', 'timm' or 'hf', got {source!r}")
    if source == "auto":
        source = detect_layout(state_dict)
    if source == "timm":
        return {_strip(k): v for k, v in state_dict.items()}
    return _convert_hf(state_dict)


def _convert_hf(state_dict: dict) -> dict:
    out, qkv_parts, unknown = {}, {}, []
    for raw_key, value in state_dict.items():
        key = _strip(raw_key)
        key = key[len("vit."):] if key.startswith("vit.") else key
        if key in _HF_EMBED:
            out[_HF_EMBED[key]] = value
            continue
        if key in _HF_UNUSED:
            continue
        match = _HF_BLOCK_KEY.match(key)
        if match:
            index, name, kind = match.groups()
            if name in _HF_BLOCK:
                out[f"blocks.{index}.{_HF_BLOCK[name]}.{kind}"] = value
                continue
            if name in _HF_QKV:
                qkv_parts.setdefault((index, kind), [None] * 3)[_HF_QKV[name]] = value
                continue
        unknown.append(raw_key)
    if unknown:
        raise ValueError(f"unrecognised Hugging Face ViT keys: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}")
    for (index, kind), parts in qkv_parts.items():
        if any(p is None for p in parts):
            missing = [n for n, p in zip("qkv", parts) if p is None]
            raise ValueError(f"block {index} has an incomplete query/key/value {kind}: missing {missing}")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    return out


# ---------------------------------------------------------------------- files

def save(state_dict, path, config=None, metadata: dict | None = None) -> None:
    """Write a state_dict (or a module's) to ``path`` as safetensors.

    ``config`` (a ViTConfig or dict) is stored in the file's metadata so that
    ``vit.from_pretrained(path)`` can rebuild the model.
    """
    from safetensors.torch import save_file

    if isinstance(state_dict, torch.nn.Module):
        state_dict = state_dict.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {"format": "pt", **(metadata or {})}
    if config is not None:
        meta[CONFIG_METADATA_KEY] = json.dumps(config if isinstance(config, dict) else config.to_dict())
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))  # never half-written


def load(path) -> dict:
    """Read a state_dict from ``.safetensors`` (safe) or ``.bin``/``.pth``/``.pt`` (weights only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".bin", ".pth", ".pt"):
        obj = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path} does not hold a state_dict of tensors")
        return obj
    raise ValueError(f"unsupported checkpoint format {path.suffix!r} for {path}; "
                     "expected .safetensors, .bin, .pth or .pt")


def load_metadata(path) -> dict:
    """The string metadata of a safetensors file ({} for other formats)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def check_state_dict(model: torch.nn.Module, state_dict: dict) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: expected {tuple(expected[k].shape)}, got {tuple(state_dict[k].shape)}"
              for k in expected if k in state_dict and expected[k].shape != state_dict[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if shapes:
        problems.append(f"shape mismatches [{'; '.join(shapes)}]")
    if problems:
        raise ValueError("checkpoint does not match the model: " + "; ".join(problems))
