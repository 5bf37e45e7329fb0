"""The reference Vision Transformer: plain PyTorch, timm's structure and parameter names.

``ViT(config)`` or ``ViT(**fields)`` (the fields of ``ViTConfig``), or both: keyword
arguments override the config. Subclasses swap the layer classes (``patch_embed_layer``,
``block_layer``, ``norm_layer``) and keep every parameter name.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ViTConfig
from .layers import Block, PatchEmbed
from .weights import resample_pos_embed


class ViT(nn.Module):
    patch_embed_layer = PatchEmbed
    block_layer = Block
    norm_layer = nn.LayerNorm

    def __init__(self, config: ViTConfig | None = None, **overrides):
        super().__init__()
        if config is not None and not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig or None, got {type(config).__name__}")
        cfg = (config or ViTConfig()).replace(**overrides)
        self.config = cfg
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.grad_checkpointing = False

        dim = cfg.embed_dim
        self.patch_embed = self.patch_embed_layer(cfg.patch_size, cfg.in_chans, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        num_tokens = cfg.grid_size[0] * cfg.grid_size[1] + cfg.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.blocks = nn.Sequential(*[
            self.block_layer(dim, cfg.num_heads, cfg.mlp_hidden_dim, cfg.qkv_bias,
                             proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate,
                             drop_path=rate, norm_eps=cfg.norm_eps)
            for rate in rates
        ])
        self.norm = nn.Identity() if cfg.use_fc_norm else self.norm_layer(dim, eps=cfg.norm_eps)
        self.fc_norm = self.norm_layer(dim, eps=cfg.norm_eps) if cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ init / settings
    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default init: truncated normal (std .02) for Linear and pos_embed."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = bool(enable)

    @property
    def num_features(self) -> int:
        return self.config.embed_dim

    # ------------------------------------------------------------------------ forward
    def check_images(self, x) -> tuple[int, int]:
        """Validate an image batch; returns its patch grid (rows, cols)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"images must be (batch, {cfg.in_chans}, height, width), "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[1] != cfg.in_chans:
            raise ValueError(f"expected {cfg.in_chans} image channels, got {x.shape[1]} "
                             f"(images of shape {tuple(x.shape)})")
        height, width = x.shape[-2:]
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size "
                             f"{cfg.patch_size}")
        if not cfg.dynamic_img_size and (height, width) != cfg.img_hw:
            raise ValueError(f"expected image size {cfg.img_hw[0]}x{cfg.img_hw[1]}, got "
                             f"{height}x{width} (build with dynamic_img_size=True for other sizes)")
        return height // cfg.patch_size, width // cfg.patch_size

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a patch grid, resampled if it is not the config's."""
        if tuple(grid) == self.config.grid_size:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, grid, self.config.grid_size, self.num_prefix_tokens)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> tokens: patch embedding, class token prepended, position embedding added."""
        grid = self.check_images(x)
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed_for(grid))

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalized tokens (B, T, D)."""
        return self.norm(self.run_blocks(self.embed(x)))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, T, D) -> logits (B, num_classes), or pooled features if pre_logits."""
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def count_flops(config: ViTConfig, img_hw: tuple[int, int] | None = None) -> int:
    """Forward FLOPs (2 per multiply-add) of one image: the matmuls and attention."""
    height, width = img_hw or config.img_hw
    patches = (height // config.patch_size) * (width // config.patch_size)
    tokens = patches + config.num_prefix_tokens
    dim, hidden = config.embed_dim, config.mlp_hidden_dim
    embed = 2 * patches * dim * config.in_chans * config.patch_size ** 2
    per_block = 2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 4 * tokens * tokens * dim
    head = 2 * dim * config.num_classes
    return embed + config.depth * per_block + head


__all__ = ["ViT", "count_flops"]
