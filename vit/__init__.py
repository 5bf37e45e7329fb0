"""vit: Vision Transformer models (reference ``vit.ViT``; fast ``vit.fast.ViT``)."""

from .config import PRESETS, ViTConfig, get_config
from .factory import create_model, from_pretrained, load_checkpoint, load_pretrained
from .model import ViT, count_flops

__all__ = ["PRESETS", "ViT", "ViTConfig", "count_flops", "create_model", "from_pretrained",
           "get_config", "load_checkpoint", "load_pretrained"]
