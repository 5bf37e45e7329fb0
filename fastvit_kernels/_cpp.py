"""The cpp backend: loads the C++ extension in ``csrc/`` and registers its fake kernels.

Loading, in order: ``FASTVIT_CPP_LIBRARY`` if set; unless ``FASTVIT_CPP_PREBUILT=0``, a
CMake-built library next to this package or in ``build/``, not older than its sources;
else the sources are compiled on first use (ninja, cached under ``TORCH_EXTENSIONS_DIR``).
If all fail: one warning line and ImportError (``auto`` then runs torch; ``backend("cpp")``
raises with the reason). The library is compiled for the SIMD level ATen uses on this CPU
(``torch.backends.cpu.get_cpu_capability()``: AVX512, AVX2 or DEFAULT; part of its file
name), never ``-march=native``. The C++ ops also return what backward needs; their autograd
is C++ (``csrc/autograd.cpp``); ``OPS`` below has the public signatures.
"""

from __future__ import annotations

import os
import platform
import re
import site
import sys
import warnings
from pathlib import Path

import torch

from . import reference
from .reference import default_scale

_PACKAGE_DIR = Path(__file__).resolve().parent
_LIB_PREFIX = "libfastvit_cpp_"
_ORDER = ("DEFAULT", "AVX2", "AVX512")
# The flags ATen compiles its own AVX2 / AVX512 kernels with.
_ISA_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
}
_CFLAGS = ["-O3", "-fopenmp", "-DNDEBUG"]  # OpenMP: at::parallel_for is inline, it needs it
_LDFLAGS = ["-fopenmp"]

CAPABILITY = "none"
LIBRARY = ""  # path of the loaded library


