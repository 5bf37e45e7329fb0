"""bench/gpu_check's pure parts: deadlines, section stops, target verdicts, summary, pytest lines.

The whole script runs in CI as ``make gpu-check-smoke``; these check the decisions it makes
on results a CPU run never produces (GPU timings, timeouts, missed targets).
"""

import json
import time

import pytest
import torch

from bench.gpu_check import __main__ as cli
from bench.gpu_check import checks, plan, record, targets
from vit.tools.bench.timing import time_interleaved


class _Ctx:
    def __init__(self, rec):
        self.rec = rec


def test_deadline_cuts_a_section_to_the_global_deadline():
    deadline = plan.Deadline.after(10.0)
    assert deadline.start_section(100.0) <= 10.0
    assert deadline.allows(5.0) and not deadline.allows(11.0)
    deadline = plan.Deadline.after(0.0)
    assert deadline.start_section(30.0) == 0.0 and deadline.left() == 0.0


def test_every_section_has_a_budget_and_a_function():
    from bench.gpu_check.sections import SECTION_FUNCS

    assert list(plan.GPU_BUDGETS) == list(plan.SMOKE_BUDGETS) == plan.SECTIONS == list(SECTION_FUNCS)
    assert sum(plan.GPU_BUDGETS.values()) <= plan.GPU_DEADLINE_S + 10 < 8 * 60


def test_a_section_past_its_budget_is_stopped_and_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(cli, "HARD_STOP_GRACE_S", 0.05)
    rec = record.Recorder(tmp_path, smoke=True)
    rec.results["e2e"].append({"model": "m", "mode": "inference", "batch": 1, "provider": "fast", "status": "running"})

    def forever(ctx):
        while True:
            time.sleep(0.01)

    assert cli.run_section("slow", forever, _Ctx(rec), 0.1, plan.Deadline.after(60.0)) == 0
    assert rec.results["sections"]["slow"]["status"] == "timed out"
    assert rec.results["e2e"][0]["status"] == "interrupted"
    saved = json.loads((tmp_path / record.JSON_NAME).read_text())
    assert saved["sections"]["slow"]["status"] == "timed out"


def test_sections_that_fail_error_or_do_not_fit(tmp_path):
    rec = record.Recorder(tmp_path, smoke=True)
    deadline = plan.Deadline.after(60.0)
    assert cli.run_section("bad", lambda ctx: "FAILED 2 tests", _Ctx(rec), 5, deadline) == 1
    assert cli.run_section("boom", lambda ctx: 1 / 0, _Ctx(rec), 5, deadline) == 1
    assert cli.run_section("late", lambda ctx: "", _Ctx(rec), 5, plan.Deadline.after(1.0)) == 0
    sections = rec.results["sections"]
    assert [sections[n]["status"] for n in ("bad", "boom", "late")] == ["failed", "error", "skipped"]
    assert "ZeroDivisionError" in sections["boom"]["note"]


def _e2e(provider, mode, img_per_s, peak=None):
    return {"model": "vit_b16", "mode": mode, "provider": provider, "status": "ok", "batch": 1,
            "img_per_s": img_per_s, "peak_mem_mb": peak, "mfu": 0.4 if provider == "fast" else None}


def _op(op, shape, medians, **extra):
    providers = {name: {"median_us": us, **extra.get(name, {})} for name, us in medians.items()}
    return {"op": op, "shape": shape, "case": f"{op} {shape}", "direction": "fwd", "providers": providers}


