"""The optimization schedule: AdamW parameter groups and the warmup-cosine learning rate."""

from __future__ import annotations

import math

import torch

from .errors import TrainError

# The token parameters that take no weight decay: ``vit.ViT.no_weight_decay()``, timm's set.
NO_DECAY_TOKENS = frozenset({"pos_embed", "cls_token", "reg_token", "dist_token"})


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases, the position embedding and the class / register / distillation tokens
    are not decayed (names may carry a wrapper's prefix, e.g. DDP's ``module.``)."""
    return param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_TOKENS


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay for weight matrices, none for what ``no_weight_decay`` names."""
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if no_weight_decay(name, param):
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
        """Set the rate of ``step`` (0-based) on every parameter group, times the group's
        ``lr_scale`` if it has one (layer decay, head scale: ``finetune.param_groups``); returns it."""
        self.step = step
        rate = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = rate * group["lr_scale"] if "lr_scale" in group else rate
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
