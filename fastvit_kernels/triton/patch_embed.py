"""patch_embed on Triton: patchify + projection + class token + position embedding, one GEMM.

The kernel is the shared GEMM core in ``gemm.py``; this file holds the launchers and
the torch.library glue.

Forward: A is the (B*G, C*P*P) patch matrix read straight from the image (NCHW or
channels-last, any strides; no im2col copy), B the Conv2d weight viewed as (C*P*P, D);
the epilogue adds the bias and pos_embed[1 + token] and stores into tokens 1.. of the
(B, T, D) output, and the first row block also writes token 0 of every image as
cls_token + pos_embed[0].

Backward: pos_embed's gradient is dOut summed over the batch (fp32); the class token's
is its row 0 and the bias's the sum of its other rows, so one reduction gives all
three. dW = dOut_rows^T @ patches reads both operands in place (split-K when the batch
is long and D small). dImages = dOut_rows @ W is stored through the patch map straight
into the image layout (patches do not overlap, so every pixel is written once).
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


def patch_embed_forward(images: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor,
                        cls_token: Tensor | None = None) -> Tensor:
    """(B, T, D) tokens; see ``fastvit_kernels.patch_embed`` for the argument shapes."""
    batch, chans = images.shape[:2]
    dim, _, patch, _ = weight.shape
    geo = Geometry.of(images, patch)
    has_cls = int(cls_token is not None)
    tokens = geo.tokens + has_cls
    out = images.new_empty(batch, tokens, dim)
    pos = pos_embed.reshape(tokens, dim)
    gemm(patches(images), matrix(_weight_rows(weight)).t(), token_rows(out[:, has_cls:]),
         batch * geo.tokens, dim, chans * patch * patch, geometry=geo, bias=bias,
         pos=matrix(pos[has_cls:]), cls=cls_token.reshape(dim) if has_cls else None)
    return out


def patch_embed_weight_grad(grad: Tensor, images: Tensor, weight: Tensor) -> Tensor:
    """d loss / d weight, (D, C, P, P), from the (B, T, D) output gradient."""
    dim, chans, patch, _ = weight.shape
    geo = Geometry.of(images, patch)
    has_cls = grad.shape[1] - geo.tokens
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    gemm_split_sum(token_rows(grad[:, has_cls:]).t(), patches(images), dw.view(dim, -1),
                   dim, chans * patch * patch, images.shape[0] * geo.tokens, geometry=geo)
    return dw


def patch_embed_images_grad(grad: Tensor, weight: Tensor, images: Tensor) -> Tensor:
    """d loss / d images, in the images' shape and memory format."""
    dim, chans, patch, _ = weight.shape
    d_images = torch.empty_like(images)
    geo = Geometry.of(d_images, patch)
    has_cls = grad.shape[1] - geo.tokens
    gemm(token_rows(grad[:, has_cls:]), matrix(_weight_rows(weight)), patches(d_images),
         images.shape[0] * geo.tokens, chans * patch * patch, dim, geometry=geo)
    return d_images


# ------------------------------------------------------------------ torch.library glue
@torch.library.custom_op("fastvit_triton::patch_embed", mutates_args=())
def _patch_embed_op(images: Tensor, weight: Tensor, bias: Optional[Tensor], pos_embed: Tensor,
                    cls_token: Optional[Tensor]) -> Tensor:
    return patch_embed_forward(images, weight, bias, pos_embed, cls_token)


@torch.library.custom_op("fastvit_triton::patch_embed_weight_grad", mutates_args=())
def _weight_grad_op(grad: Tensor, images: Tensor, weight: Tensor) -> Tensor:
    return patch_embed_weight_grad(grad, images, weight)


@torch.library.custom_op("fastvit_triton::patch_embed_images_grad", mutates_args=())
def _images_grad_op(grad: Tensor, weight: Tensor, images: Tensor) -> Tensor:
    return patch_embed_images_grad(grad, weight, images)


@_patch_embed_op.register_fake
def _(images, weight, bias, pos_embed, cls_token):
    patch = weight.shape[-1]
    tokens = (images.shape[2] // patch) * (images.shape[3] // patch) + (cls_token is not None)
    return images.new_empty(images.shape[0], tokens, weight.shape[0])


@_weight_grad_op.register_fake
def _(grad, images, weight):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@_images_grad_op.register_fake
def _(grad, weight, images):
    return torch.empty_like(images)


def _setup(ctx, inputs, output):
    images, weight, bias, pos_embed, cls_token = inputs
    ctx.save_for_backward(images, weight)
    ctx.has_cls = cls_token is not None
    ctx.pos_shape = pos_embed.shape
    ctx.cls_shape = cls_token.shape if cls_token is not None else None


def _backward(ctx, grad):
    images, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    d_images = d_weight = d_bias = d_pos = d_cls = None
    if need[0]:
        d_images = torch.ops.fastvit_triton.patch_embed_images_grad(grad, weight, images)
    if need[1]:
        d_weight = torch.ops.fastvit_triton.patch_embed_weight_grad(grad, images, weight)
    if need[2] or need[3] or need[4]:
        per_token = grad.sum(0, dtype=torch.float32)  # (T, D): pos_embed's gradient
        if need[2]:
            d_bias = per_token[int(ctx.has_cls):].sum(0).to(grad.dtype)
        if need[3]:
            d_pos = per_token.to(grad.dtype).reshape(ctx.pos_shape)
        if need[4]:
            d_cls = per_token[0].to(grad.dtype).reshape(ctx.cls_shape)
    return d_images, d_weight, d_bias, d_pos, d_cls


_patch_embed_op.register_autograd(_backward, setup_context=_setup)


def patch_embed(images: Tensor, weight: Tensor, bias: Tensor | None, pos_embed: Tensor,
                cls_token: Tensor | None = None, reg_tokens: Tensor | None = None) -> Tensor:
    """Conv2d patchify + projection, class token prepended, position embedding added."""
    return torch.ops.fastvit_triton.patch_embed(images, weight, bias, pos_embed, cls_token)


def _unsupported(images=None, weight=None, bias=None, pos_embed=None, cls_token=None, reg_tokens=None):
    if reg_tokens is not None:
        return "register tokens are not implemented yet"  # TODO(issue 18)
    if cls_token is not None and pos_embed is not None and pos_embed.shape[-2] != (
            (images.shape[-2] // weight.shape[-1]) * (images.shape[-1] // weight.shape[-1]) + 1):
        return "a class token without position (no_embed_class) is not implemented yet"  # TODO(issue 18)
    return dot_op_unsupported(images, weight, bias, pos_embed, cls_token)


SUPPORTS = {"patch_embed": _unsupported}
