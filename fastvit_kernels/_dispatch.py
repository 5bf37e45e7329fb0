"""The single place that decides which backend (triton | cpp | torch) runs an op.

The request comes from the innermost ``with backend(name):``, else ``FASTVIT_BACKEND``,
else ``"auto"``: triton for CUDA tensors, cpp for CPU tensors, torch otherwise, falling
back quietly; a backend requested by name that cannot run the call raises with the reason.
A backend module exposes ``OPS`` (op name -> differentiable function with the public
signature) and optionally ``SUPPORTS`` (op name -> predicate: ``None`` or why not).
See ARCHITECTURE.md.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

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

# What resolve() decided per (choice, op, device), so that a call in eager mode skips the
# backend checks. Only what does not depend on the arguments is kept: the backends that
# could run the op, in order, each (name, implementation, SUPPORTS predicate or None) --
# the predicates read the arguments, so they run on every call -- and the _Loaded entries
# the decision read: a route whose entries were since replaced is rebuilt. The decision
# depends on the device's type only; the key is the device because hashing it costs less
# than reading its type. (TRITON_INTERPRET, which decides where triton runs, must be set
# before triton is imported anyway, so a route never outlives it.)
_routes: dict[tuple[str, str, torch.device], tuple] = {}


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
            ops = dict(module.OPS)
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
    if name in CHOICES:
        return name
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


def _unavailable(name: str, op: str, device: torch.device) -> str:
    """Why backend ``name`` cannot run ``op`` on ``device`` whatever the arguments, or ""."""
    loaded = _load(name)
    if loaded.reason:
        return f"backend {name!r} is unavailable ({loaded.reason})"
    if not _runs_on(name, device):
        hint = " (set TRITON_INTERPRET=1 to run it on CPU tensors)" if name == "triton" else ""
        return f"backend {name!r} runs on {'/'.join(_devices(name))} tensors, got {device.type} tensors{hint}"
    if op not in loaded.ops:
        return f"backend {name!r} does not implement {op!r} yet"
    return ""


def _unsupported(name: str, op: str, check: Callable, args, kwargs) -> str:
    """Why backend ``name``'s SUPPORTS predicate ``check`` rejects this call, or ""."""
    reason = check(*args, **kwargs)
    return f"backend {name!r} cannot run this {op!r} call: {reason}" if reason else ""


def _route(choice: str, op: str, device: torch.device) -> tuple[tuple, tuple]:
    """The backends that could run ``op`` on ``device`` when ``choice`` is requested:
    ((name, _Loaded) entries read, candidates (name, implementation, predicate or None))."""
    read, candidates = [], []
    for name in _auto_order(device) if choice == "auto" else (choice,):
        read.append((name, _load(name)))
        if not _unavailable(name, op, device):
            candidates.append((name, _loaded[name].ops[op], _loaded[name].supports.get(op)))
    return tuple(read), tuple(candidates)


def _cached_candidates(choice: str, op: str, device: torch.device) -> tuple:
    """``_route``'s candidates, from ``_routes`` while the entries it read are current."""
    key = (choice, op, device)
    route = _routes.get(key)
    if route is not None:
        for name, loaded in route[0]:
            if _loaded.get(name) is not loaded:
                break
        else:
            return route[1]
    route = _routes[key] = _route(choice, op, device)
    return route[1]


def resolve(op: str, device: torch.device, *args, **kwargs) -> tuple[str, Callable]:
    """(backend name, implementation) that will run ``op`` on ``device`` for these args."""
    choice = requested_backend()
    if torch.compiler.is_compiling():
        # Traced once per graph, where a lookup in the cache (and filling it) would only
        # add guards and side effects: decide afresh.
        candidates = _route(choice, op, device)[1]
    else:
        candidates = _cached_candidates(choice, op, device)
    for name, impl, check in candidates:
        if check is None:
            return name, impl
        reason = _unsupported(name, op, check, args, kwargs)
        if not reason:
            return name, impl
        if choice != "auto":
            raise BackendUnavailableError(reason)
    if choice != "auto":  # no candidate: the backend cannot run this op on this device at all
        raise BackendUnavailableError(_unavailable(choice, op, device))
    raise BackendUnavailableError(f"no backend can run {op!r} on {device.type}")  # torch always can


def resolved_backend(op: str, device: torch.device | str, *args, **kwargs) -> str:
    """Name of the backend ``op`` would run on for ``device`` (and these args, if given)."""
    return resolve(op, torch.device(device), *args, **kwargs)[0]


def dispatch(op: str, device: torch.device, *args, **kwargs):
    """Run ``op`` on the backend chosen for ``device``."""
    return resolve(op, device, *args, **kwargs)[1](*args, **kwargs)
