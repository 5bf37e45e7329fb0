"""``fastvit train`` from argv to exit status: parse, find the state to resume, set up, train.

Exit status: 0 done, 1 a clear error (bad input, corrupted or mismatched state, empty
dataset, too many non-finite steps in a row), 2 bad command line.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from .args import merge_resume_args, parse_args
from .dist import Dist
from .errors import TrainError
from .state import STATE_FILE, find_state, read_state
from .trainer import Trainer


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code or 0)
    dist_ = None
    try:
        resume = _resume(args) if args.resume else None
        dist_ = Dist(args.device)
        backend = contextlib.nullcontext()
        if args.backend:
            import fastvit_kernels

            backend = fastvit_kernels.backend(args.backend)
        threads = torch.get_num_threads()
        if args.threads:
            torch.set_num_threads(args.threads)
        try:
            with backend:
                Trainer(args, dist_, resume).run()
        finally:
            torch.set_num_threads(threads)  # main() may run inside a larger program (tests)
        return 0
    except (TrainError, ImportError) as exc:
        print(f"fastvit train: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except ValueError as exc:  # a configuration the model or data code refuses
        print(f"fastvit train: error: invalid configuration: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if dist_ is not None:
            dist_.close()


def _resume(args) -> tuple:
    """(state directory, training state, weights) of ``--resume``; the saved options fill in
    those not typed, and the run continues in the same output directory unless ``--out`` is given."""
    directory = find_state(args.resume)
    try:
        state, weights = read_state(directory)
    except TrainError as exc:
        older = sorted(p for p in directory.parent.glob("step_*")
                       if p != directory and (p / STATE_FILE).is_file())
        hint = f" (an older checkpoint remains: --resume {older[-1]})" if older else ""
        raise TrainError(f"{exc}{hint}") from exc
    merge_resume_args(args, state["args"])
    if "out" not in args.explicit:
        run_dir = directory.parent.parent if directory.parent.name == "checkpoints" else directory
        args.out = str(run_dir)
    return directory, state, weights
