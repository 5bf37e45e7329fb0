"""The sections that are not timings: environment and ceilings, CUDA tests, compile, autotune."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# The tests run on the GPU, selected in one place (the op tests may move to tests/ops/).
# fp32 cases are left out: their ieee dots take minutes to compile per config (issue 14).
CUDA_TESTS = ["tests/ops/test_layer_norm.py", "tests/ops/test_linear_gelu.py", "tests/ops/test_patch_embed.py",
              "tests/ops/test_attention.py", "tests/ops/test_linear.py", "tests/ops/test_varlen_attention.py",
              "tests/models/test_fast_model.py"]
# The cpp backend's cases too: it would build its C++ extension first (minutes).
CUDA_TESTS_K = "not fp32 and not float32 and not cpp"
# --smoke: a few fast interpreter tests that still reach opcheck and the fast model.
SMOKE_TESTS = ["tests/ops/test_layer_norm.py::test_opcheck",
               "tests/models/test_fast_model.py::test_logits_parity_eval"]
SMOKE_TESTS_K = "affine or triton"
# "path::test PASSED", or with pytest-xdist "[gw0] [ 1%] PASSED path::test"
RESULT_LINE = re.compile(r"^(?:(?P<test>\S+::\S+)\s+(?P<outcome>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)"
                         r"|\[gw\d+\].*?(?P<outcome2>PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (?P<test2>\S+::\S+))")
XDIST_WORKERS = 8   # Triton compiles are CPU-bound and serial per process: 8 processes share the GPU


# ------------------------------------------------------------------------------- env
def environment(device: torch.device) -> dict:
    """Device, versions (torch, triton, CUDA, driver, transformers, timm), commit, date."""
    from vit.tools.bench.report import environment as bench_environment

    env = bench_environment(device)
    versions = env.pop("versions")
    try:
        versions["timm"] = importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        versions["timm"] = None
    versions["cuda"] = torch.version.cuda
    versions["driver"] = _driver()
    env["versions"] = versions
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if not env.get("commit") and os.environ.get("FASTVIT_COMMIT"):
        # a copy of the tree without .git (the device machine): the commit given by whoever ran it
        env["commit"] = {"id": os.environ["FASTVIT_COMMIT"], "dirty": None, "given": True}
    return env


def _driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def ceilings(device: torch.device, smoke: bool) -> dict:
    """Copy bandwidth (bytes read + written) and bf16 GEMM rate measured here (METHOD.md)."""
    from vit.tools.bench.timing import time_interleaved

    n = 1 << (20 if smoke else 30)             # 1 GiB of bf16 on the GPU: far above the 60 MB L2
    src = torch.randn(n // 2, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    size = 256 if smoke else 8192
    dtype = torch.float32 if smoke else torch.bfloat16
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    times = time_interleaved({"copy": lambda: dst.copy_(src), "gemm": lambda: a @ b}, device,
                             rounds=2 if smoke else 10, warmup=1 if smoke else 3)
    copy_s, gemm_s = statistics.median(times["copy"]), statistics.median(times["gemm"])
    return {"copy_gb_per_s": 2 * src.numel() * src.element_size() / copy_s / 1e9,
            "gemm_tflops": 2 * size ** 3 / gemm_s / 1e12, "gemm_size": size, "gemm_dtype": str(dtype)}


# ----------------------------------------------------------------------------- tests
def run_tests(out: Path, timeout_s: float, smoke: bool, log) -> dict:
    """pytest in a subprocess (its own CUDA context, killed at the timeout), output in pytest.txt."""
    files, k = (SMOKE_TESTS, SMOKE_TESTS_K) if smoke else (CUDA_TESTS, CUDA_TESTS_K)
    cmd = [sys.executable, "-m", "pytest", *files, "-k", k, "-v", "-p", "no:cacheprovider", "-rfE"]
    if not smoke and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(XDIST_WORKERS)]
    env = dict(os.environ, FASTVIT_AUTOTUNE="0", PYTHONUNBUFFERED="1")
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    result = {"command": " ".join(cmd[1:]), "timeout_s": round(timeout_s), "counts": {}, "failed": []}
    start = time.monotonic()
    with open(out / "pytest.txt", "w", buffering=1) as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            result["returncode"] = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)   # the whole pytest tree, started in its own session above
            proc.wait()
            result["returncode"], result["timed_out"] = None, True
    result["elapsed_s"] = time.monotonic() - start
    counts = result["counts"]
    for line in (out / "pytest.txt").read_text(errors="replace").splitlines():
        outcome, test = parse_result_line(line)
        if outcome:
            counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
            if outcome in ("FAILED", "ERROR"):
                result["failed"].append(test)
    log(f"tests: {counts} rc {result['returncode']}{' (timed out)' if result.get('timed_out') else ''}")
    return result


def parse_result_line(line: str) -> tuple[str | None, str | None]:
    """(outcome, test id) of one ``pytest -v`` result line, else (None, None)."""
    match = RESULT_LINE.match(line)
    if not match:
        return None, None
    return match.group("outcome") or match.group("outcome2"), match.group("test") or match.group("test2")


# --------------------------------------------------------------------------- compile
def compile_fast_model(config, device, dtype, backend: str) -> dict:
    """torch.compile(fast model, fullgraph=True) by the parity rule against the fp32 torch reference.

    The reference (``vit.ViT``, same weights) gives the fp32 truth: the fast model in fp32
    would send Triton's ieee-precision kernels to compile (minutes per config, issue 14).
    The eager fast model is checked the same way, so a difference is the compiler's.
    """
    from vit.fast import ViT as FastViT
    from vit.model import ViT
    from vit.tools.bench.parity import check_parity, reference_outputs

    torch.manual_seed(0)
    reference = ViT(config).to(device).eval()
    model = FastViT(config).to(device).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    images = torch.randn(4, config.in_chans, *config.img_hw, device=device)
    labels = torch.zeros(4, dtype=torch.long, device=device)
    ref = reference_outputs(reference, images, labels, dtype, with_grads=False)
    eager = check_parity(model, ref, dtype)[0]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    start = time.perf_counter()
    verdict = check_parity(compiled, ref, dtype)[0]   # the first call compiles
    compile_s = time.perf_counter() - start
    return {"backend": backend, "fullgraph": True, "compile_s": round(compile_s, 1),
            "ok": verdict.ok and eager.ok, "max_diff_vs_fp32": verdict.max_diff,
            "eager_max_diff_vs_fp32": eager.max_diff, "tolerance": verdict.tolerance,
            "detail": "; ".join(d for d in (verdict.detail, eager.detail) if d)}


# -------------------------------------------------------------------------- autotune
def autotune_choices() -> list[dict]:
    """Every Triton autotuner of fastvit_kernels.triton: its cached choice per key (or its only config)."""
    import importlib
    import pkgutil

    from triton.runtime.autotuner import Autotuner

    import fastvit_kernels.triton as pkg

    rows = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for attr, value in sorted(vars(module).items()):
            if not isinstance(value, Autotuner):
                continue
            kernel = f"{info.name}.{attr}"
            names = list(getattr(value, "keys", []))
            cache = dict(getattr(value, "cache", {}) or {})
            for key, config in cache.items():
                rows.append({"kernel": kernel, "key": _key_text(names, key), "config": str(config)})
            if not cache:
                rows.append({"kernel": kernel, "key": "(never tuned)",
                             "config": f"{len(value.configs)} candidate(s); first {value.configs[0]}"})
    return rows


def _key_text(names, key) -> str:
    key = list(key) if isinstance(key, tuple) else [key]
    named = [f"{n}={v}" for n, v in zip(names, key)]
    return ", ".join(named + [str(v) for v in key[len(names):]])
