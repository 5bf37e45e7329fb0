"""Offline compile check: every Triton kernel launch of the ops, compiled for a GPU that
this machine does not have, with its registers, spills and shared memory.

Three steps, top to bottom in this file:

1. Record (``compile_launches``): every kernel launch the op launchers make at ViT shapes,
   on meta tensors, for the target; an autotuned kernel once per config its prune keeps.
2. Compile. Each distinct record is compiled with ``triton.compile`` for the target down
   to cubin in a pool of worker processes (a compiler crash, even an abort, is a recorded
   failure); shared memory is ``metadata.shared``, registers and spills come from the
   verbose report of the ptxas that the triton wheel bundles (``n_regs`` / ``n_spills``
   are only filled when a driver loads the kernel). Results are cached on disk, keyed by
   the kernel's source hash, the triton version, the target and the compile's arguments.
3. Check and report: a compile error, shared memory over the target's per-block limit,
   or a spill in a 16-bit (fp16 / bf16) config fails; fp32 (ieee dots, for checking
   rather than speed) may spill but must compile and fit. A markdown table and JSON.

Command line (the kernel modules must be imported with TRITON_INTERPRET unset)::

    python -m fastvit_kernels.triton.compile_check --ci            # the CI subset, sm_90 + sm_80
    python -m fastvit_kernels.triton.compile_check --full --target 90 --out bench/results/compile/

The kernels are imported by their absolute names, so this file also checks another
checkout's kernels when run by path with that checkout first on PYTHONPATH.

The recorded workloads call the launchers of each op module by name (``WORKLOADS`` in
``compile_launches``): a renamed launcher is a recording failure, to be fixed in that table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pickle
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import triton

from fastvit_kernels.triton.compile_launches import (  # noqa: F401 -- the public names of the check
    CI,
    FULL,
    SHAPES,
    TARGETS,
    WORKLOADS,
    Job,
    Shape,
    Sweep,
    Target,
    ci_subset,
    record,
)


# ------------------------------------------------------------------------------ compile
@dataclass
class Result:
    """A compiled job: shared memory (bytes), registers per thread, spill bytes per thread."""

    job: Job
    shared: int | None = None
    regs: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    error: str | None = None
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    cached: bool = False

    @property
    def spills(self) -> int:
        return max(self.spill_stores or 0, self.spill_loads or 0)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> tuple[int | None, int, int]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` output (one kernel)."""
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    spills = [(int(a), int(b)) for a, b in _PTXAS_SPILLS.findall(log)]
    return (max(regs) if regs else None, max((a for a, _ in spills), default=0),
            max((b for _, b in spills), default=0))


def _find_kernel(module: str, name: str):
    import importlib

    from triton.runtime.jit import JITFunction
    for obj in vars(importlib.import_module(module)).values():
        while obj is not None and not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
            obj = obj.fn
        if isinstance(obj, JITFunction) and obj.fn.__name__ == name:
            return obj
    raise LookupError(f"no jit kernel {name} in {module}")


