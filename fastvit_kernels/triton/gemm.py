"""One Triton GEMM core, ``C = epilogue(prologue(A) @ B)``, shared by the fused ops.

Every operand is addressed through a per-axis index map instead of a plain stride, so
the same kernel reads a row-major matrix, a transposed one, the token rows of a
``(B, T, D)`` tensor that skip the prefix tokens, or the patches of an NCHW /
channels-last image (implicit im2col: nothing is copied to a patch matrix). The
output is written through the same maps, so the image gradient of a patch embedding
is stored straight back into image layout.

Axis maps (``idx`` is a row or column index of the logical matrix):

* ``LIN``   ``idx * s0``
* ``SPLIT`` ``(idx // G) * s0 + (idx % G) * s1``: token rows, G tokens per image
* ``PATCH`` patch ``idx`` of image ``idx // G`` on a grid G patches wide ``GW``:
  ``b * s0 + gy * P * s_h + gx * P * s_w`` (s0 is the image's batch stride)
* ``KERN``  element ``(ch, py, px)`` of a patch, ``idx = (ch * P + py) * P + px`` as in
  the Conv2d weight (D, C, P, P): ``ch * s0 + py * s_h + px * s_w``

Prologue: ``A *= AUX`` elementwise (the saved GELU derivative, turning dY into dZ),
and row sums of A as a second dot, ``A @ ones`` (a bias gradient falls out of the
weight-gradient GEMM).
Epilogue: bias, position embedding (token ``m % G``), prefix-token rows (class and
register tokens, with or without their own positions), GELU (erf,
tanh, or CLIP's QuickGELU ``z * sigmoid(1.702 z)``) or its derivative (saved for
backward, or multiplied into an upstream gradient). Split-K writes fp32 partial products that the launcher sums.

Accumulation is fp32. fp32 inputs use ``input_precision="ieee"``: tf32 (the GPU
default) has a 10-bit mantissa and could not meet DESIGN.md's ~1e-5 fp32 parity.

Performance shape: grouped (swizzled) tile order for L2 reuse; whole K tiles are
loaded without a K mask and the partial last one separately, because a K mask the
compiler cannot prove 16-aligned (K = 588) stops 16-bit loads from being pipelined;
autotuning is keyed on power-of-2 buckets of M, N and K (a new batch size reuses the
tuned config), with one config under the interpreter. The configs are pruned per
launch (``_prune``): tensor-core tiles for 16-bit operands, shallow-K tiles for fp32,
a shared-memory estimate that the compiled kernels stay under (sm_90, triton 3.6 and
3.9), and no tile whose accumulator leaves a fused epilogue too few registers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, max_shared_mem, sm_count, tuning_candidates

LIN, SPLIT, PATCH, KERN = 0, 1, 2, 3
ROWSUM_N: tl.constexpr = tl.constexpr(16)  # width of the ones block for row sums (the smallest MMA N)
ACT_NONE, ACT_ERF, ACT_TANH, ACT_QUICK = 0, 1, 2, 3
ACTIVATIONS = {"none": ACT_ERF, "tanh": ACT_TANH, "quick": ACT_QUICK}  # GELU's `approximate` -> ACT code


# ----------------------------------------------------------------------------- kernels
def _device(fn):
    """``triton.jit`` for a device helper, except under the interpreter.

    There every call of a nested jit function re-patches all of triton.language
    (~10 ms a call); the plain function runs the same code inside the patched kernel.
    """
    return fn if INTERPRET else triton.jit(fn)


if INTERPRET:
    def _bound(x):
        """A loop bound the interpreter's ``range`` accepts: triton 3.6's interpreter
        converts a runtime (1-element array) bound with ``int(array)``, which numpy 2
        rejects."""
        return int(x.handle.data.reshape(())) if isinstance(x, tl.tensor) else x
else:
    @triton.jit
    def _bound(x):
        return x


@_device
def _axis_offsets(idx, MODE: tl.constexpr, s0, s1, s_h, s_w, G, GW, P: tl.constexpr):
    """Element offsets (int64) of indices ``idx`` along one axis; see the module doc."""
    if MODE == 0:
        off = idx.to(tl.int64) * s0
    elif MODE == 1:
        off = (idx // G).to(tl.int64) * s0 + (idx % G).to(tl.int64) * s1
    elif MODE == 2:
        g = idx % G
        off = ((idx // G).to(tl.int64) * s0 + ((g // GW) * P).to(tl.int64) * s_h
               + ((g % GW) * P).to(tl.int64) * s_w)
    else:
        # Pixels in runs of VEC (the largest power of 2 dividing P) share a patch row:
        # the offset of the run's first pixel plus the step inside the run, a form in
        # which the compiler sees the run is contiguous (s_w == 1) and vectorises the
        # load (P = 14: 4-byte pairs, which it pipelines; single 2-byte loads it does not).
        VEC = P & -P
        run = idx // VEC * VEC
        r = run % (P * P)
        off = ((run // (P * P)).to(tl.int64) * s0 + (r // P).to(tl.int64) * s_h
               + (r % P + idx % VEC).to(tl.int64) * s_w)
    return off


@_device
def _tanh(u):
    # exp of a non-positive argument never overflows; the sign is restored after.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@_device
def _sigmoid(u):
    # exp of a non-positive argument never overflows; the other side is 1 - sigmoid(|u|).
    e = tl.exp(-tl.abs(u))
    r = 1.0 / (1.0 + e)
    return tl.where(u >= 0, r, e * r)


@_device
def _gelu(z, ACT: tl.constexpr):
    if ACT == 1:
        y = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 2:
        y = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    else:
        y = z * _sigmoid(1.702 * z)
    return y


@_device
def _gelu_grad(z, ACT: tl.constexpr):
    """d GELU(z) / dz."""
    if ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        g = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        g = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    else:
        sig = _sigmoid(1.702 * z)
        g = sig + 1.702 * z * sig * (1.0 - sig)
    return g


@_device
def _k_tile(acc, rowsum, ones, a_ptrs, b_ptrs, aux_ptrs, a_mask, b_mask, PROLOGUE_SCALE: tl.constexpr,
            ROWSUM_A: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One K tile: acc += prologue(A) @ B, and rowsum += prologue(A) @ ones.

    The row sums are a second, narrow dot rather than a tl.sum: a reduction carried
    through the K loop crashes triton 3.6's thread-locality pass (fp32), and the
    tensor cores read A from shared memory without a register copy of the tile.
    """
    b = tl.load(b_ptrs, mask=b_mask, other=0.0)
    a = tl.load(a_ptrs, mask=a_mask, other=0.0)
    if PROLOGUE_SCALE:
        scale = tl.load(aux_ptrs, mask=a_mask, other=0.0)
        a = (a.to(tl.float32) * scale.to(tl.float32)).to(b.dtype)
    if ROWSUM_A:
        rowsum = tl.dot(a, ones, rowsum, input_precision=DOT_PRECISION)
    acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc, rowsum


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr,      # operands; c is the output (fp32 workspace (S, M, N) with split-K)
    aux_ptr,                  # A-shaped prologue scale, or C-shaped upstream gradient (EPI_GELU_GRAD)
    bias_ptr, pos_ptr,
    prefix_ptr,               # (NUM_PREFIX, N) contiguous prefix-token rows (HAS_PREFIX)
    c2_ptr,                   # second output with C's layout: GELU'(pre-activation) (ACT_GRAD_OUT)
    rowsum_ptr,               # (S, M) fp32 row sums of prologue(A) (ROWSUM_A)
    M, N, K,
    G, GW, NUM_IMAGES,        # geometry: tokens (patches) per image, grid width, images
    NUM_PREFIX,               # prefix tokens before each image's patch tokens (HAS_PREFIX)
    sa_r0, sa_r1, sa_c0, sa_c1,  # A's row / column map strides
    sb_r0, sb_r1, sb_c0, sb_c1,
    sc_r0, sc_r1, sc_c0, sc_c1, sc_split,
    s_aux_r, s_aux_c, s_pos_r, s_pos_c,
    s_h, s_w,                 # image row / column strides for PATCH and KERN maps
    M_BUCKET, N_BUCKET, K_BUCKET,  # autotuning key only: sizes rounded up to powers of 2
    A_ROW: tl.constexpr, A_COL: tl.constexpr, B_ROW: tl.constexpr, B_COL: tl.constexpr,
    C_ROW: tl.constexpr, C_COL: tl.constexpr, P: tl.constexpr,
    PROLOGUE_SCALE: tl.constexpr, ROWSUM_A: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_PREFIX: tl.constexpr, PREFIX_POS: tl.constexpr,  # prefix rows; they get pos rows too
    ACT: tl.constexpr, ACT_GRAD_OUT: tl.constexpr, EPI_GELU_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped ordering: GROUP_M row blocks share each B column block while it sits in L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rm < M
    mask_n = rn < N
    a_rows = _axis_offsets(rm, A_ROW, sa_r0, sa_r1, s_h, s_w, G, GW, P)
    b_cols = _axis_offsets(rn, B_COL, sb_c0, sb_c1, s_h, s_w, G, GW, P)
    aux_rows = rm.to(tl.int64) * s_aux_r

    # This program's slice of K (the whole of K without split-K), in whole BLOCK_K tiles.
    num_splits = tl.num_programs(1)
    tiles_per_split = ((K + BLOCK_K - 1) // BLOCK_K + num_splits - 1) // num_splits
    k_lo = split * tiles_per_split * BLOCK_K
    k_hi = tl.minimum(K, k_lo + tiles_per_split * BLOCK_K)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Row sums of prologue(A) as A @ ones: every one of the ROWSUM_N columns is the sum.
    rowsum = tl.zeros((BLOCK_M, ROWSUM_N), dtype=tl.float32)
    ones = tl.full((BLOCK_K, ROWSUM_N), 1.0, dtype=b_ptr.dtype.element_ty)
    offs_k = tl.arange(0, BLOCK_K)
    rows_in = mask_m[:, None]
    cols_in = mask_n[None, :]
    # Plain (LIN) K axes step their pointers; mapped K axes recompute offsets per tile.
    k_first = (k_lo + offs_k).to(tl.int64)
    a_ptrs = a_ptr + a_rows[:, None] + (k_first * sa_c0)[None, :]
    b_ptrs = b_ptr + (k_first * sb_r0)[:, None] + b_cols[None, :]
    if PROLOGUE_SCALE:
        aux_ptrs = aux_ptr + aux_rows[:, None] + (k_first * s_aux_c)[None, :]
    else:
        aux_ptrs = a_ptrs
    # Whole K tiles first, masked only along M and N: with a K mask whose groups the
    # compiler cannot prove aligned (K = 588), 16-bit loads are not pipelined.
    k_whole = k_lo + (k_hi - k_lo) // BLOCK_K * BLOCK_K
    for k0 in range(_bound(k_lo), _bound(k_whole), BLOCK_K):
        if A_COL != 0:
            a_cols = _axis_offsets(k0 + offs_k, A_COL, sa_c0, sa_c1, s_h, s_w, G, GW, P)
            a_ptrs = a_ptr + a_rows[:, None] + a_cols[None, :]
        if B_ROW != 0:
            b_rows = _axis_offsets(k0 + offs_k, B_ROW, sb_r0, sb_r1, s_h, s_w, G, GW, P)
            b_ptrs = b_ptr + b_rows[:, None] + b_cols[None, :]
        acc, rowsum = _k_tile(acc, rowsum, ones, a_ptrs, b_ptrs, aux_ptrs, rows_in, cols_in,
                              PROLOGUE_SCALE, ROWSUM_A, DOT_PRECISION)
        if A_COL == 0:
            a_ptrs += BLOCK_K * sa_c0
        if B_ROW == 0:
            b_ptrs += BLOCK_K * sb_r0
        if PROLOGUE_SCALE:
            aux_ptrs += BLOCK_K * s_aux_c
    if k_whole < k_hi:  # the partial last tile
        k_in = offs_k < k_hi - k_whole
        if A_COL != 0:
            a_cols = _axis_offsets(k_whole + offs_k, A_COL, sa_c0, sa_c1, s_h, s_w, G, GW, P)
            a_ptrs = a_ptr + a_rows[:, None] + a_cols[None, :]
        if B_ROW != 0:
            b_rows = _axis_offsets(k_whole + offs_k, B_ROW, sb_r0, sb_r1, s_h, s_w, G, GW, P)
            b_ptrs = b_ptr + b_rows[:, None] + b_cols[None, :]
        acc, rowsum = _k_tile(acc, rowsum, ones, a_ptrs, b_ptrs, aux_ptrs, rows_in & k_in[None, :],
                              k_in[:, None] & cols_in, PROLOGUE_SCALE, ROWSUM_A, DOT_PRECISION)

    if ROWSUM_A:
        # Every column block sums the same rows; the first one stores them.
        if pid_n == 0:
            # The columns are equal, so their max is the sum, exactly.
            tl.store(rowsum_ptr + split.to(tl.int64) * M + rm, tl.max(rowsum, axis=1), mask=mask_m)

    c_rows = _axis_offsets(rm, C_ROW, sc_r0, sc_r1, s_h, s_w, G, GW, P)
    c_cols = _axis_offsets(rn, C_COL, sc_c0, sc_c1, s_h, s_w, G, GW, P)
    c_off = split.to(tl.int64) * sc_split + c_rows[:, None] + c_cols[None, :]
    c_mask = rows_in & cols_in
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        pos_rows = (rm % G).to(tl.int64) * s_pos_r
        acc += tl.load(pos_ptr + pos_rows[:, None] + (rn * s_pos_c)[None, :],
                       mask=c_mask, other=0.0).to(tl.float32)
    if EPI_GELU_GRAD:
        dy = tl.load(aux_ptr + aux_rows[:, None] + (rn.to(tl.int64) * s_aux_c)[None, :],
                     mask=c_mask, other=0.0)
        acc = dy.to(tl.float32) * _gelu_grad(acc, ACT)
    elif ACT != 0:
        if ACT_GRAD_OUT:
            tl.store(c2_ptr + c_off, _gelu_grad(acc, ACT).to(c2_ptr.dtype.element_ty), mask=c_mask)
        acc = _gelu(acc, ACT)
    tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=c_mask)

    if HAS_PREFIX:
        # Prefix row j of image b sits NUM_PREFIX - j token strides before the image's first
        # patch token (where c points), its position as many rows before pos (PREFIX_POS).
        # The (image, row) pairs are dealt out to the row blocks: a ViT has more row blocks
        # than prefix rows in the batch, so a program writes one row, or none.
        for t in range(_bound(pid_m), _bound(NUM_IMAGES * NUM_PREFIX), _bound(num_pid_m)):
            img = t // NUM_PREFIX
            j = t % NUM_PREFIX
            val = tl.load(prefix_ptr + j * N + rn, mask=mask_n, other=0.0).to(tl.float32)
            if PREFIX_POS:
                val += tl.load(pos_ptr + (j - NUM_PREFIX) * s_pos_r + rn * s_pos_c,
                               mask=mask_n, other=0.0).to(tl.float32)
            row = c_ptr + tl.cast(img, tl.int64) * sc_r0 + (j - NUM_PREFIX) * sc_r1
            tl.store(row + rn * sc_c0, val.to(c_ptr.dtype.element_ty), mask=mask_n)


