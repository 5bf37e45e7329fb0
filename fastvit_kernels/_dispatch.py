"""The single place that decides which backend runs an op.

Backends:

* ``triton`` -- our Triton kernels (``fastvit_kernels/triton/``). CUDA tensors, and
  CPU tensors when ``TRITON_INTERPRET=1`` (the interpreter, used by the tests).
* ``cpp``    -- our C++ extension (``csrc/``, loaded by ``fastvit_kernels/_cpp.py``).
  CPU tensors.
* ``torch``  -- ``fastvit_kernels/reference.py``, plain PyTorch. Any device.

The requested backend comes from, in order: the innermost ``with backend(name):``
block, the ``FASTVIT_BACKEND`` environment variable, else ``"auto"``. ``auto`` picks
triton for CUDA tensors and cpp for CPU tensors when they are available and support
the call, else torch, quietly. A backend requested by name that cannot run the call
raises and says why.

A backend module exposes ``OPS`` (op name -> callable with the public signature,
differentiable) and optionally ``SUPPORTS`` (op name -> predicate taking the same
arguments and returning ``None`` when it can run them, or the reason it cannot).
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

BACKENDS = ("triton", "cpp", "torch")
CHOICES = BACKENDS + ("auto",)
ENV_VAR = "FASTVIT_BACKEND"

# Module that provides each backend's OPS / SUPPORTS, imported on first use.
_MODULES = {
    "triton": "fastvit_kernels.triton",
    "cpp": "fastvit_kernels._cpp",
    "torch": "fastvit_kernels.reference",
}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the requested call."""


@dataclass(frozen=True)
class BackendInfo:
    """What ``available_backends()`` reports for one backend."""

    available: bool
    reason: str  # why it is unavailable; "" when available
    ops: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.available:
            return f"available on {'/'.join(self.devices)} ({', '.join(self.ops)})"
        return f"unavailable: {self.reason}"


@dataclass
class _Loaded:
    ops: dict[str, Callable] = field(default_factory=dict)
    supports: dict[str, Callable] = field(default_factory=dict)
    reason: str = ""


_loaded: dict[str, _Loaded] = {}
_stack: list[str] = []  # innermost backend(...) choice last


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def _import_backend(name: str) -> str:
    """Import backend ``name`` once; returns why it is unavailable ("" if it is available).

    Opaque to torch.compile (run eagerly while tracing), so that a compiled function may be
    the first to touch a backend without a graph break on the import.
    """
    if name not in _loaded:
        try:
            module = importlib.import_module(_MODULES[name])
            ops = dict(getattr(module, "OPS"))
            if not ops:
                raise ImportError(getattr(module, "UNAVAILABLE_REASON", "no ops implemented"))
            _loaded[name] = _Loaded(ops, dict(getattr(module, "SUPPORTS", {})))
        except Exception as exc:  # any failure means "not available", with the reason kept
            _loaded[name] = _Loaded(reason=f"{type(exc).__name__}: {exc}")
    return _loaded[name].reason


def _load(name: str) -> _Loaded:
    _import_backend(name)
    return _loaded[name]


def _devices(name: str) -> tuple[str, ...]:
    if name == "triton":
        return ("cuda", "cpu") if _interpreting() else ("cuda",)
    if name == "cpp":
        return ("cpu",)
    return ("cpu", "cuda", "any")


def available_backends() -> dict[str, BackendInfo]:
    """Every backend with whether it can run here, which ops it has, and why not."""
    out = {}
    for name in BACKENDS:
        loaded = _load(name)
        if loaded.reason:
            out[name] = BackendInfo(False, loaded.reason)
        else:
            out[name] = BackendInfo(True, "", tuple(sorted(loaded.ops)), _devices(name))
    return out


def _check_choice(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(CHOICES)}")
    return name.lower()


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend ``name`` (triton | cpp | torch | auto)."""
    _stack.append(_check_choice(name))
    try:
        yield
    finally:
        _stack.pop()


def requested_backend() -> str:
    """The backend asked for right now: innermost ``backend()`` block, env var, or auto."""
    if _stack:
        return _stack[-1]
    return _check_choice(os.environ.get(ENV_VAR, "auto") or "auto")


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    return device.type in _devices(name)


def _auto_order(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("triton", "torch")
    if device.type == "cpu":
        return ("cpp", "torch")
    return ("torch",)


def _why_not(name: str, op: str, device: torch.device, args, kwargs) -> str:
    """Why backend ``name`` cannot run this call, or "" if it can."""
    loaded = _load(name)
    if loaded.reason:
        return f"backend {name!r} is unavailable ({loaded.reason})"
    if not _runs_on(name, device):
        hint = " (set TRITON_INTERPRET=1 to run it on CPU tensors)" if name == "triton" else ""
        return f"backend {name!r} runs on {'/'.join(_devices(name))} tensors, got {device.type} tensors{hint}"
    if op not in loaded.ops:
        return f"backend {name!r} does not implement {op!r} yet"
    check = loaded.supports.get(op)
    reason = check(*args, **kwargs) if check is not None else None
    return f"backend {name!r} cannot run this {op!r} call: {reason}" if reason else ""


def resolve(op: str, device: torch.device, *args, **kwargs) -> tuple[str, Callable]:
    """(backend name, implementation) that will run ``op`` on ``device`` for these args."""
    choice = requested_backend()
    if choice != "auto":
        reason = _why_not(choice, op, device, args, kwargs)
        if reason:
            raise BackendUnavailableError(reason)
        return choice, _loaded[choice].ops[op]
    for name in _auto_order(device):
        if not _why_not(name, op, device, args, kwargs):
            return name, _loaded[name].ops[op]
    raise BackendUnavailableError(f"no backend can run {op!r} on {device.type}")  # torch always can


def resolved_backend(op: str, device: torch.device | str, *args, **kwargs) -> str:
    """Name of the backend ``op`` would run on for ``device`` (and these args, if given)."""
    return resolve(op, torch.device(device), *args, **kwargs)[0]


def dispatch(op: str, device: torch.device, *args, **kwargs):
    """Run ``op`` on the backend chosen for ``device``."""
    return resolve(op, device, *args, **kwargs)[1](*args, **kwargs)
