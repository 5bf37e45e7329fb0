"""Atomic file writes: write a temporary file next to the target, then rename it over.

A reader (or a run resumed after a crash) sees the old file or the new one, never a
torn one: ``os.replace`` is atomic within a file system, and the temporary file lives
in the target's directory so that the rename never crosses file systems.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then move it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_torch_save(obj, path) -> Path:
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
