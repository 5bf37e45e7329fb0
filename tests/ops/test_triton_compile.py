"""Every Triton kernel compiles for Hopper (sm_90) and A100 (sm_80) without a GPU: no
compile error, shared memory within the target's per-block limit, no register spills in
the 16-bit configs that the autotuner may pick (fp32 may spill but must compile and fit).

The CI subset of ``fastvit_kernels.triton.compile_check`` (see ``ci_subset`` there) runs in
a subprocess: this process runs Triton in interpreter mode (tests/conftest.py), and the
kernel modules must be imported without it. Results are cached by kernel source hash and
triton version (FASTVIT_COMPILE_CACHE, default ~/.cache/fastvit/compile_check). The table
(kernel, variant, config, regs, spills, smem) is printed at the end of the run.
The full sweep: ``python -m fastvit_kernels.triton.compile_check --full --out DIR``.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastvit_kernels.triton import compile_check as cc

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ("sm_90", "sm_80")


def _env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _python(args, timeout):
    proc = subprocess.run([sys.executable, "-W", "ignore", *args], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def report(request, tmp_path_factory):
    """{target: {"totals", "problems", "results"}} of the CI subset. Under pytest-xdist,
    run with ``--dist loadfile`` so that one worker runs it once."""
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    out = Path(cache.mkdir("compile_check")) if cache else tmp_path_factory.mktemp("compile_check")
    for old in out.glob("compile_*"):
        old.unlink()
    proc = _python(["-m", cc.__name__, "--ci", "--quiet", "--out", str(out)], timeout=1800)
    found = {t: out / f"compile_{t}.json" for t in TARGETS}
    missing = [t for t, path in found.items() if not path.exists()]
    assert not missing, f"no compile report for {missing}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    if not cache:
        print(f"compile check tables: {out}")
    return {t: json.loads(path.read_text()) for t, path in found.items()}


def _listing(problems, limit=40):
    more = f"\n... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n".join(problems[:limit]) + more


@pytest.mark.parametrize("target", TARGETS)
def test_every_op_is_recorded(report, target):
    totals = report[target]["totals"]
    assert totals["recording_errors"] == [], _listing(totals["recording_errors"])
    assert totals["configs"] > 0


def test_ci_subset_covers_every_kernel_and_op(report):
    results = report["sm_90"]["results"]
    ops = {origin.split()[0] for r in results for origin in r["origins"]}
    assert ops == set(cc.WORKLOADS), f"ops without a compile: {set(cc.WORKLOADS) - ops}"
    kernels = {(r["kernel"], r["dtype"]) for r in results}
    for kernel in {k for k, _ in kernels}:
        for dtype in ("bf16", "fp32"):
            assert (kernel, dtype) in kernels, f"{kernel} is not compiled for {dtype}"


def test_ci_subset_covers_the_vit_family_variants(report):
    """The launches the ViT families add (issue 18) are compiled in bf16: LayerScale in both
    norm kernels, QuickGELU (ACT=3) in each of its three epilogues, and prefix tokens
    without position rows (no_embed_class) in the patch-embedding forward."""
    compiled = {(r["kernel"], frozenset(r["variant"].split(","))) for r in report["sm_90"]["results"]
                if r["dtype"] == "bf16" and not r["error"]}
    wanted = {
        "add_layer_norm forward with gamma": ("_layer_norm_fwd_kernel", {"HAS_RESIDUAL", "HAS_GAMMA"}),
        "add_layer_norm backward with gamma": ("_layer_norm_bwd_kernel", {"HAS_DSUM", "HAS_GAMMA"}),
        "quick GELU inference": ("_gemm_kernel", {"ACT=3"}),
        "quick GELU training forward": ("_gemm_kernel", {"ACT=3", "ACT_GRAD_OUT"}),
        "quick GELU recompute backward": ("_gemm_kernel", {"ACT=3", "EPI_GELU_GRAD"}),
        "prefix tokens with positions": ("_gemm_kernel", {"HAS_PREFIX", "PREFIX_POS"}),
    }
    for what, (kernel, tokens) in wanted.items():
        assert any(k == kernel and tokens <= v for k, v in compiled), f"{what}: no bf16 compile of {kernel} {tokens}"
    no_pos = [v for k, v in compiled if k == "_gemm_kernel" and "HAS_PREFIX" in v and "PREFIX_POS" not in v]
    assert no_pos, "prefix tokens without position rows: no bf16 compile"


@pytest.mark.parametrize("target", TARGETS)
def test_kernels_compile(report, target):
    errors = [p for p in report[target]["problems"] if p.startswith("compile error")]
    assert not errors, f"{len(errors)} compile errors for {target}:\n{_listing(errors)}"


@pytest.mark.parametrize("target", TARGETS)
def test_shared_memory_fits(report, target):
    over = [p for p in report[target]["problems"] if p.startswith("shared memory")]
    assert not over, f"{len(over)} configs over the shared memory of {target}:\n{_listing(over)}"


@pytest.mark.parametrize("target", TARGETS)
def test_no_spills_in_16bit_configs(report, target):
    spills = [p for p in report[target]["problems"] if p.startswith("spills")]
    assert not spills, f"{len(spills)} fp16/bf16 configs spill on {target}:\n{_listing(spills)}"


@pytest.mark.parametrize("target", TARGETS)
def test_every_compile_has_a_register_report(report, target):
    missing = [p for p in report[target]["problems"] if p.startswith("no ptxas")]
    assert not missing, _listing(missing)


# ------------------------------------------------------------------- the checker itself
def _result(dtype="bf16", **fields):
    job = cc.Job("m", "k", {}, {}, {}, {"num_warps": 4, "num_stages": 3}, "h", dtype, "v", "c", origins=["op"])
    return cc.Result(job, **{"shared": 1024, "regs": 128, "spill_stores": 0, "spill_loads": 0, **fields})


def test_checker_flags_each_kind_of_problem():
    h100 = cc.TARGETS[90]
    assert cc.problems([_result()], h100) == []
    assert cc.problems([_result(dtype="fp32", spill_stores=4096, spill_loads=4096)], h100) == []
    flagged = {
        "compile error": _result(shared=None, regs=None, error="RuntimeError: PassManager::run failed"),
        "shared memory": _result(shared=h100.shared_mem + 1),
        "spills": _result(dtype="fp16", spill_stores=8, spill_loads=8),
        "no ptxas": _result(regs=None),
    }
    for kind, result in flagged.items():
        found = cc.problems([result], h100)
        assert len(found) == 1 and found[0].startswith(kind), (kind, found)
    fp32_over = cc.problems([_result(dtype="fp32", shared=h100.shared_mem + 1)], h100)
    assert len(fp32_over) == 1 and fp32_over[0].startswith("shared memory")
    assert cc.problems([_result(shared=h100.shared_mem)], h100) == []
    assert len(cc.problems([_result(shared=cc.TARGETS[80].shared_mem + 1)], cc.TARGETS[80])) == 1


def test_ptxas_report_is_parsed():
    log = textwrap.dedent("""\
        ptxas info    : 0 bytes gmem
        ptxas info    : Compiling entry function '_attn_fwd' for 'sm_90a'
        ptxas info    : Function properties for _attn_fwd
            24 bytes stack frame, 48 bytes spill stores, 40 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 24 bytes cumulative stack size
        """)
    assert cc.parse_ptxas(log) == (255, 48, 40)
    assert cc.parse_ptxas("ptxas info    : Used 90 registers") == (90, 0, 0)


def test_an_oversized_config_is_caught_by_a_real_compile(tmp_path):
    """A GEMM config that the launcher's prune would never keep (6 stages of 128x128x128
    bf16 tiles: 384 KiB), compiled for real: the check must report its shared memory."""
    script = textwrap.dedent(f"""
        import json
        from fastvit_kernels.triton import compile_check as cc
        h100 = cc.TARGETS[90]
        jobs, errors = cc.record(cc.Sweep(("B/16",), (64,), ("bf16",)), h100, ops=["linear_gelu"])
        job = next(j for j in jobs if j.kernel == "_gemm_kernel" and j.rank == 0)
        big = job.replace(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, options={{"num_warps": 8, "num_stages": 6}})
        [result] = cc.compile_jobs([big], h100, workers=1, cache_dir={str(tmp_path)!r})
        print(json.dumps({{"errors": errors, "shared": result.shared, "error": result.error,
                          "problems": cc.problems([result], h100)}}))
        """)
    proc = _python(["-c", script], timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["errors"] == [] and out["error"] is None, out
    assert out["shared"] > cc.TARGETS[90].shared_mem, out
    assert any(p.startswith("shared memory") for p in out["problems"]), out
