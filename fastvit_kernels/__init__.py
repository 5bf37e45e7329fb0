"""fastvit_kernels: fused Vision Transformer ops with triton / cpp / torch backends.

The functional ops validate their inputs and dispatch to one backend (see
``_dispatch``); ``available_backends()`` says what can run here and why not.
"""

from ._dispatch import (
    BACKENDS,
    BackendInfo,
    BackendUnavailableError,
    available_backends,
    backend,
    requested_backend,
    resolved_backend,
)
from .functional import (
    add_layer_norm,
    attention,
    layer_norm,
    linear_gelu,
    packed_attention,
    patch_embed,
    varlen_attention,
    varlen_packed_attention,
)

__all__ = [
    "BACKENDS",
    "BackendInfo",
    "BackendUnavailableError",
    "add_layer_norm",
    "attention",
    "available_backends",
    "backend",
    "layer_norm",
    "linear_gelu",
    "packed_attention",
    "patch_embed",
    "requested_backend",
    "resolved_backend",
    "varlen_attention",
    "varlen_packed_attention",
]
