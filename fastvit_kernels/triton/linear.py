"""linear on Triton: ``x @ weight.T + bias`` on the GEMM core of ``gemm.py``.

The same kernel as linear_gelu without an activation: the bias in the epilogue. Backward
is the two GEMMs dX = dY @ W and dW = dY^T @ X, the bias gradient (the column sums of dY)
taken inside the dW GEMM as the row sums of its A operand (dY^T); each GEMM runs only
when its gradient is wanted.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._common import dot_op_unsupported
from .gemm import gemm, gemm_split_sum, matrix


# --------------------------------------------------------------------------- launchers
def _rows(t: Tensor) -> Tensor:
    """(..., F) -> (M, F), a view when the strides allow it."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def linear_forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias``, shaped (..., N)."""
    x2 = _rows(x)
    m, k = x2.shape
    n = weight.shape[0]
    out = x2.new_empty(m, n)
    gemm(matrix(x2), matrix(weight).t(), matrix(out), m, n, k, bias=bias)
    return out.reshape(*x.shape[:-1], n)


def linear_backward(grad: Tensor, x: Tensor, weight: Tensor, x_grad: bool = True,
                    weight_grad: bool = True, bias_grad: bool = True):
    """(dx, dweight, dbias); those not asked for are empty (0,) tensors."""
    dy2, x2 = _rows(grad), _rows(x)
    m, n = dy2.shape
    k = x2.shape[1]
    dx = dw = db = None
    if x_grad:
        dx = x2.new_empty(m, k)
        gemm(matrix(dy2), matrix(weight), matrix(dx), m, k, n)
        dx = dx.reshape(x.shape)
    if weight_grad:
        dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
        fused = bias_grad and k > 0  # with k == 0 the dW GEMM has no columns and does not run
        rowsum = torch.empty(n, device=weight.device, dtype=torch.float32) if fused else None
        gemm_split_sum(matrix(dy2).t(), matrix(x2), dw, n, k, m, rowsum=rowsum)
        if fused:
            db = rowsum.to(weight.dtype)
    if bias_grad and db is None:
        db = dy2.sum(0, dtype=torch.float32).to(weight.dtype)
    # Separate empty tensors for the gradients not asked for: a custom op's outputs may not alias.
    return tuple(t if t is not None else x.new_empty(0) for t in (dx, dw, db))


# ------------------------------------------------------------------ torch.library glue
@torch.library.custom_op("fastvit_triton::linear", mutates_args=())
def _linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return linear_forward(x, weight, bias)


@torch.library.custom_op("fastvit_triton::linear_backward", mutates_args=())
def _linear_backward_op(grad: Tensor, x: Tensor, weight: Tensor, x_grad: bool, weight_grad: bool,
                        bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    return linear_backward(grad, x, weight, x_grad, weight_grad, bias_grad)


@_linear_op.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_linear_backward_op.register_fake
def _(grad, x, weight, x_grad, weight_grad, bias_grad):
    dense = torch.contiguous_format
    return (torch.empty_like(x, memory_format=dense) if x_grad else x.new_empty(0),
            torch.empty_like(weight, memory_format=dense) if weight_grad else x.new_empty(0),
            weight.new_empty(weight.shape[0]) if bias_grad else x.new_empty(0))


def _setup(ctx, inputs, output):
    x, weight, bias = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    x_grad, weight_grad, bias_grad = ctx.needs_input_grad
    bias_grad = bias_grad and ctx.has_bias
    dx, dw, db = torch.ops.fastvit_triton.linear_backward(grad, x, weight, x_grad, weight_grad, bias_grad)
    return (dx if x_grad else None), (dw if weight_grad else None), (db if bias_grad else None)


_linear_op.register_autograd(_backward, setup_context=_setup)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ weight.T + bias``."""
    return torch.ops.fastvit_triton.linear(x, weight, bias)


SUPPORTS = {"linear": dot_op_unsupported}
