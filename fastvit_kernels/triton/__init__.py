"""The triton backend: one module per op (kernels -> launchers -> torch.library glue).

Each op module defines the public-signature function named below; ops whose module
does not exist yet are simply not offered by this backend (auto falls back).
"""

from __future__ import annotations

import importlib

import triton  # noqa: F401  -- the backend is unavailable when triton does not import

# op name -> (module in this package, function in it)
_OP_MODULES = {
    "layer_norm": ("layer_norm", "layer_norm"),
    "add_layer_norm": ("layer_norm", "add_layer_norm"),
    "linear_gelu": ("linear_gelu", "linear_gelu"),
    "patch_embed": ("patch_embed", "patch_embed"),
    "attention": ("attention", "attention"),
    "packed_attention": ("attention", "packed_attention"),
    "varlen_attention": ("varlen_attention", "varlen_attention"),
    "varlen_packed_attention": ("varlen_attention", "varlen_packed_attention"),
}

OPS = {}
SUPPORTS = {}
for _op, (_module, _fn) in _OP_MODULES.items():
    try:
        _mod = importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_module}":
            raise  # a real import error inside an existing module must not be hidden
        continue
    OPS[_op] = getattr(_mod, _fn)
    if hasattr(_mod, "SUPPORTS") and _op in _mod.SUPPORTS:
        SUPPORTS[_op] = _mod.SUPPORTS[_op]
