"""Benchmark session setup; the helpers live in ``benchutil.py``."""

import pytest
from benchutil import DEVICE  # noqa: F401  -- also drops TRITON_INTERPRET on CPU


@pytest.fixture(scope="session")
def device():
    return DEVICE
