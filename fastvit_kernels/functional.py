"""The public functional ops: validate, apply the autocast policy, resolve defaults, dispatch.

Each op checks its arguments once, so every backend sees well-formed input and every user
gets the same error messages (the checks build nothing unless they fail). The autocast
policy is described in ARCHITECTURE.md ("Numerics").
"""

from __future__ import annotations

import math
import weakref

import torch
from torch.amp.autocast_mode import is_autocast_available
from torch.utils.weak import WeakIdKeyDictionary

from . import _dispatch
from .reference import default_scale

_GELU_APPROXIMATIONS = ("none", "tanh", "quick")


# ----------------------------------------------------------------------------- checks
def _check_tensor(name: str, t, ndim: int | tuple[int, ...] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if t.dim() not in allowed:
            want = " or ".join(str(n) for n in allowed)
            raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")


def _check_optional(name: str, t, shape: tuple[int, ...]) -> None:
    if t is None:
        return
    _check_tensor(name, t)
    if t.shape != shape:  # torch.Size is a tuple
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")


def _check_same(first_name: str, first: torch.Tensor, *named) -> None:
    """``first`` and the tensors of ``named`` (name, tensor, name, tensor ...; None
    skipped) on one device and of one dtype."""
    device, dtype = first.device, first.dtype
    for i in range(0, len(named), 2):
        t = named[i + 1]
        if t is None or (t.dtype == dtype and t.device == device):
            continue
        if t.device != device:
            raise ValueError(f"{named[i]} is on {t.device} but {first_name} is on {device}; "
                             "all tensors must be on one device")
        raise TypeError(f"{named[i]} has dtype {t.dtype} but {first_name} has {dtype}; "
                        "all tensors must share one dtype (or run under torch.autocast)")


def _check_scale(scale) -> None:
    if scale is not None and (not isinstance(scale, (int, float)) or isinstance(scale, bool)
                              or not 0 < scale < math.inf):
        raise ValueError(f"scale must be a positive finite number or None, got {scale!r}")


def _check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
        raise ValueError(f"eps must be a positive number, got {eps!r}")


def _check_num_heads(width: int, num_heads) -> None:
    """num_heads of a packed qkv whose last dimension is ``width`` = 3 * num_heads * head_dim."""
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads <= 0:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if width % (3 * num_heads):
        raise ValueError(f"qkv's last dimension {width} must be 3 * num_heads * head_dim "
                         f"with num_heads={num_heads}")


# ---------------------------------------------------------------------------- autocast
def _autocast_dtype(device: torch.device):
    """The dtype autocast casts matrix products to, or None outside autocast."""
    kind = device.type
    if not is_autocast_available(kind) or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _contiguous(t):
    """A parameter (bias, cls_token, pos_embed ...) in contiguous memory, or None.

    Parameters are small, so the copy of a strided or expanded one costs nothing, and no
    backend has to handle strides for them (a kernel reading ``W + cols`` of a strided
    or stride-0 weight would be silently wrong).
    """
    return None if t is None else t.contiguous()


def _cast(dtype, *tensors):
    return tuple(t.to(dtype) if t is not None and t.dtype != dtype else t for t in tensors)


# parameter -> (alias, version, copy): the autocast copy of a parameter (a weight, a
# bias ...), made once instead of on every call, as torch.compile's freezing does. Weakly
# keyed, so a freed model frees its copies.
_cast_cache = WeakIdKeyDictionary()


def _cast_params(dtype, *tensors):
    """``_cast`` for parameters: in inference (no grad, outside torch.compile) the cast copy of
    a plain tensor is kept and reused while the tensor is unchanged; otherwise a fresh cast.

    Never stale: an entry is reused only for the same tensor object, version counter (every
    in-place update: optimizer steps, ``load_state_dict``, ``copy_``), data pointer, dtype,
    device and layout. ``alias`` (a detached view of the source) keeps the source's memory
    alive, so that no other tensor's data can appear at the same address (``module.to()`` and
    ``.half()``/``.float()`` swap ``param.data`` without a version bump).
    """
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return _cast(dtype, *tensors)
    return tuple(_cached_cast(dtype, t) for t in tensors)


def _cached_cast(dtype, t):
    if t is None or t.dtype == dtype:
        return t
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_inference():
        return t.to(dtype)  # inference tensors keep no version counter; subclasses may not be plain data
    entry = _cast_cache.get(t)
    if entry is not None:
        alias, version, copy = entry
        if (version == t._version and copy.dtype == dtype and alias.data_ptr() == t.data_ptr()
                and alias.dtype == t.dtype and alias.device == t.device and alias.shape == t.shape
                and alias.stride() == t.stride()):
            return copy
    with torch.inference_mode(False):  # a normal tensor, whose version the cpp backend can check
        copy = t.to(dtype)
    _cast_cache[t] = (t.detach(), t._version, copy)
    return copy


def _run(op: str, device: torch.device, autocast_dtype, *args):
    """Dispatch with autocast switched off (``autocast_dtype`` is not None inside
    autocast): the inputs already carry the policy's dtype."""
    if autocast_dtype is not None:
        with torch.autocast(device.type, enabled=False):
            return _dispatch.dispatch(op, device, *args)
    return _dispatch.dispatch(op, device, *args)


# --------------------------------------------------------------------------------- ops
def patch_embed(images, weight, bias, pos_embed, cls_token=None, reg_tokens=None):
    """Patchify + project (a stride-P Conv2d), prepend the prefix tokens, add ``pos_embed``.

    Args:
        images: (B, C, H, W), NCHW or channels-last; H and W multiples of P.
        weight: the Conv2d weight, (D, C, P, P).
        bias: (D,) or None.
        pos_embed: (1, T, D) or (T, D). T = (H/P) * (W/P) + n_prefix when the prefix tokens
            have a position (timm's default), or just (H/P) * (W/P) when they have none
            (timm's ``no_embed_class``: DINOv2 with registers, DeiT-III).
        cls_token: (1, 1, D), or None for no class token.
        reg_tokens: (1, R, D) register (or DeiT distillation) tokens, placed after the
            class token; or None.

    Returns:
        (B, n_prefix + (H/P) * (W/P), D) tokens, n_prefix = (class token) + R.
    """
    _check_tensor("images", images, 4)
    _check_tensor("weight", weight, 4)
    _check_tensor("pos_embed", pos_embed, (2, 3))
    dim, chans, ph, pw = weight.shape
    if ph != pw:
        raise ValueError(f"weight must be a square patch kernel (D, C, P, P), got {tuple(weight.shape)}")
    if images.shape[1] != chans:
        raise ValueError(f"images have {images.shape[1]} channels but weight {tuple(weight.shape)} "
                         f"expects {chans}")
    height, width = images.shape[-2:]
    if height % ph or width % ph:
        raise ValueError(f"image size {height}x{width} is not divisible by the patch size {ph}")
    _check_optional("bias", bias, (dim,))
    if cls_token is not None:
        _check_tensor("cls_token", cls_token)
        if tuple(cls_token.shape) != (1, 1, dim):
            raise ValueError(f"cls_token must have shape (1, 1, {dim}), got {tuple(cls_token.shape)}")
    if reg_tokens is not None:
        _check_tensor("reg_tokens", reg_tokens, 3)
        if reg_tokens.shape[0] != 1 or reg_tokens.shape[2] != dim or reg_tokens.shape[1] == 0:
            raise ValueError(f"reg_tokens must have shape (1, R, {dim}) with R >= 1, got {tuple(reg_tokens.shape)}")
    grid = (height // ph) * (width // ph)
    prefix = (cls_token is not None) + (0 if reg_tokens is None else reg_tokens.shape[1])
    rows = pos_embed.shape[-2]
    if pos_embed.shape[-1] != dim or rows not in (grid, grid + prefix) or pos_embed.numel() != rows * dim:
        extra = f" ({grid} patches + {prefix} prefix tokens, or the patches only)" if prefix else ""
        want = f"(1, {grid + prefix}, {dim}) or (1, {grid}, {dim})" if prefix else f"(1, {grid}, {dim})"
        raise ValueError(f"pos_embed must have shape {want} for a {height}x{width} image with patch "
                         f"{ph}{extra}, got {tuple(pos_embed.shape)}")
    device = images.device
    cast = _autocast_dtype(device)
    if cast is not None:
        (images,) = _cast(cast, images)
        weight, bias, pos_embed, cls_token, reg_tokens = _cast_params(
            cast, weight, bias, pos_embed, cls_token, reg_tokens)
    _check_same("images", images, "weight", weight, "bias", bias, "pos_embed", pos_embed, "cls_token", cls_token,
                "reg_tokens", reg_tokens)
    return _run("patch_embed", device, cast, images, weight, _contiguous(bias), _contiguous(pos_embed),
                _contiguous(cls_token), _contiguous(reg_tokens))


def _check_norm_args(x, weight, bias, eps) -> None:
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a scalar")
    if weight is not None or bias is not None:
        features = (x.shape[-1],)
        _check_optional("weight", weight, features)
        _check_optional("bias", bias, features)
    _check_eps(eps)


def layer_norm(x, weight, bias, eps: float = 1e-6):
    """LayerNorm over the last dimension; statistics in fp32. weight/bias may be None."""
    _check_norm_args(x, weight, bias, eps)
    device = x.device
    cast = _autocast_dtype(device)
    if cast is not None:
        weight, bias = _cast(x.dtype, weight, bias)
    _check_same("x", x, "weight", weight, "bias", bias)
    return _run("layer_norm", device, cast, x, _contiguous(weight), _contiguous(bias), float(eps))


def add_layer_norm(x, residual, weight, bias, eps: float = 1e-6, gamma=None):
    """Returns ``(layer_norm(residual + gamma * x), residual + gamma * x)`` in one pass.

    ``x`` is a residual branch's output, ``gamma`` (D,) its LayerScale (timm's ``ls1`` /
    ``ls2``; DINOv2, DeiT-III), or None for none.
    """
    _check_norm_args(x, weight, bias, eps)
    _check_tensor("residual", residual)
    if residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
    _check_optional("gamma", gamma, (x.shape[-1],))
    device = x.device
    cast = _autocast_dtype(device)
    if cast is not None:
        x, residual, weight, bias, gamma = _cast(torch.result_type(x, residual), x, residual, weight, bias, gamma)
    _check_same("x", x, "residual", residual, "weight", weight, "bias", bias, "gamma", gamma)
    return _run("add_layer_norm", device, cast, x, residual, _contiguous(weight), _contiguous(bias), float(eps),
                _contiguous(gamma))


def _linear_inputs(x, weight, bias):
    """A Linear's arguments checked and put under the autocast policy (a matrix product:
    cast to the autocast dtype, parameters through the inference cast cache); returns
    (device, autocast dtype or None, x, weight, contiguous bias)."""
    _check_tensor("x", x)
    _check_tensor("weight", weight, 2)
    if x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dimension must equal weight's in_features {weight.shape[1]} "
                         f"(weight {tuple(weight.shape)}), got x of shape {tuple(x.shape)}")
    _check_optional("bias", bias, (weight.shape[0],))
    device = x.device
    cast = _autocast_dtype(device)
    if cast is not None:
        (x,) = _cast(cast, x)
        weight, bias = _cast_params(cast, weight, bias)
    _check_same("x", x, "weight", weight, "bias", bias)
    return device, cast, x, weight, _contiguous(bias)


def linear_gelu(x, weight, bias, approximate: str = "none"):
    """``GELU(x @ weight.T + bias)``: exact erf GELU (``approximate="none"``), its tanh
    approximation (``"tanh"``, SigLIP), or QuickGELU ``h * sigmoid(1.702 h)`` (``"quick"``, CLIP)."""
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_GELU_APPROXIMATIONS}, got {approximate!r}")
    device, cast, x, weight, bias = _linear_inputs(x, weight, bias)
    return _run("linear_gelu", device, cast, x, weight, bias, approximate)


