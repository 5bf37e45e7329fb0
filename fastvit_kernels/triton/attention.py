"""Flash attention for ViT shapes: non-causal softmax(q k^T * scale) v, forward and backward.

Layout. Every kernel indexes q, k, v, the output and the gradients as (B, H, N, d) through
three strides (batch, head, token) plus a unit stride on d, so the same kernels serve

* ``attention(q, k, v)`` on (B, H, N, d) tensors of any strides, e.g. the three views
  ``qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)`` of a packed qkv tensor, read in
  place; only a tensor whose last dimension is strided is copied (once);
* ``packed_attention(qkv, H)``: reads the qkv Linear's (B, N, 3*D) output laid out as
  (B, N, 3, H, d) and writes (B, N, D) = (B, N, H, d) directly, so the projection after it
  needs no permute; its backward writes one packed (B, N, 3*D) gradient.

Numerics. Scores and the online softmax stay in fp32 whatever the input dtype; the scale is
folded together with log2(e) into one multiplier so the exponentials are ``exp2``. The
forward saves the fp32 natural-log log-sum-exp per query row for the backward, which
recomputes the probabilities tile by tile and never holds an N x N matrix. fp32 inputs use
``input_precision="ieee"`` in ``tl.dot`` (TF32 would miss DESIGN.md's 1e-5 parity by far).

Shapes. Any token count (the last key / query tile is masked), q and k/v token counts may
differ, head dims up to 128 (non-power-of-2 ones such as 80 and 96 use the next
power-of-2 tile with a masked load; nothing is padded in memory). The grid is one flat axis
of B*H*ceil(N/BLOCK) programs, query blocks fastest so that neighbouring programs share a
head's K/V in L2; base offsets are int64.

Order: jitted helpers and kernels, autotune configs, launchers (tensors in, tensors out),
then the torch.library custom ops with their fake and autograd registrations, and the
public functions with ``SUPPORTS``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, dtype_unsupported, max_shared_mem

LOG2E = 1.4426950408889634
# Kernels work in base 2 (exp2 / log2) and convert the saved log-sum-exp to and from base e.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
MAX_HEAD_DIM = 128


# ---------------------------------------------------------------------------- jitted helpers
@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               MASK_ROWS: tl.constexpr):
    """A (rows, BLOCK_D) tile; masked only where a mask is needed (tail rows, padded d)."""
    if MASK_ROWS:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=(cols < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_tile_t(ptrs, rows, n_rows, cols, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 MASK_ROWS: tl.constexpr):
    """The transposed (BLOCK_D, rows) tile: K^T for q @ K^T without a tl.trans."""
    if MASK_ROWS:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=(cols < HEAD_DIM)[:, None] & (rows < n_rows)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[None, :], other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=(cols < HEAD_DIM)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_tile(ptrs, x, rows, n_rows, cols, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if BLOCK_D != HEAD_DIM:
        tl.store(ptrs, x, mask=(rows < n_rows)[:, None] & (cols < HEAD_DIM)[None, :])
    else:
        tl.store(ptrs, x, mask=(rows < n_rows)[:, None])


# ----------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, kt_ptrs, v_ptrs, stride_kn, stride_vn, start, end, N_K, qk_scale,
               offs_n, offs_d,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [start, end); MASK_N for the ragged last block.

    kt_ptrs (K^T) / v_ptrs point at key row ``start`` and come back advanced past ``end``
    (advancing pointers, rather than multiplying the row by its stride, cannot overflow).
    """
    for start_n in range(start, end, BLOCK_N):
        rows = start_n + offs_n
        kt = _load_tile_t(kt_ptrs, rows, N_K, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if MASK_N:
            qk = tl.where((rows < N_K)[None, :], qk, float("-inf"))
        # Scores in base 2 and fp32: large logits in fp16 inputs cannot overflow here.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptrs, rows, N_K, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
        kt_ptrs += BLOCK_N * stride_kn
        v_ptrs += BLOCK_N * stride_vn
    return acc, l_i, m_i, kt_ptrs, v_ptrs


@triton.jit
def _attn_fwd(
    Q, K, V, O,                                  # (B, H, N, d) views, unit stride on d
    LSE,                                         # (B*H, N_Q) fp32 out: natural-log log-sum-exp
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, N_Q, N_K,                                 # heads, query and key token counts
    N_BUCKET,                                    # bucketed max(N_Q, N_K): autotune key only
    qk_scale,                                    # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,                      # d
    BLOCK_D: tl.constexpr,                       # d rounded up to a power of 2 (>= 16)
    DOT_PRECISION: tl.constexpr,                 # "ieee" for fp32 inputs
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    # int64: batch * stride reaches B * N * 3 * D elements, past 2**31 at large batch.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q_ptrs = Q + b * stride_qb + h * stride_qh \
        + offs_m.to(tl.int64)[:, None] * stride_qn + offs_d[None, :]
    kt_ptrs = K + b * stride_kb + h * stride_kh + offs_d[:, None] + offs_n[None, :] * stride_kn
    v_ptrs = V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :]

    q = _load_tile(q_ptrs, offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    n_full = (N_K // BLOCK_N) * BLOCK_N
    # Full key blocks without a row mask, then the ragged last block with one.
    acc, l_i, m_i, kt_ptrs, v_ptrs = _fwd_inner(
        acc, l_i, m_i, q, kt_ptrs, v_ptrs, stride_kn, stride_vn, 0, n_full, N_K, qk_scale,
        offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION)
    if n_full < N_K:
        acc, l_i, m_i, kt_ptrs, v_ptrs = _fwd_inner(
            acc, l_i, m_i, q, kt_ptrs, v_ptrs, stride_kn, stride_vn, n_full, N_K, N_K, qk_scale,
            offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION)

    acc = acc / l_i[:, None]
    o_ptrs = O + b * stride_ob + h * stride_oh \
        + offs_m.to(tl.int64)[:, None] * stride_on + offs_d[None, :]
    _store_tile(o_ptrs, acc.to(O.dtype.element_ty), offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D)
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, lse, mask=offs_m < N_Q)


# ---------------------------------------------------------------------------------- backward
@triton.jit
def _attn_bwd_preprocess(
    O, DO,                                       # (B, H, N_Q, d) views
    DLSE,                                        # (B*H, N_Q) gradient of the lse output, if HAS_DLSE
    DELTA,                                       # (B*H, N_Q) fp32 out: rowsum(dO * O) - dLSE
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    # int64: batch * stride reaches B * N * 3 * D elements, past 2**31 at large batch.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)[:, None]
    o = _load_tile(O + b * stride_ob + h * stride_oh + rows * stride_on + offs_d[None, :],
                   offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + rows * stride_don + offs_d[None, :],
                    offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row_offs = pid_bh.to(tl.int64) * N_Q + offs_m
    if HAS_DLSE:
        # d lse_i / d s_ij = p_ij, so an lse gradient g_i just shifts delta_i by -g_i.
        delta -= tl.load(DLSE + row_offs, mask=offs_m < N_Q, other=0.0).to(tl.float32)
    tl.store(DELTA + row_offs, delta, mask=offs_m < N_Q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_ptrs, do_ptrs, LSE_ROW, DELTA_ROW, stride_qn, stride_don,
                    start, end, N_Q, qk_scale, offs_m, offs_d,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK and dV of one key block over query blocks [start, end), transposed.

    q_ptrs / do_ptrs point at query row ``start`` and come back advanced past ``end``.
    """
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        q = _load_tile(q_ptrs, rows, N_Q, offs_d, HEAD_DIM, BLOCK_D, MASK_M)
        if MASK_M:
            lse = tl.load(LSE_ROW + rows, mask=rows < N_Q, other=0.0)
        else:
            lse = tl.load(LSE_ROW + rows)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)          # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(qk_t * qk_scale - (lse * _LOG2E)[None, :])
        if MASK_M:
            p_t = tl.where((rows < N_Q)[None, :], p_t, 0.0)
        do = _load_tile(do_ptrs, rows, N_Q, offs_d, HEAD_DIM, BLOCK_D, MASK_M)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if MASK_M:
            delta = tl.load(DELTA_ROW + rows, mask=rows < N_Q, other=0.0)
        else:
            delta = tl.load(DELTA_ROW + rows)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        q_ptrs += BLOCK_M * stride_qn
        do_ptrs += BLOCK_M * stride_don
    return dk, dv, q_ptrs, do_ptrs


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO,                                 # (B, H, N, d) views
    LSE, DELTA,                                  # (B*H, N_Q) fp32
    DK, DV,                                      # (B, H, N_K, d) outputs, layout of k and v
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, N_Q, N_K, N_BUCKET,
    sm_scale, qk_scale,                          # scale, and scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,                       # query rows per step of the loop
    BLOCK_N: tl.constexpr,                       # keys owned by one program
):
    num_n = tl.cdiv(N_K, BLOCK_N)
    pid = tl.program_id(0)
    pid_n = pid % num_n
    pid_bh = pid // num_n
    # int64: batch * stride reaches B * N * 3 * D elements, past 2**31 at large batch.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows_n = offs_n.to(tl.int64)[:, None]

    k = _load_tile(K + b * stride_kb + h * stride_kh + rows_n * stride_kn + offs_d[None, :],
                   offs_n, N_K, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + b * stride_vb + h * stride_vh + rows_n * stride_vn + offs_d[None, :],
                   offs_n, N_K, offs_d, HEAD_DIM, BLOCK_D, True)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :]
    do_ptrs = DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :]
    lse_row = LSE + pid_bh.to(tl.int64) * N_Q
    delta_row = DELTA + pid_bh.to(tl.int64) * N_Q

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    dk, dv, q_ptrs, do_ptrs = _bwd_dkdv_inner(
        dk, dv, k, v, q_ptrs, do_ptrs, lse_row, delta_row, stride_qn, stride_don, 0, m_full, N_Q,
        qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, False, DOT_PRECISION)
    if m_full < N_Q:
        dk, dv, q_ptrs, do_ptrs = _bwd_dkdv_inner(
            dk, dv, k, v, q_ptrs, do_ptrs, lse_row, delta_row, stride_qn, stride_don, m_full, N_Q, N_Q,
            qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M, True, DOT_PRECISION)

    # Key rows past N_K were loaded as zeros and are simply not stored.
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + rows_n * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + rows_n * stride_dvn + offs_d[None, :]
    _store_tile(dk_ptrs, (dk * sm_scale).to(DK.dtype.element_ty), offs_n, N_K, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(dv_ptrs, dv.to(DV.dtype.element_ty), offs_n, N_K, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_ptrs, vt_ptrs, stride_kn, stride_vn, start, end, N_K,
                  qk_scale, offs_n, offs_d,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end) (pointers as above)."""
    for start_n in range(start, end, BLOCK_N):
        rows = start_n + offs_n
        k = _load_tile(k_ptrs, rows, N_K, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
        vt = _load_tile_t(vt_ptrs, rows, N_K, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASK_N:
            # Zero keys still give exp2(-lse) > 0 (even inf for very negative lse): mask.
            p = tl.where((rows < N_K)[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        k_ptrs += BLOCK_N * stride_kn
        vt_ptrs += BLOCK_N * stride_vn
    return dq, k_ptrs, vt_ptrs


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO,                                 # (B, H, N, d) views
    LSE, DELTA,                                  # (B*H, N_Q) fp32
    DQ,                                          # (B, H, N_Q, d) output, layout of q
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    H, N_Q, N_K, N_BUCKET,
    sm_scale, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,                       # query rows owned by one program
    BLOCK_N: tl.constexpr,                       # keys per step of the loop
):
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    pid_bh = pid // num_m
    # int64: batch * stride reaches B * N * 3 * D elements, past 2**31 at large batch.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows_m = offs_m.to(tl.int64)[:, None]

    q = _load_tile(Q + b * stride_qb + h * stride_qh + rows_m * stride_qn + offs_d[None, :],
                   offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + b * stride_dob + h * stride_doh + rows_m * stride_don + offs_d[None, :],
                    offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D, True)
    row_offs = pid_bh.to(tl.int64) * N_Q + offs_m
    # Padded query rows get lse = +inf, hence p = 0, and are not stored.
    lse2 = tl.load(LSE + row_offs, mask=offs_m < N_Q, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + row_offs, mask=offs_m < N_Q, other=0.0)
    k_ptrs = K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :]
    vt_ptrs = V + b * stride_vb + h * stride_vh + offs_d[:, None] + offs_n[None, :] * stride_vn

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    dq, k_ptrs, vt_ptrs = _bwd_dq_inner(
        dq, q, do, lse2, delta, k_ptrs, vt_ptrs, stride_kn, stride_vn, 0, n_full, N_K, qk_scale,
        offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION)
    if n_full < N_K:
        dq, k_ptrs, vt_ptrs = _bwd_dq_inner(
            dq, q, do, lse2, delta, k_ptrs, vt_ptrs, stride_kn, stride_vn, n_full, N_K, N_K, qk_scale,
            offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION)

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + rows_m * stride_dqn + offs_d[None, :]
    _store_tile(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), offs_m, N_Q, offs_d, HEAD_DIM, BLOCK_D)


# ---------------------------------------------------------------------------------- autotune
def _configs(candidates, interpret_config):
    """Autotune candidates as (BLOCK_M, BLOCK_N, num_warps, num_stages); under the
    interpreter one fixed config (nothing to tune, and every launch costs seconds)."""
    if INTERPRET:
        candidates = [interpret_config]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in candidates]


# Shared memory kept free below the device's limit for what the estimate in _keep leaves out.
_SMEM_MARGIN = 7 * 1024


def _keep(conf, args, owned: str, owned_tiles: int) -> bool:
    """Whether a config is worth timing for this call. ``owned``: which of BLOCK_M / BLOCK_N
    is the per-program tile; ``owned_tiles``: how many tiles of that size a program holds."""
    bm, bn, stages = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"], conf.num_stages
    owned_rows, streamed = (bm, bn) if owned == "BLOCK_M" else (bn, bm)
    n_owned = args["N_Q"] if owned == "BLOCK_M" else args["N_K"]
    # A per-program tile far longer than the sequence is mostly padding.
    if owned_rows > max(64, triton.next_power_of_2(n_owned)):
        return False
    # Shared memory (the device's limit, 227 KiB on H100, less a 7 KiB margin): the owned
    # tiles (q; or k and v / q and dO in the backward) plus `stages` copies of the two
    # streamed tiles. This matches what the compiler allocates to within a few hundred bytes.
    smem = (owned_tiles * owned_rows + 2 * streamed * stages) * args["BLOCK_D"] * args["Q"].element_size()
    return smem <= max_shared_mem(args["Q"].device) - _SMEM_MARGIN


def _prune(owned, owned_tiles):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        if args["DOT_PRECISION"] == "ieee":
            # fp32 is for checking, not speed: its ieee dots take minutes to compile per config.
            return configs[-1:]
        kept = [c for c in configs if _keep(c, args, owned, owned_tiles)] or configs[-1:]
        # FASTVIT_AUTOTUNE=0: first kept candidate, no timing (quick CUDA test sweeps).
        return kept[:1] if os.environ.get("FASTVIT_AUTOTUNE", "1") == "0" else kept
    return prune


def _n_bucket(n: int) -> int:
    """Sequence lengths grouped by powers of 4 (64, 256, 1024, 4096, ...) for the tuning
    key: ViT's 197 / 257 / 577 / 1025 tokens then need at most four tunings per d and dtype."""
    bucket = 64
    while bucket < n:
        bucket *= 4
    return bucket


# Tuning is keyed on the bucketed length, the padded head dim and (added by the
# autotuner) the tensors' dtypes. Eight warps only with a 128-row owned tile (two
# Hopper warpgroups of 64 rows each). Candidates are ordered best-guess first: the
# first one that fits is what FASTVIT_AUTOTUNE=0 runs.
_KEY = ["N_BUCKET", "BLOCK_D", "DOT_PRECISION"]

_attn_fwd_tuned = triton.autotune(
    _configs([(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 2),
              (128, 64, 4, 4), (64, 128, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2)],
             interpret_config=(64, 64, 4, 1)),
    key=_KEY, prune_configs_by={"early_config_prune": _prune("BLOCK_M", 1)},
)(_attn_fwd)
_attn_bwd_dkdv_tuned = triton.autotune(   # BLOCK_N keys owned, BLOCK_M queries streamed
    _configs([(32, 128, 4, 3), (64, 128, 8, 2), (64, 128, 4, 2), (32, 128, 8, 3),
              (32, 64, 4, 3), (64, 64, 4, 2)],
             interpret_config=(64, 64, 4, 1)),
    key=_KEY, prune_configs_by={"early_config_prune": _prune("BLOCK_N", 2)},
)(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(     # BLOCK_M queries owned, BLOCK_N keys streamed
    _configs([(128, 32, 4, 3), (128, 64, 8, 2), (128, 64, 4, 2), (128, 32, 8, 3),
              (64, 32, 4, 3), (64, 64, 4, 2)],
             interpret_config=(64, 64, 4, 1)),
    key=_KEY, prune_configs_by={"early_config_prune": _prune("BLOCK_M", 2)},
)(_attn_bwd_dq)

_PREPROCESS_BLOCK_M = 64


# --------------------------------------------------------------------------------- launchers
def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q: torch.Tensor, k: torch.Tensor) -> dict:
    head_dim = q.shape[-1]
    return dict(
        H=q.shape[1], N_Q=q.shape[2], N_K=k.shape[2],
        N_BUCKET=_n_bucket(max(q.shape[2], k.shape[2])),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def attention_forward(q, k, v, out, scale: float) -> torch.Tensor:
    """Write attention(q, k, v) into ``out``; return the fp32 log-sum-exp (B, H, N_q).

    All four are (B, H, N, d) views with a unit stride on d (any other strides).
    """
    batch, heads, n_q, _ = q.shape
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    if lse.numel() == 0:
        return lse
    meta = _common(q, k)
    grid = lambda m: (triton.cdiv(n_q, m["BLOCK_M"]) * batch * heads,)  # noqa: E731
    _attn_fwd_tuned[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        qk_scale=scale * LOG2E, **meta,
    )
    return lse


def attention_backward(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, scale: float) -> None:
    """Write the gradients of attention into dq, dk, dv ((B, H, N, d) views, unit stride on d).

    grad_lse: gradient of the log-sum-exp output, or None (the usual case).
    """
    batch, heads, n_q, _ = q.shape
    n_k = k.shape[2]
    if batch * heads * n_k == 0:
        return
    if n_q == 0:  # no queries: nothing attends to the keys
        dk.zero_()
        dv.zero_()
        return
    meta = _common(q, k)
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()
    delta = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    _attn_bwd_preprocess[(triton.cdiv(n_q, _PREPROCESS_BLOCK_M) * batch * heads,)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta,
        *_strides(out), *_strides(grad_out), heads, n_q,
        HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], HAS_DLSE=grad_lse is not None,
        BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    common = (q, k, v, grad_out, lse, delta)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    _attn_bwd_dkdv_tuned[lambda m: (triton.cdiv(n_k, m["BLOCK_N"]) * batch * heads,)](
        *common, dk, dv, *strides, *_strides(dk), *_strides(dv),
        sm_scale=scale, qk_scale=scale * LOG2E, **meta,
    )
    _attn_bwd_dq_tuned[lambda m: (triton.cdiv(n_q, m["BLOCK_M"]) * batch * heads,)](
        *common, dq, *strides, *_strides(dq),
        sm_scale=scale, qk_scale=scale * LOG2E, **meta,
    )


# ---------------------------------------------------------------------------- layout helpers
def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels need a unit stride on d; anything else is copied once."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _empty_like_layout(t: torch.Tensor) -> torch.Tensor:
    """An output in t's memory layout (dense permutations kept), with a unit stride on d."""
    out = torch.empty_like(t)
    return out if out.stride(-1) == 1 else torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _heads(t: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, H*d) -> the (B, H, N, d) view of it (no copy; t has a unit last stride)."""
    return t.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def _split_packed(qkv: torch.Tensor, num_heads: int):
    """(B, N, 3*H*d) laid out (B, N, 3, H, d) -> q, k, v views, each (B, H, N, d)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


# ------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("fastvit_triton::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = attention_forward(q, k, v, out, scale)
    return out, lse


@_attention_op.register_fake
def _(q, k, v, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("fastvit_triton::attention_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor | None, q: torch.Tensor,
                           k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = (_empty_like_layout(t) for t in (q, k, v))
    q, k, v, grad_out = (_unit_last_stride(t) for t in (q, k, v, grad_out))
    attention_backward(grad_out, grad_lse, q, k, v, out, lse, dq, dk, dv, scale)
    return dq, dk, dv


@_attention_backward_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, scale):
    return tuple(_empty_like_layout(t) for t in (q, k, v))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    # An unused output's gradient arrives as None instead of a zero tensor: the lse
    # output usually has none, and then the backward skips it without allocating.
    ctx.set_materialize_grads(False)


def _attention_autograd(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    if grad_out is None:  # only the lse output was used
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _attention_backward_op(grad_out, grad_lse, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention_op.register_autograd(_attention_autograd, setup_context=_attention_setup_context)


@torch.library.custom_op("fastvit_triton::packed_attention", mutates_args=())
def _packed_attention_op(qkv: torch.Tensor, num_heads: int, scale: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    qkv = _unit_last_stride(qkv)
    batch, tokens, width = qkv.shape
    out = torch.empty((batch, tokens, width // 3), dtype=qkv.dtype, device=qkv.device)
    q, k, v = _split_packed(qkv, num_heads)
    lse = attention_forward(q, k, v, _heads(out, num_heads), scale)
    return out, lse


@_packed_attention_op.register_fake
def _(qkv, num_heads, scale):
    batch, tokens, width = qkv.shape
    return (qkv.new_empty((batch, tokens, width // 3)),
            qkv.new_empty((batch, num_heads, tokens), dtype=torch.float32))


@torch.library.custom_op("fastvit_triton::packed_attention_backward", mutates_args=())
def _packed_attention_backward_op(grad_out: torch.Tensor, grad_lse: torch.Tensor | None,
                                  qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  num_heads: int, scale: float) -> torch.Tensor:
    qkv, grad_out = _unit_last_stride(qkv), _unit_last_stride(grad_out)
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    q, k, v = _split_packed(qkv, num_heads)
    dq, dk, dv = _split_packed(dqkv, num_heads)
    attention_backward(_heads(grad_out, num_heads), grad_lse, q, k, v, _heads(out, num_heads), lse,
                       dq, dk, dv, scale)
    return dqkv


@_packed_attention_backward_op.register_fake
def _(grad_out, grad_lse, qkv, out, lse, num_heads, scale):
    return qkv.new_empty(qkv.shape)


def _packed_setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale
    ctx.set_materialize_grads(False)  # as for attention: no zero tensor for a missing grad


def _packed_autograd(ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    if grad_out is None:  # only the lse output was used
        grad_out = torch.zeros_like(out)
    dqkv = _packed_attention_backward_op(grad_out, grad_lse, qkv, out, lse, ctx.num_heads, ctx.scale)
    return dqkv, None, None


_packed_attention_op.register_autograd(_packed_autograd, setup_context=_packed_setup_context)


# ------------------------------------------------------------------------ public entry points
# functional.py has validated the arguments (ranks, shapes, one dtype and device, num_heads,
# scale) and _dispatch has checked the device; what is left are the kernels' own limits.
def _unsupported(head_dim: int, dtype: torch.dtype, n_q: int, n_k: int, programs: int) -> str | None:
    reason = dtype_unsupported(dtype)
    if reason:
        return reason
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        return (f"head dim {head_dim} is not supported "
                f"(expected 1 to {MAX_HEAD_DIM}, e.g. 32, 64, 80, 96, 128)")
    if n_k == 0 and n_q > 0:
        return "k and v have no tokens (N_k = 0): softmax over an empty set is undefined"
    if programs >= 2**31:
        return f"{programs} programs exceed the grid limit of 2**31 - 1"
    return None


def attention_unsupported(q, k, v, scale=None) -> str | None:
    """Why the kernels cannot run attention(q, k, v), or None if they can."""
    batch, heads, n_q, head_dim = q.shape
    return _unsupported(head_dim, q.dtype, n_q, k.shape[2], batch * heads * triton.cdiv(n_q, 32))


def packed_attention_unsupported(qkv, num_heads, scale=None) -> str | None:
    """Why the kernels cannot run packed_attention(qkv, num_heads), or None if they can."""
    batch, tokens, width = qkv.shape
    return _unsupported(width // (3 * num_heads), qkv.dtype, tokens, tokens,
                        batch * num_heads * triton.cdiv(tokens, 32))


def attention(q, k, v, scale=None):
    """softmax(q k^T * scale) v on (B, H, Nq, d) q and (B, H, Nk, d) k, v; differentiable.

    Arguments as validated by ``fastvit_kernels.attention`` and accepted by
    ``attention_unsupported``. Strided views are read in place (a strided last dimension
    is copied once). Returns a contiguous (B, H, Nq, d) tensor.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    # Copying here (not only inside the op) lets autograd route gradients through the copy.
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return _attention_op(q, k, v, scale)[0]


def packed_attention(qkv, num_heads, scale=None):
    """Attention on the qkv Linear's (B, N, 3*D) output laid out (B, N, 3, H, d) -> (B, N, D).

    Arguments as validated by ``fastvit_kernels.packed_attention`` and accepted by
    ``packed_attention_unsupported``.
    """
    scale = (qkv.shape[-1] // (3 * num_heads)) ** -0.5 if scale is None else float(scale)
    return _packed_attention_op(_unit_last_stride(qkv), num_heads, scale)[0]


SUPPORTS = {
    "attention": attention_unsupported,
    "packed_attention": packed_attention_unsupported,
}
