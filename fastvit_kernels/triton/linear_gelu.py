"""linear_gelu on Triton: ``GELU(x @ weight.T + bias)`` as one GEMM with a fused epilogue.

The kernel is the shared GEMM core in ``gemm.py``; this file holds the launchers and
the torch.library glue.

Forward: bias and GELU in the epilogue: exact erf (``approximate="none"``), tanh, or
CLIP's QuickGELU ``z * sigmoid(1.702 z)`` (``"quick"``). When a backward will follow,
the same epilogue also stores GELU'(z) (z = the pre-activation, fp32 in registers) in
the input dtype, so the backward needs no erf at all: dZ = dY * GELU'(z) is a multiply in
the prologue of both backward GEMMs (dX = dZ @ W and dW = dZ^T @ X), dZ never goes to
memory, and the bias gradient is the row sum of dZ^T taken inside the dW GEMM.
Without a saved GELU', as for the inference op called under autograd, the backward
recomputes z with one more GEMM whose epilogue writes dZ = dY * GELU'(z).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._common import dot_op_unsupported
from .gemm import ACTIVATIONS, gemm, gemm_split_sum, matrix


# --------------------------------------------------------------------------- launchers
def _rows(t: Tensor) -> Tensor:
    """(..., F) -> (M, F), a view when the strides allow it."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def linear_gelu_forward(x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str = "none",
                        save_act_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """(GELU(x @ weight.T + bias), GELU'(x @ weight.T + bias) or None), both shaped (..., N)."""
    x2 = _rows(x)
    m, k = x2.shape
    n = weight.shape[0]
    out = x2.new_empty(m, n)
    act_grad = x2.new_empty(m, n) if save_act_grad else None
    gemm(matrix(x2), matrix(weight).t(), matrix(out), m, n, k, bias=bias,
         act=ACTIVATIONS[approximate], act_grad_out=act_grad)
    shape = (*x.shape[:-1], n)
    return out.reshape(shape), (act_grad.reshape(shape) if act_grad is not None else None)


def _grads_from_dz(dy2: Tensor, scale2: Tensor | None, x2: Tensor, weight: Tensor):
    """(dx, dw, db) for dZ = dy2 * scale2 (or dy2 itself when scale2 is None)."""
    m, n = dy2.shape
    k = x2.shape[1]
    aux = matrix(scale2) if scale2 is not None else None
    dx = x2.new_empty(m, k)
    gemm(matrix(dy2), matrix(weight), matrix(dx), m, k, n, aux=aux, prologue_scale=aux is not None)
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format)
    db = torch.empty(n, device=weight.device, dtype=torch.float32)
    gemm_split_sum(matrix(dy2).t(), matrix(x2), dw, n, k, m,
                   aux=aux.t() if aux is not None else None, prologue_scale=aux is not None, rowsum=db)
    return dx, dw, db.to(weight.dtype)


def linear_gelu_backward(grad: Tensor, x: Tensor, weight: Tensor, act_grad: Tensor):
    """(dx, dweight, dbias) from the upstream gradient and the saved GELU'(z)."""
    dx, dw, db = _grads_from_dz(_rows(grad), _rows(act_grad), _rows(x), weight)
    return dx.reshape(x.shape), dw, db


def linear_gelu_backward_recompute(grad: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None,
                                   approximate: str = "none"):
    """(dx, dweight, dbias) recomputing z; its GEMM's epilogue writes dZ = dY * GELU'(z)."""
    x2, dy2 = _rows(x), _rows(grad)
    m, k = x2.shape
    n = weight.shape[0]
    dz = x2.new_empty(m, n)
    gemm(matrix(x2), matrix(weight).t(), matrix(dz), m, n, k, bias=bias,
         act=ACTIVATIONS[approximate], aux=matrix(dy2), epi_gelu_grad=True)
    dx, dw, db = _grads_from_dz(dz, None, x2, weight)
    return dx.reshape(x.shape), dw, db


# ------------------------------------------------------------------ torch.library glue
@torch.library.custom_op("fastvit_triton::linear_gelu", mutates_args=())
def _linear_gelu_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], approximate: str) -> Tensor:
    return linear_gelu_forward(x, weight, bias, approximate)[0]


@torch.library.custom_op("fastvit_triton::linear_gelu_train", mutates_args=())
def _linear_gelu_train_op(x: Tensor, weight: Tensor, bias: Optional[Tensor],
                          approximate: str) -> tuple[Tensor, Tensor]:
    return linear_gelu_forward(x, weight, bias, approximate, save_act_grad=True)


@torch.library.custom_op("fastvit_triton::linear_gelu_backward", mutates_args=())
def _linear_gelu_backward_op(grad: Tensor, x: Tensor, weight: Tensor,
                             act_grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return linear_gelu_backward(grad, x, weight, act_grad)


@torch.library.custom_op("fastvit_triton::linear_gelu_backward_recompute", mutates_args=())
def _linear_gelu_backward_recompute_op(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                                       approximate: str) -> tuple[Tensor, Tensor, Tensor]:
    return linear_gelu_backward_recompute(grad, x, weight, bias, approximate)


def _out_like(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@_linear_gelu_op.register_fake
def _(x, weight, bias, approximate):
    return _out_like(x, weight)


@_linear_gelu_train_op.register_fake
def _(x, weight, bias, approximate):
    return _out_like(x, weight), _out_like(x, weight)


def _grads_fake(grad, x, weight, *rest):
    dense = torch.contiguous_format
    return (torch.empty_like(x, memory_format=dense), torch.empty_like(weight, memory_format=dense),
            weight.new_empty(weight.shape[0]))


_linear_gelu_backward_op.register_fake(_grads_fake)
_linear_gelu_backward_recompute_op.register_fake(_grads_fake)


def _setup_recompute(ctx, inputs, output):
    x, weight, bias, approximate = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.approximate = approximate


def _backward_recompute(ctx, grad):
    x, weight, bias = ctx.saved_tensors
    dx, dw, db = torch.ops.fastvit_triton.linear_gelu_backward_recompute(grad, x, weight, bias,
                                                                         ctx.approximate)
    return dx, dw, (db if bias is not None else None), None


def _setup_train(ctx, inputs, output):
    x, weight, bias, _ = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.has_bias = bias is not None


def _backward_train(ctx, grad, _grad_act):
    x, weight, act_grad = ctx.saved_tensors
    dx, dw, db = torch.ops.fastvit_triton.linear_gelu_backward(grad, x, weight, act_grad)
    return dx, dw, (db if ctx.has_bias else None), None


_linear_gelu_op.register_autograd(_backward_recompute, setup_context=_setup_recompute)
_linear_gelu_train_op.register_autograd(_backward_train, setup_context=_setup_train)


def linear_gelu(x: Tensor, weight: Tensor, bias: Tensor | None, approximate: str = "none") -> Tensor:
    """``GELU(x @ weight.T + bias)``; saves GELU'(z) for backward only when one can follow."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return torch.ops.fastvit_triton.linear_gelu_train(x, weight, bias, approximate)[0]
    return torch.ops.fastvit_triton.linear_gelu(x, weight, bias, approximate)


SUPPORTS = {"linear_gelu": dot_op_unsupported}