def test_targets_met_missed_and_not_measured():
    results = {"env": {"copy_gb_per_s": 4000.0},
               "e2e": [_e2e("fast", "inference", 140.0), _e2e("eager", "inference", 100.0),
                       _e2e("hf", "inference", 100.0), _e2e("fast", "train", 130.0, peak=900.0),
                       _e2e("eager", "train", 100.0, peak=1000.0)],
               "ops": [_op("attention", "256x12x197x64", {"fast": 10.0, "sdpa-flash": 9.0, "sdpa": 12.0}),
                       _op("layer_norm", "vit_b16", {"fast": 1.0, "eager": 2.0}, fast={"gb_per_s": 3600.0}),
                       _op("linear_gelu", "vit_b16", {"fast": 100.0, "eager": 110.0, "linear": 95.0})]}
    verdict = {row["target"]: row["verdict"] for row in targets.evaluate(results)}
    assert verdict["vit_b16 inference fast / eager"] == "met"              # 1.4 >= 1.3
    assert verdict["vit_b16 inference fast / compile"] == "not measured"
    assert verdict["vit_b16 inference fast / hf"] == "met"
    assert verdict["vit_b16 inference MFU (fast)"] == "reported"
    assert verdict["vit_b16 train fast / eager"] == "met"
    assert verdict["vit_b16 train peak memory fast / eager"] == "met"      # 0.9 < 1
    assert verdict["attention fwd 256x12x197x64: best SDPA time / fast time"] == "missed by 10%"
    assert verdict["attention fwd 32x16x1025x64 TFLOP/s (fast)"] == "not measured"
    assert verdict["layer_norm fwd vit_b16: fast GB/s / copy GB/s"] == "met"  # 0.9 >= 0.85
    assert verdict["linear_gelu fwd vit_b16: gelu(linear) time / fast time"] == "missed by 8%"
    assert verdict["linear_gelu fwd vit_b16: bare F.linear time / fast time"] == "met"


def test_summary_of_partial_results_is_valid_markdown(tmp_path):
    rec = record.Recorder(tmp_path, smoke=False)
    rec.section("env", status="running", budget_s=15)
    text = (tmp_path / record.SUMMARY_NAME).read_text()
    assert text.startswith("# gpu_check: running") and "| env | running | 15 |" in text
    assert "not measured" in text
    rec.results["ops"].append(_op("layer_norm", "vit_b16", {"fast": 1.0}, fast={"gb_per_s": float("nan")}))
    rec.close("done")
    saved = json.loads((tmp_path / record.JSON_NAME).read_text())   # NaN written as a string
    assert saved["status"] == "done" and saved["ops"][0]["providers"]["fast"]["gb_per_s"] == "nan"


@pytest.mark.parametrize("line, expected", [
    ("tests/a.py::test_x[bf16] PASSED                [ 10%]", ("PASSED", "tests/a.py::test_x[bf16]")),
    ("[gw3] [ 42%] FAILED tests/a.py::test_y ", ("FAILED", "tests/a.py::test_y")),
    ("collecting ... collected 3 items", (None, None)),
])
def test_pytest_result_lines(line, expected):
    assert checks.parse_result_line(line) == expected


def test_time_interleaved_runs_every_function_every_round():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    times = time_interleaved({"a": lambda: bump("a"), "b": lambda: bump("b")}, torch.device("cpu"),
                             rounds=3, warmup=1, min_round_s=0.0)
    assert [len(times["a"]), len(times["b"])] == [3, 3]
    assert calls == {"a": 5, "b": 5}     # warm-up, one calibration call, three rounds of one rep
    assert all(t >= 0 for t in times["a"] + times["b"])


def test_autotune_choices_read_each_tuners_cache(monkeypatch):
    import triton

    from fastvit_kernels.triton import attention

    tuner = attention._attn_fwd_tuned
    chosen = triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)
    monkeypatch.setattr(tuner, "cache", {(256, 64, "tf32", "torch.bfloat16"): chosen})
    rows = [r for r in checks.autotune_choices() if r["kernel"] == "attention._attn_fwd_tuned"]
    assert len(rows) == 1
    assert rows[0]["key"] == "N_BUCKET=256, BLOCK_D=64, DOT_PRECISION=tf32, torch.bfloat16"
    assert "BLOCK_M: 128" in rows[0]["config"] and "num_warps: 8" in rows[0]["config"]
