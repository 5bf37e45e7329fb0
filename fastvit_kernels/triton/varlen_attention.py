"""Variable-length flash attention: packed sequences, each attending only to itself.

``varlen_attention(q, k, v, cu_seqlens, max_seqlen)`` reads (total, H, d) tensors holding the
tokens of several sequences back to back; sequence i is rows ``cu_seqlens[i]:cu_seqlens[i+1]``
(the flash-attention varlen convention). ``varlen_packed_attention`` reads the qkv Linear's
(total, 3*D) output as (total, 3, H, d) and writes (total, D).

The grid is (query tiles of the longest sequence) x (sequences) x (heads); a program whose
tile starts past its sequence's end does nothing, the others run the flash-attention tile
bodies of attention_kernels.py on their sequence alone (tile bounds clipped to it), so no
score between two sequences is ever computed. The log-sum-exp is saved as (H, total) fp32;
the backward's delta pass is attention's own, run on the (1, H, total, d) view.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import default_scale, split_qkv
from .attention import (
    _DKDV,
    _DQ,
    _FWD,
    _empty_like_layout,
    _n_bucket,
    _tuned,
    _unit_last_stride,
    _unsupported,
    backward_delta,
)
from .attention_kernels import LOG2E, _dkdv_tile, _dq_tile, _fwd_tile, _program


# ------------------------------------------------------------------------------- kernels
@triton.jit
def _sequence(CU_SEQLENS, MAX_SEQLEN, BLOCK: tl.constexpr, H):
    """This program's tile start, its sequence's first row (int64) and length, and head."""
    start, pid_sh, seq, h = _program(MAX_SEQLEN, BLOCK, H)
    first = tl.load(CU_SEQLENS + seq)
    length = tl.load(CU_SEQLENS + seq + 1) - first
    return start, first.to(tl.int64), length, h


@triton.jit
def varlen_attn_fwd(
    Q, K, V, Out,                                # (total, H, d) views, unit stride on d
    LSE,                                         # (H, total) fp32 out: natural-log log-sum-exp
    CU_SEQLENS,                                  # (n_seq + 1,) int32 row offsets
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_on, stride_oh,
    H, TOTAL, MAX_SEQLEN,
    N_BUCKET,                                    # bucketed MAX_SEQLEN: autotune key only
    qk_scale,                                    # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    start_m, first, n, h = _sequence(CU_SEQLENS, MAX_SEQLEN, BLOCK_M, H)
    if start_m < n:
        _fwd_tile(Q + first * stride_qn + h * stride_qh, K + first * stride_kn + h * stride_kh,
                  V + first * stride_vn + h * stride_vh, Out + first * stride_on + h * stride_oh,
                  LSE + h * TOTAL + first, stride_qn, stride_kn, stride_vn, stride_on,
                  start_m, n, n, qk_scale, HEAD_DIM, BLOCK_D, DOT_PRECISION, BLOCK_M, BLOCK_N)


@triton.jit
def varlen_attn_bwd_dkdv(
    Q, K, V, DO,                                 # (total, H, d) views
    LSE, DELTA,                                  # (H, total) fp32
    DK, DV,                                      # (total, H, d) outputs
    CU_SEQLENS,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dkn, stride_dkh, stride_dvn, stride_dvh,
    H, TOTAL, MAX_SEQLEN, N_BUCKET,
    sm_scale, qk_scale,                          # scale, and scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,                       # query rows per step of the loop
    BLOCK_N: tl.constexpr,                       # keys owned by one program
):
    start_n, first, n, h = _sequence(CU_SEQLENS, MAX_SEQLEN, BLOCK_N, H)
    if start_n < n:
        row = h * TOTAL + first
        _dkdv_tile(Q + first * stride_qn + h * stride_qh, K + first * stride_kn + h * stride_kh,
                   V + first * stride_vn + h * stride_vh, DO + first * stride_don + h * stride_doh,
                   LSE + row, DELTA + row,
                   DK + first * stride_dkn + h * stride_dkh, DV + first * stride_dvn + h * stride_dvh,
                   stride_qn, stride_kn, stride_vn, stride_don, stride_dkn, stride_dvn,
                   start_n, n, n, sm_scale, qk_scale, HEAD_DIM, BLOCK_D, DOT_PRECISION, BLOCK_M, BLOCK_N)


@triton.jit
def varlen_attn_bwd_dq(
    Q, K, V, DO,                                 # (total, H, d) views
    LSE, DELTA,                                  # (H, total) fp32
    DQ,                                          # (total, H, d) output
    CU_SEQLENS,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_don, stride_doh,
    stride_dqn, stride_dqh,
    H, TOTAL, MAX_SEQLEN, N_BUCKET,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,                       # query rows owned by one program
    BLOCK_N: tl.constexpr,                       # keys per step of the loop
):
    start_m, first, n, h = _sequence(CU_SEQLENS, MAX_SEQLEN, BLOCK_M, H)
    if start_m < n:
        row = h * TOTAL + first
        _dq_tile(Q + first * stride_qn + h * stride_qh, K + first * stride_kn + h * stride_kh,
                 V + first * stride_vn + h * stride_vh, DO + first * stride_don + h * stride_doh,
                 LSE + row, DELTA + row, DQ + first * stride_dqn + h * stride_dqh,
                 stride_qn, stride_kn, stride_vn, stride_don, stride_dqn,
                 start_m, n, n, sm_scale, qk_scale, HEAD_DIM, BLOCK_D, DOT_PRECISION, BLOCK_M, BLOCK_N)


# Attention's candidates and pruning, tuned on the bucketed longest sequence.
_varlen_fwd_tuned = _tuned(varlen_attn_fwd, _FWD, "BLOCK_M", 1)
_varlen_dkdv_tuned = _tuned(varlen_attn_bwd_dkdv, _DKDV, "BLOCK_N", 2)
_varlen_dq_tuned = _tuned(varlen_attn_bwd_dq, _DQ, "BLOCK_M", 2)


# --------------------------------------------------------------------------------- launchers
def _strides(t: torch.Tensor) -> tuple[int, int]:
    """Token and head strides of a (total, H, d) view."""
    return t.stride(0), t.stride(1)


def _meta(q: torch.Tensor, max_seqlen: int) -> dict:
    total, heads, head_dim = q.shape
    return {
        "H": heads, "TOTAL": total, "MAX_SEQLEN": max_seqlen, "N_BUCKET": _n_bucket(max_seqlen),
        "HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def varlen_attention_forward(q, k, v, out, cu_seqlens, max_seqlen: int, scale: float) -> torch.Tensor:
    """Write varlen_attention(q, k, v) into ``out``; return the fp32 log-sum-exp (H, total).

    q, k, v, out: (total, H, d) views with a unit stride on d; cu_seqlens: (n_seq + 1,) int32
    on q's device, validated (0 first, non-decreasing, total last, no gap over max_seqlen).
    """
    total, heads, _ = q.shape
    lse = torch.empty((heads, total), device=q.device, dtype=torch.float32)
    n_seq = cu_seqlens.numel() - 1
    if lse.numel() == 0:
        return lse
    grid = lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]) * n_seq * heads,)
    _varlen_fwd_tuned[grid](
        q, k, v, out, lse, cu_seqlens, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        qk_scale=scale * LOG2E, **_meta(q, max_seqlen),
    )
    return lse


def varlen_attention_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, max_seqlen: int,
                              dq, dk, dv, scale: float) -> None:
    """Write the gradients of varlen attention into dq, dk, dv ((total, H, d), unit stride on d).

    grad_lse: gradient of the (H, total) log-sum-exp output, or None (the usual case).
    """
    total, heads, _ = q.shape
    n_seq = cu_seqlens.numel() - 1
    if total * heads == 0:
        return
    meta = _meta(q, max_seqlen)
    # delta = rowsum(dO * O) per token and head: attention's pass on the (1, H, total, d) views.
    delta = backward_delta(*(t.transpose(0, 1).unsqueeze(0) for t in (out, grad_out)),
                           None if grad_lse is None else grad_lse.unsqueeze(0), meta["BLOCK_D"])[0]
    common = (q, k, v, grad_out, lse, delta)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    _varlen_dkdv_tuned[lambda m: (triton.cdiv(max_seqlen, m["BLOCK_N"]) * n_seq * heads,)](
        *common, dk, dv, cu_seqlens, *strides, *_strides(dk), *_strides(dv),
        sm_scale=scale, qk_scale=scale * LOG2E, **meta,
    )
    _varlen_dq_tuned[lambda m: (triton.cdiv(max_seqlen, m["BLOCK_M"]) * n_seq * heads,)](
        *common, dq, cu_seqlens, *strides, *_strides(dq),
        sm_scale=scale, qk_scale=scale * LOG2E, **meta,
    )


# ---------------------------------------------------------------------------- layout helpers
def _split_packed(qkv: torch.Tensor, num_heads: int):
    """(total, 3*D) laid out (total, 3, H, d) -> q, k, v as (total, H, d) views (no copy)."""
    return tuple(t[0].transpose(0, 1) for t in split_qkv(qkv.unsqueeze(0), num_heads))


def _token_heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(total, H*d) -> its (total, H, d) view."""
    return t.unflatten(-1, (num_heads, -1))


