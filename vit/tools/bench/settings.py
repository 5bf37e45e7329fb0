"""What one ``fastvit bench`` run measures: model, device, dtype, batch, steps, providers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vit.config import ViTConfig, get_config

from ..device import resolve_device
from . import providers as registry

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_MODEL, CUDA_MODEL = "vit_small_patch16_224", "vit_base_patch16_224"
CPU_BATCH, CUDA_BATCH = 8, 128


@dataclass
class Settings:
    model: str
    config: ViTConfig
    device: torch.device
    dtype: str
    batch_size: int
    steps: int | None  # interleaved rounds; None: chosen from timing.ROUND_TARGET_SECONDS
    warmup: int
    train: bool
    providers: list[str]
    out: Path | None
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _positive(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def make_settings(*, model: str | None = None, device: str | None = None, dtype: str | None = None,
                  batch_size: int | None = None, img_size: int | None = None,
                  steps: int | None = None, warmup: int | None = None, train: bool = False,
                  providers: list[str] | str | None = None, out=None, seed: int = 0) -> Settings:
    """Fill in what was not given from the device: model, dtype, batch, providers."""
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    model = model or (CUDA_MODEL if on_cuda else CPU_MODEL)
    dtype = dtype or ("bf16" if on_cuda else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    overrides = {} if img_size is None else {"img_size": _positive("img_size", img_size)}
    config = get_config(model, **overrides)
    batch_size = _positive("batch_size", batch_size if batch_size is not None
                           else (CUDA_BATCH if on_cuda else CPU_BATCH))
    _positive("steps", steps, allow_none=True)
    if warmup is None:
        warmup = 5 if on_cuda else (2 if train else 1)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an integer >= 1 (compilation happens there), got {warmup!r}")
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    if providers is None:
        providers = registry.default_providers(dev, config, dtype)
    else:
        for name in providers:
            registry.get_provider(name)  # raises for unknown names, listing the known ones
        # eager is the baseline every ratio refers to: always measured, first
        providers = ["eager"] + [p for p in dict.fromkeys(providers) if p != "eager"]
    return Settings(model, config, dev, dtype, batch_size, steps, warmup, bool(train), providers,
                    Path(out) if out is not None else None, seed)
