"""Tests of the Triton kernels as compiled for GPUs (tests/conftest.py applies too).

The offline compile check writes its tables under pytest's cache directory; the ones
written during this run are printed at its end, with or without ``-s`` and also under
pytest-xdist (the tests run in workers, the summary in the controller)."""

import time
from pathlib import Path

_STARTED = "_fastvit_compile_tables_since"


def compile_tables_dir(config) -> Path:
    return Path(config.cache.mkdir("compile_check"))


def pytest_configure(config):  # also called for this late-loaded conftest
    setattr(config, _STARTED, time.time())


def pytest_terminal_summary(terminalreporter, config):
    if getattr(config, "cache", None) is None:
        return
    since = getattr(config, _STARTED, 0.0)
    for table in sorted(compile_tables_dir(config).glob("*.md")):
        if table.stat().st_mtime >= since:
            terminalreporter.write_sep("-", f"Triton compile check: {table}")
            terminalreporter.write(table.read_text())
