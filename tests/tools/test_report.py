"""bench/report.py: markdown ratios vs eager from pytest-benchmark JSON (synthetic and real)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)


def _bench(group, provider, mean, **extra):
    return {"group": group, "name": f"test_x[{provider}]", "extra_info": {"provider": provider, **extra},
            "stats": {"mean": mean, "median": mean, "stddev": mean / 10, "rounds": 5}}


def test_speedups_are_eager_time_over_provider_time(tmp_path):
    data = {"datetime": "2026-11-21T12:00:00", "version": "5.1.0",
            "machine_info": {"node": "box", "cpu": {"brand_raw": "Some CPU", "count": 2},
                             "python_version": "3.12.0", "system": "Linux", "release": "6.1"},
            "commit_info": {"id": "0123456789abcdef", "dirty": True, "branch": "main"},
            "benchmarks": [_bench("ln-fwd", "cpp", 0.002, gb_per_s=12.5),
                           _bench("ln-fwd", "eager", 0.004, gb_per_s=6.25),
                           _bench("ln-fwd", "torch", 0.008),
                           _bench("model-infer", "eager", 0.5, img_per_s=16.0, peak_mem_mb=120.4),
                           _bench("model-infer", "hf", 0.25, img_per_s=32.0),
                           _bench("orphan", "cpp", 0.1)]}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    md = tmp_path / "b.md"
    assert report.main([str(path), "-o", str(md)]) == 0
    text = md.read_text()
    assert "0123456789ab (uncommitted changes) on main" in text and "Some CPU" in text
    summary = text[text.index("## Summary"):text.index("## ln-fwd")]
    assert "| eager | cpp | torch | hf |" in summary
    assert "| ln-fwd | 1.00x | 2.00x | 0.50x |  |" in summary
    assert "| model-infer | 1.00x |  |  | 2.00x |" in summary
    assert "| orphan |  | - |  |  |" in summary
    ln = text[text.index("## ln-fwd"):text.index("## model-infer")]
    rows = [line for line in ln.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| provider | mean ms |") and rows[0].endswith("| GB/s |")
    assert rows[1] == "| eager | 4.000 | 0.400 | 4.000 | 5 | 1.00x | 6.25 |"
    assert rows[2].startswith("| cpp | 2.000 |") and "| 2.00x | 12.5 |" in rows[2]
    assert rows[3].endswith("| 0.50x | - |")
    assert "| hf | 250.000 |" in text and "| 1.00x | 16.0 | 120 |" in text
    assert "no `eager` baseline in this group" in text


def test_bad_files_give_clear_errors(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing.json")]) == 2
    assert "no benchmark JSON at" in capsys.readouterr().err
    (tmp_path / "x.json").write_text('{"a": 1}')
    assert report.main([str(tmp_path / "x.json")]) == 2
    assert "not a pytest-benchmark JSON file" in capsys.readouterr().err


def test_real_pytest_benchmark_json(tmp_path):
    """A real --benchmark-json from a tiny suite written with benchutil.measure."""
    pytest.importorskip("pytest_benchmark")
    (tmp_path / "test_bench_sleep.py").write_text(
        "import time\nimport pytest\nfrom benchutil import measure\n\n"
        "@pytest.mark.parametrize('provider,seconds', [('eager', 0.02), ('fast', 0.005)])\n"
        "def test_sleep(benchmark, provider, seconds):\n"
        "    measure(benchmark, lambda: time.sleep(seconds), provider=provider, group='sleep',\n"
        "            items=4, rounds=3, warmup=1)\n")
    out = tmp_path / "run.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-only",
                           f"--benchmark-json={out}", "--rootdir", str(tmp_path), str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = report.load(out)
    rows = report.groups(data)["sleep"]
    assert [report._provider(b) for b in rows] == ["eager", "fast"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["speedup"] > 1.5  # 20 ms vs 5 ms sleeps
    text = report.render(data)
    assert "| sleep | 1.00x |" in text and "| fast |" in text and "img/s" in text


def test_interleaved_model_benchmarks_get_their_own_table(tmp_path):
    """bench/test_bench_model.py's records (provider "interleaved", per-provider figures in
    extra_info) are reported from those figures, not from the benchmark's job time."""
    spread = {"median": 1.25, "q1": 1.2, "q3": 1.3, "min": 1.1, "max": 1.4, "rankable": True}
    wide = {"median": 1.02, "q1": 0.97, "q3": 1.05, "min": 0.9, "max": 1.1, "rankable": False}
    rows = {"eager": {"status": "ok", "reason": "", "img_per_s": 10.0, "tflops": 0.1, "rounds": 9,
                      "peak_mem_mb": 50.0, "vs_eager": {**spread, "median": 1.0, "q1": 1.0, "q3": 1.0},
                      "parity_max_diff": 0.0, "parity_tol": 1e-4},
            "fast-cpp": {"status": "ok", "reason": "", "img_per_s": 12.5, "tflops": 0.12, "rounds": 9,
                         "peak_mem_mb": 40.0, "vs_eager": spread, "parity_max_diff": 1e-6, "parity_tol": 1e-4},
            "compile": {"status": "ok", "reason": "", "img_per_s": 10.2, "tflops": 0.1, "rounds": 9,
                        "peak_mem_mb": 60.0, "vs_eager": wide, "parity_max_diff": 1e-6, "parity_tol": 1e-4}}
    bench = {"group": "model-infer-vit_s-b8-fp32", "name": "test_model[infer]",
             "stats": {"mean": 30.0, "median": 30.0, "stddev": 0.0, "rounds": 1},
             "extra_info": {"provider": "interleaved", "interleaved": rows, "threads": 2,
                            "cpu_flags": ["avx2", "avx512f"], "memory_kind": "rss",
                            "left_out": {"onnxruntime": "not installed"}}}
    text = report.render({"benchmarks": [bench]})
    assert "model-infer-vit_s-b8-fp32 (interleaved)" in text
    assert "CPU flags: avx2 avx512f" in text
    assert "| fast-cpp | 12.5 | 0.12 | 1.25x [1.20-1.30] | 9 |" in text
    assert "1.02x [0.97-1.05] (too wide)" in text
    assert "| onnxruntime | - | - | - | - | - | - | left out: not installed |" in text
    assert report.groups({"benchmarks": [bench]}) == {}  # the job time is no provider's speed