def linear(x, weight, bias):
    """``x @ weight.T + bias``, as ``F.linear``: the Linear layers without an activation
    (qkv, proj, fc2, head), so that each backend runs its own GEMM for them."""
    device, cast, x, weight, bias = _linear_inputs(x, weight, bias)
    return _run("linear", device, cast, x, weight, bias)


def attention(q, k, v, scale: float | None = None):
    """Non-causal scaled dot-product attention on (B, H, N, d) tensors, SDPA semantics.

    q is (B, H, Nq, d); k and v are (B, H, Nk, d). ``scale`` defaults to d ** -0.5.
    Strided views (e.g. slices of a packed qkv tensor) are fine.
    """
    _check_tensor("q", q, 4)
    _check_tensor("k", k, 4)
    _check_tensor("v", v, 4)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q must be (B, H, Nq, d) with B, H and d of k {tuple(k.shape)}, "
                         f"got {tuple(q.shape)}")
    _check_scale(scale)
    device = q.device
    cast = _autocast_dtype(device)
    if cast is not None:
        q, k, v = _cast(cast, q, k, v)
    _check_same("q", q, "k", k, "v", v)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)  # resolved once, for every backend
    return _run("attention", device, cast, q, k, v, scale)


def packed_attention(qkv, num_heads: int, scale: float | None = None):
    """Attention straight from the qkv Linear's output.

    qkv is (B, N, 3*D) laid out as (B, N, 3, H, d) (timm's qkv Linear); returns
    (B, N, D), ready for the output projection without a permute.
    """
    _check_tensor("qkv", qkv, 3)
    width = qkv.shape[-1]
    _check_num_heads(width, num_heads)
    _check_scale(scale)
    device = qkv.device
    cast = _autocast_dtype(device)
    if cast is not None:
        (qkv,) = _cast(cast, qkv)
    scale = default_scale(width // (3 * num_heads)) if scale is None else float(scale)
    return _run("packed_attention", device, cast, qkv, num_heads, scale)


# ------------------------------------------------------------------- variable-length ops
def _check_cu_seqlens(cu_seqlens, max_seqlen, total: int, device: torch.device) -> None:
    """cu_seqlens: (n_seq + 1,) int32 on ``device``, 0 first, non-decreasing, ``total`` last;
    max_seqlen: an int at least the longest sequence. The values are read on the host (a
    device sync), once per tensor: a model's blocks pass the same one, unchanged (its version
    counter tells), and are not checked again; an inference tensor (no version counter) is
    read every time. Under torch.compile they are not read."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must have dtype torch.int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (n_seq + 1,) with n_seq >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but the tokens are on {device}; "
                         "all tensors must be on one device")
    if not isinstance(max_seqlen, int) or isinstance(max_seqlen, bool) or max_seqlen < 0:
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen!r}")
    if torch.compiler.is_compiling():
        return
    # Inference tensors keep no version counter (they may change unseen): read every time.
    key = None if cu_seqlens.is_inference() else (cu_seqlens._version, total, max_seqlen)
    if key is not None and _validated[0] is not None and _validated[0]() is cu_seqlens and _validated[1] == key:
        return  # the same pack again (every block of a model): no second device sync
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if bounds[-1] != total:
        raise ValueError(f"cu_seqlens must end at the token count {total}, got {bounds[-1]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if min(lengths) < 0:
        i = lengths.index(min(lengths))
        raise ValueError(f"cu_seqlens must be non-decreasing, got {bounds[i]} then {bounds[i + 1]} "
                         f"at index {i}")
    if max(lengths) > max_seqlen:
        raise ValueError(f"max_seqlen must be at least the longest sequence's length {max(lengths)}, "
                         f"got {max_seqlen}")
    if key is not None:
        _validated[:] = [weakref.ref(cu_seqlens), key]


# The cu_seqlens last found valid (a weak reference) with its version, total and max_seqlen.
_validated: list = [None, None]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen: int, scale: float | None = None):
    """Non-causal attention within each of several packed sequences (flash-attention's varlen).

    q, k, v are (total, H, d): the tokens of every sequence back to back; sequence i is rows
    ``cu_seqlens[i]:cu_seqlens[i+1]`` and attends only to itself. cu_seqlens is an int32
    (n_seq + 1,) tensor of cumulative lengths, starting at 0 and ending at total, on the
    tokens' device; max_seqlen is the longest length (or more). Returns (total, H, d).
    """
    _check_tensor("q", q, 3)
    _check_tensor("k", k, 3)
    _check_tensor("v", v, 3)
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k and v must have one shape (total, H, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)} and {tuple(v.shape)}")
    _check_scale(scale)
    device = q.device
    _check_cu_seqlens(cu_seqlens, max_seqlen, q.shape[0], device)
    cast = _autocast_dtype(device)
    if cast is not None:
        q, k, v = _cast(cast, q, k, v)
    _check_same("q", q, "k", k, "v", v)
    scale = default_scale(q.shape[-1]) if scale is None else float(scale)
    return _run("varlen_attention", device, cast, q, k, v, cu_seqlens, max_seqlen, scale)


def varlen_packed_attention(qkv, cu_seqlens, max_seqlen: int, num_heads: int, scale: float | None = None):
    """``varlen_attention`` straight from the qkv Linear's output: qkv is (total, 3*D) laid
    out as (total, 3, H, d); returns (total, D). cu_seqlens and max_seqlen as there."""
    _check_tensor("qkv", qkv, 2)
    width = qkv.shape[-1]
    _check_num_heads(width, num_heads)
    _check_scale(scale)
    device = qkv.device
    _check_cu_seqlens(cu_seqlens, max_seqlen, qkv.shape[0], device)
    cast = _autocast_dtype(device)
    if cast is not None:
        (qkv,) = _cast(cast, qkv)
    scale = default_scale(width // (3 * num_heads)) if scale is None else float(scale)
    return _run("varlen_packed_attention", device, cast, qkv, cu_seqlens, max_seqlen, num_heads, scale)