# -------------------------------------------------------------------------- autotuning
# (BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps).
# 16-bit operands: tensor-core (wgmma) tiles, 64-deep K tiles, 3-4 stages.
_HALF_TILES = ((128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
               (64, 64, 64, 4, 4))
# fp32 ("ieee"): the dot runs on the FMA units with both operand tiles in registers,
# so the K tiles are shallow.
_FP32_TILES = ((128, 128, 16, 3, 8), (128, 64, 16, 3, 4), (64, 64, 32, 3, 4))

# An epilogue beyond the plain store (bias, GELU, GELU', position / class rows), a
# prologue scale or im2col index maps (P > 1) need registers next to the fp32
# accumulator: with more than 64 accumulator elements per thread (128x256 on 8 warps)
# such variants spill on sm_90 (triton 3.6 and 3.9).
_MAX_ACC_PER_THREAD_FUSED = 64
# im2col maps over channels-last images (pixel stride s_w != 1): no pixel run is
# contiguous, every element's offset is computed on its own, and all but the 64x64
# tile spill.
_MAX_ACC_PER_THREAD_STRIDED_PIXELS = 32
# Tiles that still spill for one variant (flag -> tiles), measured on sm_90: the
# recompute epilogue (dZ = dY * GELU'(z), with dY loaded there) with 64 accumulator
# elements per thread on 4 warps (128x64; 64x128 when M is not a multiple of 16).
_SPILLING_TILES = {"EPI_GELU_GRAD": {(128, 64, 64, 4, 4), (64, 128, 64, 4, 4)}}


def _config(tile):
    bm, bn, bk, stages, warps = tile
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


def _tile(c: triton.Config):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps)


