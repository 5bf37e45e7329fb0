"""Pure-PyTorch definitions of every op: the ground truth and the ``torch`` backend.

Tests compare every other backend against these functions (run in fp32/fp64), and
benchmarks use them as the eager baseline. Keep them short and obviously right.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_embed(images, weight, bias, pos_embed, cls_token=None, reg_tokens=None):
    """Conv2d patchify + projection, prepend the prefix tokens, add the position embedding.

    images (B, C, H, W); weight (D, C, P, P); bias (D,) or None; cls_token (1, 1, D) or
    None; reg_tokens (1, R, D) or None (register tokens, after the class token). pos_embed
    (1, T, D) covers the patch grid, T = (H/P)*(W/P), and either all prefix tokens too
    (T + n_prefix rows, first) or none of them (T rows: timm's ``no_embed_class``).
    """
    patch = weight.shape[-1]
    x = F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)
    prefix = [t.expand(x.shape[0], -1, -1) for t in (cls_token, reg_tokens) if t is not None]
    pos = pos_embed.reshape(1, -1, x.shape[2])
    if pos.shape[1] == x.shape[1]:  # the grid only: prefix tokens get no position
        return torch.cat([*prefix, x + pos], dim=1)
    return torch.cat([*prefix, x], dim=1) + pos


def layer_norm(x, weight, bias, eps=1e-6):
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def add_layer_norm(x, residual, weight, bias, eps=1e-6, gamma=None):
    """(layer_norm(residual + gamma * x), residual + gamma * x); gamma (D,) is LayerScale."""
    summed = residual + (x if gamma is None else x * gamma)
    return layer_norm(summed, weight, bias, eps), summed


def gelu(x, approximate="none"):
    """GELU: exact erf ("none"), tanh approximation ("tanh"), or CLIP's QuickGELU
    x * sigmoid(1.702 x) ("quick")."""
    if approximate == "quick":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate=approximate)


def linear_gelu(x, weight, bias, approximate="none"):
    return gelu(F.linear(x, weight, bias), approximate)


def split_qkv(qkv, num_heads: int):
    """The qkv Linear's output (B, N, 3*D), laid out (B, N, 3, H, d), as q, k, v: strided
    (B, H, N, d) views, no copy. The one place this layout is written down in Python."""
    batch, tokens, width = qkv.shape
    return qkv.reshape(batch, tokens, 3, num_heads, width // (3 * num_heads)).permute(2, 0, 3, 1, 4).unbind(0)


def default_scale(head_dim: int) -> float:
    """Attention's softmax scale when none is given: 1 / sqrt(head_dim), as SDPA."""
    return head_dim ** -0.5 if head_dim > 0 else 1.0


def attention(q, k, v, scale=None):
    """Non-causal softmax(q k^T * scale) v on (B, H, N, d) tensors."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def packed_attention(qkv, num_heads, scale=None):
    """Attention on the qkv Linear's output (B, N, 3*D); returns (B, N, D)."""
    batch, tokens, width = qkv.shape
    q, k, v = split_qkv(qkv, num_heads)
    return attention(q, k, v, scale).transpose(1, 2).reshape(batch, tokens, width // 3)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """Packed sequences, each attending to itself only: q, k, v are (total, H, d), sequence i
    is rows cu_seqlens[i]:cu_seqlens[i+1] (max_seqlen, the longest, is not needed here).
    One SDPA per sequence."""
    bounds = cu_seqlens.tolist()
    outs = [attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)), scale).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs)


def varlen_packed_attention(qkv, cu_seqlens, max_seqlen, num_heads, scale=None):
    """Varlen attention on the qkv Linear's output (total, 3*D); returns (total, D)."""
    total, width = qkv.shape
    q, k, v = (t[0].transpose(0, 1) for t in split_qkv(qkv.unsqueeze(0), num_heads))
    return varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale).reshape(total, width // 3)


OPS = {
    "patch_embed": patch_embed,
    "layer_norm": layer_norm,
    "add_layer_norm": add_layer_norm,
    "linear_gelu": linear_gelu,
    "attention": attention,
    "packed_attention": packed_attention,
    "varlen_attention": varlen_attention,
    "varlen_packed_attention": varlen_packed_attention,
}