# ------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("fastvit_triton::varlen_attention", mutates_args=())
def _varlen_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         max_seqlen: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = varlen_attention_forward(q, k, v, out, cu_seqlens, max_seqlen, scale)
    return out, lse


@_varlen_attention_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("fastvit_triton::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor,
                                  k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  cu_seqlens: torch.Tensor, max_seqlen: int, scale: float
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (_empty_like_layout(t) for t in (q, k, v))
    q, k, v, grad_out = (_unit_last_stride(t) for t in (q, k, v, grad_out))
    varlen_attention_backward(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, max_seqlen, dq, dk, dv, scale)
    return dq, dk, dv


@_varlen_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
    return tuple(_empty_like_layout(t) for t in (q, k, v))


def _varlen_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale
    ctx.set_materialize_grads(False)  # as attention's: no zero tensor for the unused lse's gradient


def _varlen_autograd(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    if grad_out is None:  # only the lse output was used
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _varlen_attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, cu_seqlens,
                                               ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_varlen_attention_op.register_autograd(_varlen_autograd, setup_context=_varlen_setup_context)


@torch.library.custom_op("fastvit_triton::varlen_packed_attention", mutates_args=())
def _varlen_packed_op(qkv: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, num_heads: int,
                      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = _unit_last_stride(qkv)
    total, width = qkv.shape
    out = torch.empty((total, width // 3), dtype=qkv.dtype, device=qkv.device)
    q, k, v = _split_packed(qkv, num_heads)
    lse = varlen_attention_forward(q, k, v, _token_heads(out, num_heads), cu_seqlens, max_seqlen, scale)
    return out, lse


@_varlen_packed_op.register_fake
def _(qkv, cu_seqlens, max_seqlen, num_heads, scale):
    total, width = qkv.shape
    return qkv.new_empty((total, width // 3)), qkv.new_empty((num_heads, total), dtype=torch.float32)


@torch.library.custom_op("fastvit_triton::varlen_packed_attention_backward", mutates_args=())
def _varlen_packed_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, qkv: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                               num_heads: int, scale: float) -> torch.Tensor:
    qkv, grad_out = _unit_last_stride(qkv), _unit_last_stride(grad_out)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = _split_packed(qkv, num_heads)
    dq, dk, dv = _split_packed(dqkv, num_heads)
    varlen_attention_backward(_token_heads(grad_out, num_heads), grad_lse, q, k, v, _token_heads(out, num_heads),
                              lse, cu_seqlens, max_seqlen, dq, dk, dv, scale)
    return dqkv


@_varlen_packed_backward_op.register_fake
def _(grad_out, grad_lse, qkv, out, lse, cu_seqlens, max_seqlen, num_heads, scale):
    return qkv.new_empty(qkv.shape)


def _varlen_packed_setup_context(ctx, inputs, output):
    qkv, cu_seqlens, max_seqlen, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.num_heads, ctx.scale = max_seqlen, num_heads, scale
    ctx.set_materialize_grads(False)


def _varlen_packed_autograd(ctx, grad_out, grad_lse):
    qkv, out, lse, cu_seqlens = ctx.saved_tensors
    if grad_out is None:  # only the lse output was used
        grad_out = torch.zeros_like(out)
    dqkv = _varlen_packed_backward_op(grad_out, grad_lse, qkv, out, lse, cu_seqlens, ctx.max_seqlen,
                                      ctx.num_heads, ctx.scale)
    return dqkv, None, None, None, None


_varlen_packed_op.register_autograd(_varlen_packed_autograd, setup_context=_varlen_packed_setup_context)


# ------------------------------------------------------------------------ public entry points
# functional.py has validated the arguments (shapes, dtypes, devices, cu_seqlens' values,
# max_seqlen, num_heads, scale); what is left are the kernels' own limits, attention's.
def varlen_attention_unsupported(q, k, v, cu_seqlens, max_seqlen, scale=None) -> str | None:
    """Why the kernels cannot run varlen_attention(q, k, v, ...), or None if they can."""
    programs = (cu_seqlens.numel() - 1) * q.shape[1] * triton.cdiv(max_seqlen, 16)
    return _unsupported(q.shape[-1], q.dtype, max_seqlen, max_seqlen, programs)


def varlen_packed_attention_unsupported(qkv, cu_seqlens, max_seqlen, num_heads, scale=None) -> str | None:
    """Why the kernels cannot run varlen_packed_attention(qkv, ...), or None if they can."""
    programs = (cu_seqlens.numel() - 1) * num_heads * triton.cdiv(max_seqlen, 16)
    return _unsupported(qkv.shape[-1] // (3 * num_heads), qkv.dtype, max_seqlen, max_seqlen, programs)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None):
    """Attention within each packed sequence of (total, H, d) q, k, v; differentiable.

    Arguments as validated by ``fastvit_kernels.varlen_attention``. Returns a contiguous
    (total, H, d) tensor.
    """
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return _varlen_attention_op(q, k, v, cu_seqlens, int(max_seqlen), scale)[0]


def varlen_packed_attention(qkv, cu_seqlens, max_seqlen, num_heads, scale=None):
    """Varlen attention on the qkv Linear's (total, 3*D) output laid out (total, 3, H, d) ->
    (total, D). Arguments as validated by ``fastvit_kernels.varlen_packed_attention``."""
    scale = default_scale(qkv.shape[-1] // (3 * num_heads)) if scale is None else float(scale)
    return _varlen_packed_op(_unit_last_stride(qkv), cu_seqlens, int(max_seqlen), num_heads, scale)[0]


SUPPORTS = {
    "varlen_attention": varlen_attention_unsupported,
    "varlen_packed_attention": varlen_packed_attention_unsupported,
}
