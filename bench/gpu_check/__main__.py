"""``python -m bench.gpu_check --out DIR [--smoke]``: see ``bench/gpu_check/__init__.py``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from pathlib import Path

from . import plan

SMOKE_ENV = {"TRITON_INTERPRET": "1", "OPENBLAS_NUM_THREADS": "1"}
HARD_STOP_GRACE_S = 15.0         # a section is interrupted this long after its budget ran out


def parse(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__)
    parser.add_argument("--out", required=True, type=Path, help="folder for the (at most 8) result files")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes (CI)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="global deadline in seconds (sections keep their budgets, in order; "
                             "those past the deadline are recorded as skipped)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    if args.smoke:  # before torch / triton are imported: the interpreter is chosen at import
        os.environ.update(SMOKE_ENV)
    budgets = plan.SMOKE_BUDGETS if args.smoke else plan.GPU_BUDGETS
    deadline_s = args.deadline or (plan.SMOKE_DEADLINE_S if args.smoke else plan.GPU_DEADLINE_S)
    deadline = plan.Deadline.after(deadline_s)
    print(plan.format_plan(budgets, deadline_s), flush=True)

    import torch

    from .record import Recorder
    from .sections import SECTION_FUNCS, Context

    if not args.smoke and not torch.cuda.is_available():
        print("error: no CUDA device; run with --smoke on CPU", file=sys.stderr)
        return 2
    rec = Recorder(args.out, smoke=args.smoke)
    ctx = Context(rec=rec, deadline=deadline, smoke=args.smoke,
                  device=torch.device("cpu" if args.smoke else "cuda"))
    rec.results["plan"] = {"budgets_s": budgets, "deadline_s": deadline_s}
    failures = 0
    for name in plan.SECTIONS:
        failures += run_section(name, SECTION_FUNCS[name], ctx, budgets[name], deadline)
    status = "done" if not failures else f"done, {failures} section(s) with failures"
    rec.log(f"gpu_check {status}; files in {args.out}")
    rec.close(status)
    # the end of the output is what a remote run shows first: sections and targets last
    text = (args.out / "summary.md").read_text()
    print(text.split("## Tests")[0].split("## Per-op")[0], flush=True)
    return 1 if failures else 0


def _alarm(signum, frame):
    raise plan.SectionTimeout()


def run_section(name, func, ctx, budget: float, deadline: plan.Deadline) -> int:
    """Run one section under its budget; returns 1 if it failed or errored, else 0."""
    rec = ctx.rec
    length = deadline.start_section(budget)
    if length < min(5.0, budget):
        rec.section(name, status="skipped", budget_s=budget, note=f"global deadline: {length:.0f} s left")
        rec.log(f"== {name}: skipped (global deadline)")
        return 0
    rec.log(f"== {name} (budget {length:.0f} s)")
    rec.section(name, status="running", budget_s=round(length))
    # the hard stop, a little after the budget: sections check deadline.left() between items
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, length + HARD_STOP_GRACE_S)
    start = time.monotonic()
    status, note, failed = "ok", "", 0
    try:
        note = func(ctx) or ""
        failed = int(note.startswith("FAILED"))
        status = "failed" if failed else "timed out" if note.startswith("TIMED OUT") else "ok"
    except plan.SectionTimeout:
        status, note, failed = "timed out", f"stopped {time.monotonic() - start:.0f} s in", 0
        rec.mark_interrupted()
    except Exception as exc:
        status, note, failed = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}", 1
        rec.log(traceback.format_exc())
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    rec.section(name, status=status, elapsed_s=round(time.monotonic() - start, 1), note=note)
    rec.log(f"== {name}: {status} {note}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
