"""The tools' progress display (vit.tools.progress): tqdm on a terminal, plain lines elsewhere."""

from __future__ import annotations

import io

import pytest

from vit.tools import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_lines_mode_writes_about_every_5_percent_with_rate_and_eta():
    out = io.StringIO()
    bar = progress.Progress(40, stream=out, mode="lines", unit="step")
    for step in range(1, 41):
        bar.update(at=step, status=f"loss {1 / step:.3f}")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20 and lines[0].startswith("2/40 loss 0.500") and lines[-1].startswith("40/40")
    assert "step/s" in lines[0] and "ETA" in lines[0] and "ETA" not in lines[-1]


def test_auto_is_quiet_until_the_end_when_not_a_terminal():
    out = io.StringIO()
    bar = progress.Progress(3, label="inference", stream=out)  # auto, quiet mode "final"
    bar.update()
    bar.total = 5  # the amount of work can be decided on the way
    for _ in range(4):
        bar.update()
    assert out.getvalue() == ""
    bar.close("12.0 ms/step")
    text = out.getvalue()
    assert text.count("\n") == 1 and "inference" in text and "5/5" in text and "12.0 ms/step" in text


def test_terminal_gets_a_tqdm_bar():
    pytest.importorskip("tqdm")
    out = Terminal()
    bar = progress.Progress(10, label="train", stream=out, unit="step")
    assert bar.mode == "bar"
    bar.update(5, status="loss 0.1")
    bar.update(at=10)
    bar.close()
    assert "\r" in out.getvalue() and "10/10" in out.getvalue() and "step/s" in out.getvalue()


def test_without_tqdm_a_terminal_gets_plain_lines(monkeypatch):
    monkeypatch.setattr(progress, "tqdm", None)  # as if tqdm were not installed
    out = Terminal()
    bar = progress.Progress(2, stream=out, mode="bar")
    assert bar.mode == "lines"
    bar.update()
    bar.update()
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("2/2")


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="got 'fancy'"):
        progress.Progress(1, mode="fancy")