def _gpu_configs():
    return [_config(t) for t in _HALF_TILES + _FP32_TILES]


# Under the interpreter: one config, so nothing is benchmarked, and large tiles, as the
# interpreter's cost grows with the number of operations, hardly with their size.
_CONFIGS = ([triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 4},
                           num_stages=1, num_warps=4)]
            if INTERPRET else _gpu_configs())

# Shared memory the estimate below leaves to the compiler (barriers, layout
# conversions): 27 KiB, i.e. a 200 KiB budget on H100 / H200's 227 KiB.
_SMEM_MARGIN = 27 * 1024


def smem_estimate(c: triton.Config, element_size: int, prologue_scale: bool) -> int:
    """Bytes of shared memory for a config's pipelined tiles: per stage one A tile
    (two with the prologue scale, which is A-shaped), one B tile, and the ones
    block of the row sums. Measured on sm_90 (triton 3.6 and 3.9) the compiled
    kernels stay at or below this; the epilogue reuses the pipeline's buffers."""
    bm, bn, bk, stages, _ = _tile(c)
    a_tiles = 2 if prologue_scale else 1
    return (stages * (a_tiles * bm * bk + bk * bn) + bk * 16) * element_size


def _fused_epilogue(args) -> bool:
    return (any(args.get(f) for f in ("PROLOGUE_SCALE", "HAS_BIAS", "HAS_POS", "HAS_PREFIX", "ACT",
                                      "ACT_GRAD_OUT", "EPI_GELU_GRAD"))
            or args.get("P", 1) > 1)


