"""LayerNorm and fused residual-add + LayerNorm in Triton, forward and backward.

``layer_norm(x, weight, bias, eps)`` normalizes over the last dimension;
``add_layer_norm(x, residual, weight, bias, eps, gamma)`` returns ``(layer_norm(s), s)``
with ``s = residual + gamma * x`` computed in the same pass (the pre-norm ViT block's
residual stream; ``gamma`` is LayerScale, or None for ``s = residual + x``). Both are
differentiable; ``weight``, ``bias`` and ``gamma`` may be None.

Numerics: every row is loaded once, upcast to fp32, and the mean and rstd are
computed (two-pass, in registers) and saved in fp32 for the backward. Outputs are
in the input dtype (fp32, fp16 or bf16). In ``add_layer_norm`` the sum is rounded to
the input dtype before it is normalized, so ``normed == layer_norm(summed)`` exactly
as the reference defines it, and the backward recomputes x-hat from that ``summed``.
The backward writes dx per row and accumulates dweight/dbias per *group* of rows into
an fp32 partial buffer (one row of it per program, so no atomics and no races), then
reduces the partials with one ``sum``. The gradient of ``add_layer_norm``'s sum,
dS = d(normed) through the norm plus d(summed), is residual's; without gamma it is x's
too, with gamma x gets gamma * dS and gamma the column sums of x * dS, a third
partial buffer beside dweight's and dbias's. A constexpr flag keeps all of it out of
the kernels without gamma.

Layouts: any number of leading dimensions and rows (0 included; rows beyond what a
grid dimension allows are looped inside programs), offsets in int64. A tensor whose
last dimension is contiguous is read in place through up to two row strides (e.g. a
transposed (B, T, D) -> (T, B, D) view); only a strided last dimension, or leading
dimensions that need more than two strides, are copied. Outputs are contiguous.

Autocast: this module sees no autocast. ``fastvit_kernels.functional`` applies the
policy before dispatching: norms keep the activations' dtype (x and residual
promoted to their common dtype, weight/bias cast to it), so under
``torch.autocast(dtype=bf16)`` an fp32 activation stays fp32 and a bf16 one stays
bf16, the same as the torch backend. (``F.layer_norm`` returns fp32 under CUDA
autocast; keeping the activation dtype is what a bf16 model wants.)

Registered as ``torch.ops.fastvit_triton.layer_norm`` / ``add_layer_norm`` (returning
the fp32 mean and rstd too), ``layer_norm_backward`` and ``add_layer_norm_scaled_backward``
(with gamma), with fake kernels and
autograd, so ``torch.compile(fullgraph=True)`` traces them.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import DTYPES, dtype_unsupported, sm_count

# One row must fit in one block (registers); wider rows fall back to another backend.
MAX_WIDTH = 65536
# Programs per launch: a safe size for any grid dimension; more rows loop inside.
MAX_PROGRAMS = 65535


# ------------------------------------------------------------------------------ kernels
@triton.jit
def _row_offset(rows, inner, stride_outer, stride_inner):
    """Element offsets of (int64) ``rows`` of a tensor whose rows are indexed by two
    strides: row = outer * inner + i  ->  outer * stride_outer + i * stride_inner."""
    return (rows // inner) * stride_outer + (rows % inner) * stride_inner


@triton.jit
def _layer_norm_fwd_kernel(
    X, x_inner, x_so, x_si,          # input rows (two-level row strides, unit column stride)
    R, r_inner, r_so, r_si,          # residual rows (read only when HAS_RESIDUAL)
    Y,                               # normed output, contiguous (n_rows, n_cols)
    S,                               # summed output residual + gamma * x, contiguous (HAS_RESIDUAL)
    W, B,                            # weight / bias (n_cols,), read when HAS_WEIGHT / HAS_BIAS
    G,                               # LayerScale gamma (n_cols,), read when HAS_GAMMA
    Mean, Rstd,                      # fp32 statistics (n_rows,), saved for the backward
    n_rows, n_cols, eps,
    HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,         # only with HAS_RESIDUAL
    BLOCK_SIZE: tl.constexpr,        # >= n_cols: a whole row is in registers
    ROWS: tl.constexpr,              # rows per tile (several when rows are narrow)
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_SIZE)
    col_ok = cols[None, :] < n_cols
    # The affine parameters are shared by every row this program handles: load them once.
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    if HAS_GAMMA:
        g = tl.load(G + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    # Tiles are strided over the programs, so any number of rows fits any grid size.
    for tile in range(pid, tl.cdiv(n_rows, ROWS), nprog):
        rows = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: offsets may pass 2**31
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok
        x = tl.load(X + _row_offset(rows, x_inner, x_so, x_si)[:, None] + cols[None, :],
                    mask=mask, other=0.0)
        out = rows[:, None] * n_cols + cols[None, :]
        if HAS_RESIDUAL:
            r = tl.load(R + _row_offset(rows, r_inner, r_so, r_si)[:, None] + cols[None, :],
                        mask=mask, other=0.0)
            # Round the sum to the storage dtype first: normed must be LN(summed) as stored,
            # which is also what the backward reads back.
            if HAS_GAMMA:  # one rounding of the fp32 residual + gamma * x
                s = (r.to(tl.float32) + g * x.to(tl.float32)).to(x.dtype)
            else:
                s = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
            tl.store(S + out, s, mask=mask)
            x = s
        x = x.to(tl.float32)
        mean = tl.sum(x, axis=1) / n_cols
        xc = tl.where(mask, x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / n_cols
        rstd = 1.0 / tl.sqrt(var + eps)
        tl.store(Mean + rows, mean, mask=row_ok)
        tl.store(Rstd + rows, rstd, mask=row_ok)
        y = xc * rstd[:, None]
        if HAS_WEIGHT:
            y = y * w
        if HAS_BIAS:
            y = y + b
        tl.store(Y + out, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    X, x_inner, x_so, x_si,          # the normalized input (summed, for add_layer_norm)
    DY, dy_inner, dy_so, dy_si,      # gradient of the normed output
    DS, ds_inner, ds_so, ds_si,      # gradient of the summed output (HAS_DSUM)
    XB, xb_inner, xb_so, xb_si,      # add_layer_norm's x, the branch gamma scales (HAS_GAMMA)
    DX,                              # gradient of the input, contiguous (n_rows, n_cols)
    DXB,                             # gradient of the branch, gamma * DX, contiguous (HAS_GAMMA)
    W,                               # weight (HAS_WEIGHT)
    G,                               # LayerScale gamma (HAS_GAMMA)
    Mean, Rstd,                      # fp32 statistics from the forward
    DW_partial, DB_partial, DG_partial,  # fp32 (n_programs, n_cols): this program's column sums
    n_rows, n_cols,
    HAS_DSUM: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_GAMMA: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, ROWS: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_SIZE)
    col_ok = cols[None, :] < n_cols
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        dw = tl.zeros((ROWS, BLOCK_SIZE), dtype=tl.float32)
    if HAS_BIAS:
        db = tl.zeros((ROWS, BLOCK_SIZE), dtype=tl.float32)
    if HAS_GAMMA:
        g = tl.load(G + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
        dg = tl.zeros((ROWS, BLOCK_SIZE), dtype=tl.float32)
    for tile in range(pid, tl.cdiv(n_rows, ROWS), nprog):
        rows = tl.cast(tile, tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & col_ok
        x = tl.load(X + _row_offset(rows, x_inner, x_so, x_si)[:, None] + cols[None, :],
                    mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + _row_offset(rows, dy_inner, dy_so, dy_si)[:, None] + cols[None, :],
                     mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_ok, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            wdy = dy * w
            dw += dy * xhat
        else:
            wdy = dy
        if HAS_BIAS:
            db += dy
        # The gradient through (x - mean) * rstd; masked lanes are zero in both sums.
        c_xhat = tl.sum(xhat * wdy, axis=1) / n_cols
        c_mean = tl.sum(wdy, axis=1) / n_cols
        dx = (wdy - (xhat * c_xhat[:, None] + c_mean[:, None])) * rstd[:, None]
        if HAS_DSUM:
            ds = tl.load(DS + _row_offset(rows, ds_inner, ds_so, ds_si)[:, None] + cols[None, :],
                         mask=mask, other=0.0)
            dx += ds.to(tl.float32)
        out = rows[:, None] * n_cols + cols[None, :]
        tl.store(DX + out, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_GAMMA:  # d(residual + gamma * xb): dx for residual, gamma * dx for xb
            xb = tl.load(XB + _row_offset(rows, xb_inner, xb_so, xb_si)[:, None] + cols[None, :],
                         mask=mask, other=0.0)
            tl.store(DXB + out, (g * dx).to(DXB.dtype.element_ty), mask=mask)
            dg += xb.to(tl.float32) * dx
    # One partial row per program: no two programs write the same place, no atomics.
    partial = tl.cast(pid, tl.int64) * n_cols + cols
    if HAS_WEIGHT:
        tl.store(DW_partial + partial, tl.sum(dw, axis=0), mask=cols < n_cols)
    if HAS_BIAS:
        tl.store(DB_partial + partial, tl.sum(db, axis=0), mask=cols < n_cols)
    if HAS_GAMMA:
        tl.store(DG_partial + partial, tl.sum(dg, axis=0), mask=cols < n_cols)


# ---------------------------------------------------------------------------- launchers
def launch_settings(n_cols: int, n_rows: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_SIZE, ROWS, num_warps) for ``n_rows`` rows of ``n_cols``.

    A whole row is one block; narrow rows are stacked into tiles of at least 1024
    elements so that a program has enough to load, with about 8 elements per thread
    (2 to 16 warps). Under the interpreter (CPU) every tile op costs Python overhead,
    so tiles are made larger there; the kernel is the same."""
    block = triton.next_power_of_2(max(n_cols, 1))
    tile = 1024 if device.type == "cuda" else 16384
    rows = min(max(1, tile // block), triton.next_power_of_2(max(n_rows, 1)))
    return block, rows, min(16, max(2, rows * block // 256))


def backward_groups(device: torch.device) -> int:
    """Programs (= dweight/dbias partial rows) in the backward: a few per SM, enough to
    fill an H100 (132 SMs -> 528) while the partial buffer stays small."""
    if device.type == "cuda":
        return 4 * sm_count(device)
    return 4  # the interpreter runs programs one after another: fewer is faster


def _rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """View ``t`` as rows of its last dimension: (tensor, inner, stride_outer, stride_inner)
    with row r at offset (r // inner) * stride_outer + (r % inner) * stride_inner.

    Copies only when the last dimension is strided or the leading dimensions need more
    than two strides."""
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        t = t.contiguous()
    # Merge leading dims, innermost first, into groups that share a single stride.
    groups: list[list[int]] = []  # [size, stride]
    for size, stride in zip(reversed(t.shape[:-1]), reversed(t.stride()[:-1])):
        if size == 1:
            continue
        if groups and groups[-1][0] * groups[-1][1] == stride:
            groups[-1][0] *= size
        else:
            groups.append([size, stride])
    if not groups:
        return t, 1, 0, 0
    if len(groups) == 1:
        return t, groups[0][0], 0, groups[0][1]
    if len(groups) == 2:
        (inner, stride_inner), (_, stride_outer) = groups
        return t, inner, stride_outer, stride_inner
    t = t.contiguous()
    return t, t.numel() // t.shape[-1], 0, t.shape[-1]


def _check(x: torch.Tensor, *others: Optional[torch.Tensor]) -> None:
    """Internal invariants; the public ops in functional.py validate user input."""
    assert x.dtype in DTYPES, x.dtype
    assert 0 < x.shape[-1] <= MAX_WIDTH, x.shape
    for t in others:
        assert t is None or (t.dtype == x.dtype and t.device == x.device), (t.dtype, t.device)


def layer_norm_forward(x, residual, weight, bias, eps: float, *, gamma=None, rows_per_tile: Optional[int] = None,
                       max_programs: int = MAX_PROGRAMS):
    """Run the forward kernel. Returns (normed, summed or None, mean, rstd): normed and
    summed (``residual + gamma * x``, gamma only with a residual) have x's shape and
    dtype, mean/rstd are fp32 of shape (rows,).
    ``rows_per_tile`` / ``max_programs`` override the launch settings (tests)."""
    _check(x, residual, weight, bias, gamma)
    assert gamma is None or residual is not None, "gamma scales x in the residual sum"
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(y) if residual is not None else None
    mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, summed, mean, rstd
    block, rows, num_warps = launch_settings(n_cols, n_rows, x.device)
    rows = rows_per_tile or rows
    xr = _rows(x)
    rr = _rows(residual) if residual is not None else xr
    _layer_norm_fwd_kernel[(min(triton.cdiv(n_rows, rows), max_programs),)](
        *xr, *rr, y, summed if summed is not None else y,
        # an absent weight/bias/gamma is never read (its HAS_* flag is off); any pointer will do
        weight if weight is not None else x, bias if bias is not None else x, gamma if gamma is not None else x,
        mean, rstd, n_rows, n_cols, eps,
        HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None, HAS_GAMMA=gamma is not None, BLOCK_SIZE=block, ROWS=rows, num_warps=num_warps,
    )
    return y, summed, mean, rstd


def layer_norm_backward(dy, dsummed, x, weight, mean, rstd, has_bias: bool, *,
                        rows_per_tile: Optional[int] = None, groups: Optional[int] = None):
    """Run the backward kernel and reduce the partial sums. ``x`` is what was normalized
    (``summed`` for add_layer_norm) and ``dsummed`` the gradient of the summed output
    (None for layer_norm). Returns (dx, dweight or None, dbias or None).
    ``rows_per_tile`` / ``groups`` override the launch settings (tests)."""
    dx, dw, db, _, _ = _backward(dy, dsummed, x, weight, mean, rstd, has_bias, None, None, rows_per_tile, groups)
    return dx, dw, db


def add_layer_norm_scaled_backward(dnormed, dsummed, summed, branch, gamma, weight, mean, rstd, has_bias: bool, *,
                                   rows_per_tile: Optional[int] = None, groups: Optional[int] = None):
    """The backward of ``summed = residual + gamma * branch`` followed by the norm.
    Returns (dresidual, dbranch, dweight or None, dbias or None, dgamma)."""
    dres, dw, db, dbranch, dgamma = _backward(dnormed, dsummed, summed, weight, mean, rstd, has_bias, branch,
                                              gamma, rows_per_tile, groups)
    return dres, dbranch, dw, db, dgamma


def _backward(dy, dsummed, x, weight, mean, rstd, has_bias, branch, gamma, rows_per_tile, groups):
    """Both launchers above: (dx, dweight, dbias, dbranch, dgamma), the last two None without gamma."""
    _check(x, dy, dsummed, weight, branch, gamma)
    assert (branch is None) == (gamma is None), "branch and gamma come together"
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dbranch = torch.empty(x.shape, dtype=x.dtype, device=x.device) if gamma is not None else None
    dtype = weight.dtype if weight is not None else x.dtype
    # (whether, dtype) of the column-sum gradients: weight, bias, gamma
    sums = [(weight is not None, dtype), (has_bias, dtype), (gamma is not None, x.dtype)]
    if n_rows == 0:
        dw, db, dg = (torch.zeros(n_cols, dtype=t, device=x.device) if on else None for on, t in sums)
        return dx, dw, db, dbranch, dg
    block, rows, num_warps = launch_settings(n_cols, n_rows, x.device)
    rows = rows_per_tile or rows
    groups = min(groups or backward_groups(x.device), triton.cdiv(n_rows, rows), MAX_PROGRAMS)
    partials = [torch.empty((groups, n_cols), dtype=torch.float32, device=x.device) if on else None
                for on, _ in sums]
    xr = _rows(x)
    dyr = _rows(dy)
    dsr = _rows(dsummed) if dsummed is not None else dyr
    br = _rows(branch) if branch is not None else xr
    _layer_norm_bwd_kernel[(groups,)](
        *xr, *dyr, *dsr, *br, dx, dbranch if dbranch is not None else dx,
        weight if weight is not None else x, gamma if gamma is not None else x, mean, rstd,
        *(p if p is not None else mean for p in partials),
        n_rows, n_cols,
        HAS_DSUM=dsummed is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=has_bias,
        HAS_GAMMA=gamma is not None, BLOCK_SIZE=block, ROWS=rows, num_warps=num_warps,
    )
    # The cross-group reduction: a few hundred fp32 rows, small next to the rows read.
    dw, db, dg = (p.sum(0).to(t) if p is not None else None for p, (_, t) in zip(partials, sums))
    return dx, dw, db, dbranch, dg


# --------------------------------------------------------------- torch.library glue
_EMPTY = (0,)  # stands for "no gradient" in the backward op's outputs (no Optional returns)


@torch.library.custom_op("fastvit_triton::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = layer_norm_forward(x, None, weight, bias, eps)
    return y, mean, rstd


@torch.library.custom_op("fastvit_triton::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor],
                       bias: Optional[torch.Tensor], eps: float, gamma: Optional[torch.Tensor] = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer_norm_forward(x, residual, weight, bias, eps, gamma=gamma)


@torch.library.custom_op("fastvit_triton::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: torch.Tensor, dsummed: Optional[torch.Tensor], x: torch.Tensor,
                            weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
                            has_bias: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dw, db = layer_norm_backward(dy, dsummed, x, weight, mean, rstd, has_bias)
    empty = x.new_empty(_EMPTY)
    return dx, (dw if dw is not None else empty), (db if db is not None else empty.clone())


@torch.library.custom_op("fastvit_triton::add_layer_norm_scaled_backward", mutates_args=())
def _add_layer_norm_scaled_backward_op(
        dnormed: torch.Tensor, dsummed: torch.Tensor, summed: torch.Tensor, x: torch.Tensor, gamma: torch.Tensor,
        weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, has_bias: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dres, dx, dw, db, dg = add_layer_norm_scaled_backward(dnormed, dsummed, summed, x, gamma, weight, mean, rstd,
                                                          has_bias)
    empty = summed.new_empty(_EMPTY)
    return dres, dx, (dw if dw is not None else empty), (db if db is not None else empty.clone()), dg


def _stats_like(x):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty((rows,), dtype=torch.float32)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), _stats_like(x), _stats_like(x)


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, gamma=None):
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    return out, torch.empty_like(out), _stats_like(x), _stats_like(x)


def _param_grads_fake(x, weight, has_bias):
    dtype = weight.dtype if weight is not None else x.dtype
    width = x.shape[-1:]
    return (x.new_empty(width if weight is not None else _EMPTY, dtype=dtype),
            x.new_empty(width if has_bias else _EMPTY, dtype=dtype))


@_layer_norm_backward_op.register_fake
def _(dy, dsummed, x, weight, mean, rstd, has_bias):
    return torch.empty_like(x, memory_format=torch.contiguous_format), *_param_grads_fake(x, weight, has_bias)


@_add_layer_norm_scaled_backward_op.register_fake
def _(dnormed, dsummed, summed, x, gamma, weight, mean, rstd, has_bias):
    dres = torch.empty_like(summed, memory_format=torch.contiguous_format)
    return dres, torch.empty_like(dres), *_param_grads_fake(summed, weight, has_bias), torch.empty_like(gamma)


def _param_grads(ctx, dw, db, weight_index):
    """(dweight, dbias) with None where there is no parameter or no grad is needed;
    ``weight_index``: the weight's position among the op's inputs (bias follows it)."""
    needs = ctx.needs_input_grad
    return (dw if ctx.has_weight and needs[weight_index] else None,
            db if ctx.has_bias and needs[weight_index + 1] else None)


def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _backward_layer_norm(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = torch.ops.fastvit_triton.layer_norm_backward(dy, None, x, weight, mean, rstd, ctx.has_bias)
    return (dx, *_param_grads(ctx, dw, db, 1), None)


def _setup_add_layer_norm(ctx, inputs, output):
    x, _, weight, bias, _, gamma = inputs
    _, summed, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    # x is kept only for gamma's gradient
    ctx.save_for_backward(summed, weight, mean, rstd, x if gamma is not None else None, gamma)
    ctx.has_weight, ctx.has_bias = weight is not None, bias is not None


def _backward_add_layer_norm(ctx, dnormed, dsummed, _dmean, _drstd):
    summed, weight, mean, rstd, x, gamma = ctx.saved_tensors
    if gamma is None:
        dx, dw, db = torch.ops.fastvit_triton.layer_norm_backward(
            dnormed, dsummed, summed, weight, mean, rstd, ctx.has_bias)
        # x and residual enter only through their sum, so both get the same gradient
        # (autograd copies before accumulating into an aliased .grad, as for x + y).
        return (dx, dx, *_param_grads(ctx, dw, db, 2), None, None)
    dres, dx, dw, db, dg = torch.ops.fastvit_triton.add_layer_norm_scaled_backward(
        dnormed, dsummed, summed, x, gamma, weight, mean, rstd, ctx.has_bias)
    # (gamma is given, so needs_input_grad has its entry: only a default-valued trailing argument has none)
    return (dx, dres, *_param_grads(ctx, dw, db, 2), None, dg if ctx.needs_input_grad[5] else None)


_layer_norm_op.register_autograd(_backward_layer_norm, setup_context=_setup_layer_norm)
_add_layer_norm_op.register_autograd(_backward_add_layer_norm, setup_context=_setup_add_layer_norm)


# ---------------------------------------------------------------------------- public
def layer_norm(x, weight, bias, eps: float = 1e-6):
    """LayerNorm over the last dimension (fp32 statistics); weight/bias may be None."""
    return torch.ops.fastvit_triton.layer_norm(x, weight, bias, eps)[0]


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-6, gamma=None):
    """``(layer_norm(residual + gamma * x), residual + gamma * x)`` in one pass over the
    rows; no gamma: ``residual + x``."""
    normed, summed, _, _ = torch.ops.fastvit_triton.add_layer_norm(x, residual, weight, bias, eps, gamma)
    return normed, summed


def _unsupported(x=None, *_args, **_kwargs) -> Optional[str]:
    """Why this backend cannot run a call with input ``x`` (None when it can)."""
    if x is None:
        return None
    reason = dtype_unsupported(x.dtype, uses_dot=False)
    if reason:
        return reason
    if x.dim() == 0 or not 0 < x.shape[-1] <= MAX_WIDTH:
        width = x.shape[-1] if x.dim() else "a scalar"
        return f"the normalized width must be 1..{MAX_WIDTH}, got {width}"
    return None


SUPPORTS = {"layer_norm": _unsupported, "add_layer_norm": _unsupported}
