"""Checkpoint interop, as pure functions: key conversion, pos-embed resampling, safetensors.

``convert_state_dict`` turns timm and Hugging Face state_dicts of the ViT family into our
layout (which is timm's; the HF families' key maps are in ``vit.hf``). Loading never
unpickles arbitrary objects: ``.safetensors`` is read with safetensors, ``.bin`` /
``.pth`` / ``.pt`` only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import hf
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

# The HF key tables, as ``vit.tools.bench.providers.to_hf_state_dict`` (the inverse map) reads them.
_HF_EMBED = {**hf._EMBED, "classifier.weight": "head.weight", "classifier.bias": "head.bias"}
_HF_UNUSED = tuple(hf._DROPPED)
_HF_BLOCK, _HF_QKV, _HF_BLOCK_KEY = hf._BLOCK, hf._QKV, hf._BLOCK_KEY


def detect_layout(state_dict: dict) -> str:
    """'hf' for Hugging Face ViT-family keys, 'timm' for timm's (= ours)."""
    keys = [_strip(k) for k in state_dict]
    if hf.is_hf_state_dict(keys):
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


def convert_state_dict(state_dict: dict, source: str = "auto", notes: list | None = None) -> dict:
    """A timm or Hugging Face state_dict of the ViT family in our (timm's) layout.

    ``source`` is "auto", "timm" or "hf" (see ``vit.hf.convert_state_dict`` for the HF
    families). What is dropped (text towers, poolers ...) is appended to ``notes``; keys
    this function does not understand raise a ValueError rather than being dropped.
    """
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    if source not in ("auto", "timm", "hf"):
        raise ValueError(f"source must be 'auto', 'timm' or 'hf', got {source!r}")
    if source == "auto":
        source = detect_layout(state_dict)
    stripped = {_strip(k): v for k, v in state_dict.items()}
    if source == "timm":
        return _from_original_dinov2(stripped, [] if notes is None else notes)
    return hf.convert_state_dict(stripped, notes)


def _from_original_dinov2(state: dict, notes: list) -> dict:
    """Meta's DINOv2 checkpoints are timm's layout but for ``mask_token`` (pretraining only,
    dropped) and ``register_tokens``, which, as in HF's port, come after the position
    embedding was added: folded as ``vit.hf`` does (class position into cls_token)."""
    if "mask_token" in state:
        state.pop("mask_token")
        notes.append("dropped the masked-image-modeling token (pretraining only): mask_token")
    if "register_tokens" in state:
        state["reg_token"] = state.pop("register_tokens")
        pos = state["pos_embed"]
        state["cls_token"], state["pos_embed"] = state["cls_token"] + pos[:, :1], pos[:, 1:]
        notes.append("folded the class token's position embedding into cls_token (registers: no_embed_class)")
    return state


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
    """Read a state_dict from ``.safetensors`` (safe) or ``.bin``/``.pth``/``.pt`` (weights only),
    or from the shards a Hugging Face ``*.index.json`` lists."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.name.endswith(".index.json"):
        return _load_shards(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        with _readable(path, "safetensors"):
            return load_file(str(path))
    if path.suffix in (".bin", ".pth", ".pt"):
        with _readable(path, "torch.save (weights only)"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path} does not hold a state_dict of tensors")
        return obj
    raise ValueError(f"unsupported checkpoint format {path.suffix!r} for {path}; "
                     "expected .safetensors, .bin, .pth or .pt")


def _load_shards(index: Path) -> dict:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"{index} is not a Hugging Face shard index (a JSON 'weight_map'): {exc}") from exc
    state = {}
    for shard in sorted(set(weight_map.values())):
        state.update(load(index.parent / shard))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ValueError(f"the shards of {index} lack {len(missing)} listed tensors, e.g. {missing[:3]}")
    return state


def load_metadata(path) -> dict:
    """The string metadata of a safetensors file ({} for other formats)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with _readable(path, "safetensors"), safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


