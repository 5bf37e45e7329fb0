"""`fastvit bench` times providers interleaved and reports per-round ratios with their spread.

The order of calls is checked with recording providers on ViT-Ti at 32x32 pixels; the ratio
statistics and the table's verdict on fixed timings.
"""

import copy
import dataclasses
import io

import pytest
import torch
from torch import nn

from vit.tools import bench
from vit.tools.bench import providers as registry
from vit.tools.bench.report import format_table

pytestmark = pytest.mark.usefixtures("one_thread")


class _Recorder(nn.Module):
    """The reference, logging (name, training mode) on every forward."""

    def __init__(self, reference, name, log, fail_at=None):
        super().__init__()
        self.module, self.name, self.log, self.fail_at = copy.deepcopy(reference), name, log, fail_at

    def forward(self, images):
        self.log.append((self.name, self.training))
        if self.fail_at is not None and len([e for e in self.log if e[0] == self.name]) >= self.fail_at:
            raise RuntimeError("out of luck")
        return self.module(images)


@pytest.fixture
def recorders(monkeypatch):
    """eager, a and b as recording providers (eager's entry restored afterwards)."""
    log = []
    eager = registry.get_provider("eager")
    monkeypatch.setitem(registry._REGISTRY, "eager",
                        dataclasses.replace(eager, build=lambda ref: _Recorder(ref, "eager", log)))
    added = []

    def add(name, **kwargs):
        registry.register_provider(name, lambda ref: _Recorder(ref, name, log, **kwargs), default=False)
        added.append(name)

    yield log, add
    for name in added:
        registry.unregister_provider(name)


def _settings(providers, **kwargs):
    kwargs = {"steps": 3, "warmup": 1, **kwargs}
    return bench.make_settings(model="vit_tiny_patch16_224", img_size=32, batch_size=2, device="cpu",
                               providers=providers, **kwargs)


def test_rounds_time_one_step_of_every_provider_in_turn(recorders):
    log, add = recorders
    add("a")
    add("b")
    results = bench.run(_settings(["a", "b"], train=True), stream=io.StringIO())
    names = [name for name, _ in log]
    # parity: eager, a, b (logits, then logits + loss for the gradients)
    assert names[:6] == ["eager", "eager", "a", "a", "b", "b"]
    inference = [name for name, training in log if not training]
    train = [name for name, training in log if training]
    # per provider: warm-up (1) + the peak-memory step, one after another; then 3 rounds e a b
    assert inference[6:] == ["eager"] * 2 + ["a"] * 2 + ["b"] * 2 + ["eager", "a", "b"] * 3
    assert train == ["eager"] * 2 + ["a"] * 2 + ["b"] * 2 + ["eager", "a", "b"] * 3
    for row in results["results"]:
        for mode in ("inference", "train"):
            assert row[mode]["steps"] == 3 and len(row[mode]["times_s"]) == 3
            assert row["vs_eager"][mode]["rounds"] == 3


def test_time_interleaved_with_fixed_reps_has_no_calibration_call():
    calls = []
    rounds = []
    times = bench.time_interleaved({"x": lambda: calls.append("x"), "y": lambda: calls.append("y")},
                                   torch.device("cpu"), rounds=2, warmup=1, reps=1,
                                   on_round=lambda: rounds.append(len(calls)))
    assert calls == ["x", "y", "x", "y", "x", "y"]
    assert rounds == [4, 6] and {k: len(v) for k, v in times.items()} == {"x": 2, "y": 2}


def test_ratio_spread_of_fixed_timings():
    # ratios eager/provider per round: 2, 2, 1, 4, 2
    spread = bench.ratio_spread([1.0, 2.0, 1.0, 1.0, 3.0], [0.5, 1.0, 1.0, 0.25, 1.5])
    assert spread["ratios"] == [2.0, 2.0, 1.0, 4.0, 2.0]
    assert (spread["median"], spread["min"], spread["max"], spread["q1"], spread["q3"]) == (2, 1, 4, 2, 2)
    assert spread["rounds"] == 5 and spread["rankable"]
    # ratios 0.8 0.9 1.0 1.1 1.2: the interquartile range 0.9-1.1 contains 1: no ranking
    wide = bench.ratio_spread([0.8, 0.9, 1.0, 1.1, 1.2], [1.0] * 5)
    assert wide["q1"] == pytest.approx(0.9) and wide["q3"] == pytest.approx(1.1)
    assert wide["median"] == pytest.approx(1.0) and not wide["rankable"]
    slower = bench.ratio_spread([1.0] * 4, [1.25, 1.25, 1.1, 2.0])
    assert slower["rankable"] and slower["median"] < 1
    with pytest.raises(ValueError, match="same non-zero number of rounds, got 2 and 3"):
        bench.ratio_spread([1.0, 1.0], [1.0, 1.0, 1.0])


