"""Flash attention for ViT shapes, softmax(q k^T * scale) v: configs, launchers, custom ops.

``attention(q, k, v)`` reads (B, H, N, d) tensors of any strides with a unit stride on d (the
views of a packed qkv in place); ``packed_attention(qkv, H)`` reads the qkv Linear's (B, N, 3*D)
output as (B, N, 3, H, d) and writes (B, N, D), and its backward one packed (B, N, 3*D) gradient.
Any token counts (q and k/v may differ), head dims up to 128; fp32 uses ieee dots (TF32 would
miss DESIGN.md's parity). The kernels are in attention_kernels.py.
"""

from __future__ import annotations

import torch
import triton

from ..reference import default_scale, split_qkv
from ._common import INTERPRET, dtype_unsupported, max_shared_mem, tuning_candidates
from .attention_kernels import (
    LOG2E,
    attn_bwd_dkdv,
    attn_bwd_dq,
    attn_bwd_preprocess,
    attn_fwd,
)

MAX_HEAD_DIM = 128


# ---------------------------------------------------------------------------------- configs
# Candidates (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim (BLOCK_D <= 64,
# and 128 for d = 80, 96, 128), best guess first: the first one that fits is what
# FASTVIT_AUTOTUNE=0 runs, and the last (small tiles over 8 warps, so that fp32's ieee dots
# spill little) is the one fp32 gets. Each compiles for sm_90 without spilling in fp16 and
# bf16 on triton 3.6 and 3.9. Eight warps (two Hopper warpgroups) where a program's tiles
# would not fit 4 warps' registers.
_FWD = {   # BLOCK_M queries owned, BLOCK_N keys streamed
    64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 8, 2)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3), (64, 32, 8, 2)],
}
_DKDV = {  # BLOCK_N keys owned, BLOCK_M queries streamed
    64: [(64, 128, 8, 3), (64, 128, 8, 2), (32, 128, 8, 3), (64, 64, 4, 2), (32, 64, 8, 3)],
    128: [(32, 128, 8, 3), (16, 128, 8, 3), (64, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 3)],
}
_DQ = {    # BLOCK_M queries owned, BLOCK_N keys streamed
    64: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 8, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 8, 2), (64, 32, 8, 3)],
}
_INTERPRET_CONFIG = (64, 64, 4, 1)   # the interpreter: one config, nothing to tune

# Shared memory kept free below the device's limit for what the estimate leaves out.
_SMEM_MARGIN = 7 * 1024


def _head_dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else 128


def smem_estimate(conf, args, owned: str, owned_tiles: int) -> int:
    """Shared memory of a config in bytes: the owned tiles (q; or k and v / q and dO in the
    backward) plus ``num_stages`` copies of the two streamed tiles. Compiled for sm_90 by
    triton 3.6 and 3.9, every candidate in every dtype allocates at most 1 KiB more (the
    backward's lse and delta rows), well inside the margin."""
    bm, bn = conf.kwargs["BLOCK_M"], conf.kwargs["BLOCK_N"]
    owned_rows, streamed = (bm, bn) if owned == "BLOCK_M" else (bn, bm)
    rows = owned_tiles * owned_rows + 2 * streamed * conf.num_stages
    return rows * args["BLOCK_D"] * args["Q"].element_size()


def _keep(conf, args, owned: str, owned_tiles: int) -> bool:
    """Whether a config is worth timing for this call. ``owned``: which of BLOCK_M / BLOCK_N
    is the per-program tile; ``owned_tiles``: how many tiles of that size a program holds."""
    owned_rows = conf.kwargs[owned]
    # Packed variable-length sequences (varlen_attention.py) are bounded by the longest one.
    n_owned = args["MAX_SEQLEN"] if "MAX_SEQLEN" in args else args["N_Q" if owned == "BLOCK_M" else "N_K"]
    # A per-program tile far longer than the sequence is mostly padding.
    if owned_rows > max(64, triton.next_power_of_2(n_owned)):
        return False
    budget = max_shared_mem(args["Q"].device) - _SMEM_MARGIN
    return smem_estimate(conf, args, owned, owned_tiles) <= budget


