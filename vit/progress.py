"""The one text progress bar of the command line (``fastvit bench`` and ``fastvit train``).

Modes: ``bar`` redraws one line in place (a terminal), ``lines`` writes a plain line
about every 5% (logs), ``final`` writes only the finished line, ``none`` nothing.
``auto`` is ``bar`` when the stream is a terminal, else ``quiet_mode``.
"""

from __future__ import annotations

import sys
import time

MODES = ("auto", "bar", "lines", "final", "none")


class Progress:
    def __init__(self, total: int, *, label: str = "", stream=None, mode: str = "auto",
                 quiet_mode: str = "final", width: int = 24):
        if mode not in MODES or quiet_mode not in MODES[1:]:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r} / {quiet_mode!r}")
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else quiet_mode
        self.label, self.total, self.width, self.mode = label, max(int(total), 1), width, mode
        self.done, self.status = 0, ""
        self.start = time.perf_counter()
        self._draw()

    def update(self, n: int = 1, *, at: int | None = None, status: str | None = None) -> None:
        """Advance by ``n`` (or to ``at``); ``status`` is shown after the counts (loss, lr ...)."""
        self.done = min(self.total, at if at is not None else self.done + n)
        if status is not None:
            self.status = status
        self._draw()

    def line(self) -> str:
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        label = f"  {self.label:<24s} " if self.label else ""
        status = f" {self.status}" if self.status else ""
        return (f"{label}[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"
                f"{status} {elapsed:6.1f}s")

    def _draw(self) -> None:
        if self.mode == "bar":
            self.stream.write("\r" + self.line())
            self.stream.flush()
        elif self.mode == "lines" and self.done and (
                self.done % max(1, self.total // 20) == 0 or self.done == self.total):
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self, note: str = "") -> None:
        note = f"  {note}" if note else ""
        if self.mode == "bar":
            self.stream.write("\r" + self.line() + note + "\n")
        elif self.mode == "final" or (self.mode == "lines" and note):
            self.stream.write(self.line() + note + "\n")
        else:
            return
        self.stream.flush()
