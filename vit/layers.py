"""The reference ViT's building blocks, in plain PyTorch, with timm's parameter names.

The model in ``model.py`` is assembled from these classes; the fast model swaps in
layers that call the fused ops but keeps every parameter name and shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastvit_kernels.reference import split_qkv

from .packing import PackLayout, sequence_ids


class QuickGELU(nn.Module):
    """CLIP's activation ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    """The activation module for a config's ``act_layer`` (timm's names)."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    raise ValueError(f"act_layer must be 'gelu', 'gelu_tanh' or 'quick_gelu', got {name!r}")


def gelu_approximation(act: nn.Module) -> str | None:
    """The ``approximate`` argument of ``fastvit_kernels.linear_gelu`` that computes ``act``,
    or None when no fused activation does."""
    if type(act) is nn.GELU:
        return act.approximate
    if type(act) is QuickGELU:
        return "quick"
    return None


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, ``x * gamma`` (timm's ``ls1`` / ``ls2``)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"init_values={self.init_values}"


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, H/P * W/P, D) through a stride-P Conv2d."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv Linear and SDPA."""

    linear_layer = nn.Linear

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = self.linear_layer(dim, dim * 3, bias=qkv_bias)
        self.proj = self.linear_layer(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, layout: PackLayout | None = None) -> torch.Tensor:
        if layout is not None:
            return self.proj_drop(self.proj(self.attend_packed(self.qkv(x), layout)))
        return self.proj_drop(self.proj(self.attend(self.qkv(x))))

    def attend_packed(self, qkv: torch.Tensor, layout: PackLayout) -> torch.Tensor:
        """A pack's qkv (1, total, 3*D) -> (1, total, D), each image attending to itself only:
        ``attend`` per image."""
        return torch.cat([self.attend(part) for part in torch.split(qkv, layout.lengths, dim=1)], dim=1)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """The qkv Linear's output (B, N, 3*D), laid out (B, N, 3, H, d) -> (B, N, D)."""
        batch, tokens, width = qkv.shape
        q, k, v = split_qkv(qkv, self.num_heads)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return x.transpose(1, 2).reshape(batch, tokens, width // 3)


class Mlp(nn.Module):
    """fc1 -> activation (exact GELU unless ``act_layer`` says otherwise) -> dropout -> fc2 -> dropout."""

    linear_layer = nn.Linear

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0, act_layer: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = make_act(act_layer)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = self.linear_layer(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def drop_path(x: torch.Tensor, drop_prob: float, training: bool, layout: PackLayout | None = None) -> torch.Tensor:
    """Stochastic depth: zero whole samples of a residual branch, rescale the kept ones.
    In a pack (``layout``; x is (1, total, D)) the samples are the images."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    if layout is not None:
        mask = x.new_empty(len(layout)).bernoulli_(keep)[sequence_ids(layout, x.device)]
        return x * mask[None, :, None] / keep
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor, layout: PackLayout | None = None) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, layout)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))).

    ``ls1`` / ``ls2`` are LayerScales with ``init_values``, or identities without.
    """

    attn_layer = Attention
    mlp_layer = Mlp
    norm_layer = nn.LayerNorm
    linear_layer = nn.Linear

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 norm_eps: float = 1e-6, init_values: float | None = None, act_layer: str = "gelu"):
        super().__init__()
        self.norm1 = self.norm_layer(dim, eps=norm_eps)
        self.attn = self.attn_layer(dim, num_heads, qkv_bias, attn_drop, proj_drop)
        self.ls1 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = self.norm_layer(dim, eps=norm_eps)
        self.mlp = self.mlp_layer(dim, mlp_hidden_dim, proj_drop, act_layer)
        self.ls2 = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, layout: PackLayout | None = None) -> torch.Tensor:
        """``layout``: x is a pack (1, total, D) of several images (``vit.packing``)."""
        if layout is not None:
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), layout)), layout)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))), layout)
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class AttentionPoolLatent(nn.Module):
    """Multihead attention pooling (MAP, SigLIP's head; timm's ``AttentionPoolLatent``).

    One learned query (``latent``, projected by ``q``) attends over the tokens (``kv``: one
    Linear giving keys then values); the result goes through ``proj`` and a residual
    ``norm`` + ``mlp``. Returns the pooled token (B, D).
    """

    mlp_layer = Mlp
    norm_layer = nn.LayerNorm
    linear_layer = nn.Linear

    def __init__(self, dim: int, num_heads: int, mlp_hidden_dim: int, norm_eps: float = 1e-6,
                 act_layer: str = "gelu"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = self.linear_layer(dim, dim)
        self.kv = self.linear_layer(dim, 2 * dim)
        self.proj = self.linear_layer(dim, dim)
        self.norm = self.norm_layer(dim, eps=norm_eps)
        self.mlp = self.mlp_layer(dim, mlp_hidden_dim, 0.0, act_layer)

    def query_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, 1, d) from the latent; k, v (B, H, N, d) from the tokens (strided views)."""
        batch, tokens, _ = x.shape
        q = self.q(self.latent).reshape(1, 1, self.num_heads, self.head_dim).transpose(1, 2)
        kv = self.kv(x).reshape(batch, tokens, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return q.expand(batch, -1, -1, -1), kv[0], kv[1]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, D) -> pooled (B, D)."""
        pooled = self.attend(*self.query_key_value(x))  # (B, H, 1, d)
        pooled = self.proj(pooled.transpose(1, 2).reshape(x.shape[0], 1, -1))
        return (pooled + self.mlp(self.norm(pooled)))[:, 0]