def _prune(by_class: dict, owned: str, owned_tiles: int):
    """The autotuner's early prune: the launch's head-dim list (``by_class``: configs per
    ``_head_dim_class``), in its order, among the configs offered, less what does not fit."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        offered = [c for c in by_class[_head_dim_class(args["BLOCK_D"])]
                   if any(c is o for o in configs)] or list(configs)
        kept = [c for c in offered if _keep(c, args, owned, owned_tiles)] or offered[-1:]
        if args["DOT_PRECISION"] == "ieee":
            # fp32 is for checking, not speed: its ieee dots take minutes to compile per config.
            return kept[-1:]
        return tuning_candidates(kept)
    return prune


def _tuned(kernel, candidates: dict, owned: str, owned_tiles: int):
    """``kernel`` autotuned over the union of its per-head-dim candidate lists."""
    if INTERPRET:
        candidates = {cls: [_INTERPRET_CONFIG] for cls in candidates}
    configs = {}
    for cands in candidates.values():
        for bm, bn, w, s in cands:
            configs.setdefault((bm, bn, w, s), triton.Config({"BLOCK_M": bm, "BLOCK_N": bn},
                                                              num_warps=w, num_stages=s))
    by_class = {cls: [configs[c] for c in cands] for cls, cands in candidates.items()}
    return triton.autotune(configs=list(configs.values()), key=["N_BUCKET", "BLOCK_D", "DOT_PRECISION"],
                           prune_configs_by={"early_config_prune": _prune(by_class, owned, owned_tiles)}
                           )(kernel)


def _n_bucket(n: int) -> int:
    """Sequence lengths grouped by powers of 4 (64, 256, 1024, 4096, ...) for the tuning
    key: ViT's 197 / 257 / 577 / 1025 tokens then need at most four tunings per d and dtype."""
    bucket = 64
    while bucket < n:
        bucket *= 4
    return bucket


# Tuned on the bucketed length, the padded head dim, the precision and (added by the
# autotuner) the tensors' dtypes.
_attn_fwd_tuned = _tuned(attn_fwd, _FWD, "BLOCK_M", 1)
_attn_bwd_dkdv_tuned = _tuned(attn_bwd_dkdv, _DKDV, "BLOCK_N", 2)
_attn_bwd_dq_tuned = _tuned(attn_bwd_dq, _DQ, "BLOCK_M", 2)
_PREPROCESS_BLOCK_M = 64   # the backward's delta pass: one load of O and dO per row, 4 warps


# --------------------------------------------------------------------------------- launchers
def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _common(q: torch.Tensor, k: torch.Tensor) -> dict:
    head_dim = q.shape[-1]
    return {
        "H": q.shape[1], "N_Q": q.shape[2], "N_K": k.shape[2],
        "N_BUCKET": _n_bucket(max(q.shape[2], k.shape[2])),
        "HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }


def attention_forward(q, k, v, out, scale: float) -> torch.Tensor:
    """Write attention(q, k, v) into ``out``; return the fp32 log-sum-exp (B, H, N_q).

    All four are (B, H, N, d) views with a unit stride on d (any other strides).
    """
    batch, heads, n_q, _ = q.shape
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)
    if lse.numel() == 0:
        return lse
    meta = _common(q, k)
    grid = lambda m: (triton.cdiv(n_q, m["BLOCK_M"]) * batch * heads,)
    _attn_fwd_tuned[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        qk_scale=scale * LOG2E, **meta,
    )
    return lse


def backward_delta(out, grad_out, grad_lse, block_d: int) -> torch.Tensor:
    """The backward's first pass: rowsum(dO * O) - dLSE, fp32 (B, H, N), from (B, H, N, d)
    views of the output and its gradient (grad_lse: (B, H, N) or None)."""
    batch, heads, n_q, head_dim = out.shape
    if grad_lse is not None:
        grad_lse = grad_lse.to(torch.float32).contiguous()
    delta = torch.empty((batch, heads, n_q), device=out.device, dtype=torch.float32)
    attn_bwd_preprocess[(triton.cdiv(n_q, _PREPROCESS_BLOCK_M) * batch * heads,)](
        out, grad_out, grad_lse if grad_lse is not None else delta, delta,
        *_strides(out), *_strides(grad_out), heads, n_q,
        HEAD_DIM=head_dim, BLOCK_D=block_d, HAS_DLSE=grad_lse is not None, BLOCK_M=_PREPROCESS_BLOCK_M,
    )
    return delta


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
    delta = backward_delta(out, grad_out, grad_lse, meta["BLOCK_D"])
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
    q, k, v = split_qkv(qkv, num_heads)
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
    q, k, v = split_qkv(qkv, num_heads)
    dq, dk, dv = split_qkv(dqkv, num_heads)
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
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    # Copying here (not only inside the op) lets autograd route gradients through the copy.
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    return _attention_op(q, k, v, scale)[0]


def packed_attention(qkv, num_heads, scale=None):
    """Attention on the qkv Linear's (B, N, 3*D) output laid out (B, N, 3, H, d) -> (B, N, D).

    Arguments as validated by ``fastvit_kernels.packed_attention`` and accepted by
    ``packed_attention_unsupported``.
    """
    scale = default_scale(qkv.shape[-1] // (3 * num_heads)) if scale is None else float(scale)
    return _packed_attention_op(_unit_last_stride(qkv), num_heads, scale)[0]


SUPPORTS = {
    "attention": attention_unsupported,
    "packed_attention": packed_attention_unsupported,
}
