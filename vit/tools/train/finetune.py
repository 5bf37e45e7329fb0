"""Fine-tuning knobs: optimizer groups with layer-wise learning-rate decay, a head learning-rate
scale and a frozen backbone (linear probe), and the drop-path rate fine-tuning recipes use."""

from __future__ import annotations

import torch

from .schedule import no_weight_decay

# Stochastic depth of the fine-tuning recipes (DeiT / BEiT / timm) by width; the from-scratch
# presets keep 0. A user's --set drop_path_rate=... wins.
FINETUNE_DROP_PATH = {192: 0.0, 384: 0.1, 768: 0.1, 1024: 0.2, 1280: 0.3}

# Parameters that belong to the embedding (layer 0) and to the head side (the last layer).
_EMBED = ("patch_embed.", "cls_token", "reg_token", "dist_token", "pos_embed", "norm_pre.")
_HEADS = ("head.", "head_dist.")  # DeiT's distillation head is a head too


def finetune_drop_path(embed_dim: int) -> float:
    """The recipe's drop-path rate for a model of this width (the nearest listed width)."""
    nearest = min(FINETUNE_DROP_PATH, key=lambda width: abs(width - embed_dim))
    return FINETUNE_DROP_PATH[nearest]


def layer_id(name: str, depth: int) -> int:
    """0 for the embedding, i + 1 for block i, depth + 1 for the final norm and the head."""
    if name.startswith(_EMBED):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def is_head(name: str) -> bool:
    return name.startswith(_HEADS)


def freeze_backbone(module: torch.nn.Module) -> list[str]:
    """Train the head only (a linear probe); returns the names of the parameters left trainable."""
    trainable = []
    for name, param in module.named_parameters():
        param.requires_grad_(is_head(name))
        if is_head(name):
            trainable.append(name)
    if not trainable:
        raise ValueError("--freeze-backbone: the model has no head to train (num_classes=0?)")
    return trainable


def param_groups(module: torch.nn.Module, weight_decay: float, *, depth: int,
                 layer_decay: float | None = None, head_lr_scale: float = 1.0) -> list[dict]:
    """AdamW groups, each with an ``lr_scale`` that the schedule multiplies the rate by.

    Without layer decay or head scale: two groups (decayed weights, then the rest), as a
    plain recipe. With ``layer_decay`` d: layer l of L = depth + 1 gets d ** (L - l) (BEiT's
    rule: the head side 1, block i d ** (depth - i), the embedding d ** (depth + 1));
    ``head_lr_scale`` multiplies the head's scale on top.
    """
    if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    if not head_lr_scale > 0:
        raise ValueError(f"head_lr_scale must be > 0, got {head_lr_scale}")
    groups: dict[tuple, dict] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        scale = 1.0
        if layer_decay is not None:
            scale = layer_decay ** (depth + 1 - layer_id(name, depth))
        if is_head(name):
            scale *= head_lr_scale
        decay = 0.0 if no_weight_decay(name, param) else weight_decay
        group = groups.setdefault((scale, decay == 0.0), {"params": [], "names": [], "weight_decay": decay,
                                                          "lr_scale": scale})
        group["params"].append(param)
        group["names"].append(name)
    # decayed before undecayed, then by scale: the plain recipe's two groups come out in its order
    return [groups[key] for key in sorted(groups, key=lambda k: (k[1], -k[0]))]
