"""What the Triton op modules share: the interpreter flag, dtypes, and device limits."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch
import triton

# Read once, before any kernel is defined: the modules pick configs and helpers by it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Shared memory per block on H100 / H200 (227 KiB opt-in): the budget where the device
# cannot be asked (the interpreter, or a driver without the query).
H100_SHARED_MEM = 227 * 1024


def tuning_candidates(kept: list) -> list:
    """What an autotuner's prune returns: ``kept`` (best guess first), or only its first
    config under FASTVIT_AUTOTUNE=0 (quick CUDA test runs: nothing is timed)."""
    return kept[:1] if os.environ.get("FASTVIT_AUTOTUNE", "1") == "0" else kept


def dtype_unsupported(dtype: torch.dtype, *, uses_dot: bool = True) -> Optional[str]:
    """Why the kernels cannot run on ``dtype`` (None when they can). ``uses_dot``: the
    kernel multiplies with tl.dot, which the interpreter cannot do in bfloat16."""
    if dtype not in DTYPES:
        return f"dtype {dtype} is not supported (expected float32, float16 or bfloat16)"
    if uses_dot and dtype == torch.bfloat16 and INTERPRET:
        return "bfloat16 tl.dot is not supported by the Triton interpreter (TRITON_INTERPRET=1)"
    return None


def dot_op_unsupported(first: torch.Tensor, *_args, **_kwargs) -> Optional[str]:
    """``SUPPORTS`` predicate of an op whose only kernel limit is the dtype: functional.py
    has already checked shapes and devices, and that every tensor has the first one's dtype."""
    return dtype_unsupported(first.dtype)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device."""
    return _sm_count(_index(device))


@functools.cache
def _shared_mem(index: int) -> int:
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # a driver without the query: assume the GPU the budgets were set on
        return H100_SHARED_MEM


def max_shared_mem(device: torch.device) -> int:
    """Bytes of shared memory one block may use (opt-in maximum) on ``device``;
    the H100 figure for anything that is not a CUDA device."""
    if device.type != "cuda" or INTERPRET:
        return H100_SHARED_MEM
    return _shared_mem(_index(device))