def _error_text(exc: BaseException, stderr: str) -> str:
    lines = [f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"]
    lines += [ln.strip() for ln in stderr.splitlines() if re.search(r"error|Assertion|failed", ln)][:3]
    return " | ".join(lines)[:400]


def compile_job(job: Job, target: Target, stderr_path: str | None = None) -> dict:
    """Compile ``job`` here (TRITON_INTERPRET unset, TRITON_ALWAYS_COMPILE and
    TRITON_DUMP_PTXAS_LOG set: see ``_worker_env``); a dict of Result's fields."""
    from triton.compiler import ASTSource
    start, cpu = time.perf_counter(), _cpu_seconds()
    log = io.StringIO()
    try:
        src = ASTSource(_find_kernel(job.module, job.kernel), job.signature, job.constexprs, job.attrs)
        with contextlib.redirect_stdout(log):  # triton prints the ptxas log (and the PTX on failure)
            compiled = triton.compile(src, target=target.gpu_target(), options=dict(job.options))
        regs, stores, loads = parse_ptxas(log.getvalue())
        out = dict(shared=int(compiled.metadata.shared), regs=regs, spill_stores=stores, spill_loads=loads)
    except Exception as exc:  # noqa: BLE001 -- a compiler failure is a result
        stderr = Path(stderr_path).read_text(errors="replace") if stderr_path else ""
        out = dict(error=_error_text(exc, stderr))
    out["seconds"] = time.perf_counter() - start
    out["cpu_seconds"] = _cpu_seconds() - cpu
    return out


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): compile cost on a busy machine."""
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def _send(stream, obj) -> None:
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream):
    """The next message, or None at end of stream (the other side is gone)."""
    head = stream.read(8)
    if len(head) < 8:
        return None
    (size,) = struct.unpack("<Q", head)
    data = stream.read(size)
    return pickle.loads(data) if len(data) == size else None


def _worker_loop() -> None:
    """``--worker``: compile jobs read from stdin, answer on stdout. fd 1 is pointed at
    stderr (a file the parent reads when this process dies) so that nothing that the
    compiler prints can corrupt the answers; stderr is emptied before each job."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    while (msg := _receive(requests)) is not None:
        job, arch = msg
        os.ftruncate(2, 0)
        os.lseek(2, 0, os.SEEK_SET)
        _send(answers, compile_job(Job(**job), TARGETS[arch], "/dev/stderr"))