def _row(name, base, times):
    timing = {"img_per_s": 1 / sorted(times)[len(times) // 2], "steps": len(times), "warmup_s": 0.1,
              "peak_mem_mb": None, "times_s": times}
    spread = bench.ratio_spread(base, times)
    return {"provider": name, "status": "ok", "reason": "", "inference": timing, "train": None,
            "parity": [{"what": "logits", "max_diff": 0.0, "tolerance": 1e-4, "ok": True}],
            "vs_eager": {"inference": spread}, "speedup_vs_eager": {"inference": spread["median"]}}


def test_table_says_when_the_spread_is_too_wide_to_rank():
    base = [1.0, 1.0, 1.0, 1.0, 1.0]
    rows = [_row("eager", base, base), _row("fast", base, [0.5, 0.5, 0.6, 0.5, 0.4]),
            _row("noisy", base, [0.8, 1.3, 1.0, 0.9, 1.1]), _row("slow", base, [2.0, 2.1, 1.9, 2.0, 2.0]),
            {"provider": "moon", "status": "unavailable", "reason": "needs the moon", "inference": None,
             "train": None, "parity": [], "vs_eager": {}, "speedup_vs_eager": {}}]
    results = {"conditions": {"model": "m", "img_size": [32, 32], "batch_size": 1, "dtype": "fp32",
                              "autocast": False, "device": "cpu", "train": False, "memory_kind": "rss"},
               "machine": {"cpu": "Some CPU", "torch_threads": 2, "cpu_flags": ["avx2", "avx512f"],
                           "cpu_capability": "AVX512"},
               "versions": {"torch": "2.x"}, "results": rows}
    table = format_table(results)
    lines = {line.split()[0]: line for line in table.splitlines() if line.split()}
    assert "baseline" in lines["eager"] and "1.00-1.00" in lines["eager"]
    assert "2.00x" in lines["fast"] and "faster" in lines["fast"]
    assert "too wide" in lines["noisy"] and "faster" not in lines["noisy"]
    assert "slower" in lines["slow"] and "0.50x" in lines["slow"]
    assert "unavailable" in lines["moon"] and "moon: needs the moon" in table
    assert "cpu: Some CPU; flags: avx2 avx512f; torch CPU capability: AVX512" in table
    assert "interleaved: 5 rounds" in table


def test_unavailable_provider_is_listed_with_its_reason_not_an_error(tmp_path):
    from vit.tools import cli

    registry.register_provider("moon", lambda ref: ref, unavailable=lambda device, config: "needs the moon",
                               default=False)
    try:
        out, err = io.StringIO(), io.StringIO()
        code = cli.main(["bench", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2",
                         "--steps", "2", "--warmup", "1", "--device", "cpu", "--providers", "eager,moon",
                         "--out", str(tmp_path)], stdout=out, stderr=err)
    finally:
        registry.unregister_provider("moon")
    assert code == 0, err.getvalue()
    table = out.getvalue()
    assert "moon: needs the moon" in table
    assert next(line for line in table.splitlines() if line.startswith("moon ")).split()[1] == "unavailable"


def test_onnxruntime_unavailable_without_its_packages_or_in_low_precision(monkeypatch):
    config = _settings(["eager"]).config
    real = registry.importlib.util.find_spec
    monkeypatch.setattr(registry.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    reason = registry.unavailable_reason("onnxruntime", "cpu", config)
    missing, _, rest = reason.partition(" not installed")  # onnx / onnxscript may be missing too
    assert rest and "onnxruntime" in missing.split(", ") and "[ort]" in rest
    assert "onnxruntime" not in registry.default_providers("cpu", config)
    monkeypatch.setattr(registry.importlib.util, "find_spec", real)
    assert registry.unavailable_reason("onnxruntime", "cpu", config, "bf16") == "runs fp32 only, not bf16"


def test_a_provider_failing_in_the_rounds_is_dropped_and_the_others_timed(recorders):
    log, add = recorders
    add("flaky", fail_at=6)  # parity 1, warm-up 1, peak-memory step 1, then fails in round 3
    add("b")
    results = bench.run(_settings(["flaky", "b"], steps=4), stream=io.StringIO())
    rows = {r["provider"]: r for r in results["results"]}
    assert rows["flaky"]["status"] == "error" and "out of luck" in rows["flaky"]["reason"]
    assert rows["flaky"]["inference"] is None
    assert rows["b"]["status"] == "ok" and rows["b"]["inference"]["steps"] == 4
    assert rows["b"]["vs_eager"]["inference"]["rounds"] == 4
    assert bench.failed(results) == ["flaky"]


def test_hf_provider_is_unavailable_for_family_models():
    """transformers' ViT is the vanilla one: a DINOv2 / CLIP-style config is not silently
    benchmarked as a different model."""
    pytest.importorskip("transformers")
    from vit.config import get_config
    from vit.tools.bench import providers

    assert providers.unavailable_reason("hf", "cpu", get_config("vit_small_patch16_224")) is None
    reason = providers.unavailable_reason("hf", "cpu", get_config("vit_small_patch14_dinov2"))
    assert reason is not None and "init_values" in reason
    assert "pre_norm" in providers.unavailable_reason("hf", "cpu", get_config("vit_base_patch16_clip_224"))


def test_cpu_runs_keep_freed_memory_and_say_so(recorders, monkeypatch):
    """On CPU the job first asks glibc to keep freed memory (timings otherwise depend on which
    providers ran before: page faults), records whether it took, and the table says so."""
    import importlib

    run_module = importlib.import_module("vit.tools.bench.run")  # the module, not the function
    calls = []
    monkeypatch.setattr(run_module, "keep_freed_memory", lambda: calls.append(1) or True)
    results = bench.run(_settings(["eager"]), stream=io.StringIO())
    assert calls == [1]
    assert results["conditions"]["malloc_tuned"] is True
    assert "malloc: glibc keeps freed memory (mallopt)" in format_table(results)


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_takes_on_glibc_and_can_be_turned_off():
    import os
    import subprocess
    import sys

    code = "from vit.tools.bench.timing import keep_freed_memory; print(keep_freed_memory())"
    for env, want in (({}, "True"), ({"FASTVIT_BENCH_DEFAULT_MALLOC": "1"}, "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env})
        assert out.stdout.strip() == want, out.stderr
