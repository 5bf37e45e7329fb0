"""patch_embed on Triton: patchify + projection + prefix tokens + position embedding, one GEMM.

The kernel is the shared GEMM core in ``gemm.py``; this file holds the launchers and
the torch.library glue.

Forward: A is the (B*G, C*P*P) patch matrix read straight from the image (NCHW or
channels-last, any strides; no im2col copy), B the Conv2d weight viewed as (C*P*P, D);
the epilogue adds the bias and the patch's position row and stores into tokens
n_prefix.. of the (B, T, D) output. The prefix tokens (the class token, then the
register tokens) are written by the same launch, their (image, row) pairs dealt out
to the row blocks: prefix token + its position row when pos_embed has rows for them,
the bare prefix token when it has rows for the patches only (timm's ``no_embed_class``).

Backward: pos_embed's gradient is dOut summed over the batch (fp32), less the prefix
rows when they have no position; the prefix tokens' are its first rows and the bias's
the sum of the patch rows, so one reduction gives them all. dW = dOut_rows^T @ patches
reads both operands in place (split-K when the batch is long and D small). dImages =
dOut_rows @ W is stored through the patch map straight into the image layout (patches
do not overlap, so every pixel is written once).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import dot_op_unsupported
from .gemm import Geometry, gemm, gemm_split_sum, matrix, patches, token_rows


# --------------------------------------------------------------------------- launchers
def _weight_rows(weight: Tensor) -> Tensor:
    """The Conv2d weight as its (D, C*P*P) matrix, with a row stride of a multiple of 16.

    Triton learns a stride's alignment only from its divisibility by 16: with K = 588
    (patch 14) the rows of the plain view look unaligned, its loads become 2-byte ones
    that are not pipelined, and the tiles spill. A padded copy (D * K elements, cheap
    next to the GEMM) keeps the weight's loads vectorised and pipelined.
    """
    w = weight.reshape(weight.shape[0], -1)
    k = w.shape[1]
    if k % 16 == 0 and w.stride(1) == 1 and w.stride(0) % 16 == 0:
        return w
    padded = w.new_empty(w.shape[0], (k + 15) // 16 * 16)[:, :k]
    padded.copy_(w)
    return padded


def _prefix_rows(cls_token: Tensor | None, reg_tokens: Tensor | None, dim: int) -> Tensor | None:
    """The prefix tokens as one contiguous (n_prefix, D) matrix: a view of the one
    given, or a copy of the two (n_prefix * D elements)."""
    rows = [t.reshape(-1, dim) for t in (cls_token, reg_tokens) if t is not None]
    if not rows:
        return None
    return rows[0].contiguous() if len(rows) == 1 else torch.cat(rows)


def patch_embed_forward(images: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor,
                        cls_token: Tensor | None = None, reg_tokens: Tensor | None = None) -> Tensor:
    """(B, n_prefix + G, D) tokens; see ``fastvit_kernels.patch_embed`` for the argument shapes."""
    batch, chans = images.shape[:2]
    dim, _, patch, _ = weight.shape
    geo = Geometry.of(images, patch)
    prefix = _prefix_rows(cls_token, reg_tokens, dim)
    n_prefix = prefix.shape[0] if prefix is not None else 0
    out = images.new_empty(batch, n_prefix + geo.tokens, dim)
    pos = pos_embed.reshape(-1, dim)
    # pos has n_prefix rows for the prefix tokens first, or rows for the patches only
    pos_rows = pos.shape[0] - geo.tokens
    gemm(patches(images), matrix(_weight_rows(weight)).t(), token_rows(out[:, n_prefix:]),
         batch * geo.tokens, dim, chans * patch * patch, geometry=geo, bias=bias,
         pos=matrix(pos[pos_rows:]), prefix=prefix, prefix_pos=pos_rows > 0)
    return out


def patch_embed_weight_grad(grad: Tensor, images: Tensor, weight: Tensor) -> Tensor:
    """d loss / d weight, (D, C, P, P), from the (B, T, D) output gradient."""
    dim, chans, patch, _ = weight.shape
    geo = Geometry.of(images, patch)
    n_prefix = grad.shape[1] - geo.tokens
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    gemm_split_sum(token_rows(grad[:, n_prefix:]).t(), patches(images), dw.view(dim, -1),
                   dim, chans * patch * patch, images.shape[0] * geo.tokens, geometry=geo)
    return dw


def patch_embed_images_grad(grad: Tensor, weight: Tensor, images: Tensor) -> Tensor:
    """d loss / d images, in the images' shape and memory format."""
    dim, chans, patch, _ = weight.shape
    d_images = torch.empty_like(images)
    geo = Geometry.of(d_images, patch)
    n_prefix = grad.shape[1] - geo.tokens
    gemm(token_rows(grad[:, n_prefix:]), matrix(_weight_rows(weight)), patches(d_images),
         images.shape[0] * geo.tokens, chans * patch * patch, dim, geometry=geo)
    return d_images