@contextlib.contextmanager
def _readable(path: Path, kind: str):
    """Turn a reader's low-level error (truncated file, bad header, a pickle that is not
    plain tensors) into a ValueError that names the file and the expected format."""
    from safetensors import SafetensorError

    try:
        yield
    except FileNotFoundError:
        raise
    except (SafetensorError, OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as a {kind} checkpoint (corrupt, truncated or another "
                         f"format): {type(exc).__name__}: {exc}") from exc


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


# ------------------------------------------------------------- fitting weights to a model
# Fine-tuning starts from weights trained for another task: timm's load_pretrained and
# transformers' num_labels re-initialize the classifier, resample the position embedding
# and adapt the patch embedding to the channel count; everything else must match.

HEAD_KEYS = ("head.weight", "head.bias", "head_dist.weight", "head_dist.bias")


def adapt_input_conv(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """A patch-embedding weight (D, C, P, P) for ``in_chans`` input channels.

    One channel: the sum over the checkpoint's channels, so a gray image (R = G = B) gives
    the activations of its RGB version. Otherwise the channels are repeated cyclically and
    scaled by C / in_chans, which keeps the activations' scale (exactly, for an image with
    equal channels, when in_chans is a multiple of C). timm's ``adapt_input_conv`` rule.
    """
    if weight.dim() != 4:
        raise ValueError(f"expected a conv weight (D, C, P, P), got shape {tuple(weight.shape)}")
    if in_chans <= 0:
        raise ValueError(f"in_chans must be a positive int, got {in_chans}")
    channels = weight.shape[1]
    if in_chans == channels:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        repeats = -(-in_chans // channels)
        w = w.repeat(1, repeats, 1, 1)[:, :in_chans] * (channels / in_chans)
    return w.to(weight.dtype)


@dataclass
class LoadReport:
    """What ``load_into`` did with each tensor of a checkpoint."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)  # model keys left at their fresh init
    dropped: list[str] = field(default_factory=list)  # checkpoint keys the model has no place for
    resampled: list[str] = field(default_factory=list)  # "pos_embed: 14x14 -> 24x24"
    adapted: list[str] = field(default_factory=list)  # "patch_embed.proj.weight: 3 -> 1 channels"
    notes: list[str] = field(default_factory=list)  # what the key conversion dropped or folded

    def __str__(self) -> str:
        parts = [f"loaded {len(self.loaded)} tensors" + (f" from {self.source}" if self.source else "")]
        for what, items in (("re-initialized", self.reinitialized), ("dropped", self.dropped),
                            ("resampled", self.resampled), ("adapted", self.adapted)):
            if items:
                parts.append(f"{what}: {', '.join(items)}")
        return "; ".join(parts + self.notes)  # each note a sentence of its own


def _grid_of(tokens: int, where: str) -> tuple[int, int]:
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{where}: cannot infer a square grid from {tokens} position tokens")
    return side, side


def fit_state_dict(model: torch.nn.Module, state_dict: dict, source: str = "",
                   grid: tuple[int, int] | None = None) -> tuple[dict, LoadReport]:
    """``state_dict`` (our layout) made to fit ``model``, and the report of what changed.

    A classifier of another size, or none, is left to the model's fresh init (and a
    checkpoint classifier the model lacks is dropped); the position embedding is resampled
    to the model's grid (``grid``: the checkpoint's, if not square); the patch embedding
    follows the model's channel count. Any other mismatch raises a ValueError naming the
    keys and shapes.
    """
    expected = model.state_dict()
    state = dict(state_dict)
    report = LoadReport(source=str(source))
    for key in HEAD_KEYS:
        if key in state and (key not in expected or state[key].shape != expected[key].shape):
            got = tuple(state.pop(key).shape)
            report.dropped.append(f"{key} {got}")
        if key in expected and key not in state:
            report.reinitialized.append(f"{key} {tuple(expected[key].shape)}")

    pos, want = state.get("pos_embed"), expected.get("pos_embed")
    if pos is not None and want is not None and pos.shape != want.shape and pos.dim() == 3 \
            and pos.shape[-1] == want.shape[-1]:
        prefix = model.config.pos_prefix_tokens  # 0 with no_embed_class
        old = tuple(grid) if grid is not None else _grid_of(pos.shape[1] - prefix, f"{source or 'checkpoint'}")
        new = tuple(model.config.grid_size)
        state["pos_embed"] = resample_pos_embed(pos, new, old, num_prefix_tokens=prefix)
        report.resampled.append(f"pos_embed: {old[0]}x{old[1]} -> {new[0]}x{new[1]}")

    key = "patch_embed.proj.weight"
    conv, want = state.get(key), expected.get(key)
    if conv is not None and want is not None and conv.dim() == 4 and conv.shape != want.shape \
            and conv.shape[0] == want.shape[0] and conv.shape[2:] == want.shape[2:]:
        state[key] = adapt_input_conv(conv, want.shape[1])
        report.adapted.append(f"{key}: {conv.shape[1]} -> {want.shape[1]} channels")

    fresh_head = {k: expected[k] for k in HEAD_KEYS if k in expected and k not in state}
    try:
        check_state_dict(model, {**state, **fresh_head})
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}" if source else str(exc)) from None
    report.loaded = [k for k in state if k in expected]
    return state, report


def load_into(model: torch.nn.Module, state_dict: dict, source: str = "",
              grid: tuple[int, int] | None = None) -> LoadReport:
    """Fit ``state_dict`` to ``model`` (see ``fit_state_dict``) and load it; returns the report."""
    state, report = fit_state_dict(model, state_dict, source, grid)
    result = model.load_state_dict(state, strict=False)
    left = sorted(set(result.missing_keys) - set(HEAD_KEYS))
    if left or result.unexpected_keys:  # fit_state_dict checked: this would be a bug here
        raise RuntimeError(f"internal error loading {source}: missing {left}, unexpected {result.unexpected_keys}")
    return report