def _prune(configs, named_args, **kwargs):
    """The configs for this launch: the tile family of its dtype, without those whose
    pipelined tiles overflow the device's shared memory or whose accumulator leaves
    too few registers for a fused epilogue. Never empty: the smallest of the family
    is the fallback."""
    args = {**named_args, **kwargs}
    a = args["a_ptr"]
    size = a.element_size()
    family = _FP32_TILES if size == 4 else _HALF_TILES
    mine = [c for c in configs if _tile(c) in family] or list(configs)
    budget = max_shared_mem(a.device) - _SMEM_MARGIN
    fused = _fused_epilogue(args)
    max_acc = _MAX_ACC_PER_THREAD_FUSED if fused else None
    if args.get("P", 1) > 1 and args.get("s_w", 1) != 1:
        max_acc = _MAX_ACC_PER_THREAD_STRIDED_PIXELS
    spilling = set().union(*(tiles for flag, tiles in _SPILLING_TILES.items() if args.get(flag)))
    kept = [c for c in mine
            if smem_estimate(c, size, bool(args.get("PROLOGUE_SCALE"))) <= budget
            and (max_acc is None or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] // (32 * c.num_warps)
                 <= max_acc)
            and _tile(c) not in spilling]
    return tuning_candidates(kept or [min(mine, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])])