# ------------------------------------------------------------------ torch.library glue
@torch.library.custom_op("fastvit_triton::patch_embed", mutates_args=())
def _patch_embed_op(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                    cls_token: Optional[Tensor], reg_tokens: Optional[Tensor] = None) -> Tensor:
    return patch_embed_forward(images, weight, bias, pos_embed, cls_token, reg_tokens)


@torch.library.custom_op("fastvit_triton::patch_embed_weight_grad", mutates_args=())
def _weight_grad_op(grad: Tensor, images: Tensor, weight: Tensor) -> Tensor:
    return patch_embed_weight_grad(grad, images, weight)


@torch.library.custom_op("fastvit_triton::patch_embed_images_grad", mutates_args=())
def _images_grad_op(grad: Tensor, weight: Tensor, images: Tensor) -> Tensor:
    return patch_embed_images_grad(grad, weight, images)


def _n_prefix(cls_token, reg_tokens) -> tuple[int, int]:
    """(class tokens, register tokens): the prefix rows, in that order."""
    return int(cls_token is not None), (reg_tokens.shape[1] if reg_tokens is not None else 0)


@_patch_embed_op.register_fake
def _(images, weight, bias, pos_embed, cls_token, reg_tokens=None):
    patch = weight.shape[-1]
    tokens = (images.shape[2] // patch) * (images.shape[3] // patch) + sum(_n_prefix(cls_token, reg_tokens))
    return images.new_empty(images.shape[0], tokens, weight.shape[0])


@_weight_grad_op.register_fake
def _(grad, images, weight):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@_images_grad_op.register_fake
def _(grad, weight, images):
    return torch.empty_like(images)


def _setup(ctx, inputs, output):
    images, weight, bias, pos_embed, cls_token, reg_tokens = inputs
    ctx.save_for_backward(images, weight)
    ctx.n_cls, ctx.n_reg = _n_prefix(cls_token, reg_tokens)
    ctx.pos_shape = pos_embed.shape
    ctx.cls_shape = cls_token.shape if cls_token is not None else None
    ctx.reg_shape = reg_tokens.shape if reg_tokens is not None else None


def _backward(ctx, grad):
    images, weight = ctx.saved_tensors
    # A trailing argument left at its default (reg_tokens=None) has no entry here.
    need = (*ctx.needs_input_grad, False)[:6]
    d_images = d_weight = d_bias = d_pos = d_cls = d_reg = None
    if need[0]:
        d_images = torch.ops.fastvit_triton.patch_embed_images_grad(grad, weight, images)
    if need[1]:
        d_weight = torch.ops.fastvit_triton.patch_embed_weight_grad(grad, images, weight)
    if any(need[2:]):
        n_prefix = ctx.n_cls + ctx.n_reg
        per_token = grad.sum(0, dtype=torch.float32)  # (T, D)
        if need[2]:
            d_bias = per_token[n_prefix:].sum(0).to(grad.dtype)
        if need[3]:  # the prefix rows' positions, when pos_embed has them, come first
            pos_rows = per_token[per_token.shape[0] - ctx.pos_shape[-2]:]
            d_pos = pos_rows.to(grad.dtype).reshape(ctx.pos_shape)
        if need[4]:
            d_cls = per_token[0].to(grad.dtype).reshape(ctx.cls_shape)
        if need[5]:
            d_reg = per_token[ctx.n_cls:n_prefix].to(grad.dtype).reshape(ctx.reg_shape)
    return d_images, d_weight, d_bias, d_pos, d_cls, d_reg


_patch_embed_op.register_autograd(_backward, setup_context=_setup)


def patch_embed(images: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor,
                cls_token: Tensor | None = None, reg_tokens: Tensor | None = None) -> Tensor:
    """Conv2d patchify + projection, prefix tokens (class, then registers) prepended,
    position embedding added (to the prefix tokens too when pos_embed has their rows)."""
    return torch.ops.fastvit_triton.patch_embed(images, weight, bias, pos_embed, cls_token, reg_tokens)


SUPPORTS = {"patch_embed": dot_op_unsupported}