def _worker_env(tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    import fastvit_kernels  # the workers import the kernels that the recording saw
    root = str(Path(fastvit_kernels.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(TRITON_CACHE_DIR=os.path.join(tmp, "triton"), TRITON_ALWAYS_COMPILE="1",
               TRITON_DUMP_PTXAS_LOG="1", PYTHONWARNINGS="ignore")
    return env


_MODULE = "fastvit_kernels.triton.compile_check"


class _Worker:
    """A compiler process (``python -m ...compile_check --worker``) and its current job."""

    def __init__(self, tmp: str, index: int):
        self.stderr_path = os.path.join(tmp, f"worker{index}.stderr")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         env=_worker_env(tmp))
        self.job, self.started = None, 0.0

    def submit(self, job: Job, target: Target) -> None:
        self.job, self.started = job, time.perf_counter()
        _send(self.proc.stdin, (dataclasses.asdict(job), target.arch))

    def stderr_tail(self, lines: int = 3) -> list[str]:
        text = Path(self.stderr_path).read_text(errors="replace") if os.path.exists(self.stderr_path) else ""
        return [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def default_cache_dir() -> Path:
    return Path(os.environ.get("FASTVIT_COMPILE_CACHE", Path.home() / ".cache" / "fastvit" / "compile_check"))


def compile_jobs(jobs: list[Job], target: Target, *, workers: int | None = None,
                 cache_dir: Path | None = None, timeout: float = 900.0,
                 progress: Callable[[str], None] | None = None) -> list[Result]:
    """Compile every job (cached ones are read back) in ``workers`` processes."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    results = {id(j): Result(j) for j in jobs}
    todo = []
    for job in jobs:
        path = cache_dir / f"{job.key(target)}.json"
        if path.exists():
            r = results[id(job)]
            for k, v in json.loads(path.read_text()).items():
                setattr(r, k, v)
            r.cached = True
        else:
            todo.append(job)
    # Slowest first: fp32 (ieee dots) and attention backward take the longest.
    todo.sort(key=lambda j: (j.dtype != "fp32", "bwd" not in j.kernel))
    start, done = time.perf_counter(), 0

    def finish(job, fields):
        nonlocal done
        r = results[id(job)]
        for k, v in fields.items():
            setattr(r, k, v)
        if not (r.error or "").startswith("timeout"):  # a timeout may pass on a quieter machine
            tmp_path = cache_dir / f".{job.key(target)}.{os.getpid()}.tmp"
            tmp_path.write_text(json.dumps(fields))
            tmp_path.replace(cache_dir / f"{job.key(target)}.json")
        done += 1
        if progress:
            status = r.error or f"regs {r.regs} spill {r.spills} smem {r.shared}"
            progress(f"[{done}/{len(todo)} {time.perf_counter() - start:5.0f}s] {job.kernel} {job.dtype} "
                     f"{job.config} ({r.seconds:.1f}s): {status}")

    if not todo:
        return [results[id(j)] for j in jobs]
    tmp = tempfile.mkdtemp(prefix="fastvit-compile-")
    pool = [_Worker(tmp, i) for i in range(max(1, min(workers or os.cpu_count() or 1, len(todo))))]
    spawned = len(pool)
    queue = list(todo)
    try:
        for w in pool:
            if queue:
                w.submit(queue.pop(0), target)
        while any(w.job for w in pool):
            busy = {w.proc.stdout: w for w in pool if w.job}
            for stream in wait(list(busy), timeout=5.0):
                w = busy[stream]
                answer = _receive(stream)
                if answer is None:  # the compiler process died (e.g. an assertion aborted it)
                    w.kill()
                    code = w.proc.returncode
                    why = f"compiler process died ({signal.Signals(-code).name if code < 0 else code})"
                    finish(w.job, dict(error=" | ".join([why] + w.stderr_tail())[:400],
                                       seconds=time.perf_counter() - w.started))
                    pool[pool.index(w)] = w = _Worker(tmp, spawned)
                    spawned += 1
                else:
                    finish(w.job, answer)
                w.job = None
                if queue:
                    w.submit(queue.pop(0), target)
            for i, w in enumerate(pool):
                if w.job and time.perf_counter() - w.started > timeout:
                    w.kill()
                    finish(w.job, dict(error=f"timeout after {timeout:.0f}s", seconds=timeout))
                    pool[i] = w = _Worker(tmp, spawned)
                    spawned += 1
                    if queue:
                        w.submit(queue.pop(0), target)
    finally:
        for w in pool:
            w.kill() if w.job else w.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return [results[id(j)] for j in jobs]


# ------------------------------------------------------------------- checking, reporting
def problems(results: list[Result], target: Target) -> list[str]:
    """What fails the check: compile errors, shared memory over the target's limit,
    spills in 16-bit configs (fp32 ones may spill)."""
    out = []
    for r in results:
        j = r.job
        where = f"{j.kernel} {j.dtype} [{j.variant}] {j.config} ({j.origins[0]})"
        if r.error:
            out.append(f"compile error: {where}: {r.error}")
            continue
        if r.shared is None or r.shared > target.shared_mem:
            out.append(f"shared memory {r.shared} B > {target.shared_mem} B ({target.name}): {where}")
        if r.regs is None:
            out.append(f"no ptxas register report: {where}")
        if r.spills and j.dtype != "fp32":
            out.append(f"spills {r.spill_stores} B stores / {r.spill_loads} B loads ({j.dtype}): {where}")
    return out


def totals(results: list[Result], target: Target) -> dict:
    ok = [r for r in results if not r.error]

    def worst(attr):
        r = max(ok, key=lambda r: getattr(r, attr) or 0, default=None)
        return None if r is None else {"value": getattr(r, attr), "kernel": r.job.kernel, "dtype": r.job.dtype,
                                       "variant": r.job.variant, "config": r.job.config}

    return {
        "target": target.name, "triton": triton.__version__, "configs": len(results),
        "failures": sum(1 for r in results if r.error),
        "over_shared_mem": sum(1 for r in ok if (r.shared or 0) > target.shared_mem),
        "spilling": sum(1 for r in ok if r.spills),
        "spilling_16bit": sum(1 for r in ok if r.spills and r.job.dtype != "fp32"),
        "worst_regs": worst("regs"), "worst_spill_stores": worst("spill_stores"), "worst_shared": worst("shared"),
        "problems": len(problems(results, target)),
        "compile_seconds": round(sum(r.seconds for r in results if not r.cached), 1),
        "compile_cpu_seconds": round(sum(r.cpu_seconds for r in results if not r.cached), 1),
    }


def markdown(results: list[Result], target: Target) -> str:
    """The table, one row per compile, sorted by kernel, dtype and variant."""
    t = totals(results, target)
    lines = [f"Compile check for {target.name} (shared memory limit {target.shared_mem} B), "
             f"triton {triton.__version__}: "
             f"{t['configs']} configs, {t['failures']} failures, {t['over_shared_mem']} over shared memory, "
             f"{t['spilling']} spilling ({t['spilling_16bit']} in fp16/bf16).", "",
             "| kernel | dtype | variant | config | regs | spill st/ld B | smem B | status | launched by |",
             "|---|---|---|---|---:|---:|---:|---|---|"]
    for r in sorted(results, key=lambda r: (r.job.kernel, r.job.dtype, r.job.variant, r.job.config)):
        j = r.job
        if r.error:
            status = "ERROR " + r.error.replace("|", "/")[:160]
        else:
            bad = [("smem>limit" if (r.shared or 0) > target.shared_mem else ""),
                   ("SPILL" if r.spills and j.dtype != "fp32" else ("spill" if r.spills else ""))]
            status = " ".join(b for b in bad if b) or "ok"
        more = f" (+{len(j.origins) - 1})" if len(j.origins) > 1 else ""
        spill = "" if r.error else f"{r.spill_stores}/{r.spill_loads}"
        lines.append(f"| {j.kernel} | {j.dtype} | {j.variant} | {j.config} | {r.regs if r.regs is not None else ''} "
                     f"| {spill} | {r.shared if r.shared is not None else ''} | {status} | {j.origins[0]}{more} |")
    return "\n".join(lines) + "\n"


def _result_json(r: Result) -> dict:
    j = r.job
    return {"kernel": j.kernel, "module": j.module, "dtype": j.dtype, "variant": j.variant, "config": j.config,
            "options": j.options, "regs": r.regs, "spill_stores": r.spill_stores, "spill_loads": r.spill_loads,
            "shared": r.shared, "error": r.error, "seconds": round(r.seconds, 2),
            "cpu_seconds": round(r.cpu_seconds, 2), "origins": j.origins}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m " + _MODULE, description=__doc__.split("\n\n")[0])
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--ci", action="store_true", help="the CI subset (default), sm_90 and sm_80")
    scope.add_argument("--full", action="store_true", help="every preset, batch and dtype, every kept config")
    p.add_argument("--extras", action="store_true",
                   help="with --full: also channels-last images, tanh GELU, norms without weight and bias")
    p.add_argument("--target", type=int, action="append", choices=sorted(TARGETS),
                   help="compute capability, repeatable (default: 90 and 80 with --ci, 90 with --full)")
    p.add_argument("--out", type=Path, help="directory for compile_sm<arch>.md and .json")
    p.add_argument("--workers", type=int, default=None, help="compile processes (default: all cores)")
    p.add_argument("--cache", type=Path, default=None, help=f"result cache (default: {default_cache_dir()})")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker_loop()
        return 0
    sweep = dataclasses.replace(FULL, extras=args.extras) if args.full else CI
    progress = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    status = 0
    for arch in args.target or ([90] if args.full else [90, 80]):
        target = TARGETS[arch]
        start = time.perf_counter()
        jobs, rec_errors = record(sweep, target)
        if not args.full:
            jobs = ci_subset(jobs, target)
        results = compile_jobs(jobs, target, workers=args.workers, cache_dir=args.cache, progress=progress)
        found = [f"recording failed: {e}" for e in rec_errors] + problems(results, target)
        t = totals(results, target)
        t.update(wall_seconds=round(time.perf_counter() - start, 1), cached=sum(r.cached for r in results),
                 recording_errors=rec_errors, sweep=dataclasses.asdict(sweep), ci_subset=not args.full)
        table = markdown(results, target)
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"compile_{target.name}.md").write_text(table)
            (args.out / f"compile_{target.name}.json").write_text(json.dumps(
                {"totals": t, "problems": found, "results": [_result_json(r) for r in results]}, indent=1))
        if not args.full or not args.out:
            print(table)
        print("\n".join(found) if found else "no problems", flush=True)
        print(json.dumps({k: v for k, v in t.items() if k not in ("sweep", "recording_errors")}), flush=True)
        status = status or int(bool(found))
    return status


if __name__ == "__main__":
    sys.exit(main())