_gemm = triton.autotune(
    configs=_CONFIGS,
    key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "A_ROW", "A_COL", "B_ROW", "B_COL", "C_ROW", "C_COL",
         "P", "PROLOGUE_SCALE", "ROWSUM_A", "HAS_BIAS", "HAS_POS", "HAS_PREFIX", "PREFIX_POS", "ACT",
         "ACT_GRAD_OUT", "EPI_GELU_GRAD"],
    prune_configs_by={"early_config_prune": _prune},
)(_gemm_kernel)


# ---------------------------------------------------------------------------- launcher
@dataclass(frozen=True)
class Operand:
    """A tensor seen as a logical matrix through a row map and a column map."""

    tensor: torch.Tensor
    row: int = LIN
    col: int = LIN
    row_strides: tuple[int, int] = (0, 0)
    col_strides: tuple[int, int] = (0, 0)

    def t(self) -> Operand:
        return Operand(self.tensor, self.col, self.row, self.col_strides, self.row_strides)


def matrix(t: torch.Tensor) -> Operand:
    """A 2-D tensor with any strides."""
    return Operand(t, LIN, LIN, (t.stride(0), 0), (t.stride(1), 0))


def token_rows(t: torch.Tensor) -> Operand:
    """(B, G, D) tensor (e.g. ``out[:, 1:]``) as the (B*G, D) matrix of its rows."""
    return Operand(t, SPLIT, LIN, (t.stride(0), t.stride(1)), (t.stride(2), 0))