def target_capability() -> str:
    """The instruction set to build for: the one ATen's own kernels use on this CPU."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return cap if cap in _ORDER else "DEFAULT"


def _source_dir() -> Path | None:
    """csrc/ shipped inside the package, in the repository (editable install), or under the prefix."""
    shared = Path("share") / "fastvit-engine" / "csrc"  # pyproject's data-files (pip install)
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc", Path(sys.prefix) / shared,
                      Path(site.getuserbase()) / shared):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def _sources(src: Path) -> list[str]:
    return sorted(str(p) for p in src.glob("*.cpp"))


def _newest_source_mtime(src: Path | None) -> float:
    if src is None:
        return 0.0
    return max(p.stat().st_mtime for p in list(src.glob("*.cpp")) + list(src.glob("*.h")))


def _prebuilt(target: str, src: Path | None) -> list[Path]:
    """Prebuilt libraries this CPU can run, best instruction set first, skipping stale ones."""
    allowed = _ORDER[: _ORDER.index(target) + 1]
    found = []
    for folder in (_PACKAGE_DIR, _PACKAGE_DIR.parent / "build"):
        for path in folder.glob(f"{_LIB_PREFIX}*.so"):
            cap = path.stem[len(_LIB_PREFIX):].upper()
            if cap in allowed and path.stat().st_mtime >= _newest_source_mtime(src):
                found.append((allowed.index(cap), path))
    return [p for _, p in sorted(found, reverse=True)]


def _jit_build(src: Path, target: str) -> str:
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise ImportError("ninja is not installed (pip install ninja), so the C++ extension cannot be built")
    compiler = os.environ.get("CXX", "c++")
    if not any(os.access(os.path.join(d, compiler), os.X_OK) for d in os.environ.get("PATH", "").split(os.pathsep)) \
            and not os.access(compiler, os.X_OK):
        raise ImportError(f"no C++ compiler ({compiler!r} not found on PATH), so the C++ extension cannot be built")
    # The torch version is in the name so a cached build never meets another torch's ABI.
    version = re.sub(r"[^0-9a-zA-Z]", "_", torch.__version__)
    name = f"fastvit_cpp_{target.lower()}_torch{version}"
    verbose = os.environ.get("FASTVIT_CPP_VERBOSE", "0") == "1"
    cpp_extension.load(name=name, sources=_sources(src), extra_cflags=_CFLAGS + _ISA_FLAGS[target],
                       extra_ldflags=_LDFLAGS, is_python_module=False, verbose=verbose)
    return os.path.join(cpp_extension._get_build_directory(name, False), f"{name}.so")


def _load() -> tuple[str, str]:
    """Load the library (see the module docstring); returns (path, capability)."""
    target = target_capability()
    explicit = os.environ.get("FASTVIT_CPP_LIBRARY")
    if explicit:
        torch.ops.load_library(explicit)
        return explicit, torch.ops.fastvit.cpu_capability()
    src = _source_dir()
    errors = []
    use_prebuilt = os.environ.get("FASTVIT_CPP_PREBUILT", "1") != "0"
    for path in _prebuilt(target, src) if use_prebuilt else []:
        try:
            torch.ops.load_library(str(path))
            return str(path), torch.ops.fastvit.cpu_capability()
        except (OSError, RuntimeError) as exc:  # e.g. built against another torch
            errors.append(f"{path.name}: {exc}")
    if src is None:
        raise ImportError("no prebuilt fastvit C++ library and no csrc/ sources to build one"
                          + (f" ({'; '.join(errors)})" if errors else ""))
    path = _jit_build(src, target)
    return path, torch.ops.fastvit.cpu_capability()


# ------------------------------------------------------------------ fake (meta) kernels
def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_fakes() -> None:
    reg = torch.library.register_fake

    @reg("fastvit::layer_norm_fwd")
    def _(x, weight, bias, eps):
        stats = x.shape[:-1]
        return x.new_empty(x.shape), x.new_empty(stats, dtype=_acc(x.dtype)), x.new_empty(stats, dtype=_acc(x.dtype))

    @reg("fastvit::add_layer_norm_fwd")
    def _(x, residual, weight, bias, eps):
        stats = x.shape[:-1]
        return (x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(stats, dtype=_acc(x.dtype)),
                x.new_empty(stats, dtype=_acc(x.dtype)))

    @reg("fastvit::layer_norm_bwd")
    def _(grad_out, grad_sum, x, mean, rstd, weight):
        dim = x.shape[-1]
        return x.new_empty(x.shape), x.new_empty((dim,)), x.new_empty((dim,))

    @reg("fastvit::linear_gelu")
    def _(x, weight, bias, approximate):
        return x.new_empty((*x.shape[:-1], weight.shape[0]))

    @reg("fastvit::linear_gelu_fwd")
    def _(x, weight, bias, approximate):
        shape = (*x.shape[:-1], weight.shape[0])
        return x.new_empty(shape), x.new_empty(shape)

    @reg("fastvit::linear_gelu_bwd")
    def _(grad_out, preact, x, weight, approximate):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty((weight.shape[0],))

    @reg("fastvit::patch_embed")
    def _(images, weight, bias, pos_embed, cls_token):
        patch = weight.shape[-1]
        tokens = (images.shape[2] // patch) * (images.shape[3] // patch) + (cls_token is not None)
        return images.new_empty((images.shape[0], tokens, weight.shape[0]))

    @reg("fastvit::patch_embed_bwd")
    def _(grad_out, images, weight, has_cls, images_grad):
        dim = weight.shape[0]
        dimages = images.new_empty(images.shape if images_grad else (0,))
        return (dimages, weight.new_empty(weight.shape), weight.new_empty((dim,)),
                weight.new_empty((grad_out.shape[1], dim)), weight.new_empty((dim,)))

    @reg("fastvit::attention_fwd")
    def _(q, k, v, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=_acc(q.dtype))

    @reg("fastvit::attention_bwd")
    def _(grad_out, q, k, v, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @reg("fastvit::packed_attention_fwd")
    def _(qkv, num_heads, scale):
        batch, tokens, width = qkv.shape
        return (qkv.new_empty((batch, tokens, width // 3)),
                qkv.new_empty((batch, num_heads, tokens), dtype=_acc(qkv.dtype)))

    @reg("fastvit::packed_attention_bwd")
    def _(grad_out, qkv, out, lse, num_heads, scale):
        return qkv.new_empty(qkv.shape)


# ------------------------------------------------------------------- public signatures
def _needs_grad(x, weight, bias) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def patch_embed(images, weight, bias, pos_embed, cls_token=None, reg_tokens=None):
    return torch.ops.fastvit.patch_embed(images, weight, bias, pos_embed, cls_token)


def layer_norm(x, weight, bias, eps=1e-6):
    return torch.ops.fastvit.layer_norm_fwd(x, weight, bias, eps)[0]


def add_layer_norm(x, residual, weight, bias, eps=1e-6, gamma=None):
    out, summed, _, _ = torch.ops.fastvit.add_layer_norm_fwd(x, residual, weight, bias, eps)
    return out, summed


def linear_gelu(x, weight, bias, approximate="none"):
    if _needs_grad(x, weight, bias):  # keep the pre-activation for backward
        return torch.ops.fastvit.linear_gelu_fwd(x, weight, bias, approximate)[0]
    return torch.ops.fastvit.linear_gelu(x, weight, bias, approximate)


def attention(q, k, v, scale=None):
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return torch.ops.fastvit.attention_fwd(q, k, v, scale)[0]


def packed_attention(qkv, num_heads, scale=None):
    scale = default_scale(qkv.shape[-1] // (3 * num_heads)) if scale is None else scale
    return torch.ops.fastvit.packed_attention_fwd(qkv, num_heads, scale)[0]


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale=None):
    scale = default_scale(q.shape[-1]) if scale is None else scale
    return torch.ops.fastvit.varlen_attention_fwd(q, k, v, cu_seqlens, max_seqlen, scale)[0]


def varlen_packed_attention(qkv, cu_seqlens, max_seqlen, num_heads, scale=None):
    scale = default_scale(qkv.shape[-1] // (3 * num_heads)) if scale is None else scale
    return torch.ops.fastvit.varlen_packed_attention_fwd(qkv, cu_seqlens, max_seqlen, num_heads, scale)[0]


def _register_varlen_fakes() -> None:
    """Fake kernels of the variable-length attention ops (csrc/varlen_attention.cpp)."""
    reg = torch.library.register_fake

    @reg("fastvit::varlen_attention_fwd")
    def _(q, k, v, cu_seqlens, max_seqlen, scale):
        return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=_acc(q.dtype))

    @reg("fastvit::varlen_attention_bwd")
    def _(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @reg("fastvit::varlen_packed_attention_fwd")
    def _(qkv, cu_seqlens, max_seqlen, num_heads, scale):
        total, width = qkv.shape
        return qkv.new_empty((total, width // 3)), qkv.new_empty((num_heads, total), dtype=_acc(qkv.dtype))

    @reg("fastvit::varlen_packed_attention_bwd")
    def _(grad_out, qkv, out, lse, cu_seqlens, max_seqlen, num_heads, scale):
        return qkv.new_empty(qkv.shape)

_PUBLIC = {name: globals()[name] for name in reference.OPS}  # every op, by the functions above


# TODO(issue 18): the C++ ops do not take these arguments yet; auto falls back to torch.
def _patch_embed_unsupported(images, weight, bias, pos_embed, cls_token=None, reg_tokens=None):
    if reg_tokens is not None:
        return "register tokens are not implemented yet"
    grid = (images.shape[-2] // weight.shape[-1]) * (images.shape[-1] // weight.shape[-1])
    if cls_token is not None and pos_embed.shape[-2] == grid:
        return "a class token without position (no_embed_class) is not implemented yet"
    return None


SUPPORTS = {
    "patch_embed": _patch_embed_unsupported,
    "add_layer_norm": lambda x, residual, weight, bias, eps=1e-6, gamma=None: (
        "LayerScale (gamma) is not implemented yet" if gamma is not None else None),
    "linear_gelu": lambda x, weight, bias, approximate="none": (
        "QuickGELU is not implemented yet" if approximate == "quick" else None),
}

OPS: dict = {}
UNAVAILABLE_REASON = ""


def _init() -> None:
    global LIBRARY, CAPABILITY, UNAVAILABLE_REASON
    try:
        LIBRARY, CAPABILITY = _load()
    except Exception as exc:  # no compiler, no ninja, build error, ABI mismatch ...
        UNAVAILABLE_REASON = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}"
        warnings.warn(f"fastvit: C++ extension unavailable, falling back to torch ({UNAVAILABLE_REASON})",
                      RuntimeWarning, stacklevel=3)
        raise ImportError(UNAVAILABLE_REASON) from exc
    _register_fakes()
    _register_varlen_fakes()
    OPS.update(_PUBLIC)


_init()
