"""The flash-attention kernels: forward, backward preprocess (delta), dK/dV and dQ.

Every tensor is read as (B, H, N, d) through three strides plus a unit stride on d; a
program's base pointer (batch and head, int64) is a scalar, and each loop step recomputes
its tile's pointers from that scalar and the step's first row, so no pointer tensor is
carried through a loop (carried pointer tensors cost registers and made these spill).
Scores and the online softmax are fp32, in base 2; the saved log-sum-exp is natural-log.

Each kernel is a thin entry that finds its program's (batch, head) base pointers and row
counts and runs a ``*_tile`` body on them; the variable-length kernels (varlen_attention.py)
run the same bodies on one packed sequence's rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# Kernels work in base 2 (exp2 / log2) and convert the saved log-sum-exp to and from base e.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


# ---------------------------------------------------------------------------- tile helpers
@triton.jit
def _load_rows(base, start, n_rows, stride, offs_r, offs_d, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """Rows [start, start + len(offs_r)) of a (n_rows, HEAD_DIM) matrix at ``base`` as a
    (rows, BLOCK_D) tile, zero past n_rows (if MASK_ROWS) and past HEAD_DIM."""
    rows = start + offs_r
    ptrs = base + tl.cast(start, tl.int64) * stride + offs_r[:, None] * stride + offs_d[None, :]
    if MASK_ROWS:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[:, None], other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _load_rows_t(base, start, n_rows, stride, offs_r, offs_d, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, MASK_ROWS: tl.constexpr):
    """The same rows transposed, a (BLOCK_D, rows) tile: K^T for q @ K^T without tl.trans."""
    rows = start + offs_r
    ptrs = base + tl.cast(start, tl.int64) * stride + offs_d[:, None] + offs_r[None, :] * stride
    if MASK_ROWS:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[:, None] & (rows < n_rows)[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows < n_rows)[None, :], other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            x = tl.load(ptrs, mask=(offs_d < HEAD_DIM)[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _store_rows(base, x, start, n_rows, stride, offs_r, offs_d, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """Store a (rows, BLOCK_D) tile as rows [start, ...) of a (n_rows, HEAD_DIM) matrix."""
    rows = start + offs_r
    ptrs = base + tl.cast(start, tl.int64) * stride + offs_r[:, None] * stride + offs_d[None, :]
    if BLOCK_D != HEAD_DIM:
        tl.store(ptrs, x, mask=(rows < n_rows)[:, None] & (offs_d < HEAD_DIM)[None, :])
    else:
        tl.store(ptrs, x, mask=(rows < n_rows)[:, None])


@triton.jit
def _program(N, BLOCK: tl.constexpr, H):
    """One flat grid axis: (row block, batch*head) with row blocks fastest, so that
    neighbouring programs share a head's K/V in L2. Returns the first row, the flat
    batch*head index, and batch and head as int64 (batch * stride passes 2**31)."""
    num_blocks = tl.cdiv(N, BLOCK)
    pid = tl.program_id(0)
    pid_bh = pid // num_blocks
    start = (pid % num_blocks) * BLOCK
    return start, pid_bh, (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)


# ----------------------------------------------------------------------------------- forward
@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K_BH, V_BH, stride_kn, stride_vn, start, end, N_K, qk_scale,
               offs_n, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [start, end); MASK_N for the ragged last block."""
    for start_n in range(start, end, BLOCK_N):
        kt = _load_rows_t(K_BH, start_n, N_K, stride_kn, offs_n, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
        qk = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if MASK_N:
            qk = tl.where((start_n + offs_n < N_K)[None, :], qk, float("-inf"))
        # Scores in base 2 and fp32: large logits in fp16 inputs cannot overflow here.
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(V_BH, start_n, N_K, stride_vn, offs_n, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_tile(Q_BH, K_BH, V_BH, O_BH, LSE_ROW, stride_qn, stride_kn, stride_vn, stride_on,
              start_m, N_Q, N_K, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query rows [start_m, start_m + BLOCK_M) of one (N_Q, d) x (N_K, d) attention whose
    rows start at the *_BH pointers (one batch and head, or one packed sequence and head):
    writes their output rows and their log-sum-exp at LSE_ROW + row."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q_BH, start_m, N_Q, stride_qn, offs_m, offs_d, HEAD_DIM, BLOCK_D, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Full key blocks without a row mask, then the ragged last block with one.
    n_full = (N_K // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_BH, V_BH, stride_kn, stride_vn, 0, n_full, N_K,
                               qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION)
    if n_full < N_K:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_BH, V_BH, stride_kn, stride_vn, n_full, N_K,
                                   N_K, qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True,
                                   DOT_PRECISION)

    acc = acc / l_i[:, None]
    _store_rows(O_BH, acc.to(O_BH.dtype.element_ty), start_m, N_Q, stride_on, offs_m, offs_d, HEAD_DIM, BLOCK_D)
    rows = start_m + offs_m
    lse = (m_i + tl.math.log2(l_i)) * _LN2
    tl.store(LSE_ROW + rows, lse, mask=rows < N_Q)


@triton.jit
def attn_fwd(
    Q, K, V, Out,                                # (B, H, N, d) views, unit stride on d
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
    start_m, pid_bh, b, h = _program(N_Q, BLOCK_M, H)
    _fwd_tile(Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh,
              V + b * stride_vb + h * stride_vh, Out + b * stride_ob + h * stride_oh,
              LSE + pid_bh.to(tl.int64) * N_Q, stride_qn, stride_kn, stride_vn, stride_on,
              start_m, N_Q, N_K, qk_scale, HEAD_DIM, BLOCK_D, DOT_PRECISION, BLOCK_M, BLOCK_N)


# ---------------------------------------------------------------------------------- backward
@triton.jit
def attn_bwd_preprocess(
    Out, DO,                                     # (B, H, N_Q, d) views
    DLSE,                                        # (B*H, N_Q) gradient of the lse output, if HAS_DLSE
    DELTA,                                       # (B*H, N_Q) fp32 out: rowsum(dO * O) - dLSE
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    H, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr,
):
    start_m, pid_bh, b, h = _program(N_Q, BLOCK_M, H)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + b * stride_ob + h * stride_oh, start_m, N_Q, stride_on, offs_m, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, start_m, N_Q, stride_don, offs_m, offs_d,
                    HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    rows = start_m + offs_m
    row_offs = pid_bh.to(tl.int64) * N_Q + rows
    if HAS_DLSE:
        # d lse_i / d s_ij = p_ij, so an lse gradient g_i just shifts delta_i by -g_i.
        delta -= tl.load(DLSE + row_offs, mask=rows < N_Q, other=0.0).to(tl.float32)
    tl.store(DELTA + row_offs, delta, mask=rows < N_Q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, Q_BH, DO_BH, LSE_ROW, DELTA_ROW, stride_qn, stride_don,
                    start, end, N_Q, qk_scale, offs_m, offs_d,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dK and dV of one key block over query blocks [start, end), transposed."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        q = _load_rows(Q_BH, start_m, N_Q, stride_qn, offs_m, offs_d, HEAD_DIM, BLOCK_D, MASK_M)
        if MASK_M:
            lse = tl.load(LSE_ROW + rows, mask=rows < N_Q, other=0.0)
        else:
            lse = tl.load(LSE_ROW + rows)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)          # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(qk_t * qk_scale - (lse * _LOG2E)[None, :])
        if MASK_M:
            p_t = tl.where((rows < N_Q)[None, :], p_t, 0.0)
        do = _load_rows(DO_BH, start_m, N_Q, stride_don, offs_m, offs_d, HEAD_DIM, BLOCK_D, MASK_M)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if MASK_M:
            delta = tl.load(DELTA_ROW + rows, mask=rows < N_Q, other=0.0)
        else:
            delta = tl.load(DELTA_ROW + rows)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _dkdv_tile(Q_BH, K_BH, V_BH, DO_BH, LSE_ROW, DELTA_ROW, DK_BH, DV_BH,
               stride_qn, stride_kn, stride_vn, stride_don, stride_dkn, stride_dvn,
               start_n, N_Q, N_K, sm_scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK and dV of key rows [start_n, start_n + BLOCK_N) of one attention (rows at the *_BH
    pointers, lse and delta at LSE_ROW / DELTA_ROW + query row)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_rows(K_BH, start_n, N_K, stride_kn, offs_n, offs_d, HEAD_DIM, BLOCK_D, True)
    v = _load_rows(V_BH, start_n, N_K, stride_vn, offs_n, offs_d, HEAD_DIM, BLOCK_D, True)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    m_full = (N_Q // BLOCK_M) * BLOCK_M
    dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_BH, DO_BH, LSE_ROW, DELTA_ROW, stride_qn, stride_don,
                             0, m_full, N_Q, qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M,
                             False, DOT_PRECISION)
    if m_full < N_Q:
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_BH, DO_BH, LSE_ROW, DELTA_ROW, stride_qn, stride_don,
                                 m_full, N_Q, N_Q, qk_scale, offs_m, offs_d, HEAD_DIM, BLOCK_D, BLOCK_M,
                                 True, DOT_PRECISION)

    # Key rows past N_K were loaded as zeros and are simply not stored.
    _store_rows(DK_BH, (dk * sm_scale).to(DK_BH.dtype.element_ty), start_n, N_K, stride_dkn, offs_n, offs_d,
                HEAD_DIM, BLOCK_D)
    _store_rows(DV_BH, dv.to(DV_BH.dtype.element_ty), start_n, N_K, stride_dvn, offs_n, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def attn_bwd_dkdv(
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
    start_n, pid_bh, b, h = _program(N_K, BLOCK_N, H)
    row = pid_bh.to(tl.int64) * N_Q
    _dkdv_tile(Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh,
               V + b * stride_vb + h * stride_vh, DO + b * stride_dob + h * stride_doh, LSE + row, DELTA + row,
               DK + b * stride_dkb + h * stride_dkh, DV + b * stride_dvb + h * stride_dvh,
               stride_qn, stride_kn, stride_vn, stride_don, stride_dkn, stride_dvn,
               start_n, N_Q, N_K, sm_scale, qk_scale, HEAD_DIM, BLOCK_D, DOT_PRECISION, BLOCK_M, BLOCK_N)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, K_BH, V_BH, stride_kn, stride_vn, start, end, N_K,
                  qk_scale, offs_n, offs_d,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  MASK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [start, end)."""
    for start_n in range(start, end, BLOCK_N):
        k = _load_rows(K_BH, start_n, N_K, stride_kn, offs_n, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
        vt = _load_rows_t(V_BH, start_n, N_K, stride_vn, offs_n, offs_d, HEAD_DIM, BLOCK_D, MASK_N)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASK_N:
            # Zero keys still give exp2(-lse) > 0 (even inf for very negative lse): mask.
            p = tl.where((start_n + offs_n < N_K)[None, :], p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _dq_tile(Q_BH, K_BH, V_BH, DO_BH, LSE_ROW, DELTA_ROW, DQ_BH,
             stride_qn, stride_kn, stride_vn, stride_don, stride_dqn,
             start_m, N_Q, N_K, sm_scale, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of query rows [start_m, start_m + BLOCK_M) of one attention (as ``_dkdv_tile``)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_rows(Q_BH, start_m, N_Q, stride_qn, offs_m, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_rows(DO_BH, start_m, N_Q, stride_don, offs_m, offs_d, HEAD_DIM, BLOCK_D, True)
    rows = start_m + offs_m
    # Padded query rows get lse = +inf, hence p = 0, and are not stored.
    lse2 = tl.load(LSE_ROW + rows, mask=rows < N_Q, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA_ROW + rows, mask=rows < N_Q, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    n_full = (N_K // BLOCK_N) * BLOCK_N
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_BH, V_BH, stride_kn, stride_vn, 0, n_full, N_K,
                       qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, False, DOT_PRECISION)
    if n_full < N_K:
        dq = _bwd_dq_inner(dq, q, do, lse2, delta, K_BH, V_BH, stride_kn, stride_vn, n_full, N_K, N_K,
                           qk_scale, offs_n, offs_d, HEAD_DIM, BLOCK_D, BLOCK_N, True, DOT_PRECISION)

    _store_rows(DQ_BH, (dq * sm_scale).to(DQ_BH.dtype.element_ty), start_m, N_Q, stride_dqn, offs_m, offs_d,
                HEAD_DIM, BLOCK_D)


@triton.jit
def attn_bwd_dq(
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
    start_m, pid_bh, b, h = _program(N_Q, BLOCK_M, H)
    row = pid_bh.to(tl.int64) * N_Q
    _dq_tile(Q + b * stride_qb + h * stride_qh, K + b * stride_kb + h * stride_kh,
             V + b * stride_vb + h * stride_vh, DO + b * stride_dob + h * stride_doh, LSE + row, DELTA + row,
             DQ + b * stride_dqb + h * stride_dqh, stride_qn, stride_kn, stride_vn, stride_don, stride_dqn,
             start_m, N_Q, N_K, sm_scale, qk_scale, HEAD_DIM, BLOCK_D, DOT_PRECISION, BLOCK_M, BLOCK_N)
