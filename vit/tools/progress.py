"""Progress display of the tools: a tqdm bar on a terminal, plain lines in logs.

Modes: ``bar`` (tqdm: count, rate, ETA, redrawn in place), ``lines`` (a plain line about
every 5%), ``final`` (only the finished line), ``none``. ``auto`` is ``bar`` when the stream
is a terminal, else ``quiet_mode``. tqdm is optional (``pip install fastvit-engine[tools]``):
without it ``bar`` writes the plain lines instead.
"""

from __future__ import annotations

import sys
import time

try:
    from tqdm import tqdm
except ImportError:  # the tools run without it: plain lines instead of a bar
    tqdm = None

MODES = ("auto", "bar", "lines", "final", "none")


class Progress:
    """Call ``update()`` after each unit of work and ``close(note)`` once at the end."""

    def __init__(self, total: int, *, label: str = "", stream=None, mode: str = "auto",
                 quiet_mode: str = "final", initial: int = 0, unit: str = "it"):
        if mode not in MODES or quiet_mode not in MODES[1:]:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)} (quiet mode: not auto), "
                             f"got {mode!r} / {quiet_mode!r}")
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if getattr(self.stream, "isatty", lambda: False)() else quiet_mode
        if mode == "bar" and tqdm is None:
            mode = "lines"
        self.mode, self.label, self.unit = mode, label, unit
        self._total = max(int(total), 1)
        self.initial = self.done = initial
        self.status = ""
        self.start = time.perf_counter()
        self._bar = None
        if mode == "bar":
            self._bar = tqdm(total=self._total, initial=initial, desc=label or None, unit=unit,
                             file=self.stream, dynamic_ncols=True, leave=True)

    @property
    def total(self) -> int:
        return self._total

    @total.setter
    def total(self, value: int) -> None:
        """The amount of work may be decided on the way (``fastvit bench`` sizes its timed steps)."""
        self._total = max(int(value), 1)
        if self._bar is not None:
            self._bar.total = self._total
            self._bar.refresh()

    def update(self, n: int = 1, *, at: int | None = None, status: str | None = None) -> None:
        """Advance by ``n`` (or to ``at``); ``status`` is shown after the counts (loss, lr ...)."""
        before = self.done
        self.done = min(self._total, at if at is not None else self.done + n)
        if status is not None:
            self.status = status
        if self._bar is not None:
            if status is not None:
                self._bar.set_postfix_str(status, refresh=False)
            self._bar.update(self.done - before)
        elif self.mode == "lines" and self.done > before and (  # crossed a 5% mark (updates may be > 1)
                self.done // max(1, self._total // 20) > before // max(1, self._total // 20)
                or self.done == self._total):
            self._write(self.line())

    def line(self) -> str:
        """The plain-text state: label, count, status, elapsed time, rate and ETA."""
        elapsed = time.perf_counter() - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {_clock((self._total - self.done) / rate)}" if rate > 0 and self.done < self._total else ""
        label = f"  {self.label:<24s} " if self.label else ""
        status = f" {self.status}" if self.status else ""
        return f"{label}{self.done}/{self._total}{status} [{_clock(elapsed)}, {rate:.2f} {self.unit}/s{eta}]"

    def close(self, note: str = "") -> None:
        if self._bar is not None:
            if note:
                self._bar.set_postfix_str(" ".join(filter(None, (self.status, note))), refresh=False)
            self._bar.close()
        elif self.mode == "final" or (self.mode == "lines" and note):
            self._write(self.line() + (f"  {note}" if note else ""))

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    """``12.3s`` below a minute, else ``m:ss`` or ``h:mm:ss``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