def patches(images: torch.Tensor) -> Operand:
    """(B, C, H, W) images, any memory format, as the (B*G, C*P*P) patch matrix."""
    return Operand(images, PATCH, KERN, (images.stride(0), 0), (images.stride(1), 0))


@dataclass(frozen=True)
class Geometry:
    """Patch grid for SPLIT / PATCH / KERN maps: P, G = GH * GW patches per image."""

    patch: int = 1
    tokens: int = 1
    grid_w: int = 1
    images: int = 0
    s_h: int = 0
    s_w: int = 0

    @staticmethod
    def of(images: torch.Tensor, patch: int) -> Geometry:
        gh, gw = images.shape[2] // patch, images.shape[3] // patch
        return Geometry(patch, gh * gw, gw, images.shape[0], images.stride(2), images.stride(3))


def _bucket(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def choose_splits(m: int, n: int, k: int, device: torch.device) -> int:
    """Split-K factor for a GEMM with few output tiles and a long K (weight gradients).

    Picks the split that fills the GPU's SMs with the fewest wasted tail slots,
    counting 128x128 tiles and keeping at least 1024 of K per split.
    """
    if device.type != "cuda":
        return 1
    sms = sm_count(device)
    tiles = triton.cdiv(m, 128) * triton.cdiv(n, 128)
    best, best_cost = 1, float("inf")
    for s in range(1, 17):
        if s > 1 and k // s < 1024:
            break
        cost = triton.cdiv(tiles * s, sms) / s  # waves, each 1/s as long
        if cost < best_cost * 0.9:  # a split must clearly pay for its reduction
            best, best_cost = s, cost
    return best


def gemm(a: Operand, b: Operand, c: Operand, m: int, n: int, k: int, *,
         geometry: Geometry = Geometry(), aux: Operand | None = None, prologue_scale: bool = False,
         rowsum: torch.Tensor | None = None, bias: torch.Tensor | None = None,
         pos: Operand | None = None, prefix: torch.Tensor | None = None, prefix_pos: bool = False,
         act: int = ACT_NONE,
         act_grad_out: torch.Tensor | None = None, epi_gelu_grad: bool = False,
         splits: int = 1) -> None:
    """``c = epilogue(prologue(a) @ b)`` for an (m, k) ``a`` and (k, n) ``b``, written in place.

    aux: A-shaped scale multiplied into A (``prologue_scale``) or C-shaped upstream
    gradient (``epi_gelu_grad``: c = aux * GELU'(a @ b + bias)). rowsum: (m,) tensor
    receiving the row sums of prologue(a). pos: (G, n) position rows added to row
    ``i`` at ``i % G``; prefix: (n_prefix, n) contiguous rows written before each image's
    G rows of c (c points at the image's first patch row), plus the n_prefix rows before
    pos when ``prefix_pos``. act_grad_out: tensor shaped like c receiving GELU'.
    splits: split-K factor; with more than one, c must be an fp32 (splits, m, n)
    workspace and nothing but rowsum may be fused (``gemm_split_sum`` wraps this).
    ``rowsum`` is then summed over the splits here.
    """
    if m == 0 or n == 0:
        return
    device = a.tensor.device
    if splits > 1:
        ws = c.tensor
        fused = any(f is not None for f in (bias, pos, prefix, act_grad_out)) or act != ACT_NONE or epi_gelu_grad
        if ws.dtype != torch.float32 or tuple(ws.shape) != (splits, m, n) or fused:
            raise ValueError(f"split-K needs an fp32 ({splits}, {m}, {n}) workspace and no fused "
                             f"epilogue, got {ws.dtype} {tuple(ws.shape)}, fused epilogue: {fused}")
    dtype = a.tensor.dtype
    rowsum_ws = None
    if rowsum is not None:
        rowsum_ws = rowsum if splits == 1 else torch.empty((splits, m), device=device, dtype=torch.float32)
    g = geometry
    aux_t = aux.tensor if aux is not None else c.tensor
    aux_s = (aux.row_strides[0], aux.col_strides[0]) if aux is not None else (0, 0)
    pos_t = pos.tensor if pos is not None else c.tensor
    pos_s = (pos.row_strides[0], pos.col_strides[0]) if pos is not None else (0, 0)

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), splits

    _gemm[grid](
        a.tensor, b.tensor, c.tensor, aux_t,
        bias if bias is not None else c.tensor, pos_t, prefix if prefix is not None else c.tensor,
        act_grad_out if act_grad_out is not None else c.tensor,
        rowsum_ws if rowsum_ws is not None else c.tensor,
        m, n, k, g.tokens, g.grid_w, g.images, prefix.shape[0] if prefix is not None else 0,
        *a.row_strides, *a.col_strides, *b.row_strides, *b.col_strides,
        *c.row_strides, *c.col_strides, c.tensor.stride(0) if splits > 1 else 0,
        *aux_s, *pos_s, g.s_h, g.s_w,
        _bucket(m), _bucket(n), _bucket(k),
        A_ROW=a.row, A_COL=a.col, B_ROW=b.row, B_COL=b.col, C_ROW=c.row, C_COL=c.col, P=g.patch,
        PROLOGUE_SCALE=prologue_scale, ROWSUM_A=rowsum is not None,
        HAS_BIAS=bias is not None, HAS_POS=pos is not None, HAS_PREFIX=prefix is not None,
        PREFIX_POS=prefix_pos,
        ACT=act, ACT_GRAD_OUT=act_grad_out is not None, EPI_GELU_GRAD=epi_gelu_grad,
        DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
    if rowsum is not None and splits > 1:
        rowsum.copy_(rowsum_ws.sum(0))


def gemm_split_sum(a: Operand, b: Operand, out: torch.Tensor, m: int, n: int, k: int, *,
                   geometry: Geometry = Geometry(), aux: Operand | None = None,
                   prologue_scale: bool = False, rowsum: torch.Tensor | None = None,
                   splits: int | None = None) -> None:
    """``out = prologue(a) @ b`` for weight gradients: split-K when that fills the GPU.

    out is an (m, n) tensor of any float dtype (written in place); with split-K the
    fp32 partial products are summed and cast once.
    """
    splits = splits or choose_splits(m, n, k, a.tensor.device)
    if splits == 1:
        gemm(a, b, matrix(out), m, n, k, geometry=geometry, aux=aux, prologue_scale=prologue_scale,
             rowsum=rowsum, splits=1)
        return
    ws = torch.empty((splits, m, n), device=out.device, dtype=torch.float32)
    ws_op = Operand(ws, LIN, LIN, (ws.stride(1), 0), (ws.stride(2), 0))
    gemm(a, b, ws_op, m, n, k, geometry=geometry, aux=aux, prologue_scale=prologue_scale,
         rowsum=rowsum, splits=splits)
    out.copy_(ws.sum(0))
