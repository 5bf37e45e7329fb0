"""`fastvit bench` / `fastvit train` / the provider registry, on tiny models.

`fastvit bench` runs end to end here (parity, timing, table, results.json, PNG) on
ViT-Ti at 32x32 pixels (5 tokens), a few steps per provider.
"""

import copy
import io
import json
import sys

import pytest
import torch
from torch import nn

import vit.tools.cli as cli
from vit import ViT, get_config
from vit.tools import bench
from vit.tools.bench import providers as registry

TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch-size", "2",
        "--steps", "2", "--warmup", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


class _OffByOne(nn.Module):
    """The reference plus a constant: plausible-looking logits that are wrong."""

    def __init__(self, reference):
        super().__init__()
        self.module = copy.deepcopy(reference)
        self.calls = 0

    def forward(self, images):
        self.calls += 1
        return self.module(images) + 1e-2


@pytest.fixture
def injected():
    """Register test providers, and remove them whatever happens."""
    names = []

    def add(name, build, **kwargs):
        registry.register_provider(name, build, default=False, **kwargs)
        names.append(name)

    yield add
    for name in names:
        registry.unregister_provider(name)


def test_bench_tiny_model_end_to_end(tmp_path, device):
    code, out, err = _run(["bench", *TINY, "--device", str(device), "--providers", "eager,hf,fast-torch",
                           "--out", str(tmp_path)])
    assert code == 0, err
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["provider"]: r for r in results["results"]}
    assert list(rows) == ["eager", "hf", "fast-torch"]
    for row in rows.values():
        assert row["status"] == "ok", row  # transformers and vit.fast are always installed
        inf = row["inference"]
        assert inf["steps"] == 2 and len(inf["times_s"]) == 2 and all(t > 0 for t in inf["times_s"])
        assert inf["img_per_s"] == pytest.approx(2 / inf["median_s"])
        logits = row["parity"][0]
        assert logits["what"] == "logits" and logits["ok"] and logits["max_diff"] <= logits["tolerance"]
        # vs eager: the median of the per-round ratios of the interleaved rounds
        spread = row["vs_eager"]["inference"]
        ratios = [e / t for e, t in zip(rows["eager"]["inference"]["times_s"], inf["times_s"])]
        assert spread["ratios"] == pytest.approx(ratios) and spread["rounds"] == 2
        assert row["speedup_vs_eager"]["inference"] == spread["median"]
        assert spread["min"] <= spread["q1"] <= spread["median"] <= spread["q3"] <= spread["max"]
        assert row["train"] is None and row["setup_s"] > 0
    assert rows["eager"]["parity"][0]["max_diff"] == 0.0
    assert rows["eager"]["vs_eager"]["inference"]["ratios"] == [1.0, 1.0]
    assert "interleaved" in results["conditions"]["timing"]
    cond = results["conditions"]
    assert (cond["model"], cond["img_size"], cond["batch_size"], cond["dtype"]) == \
        ("vit_tiny_patch16_224", [32, 32], 2, "fp32")
    assert results["versions"]["torch"] == torch.__version__ and results["date"]
    assert results["machine"]["cpu_count"] >= 1
    # the printed table has one line per provider, with img/s and the ratio for timed ones
    table = out[out.index("provider "):]
    eager_line = next(line for line in table.splitlines() if line.startswith("eager "))
    assert "1.00x" in eager_line and "ok" in eager_line and "baseline" in eager_line
    assert "1.00-1.00" in eager_line  # eager against itself: IQR exactly 1
    assert "interleaved: 2 rounds" in out and "cpu: " in out and "flags:" in out
    assert "inference" in err  # the progress bars
    pytest.importorskip("matplotlib")
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_broken_provider_fails_parity_and_is_not_timed(tmp_path, injected, device):
    built = []

    def build(reference):
        built.append(_OffByOne(reference))
        return built[-1]

    add = injected
    add("off-by-one", build)
    add("nan", lambda ref: _NaN(ref))
    code, out, err = _run(["bench", *TINY, "--device", str(device), "--providers", "off-by-one,nan",
                           "--out", str(tmp_path)])
    assert code == 1
    assert "off-by-one" in err and "failed parity" in err
    rows = {r["provider"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    assert rows["eager"]["status"] == "ok" and rows["eager"]["inference"] is not None
    broken = rows["off-by-one"]
    assert broken["status"] == "parity-failed"
    assert broken["inference"] is None and broken["speedup_vs_eager"] == {}
    assert broken["parity"][0]["max_diff"] == pytest.approx(1e-2, rel=1e-3)
    assert broken["parity"][0]["max_diff"] > broken["parity"][0]["tolerance"]
    assert "max |diff|" in broken["reason"]
    assert len(built) == 1 and built[0].calls == 1  # built once for parity, never timed
    assert rows["nan"]["status"] == "parity-failed" and "NaN" in rows["nan"]["reason"]
    line = next(line for line in out.splitlines() if line.startswith("off-by-one "))
    assert "parity-failed" in line and "1.00e-02" in line


class _NaN(nn.Module):
    def __init__(self, reference):
        super().__init__()
        self.module = copy.deepcopy(reference)

    def forward(self, images):
        out = self.module(images)
        return out.masked_fill(torch.rand_like(out) < 0.5, float("nan"))


def test_bench_train_checks_gradients(tmp_path, injected, device):
    class FrozenHead(_OffByOne):
        """Right logits, but no gradient reaches the head: a training bug to catch."""

        def forward(self, images):
            features = self.module.forward_head(self.module.forward_features(images), pre_logits=True)
            head = self.module.head
            return features @ head.weight.detach().T + head.bias.detach()

    injected("frozen-head", lambda ref: FrozenHead(ref))
    code, out, err = _run(["bench", *TINY, "--device", str(device), "--train",
                           "--providers", "frozen-head", "--out", str(tmp_path)])
    assert code == 1
    rows = {r["provider"]: r for r in json.loads((tmp_path / "results.json").read_text())["results"]}
    eager = rows["eager"]
    assert [p["what"] for p in eager["parity"]] == ["logits", "gradients"]
    assert eager["train"]["steps"] == 2 and eager["train"]["img_per_s"] > 0
    assert eager["speedup_vs_eager"] == {"inference": 1.0, "train": 1.0}
    frozen = rows["frozen-head"]
    assert frozen["status"] == "parity-failed" and frozen["train"] is None
    assert frozen["parity"][0]["ok"] and not frozen["parity"][1]["ok"]


def test_low_precision_tolerance_is_twice_the_references_own_error():
    hi = torch.randn(4, 10, dtype=torch.float64)
    lowp = hi + 1e-1 * torch.randn_like(hi)
    base = (lowp - hi).abs().max().item()
    tol = bench.tolerance(hi, lowp, torch.bfloat16)
    assert tol == pytest.approx(2 * base + torch.finfo(torch.bfloat16).eps * hi.abs().max().item())
    assert bench.compare(lowp, hi, tol).ok
    assert not bench.compare(hi + 3 * base, hi, tol).ok
    assert bench.tolerance(hi, None, torch.float32) == pytest.approx(bench.FP32_RTOL * hi.abs().max().item())
    with pytest.raises(ValueError, match="low-precision reference"):
        bench.tolerance(hi, None, torch.float16)
    assert not bench.compare(hi[:2], hi, tol).ok  # wrong shape never passes


def test_hf_provider_has_the_reference_weights(device):
    pytest.importorskip("transformers")
    cfg = get_config("vit_tiny_patch16_224", img_size=32, depth=2)
    reference = ViT(cfg).to(device).eval()
    with torch.no_grad():  # non-default LayerNorm and bias values, so a swapped key shows
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hf = registry.get_provider("hf").build(reference)
    images = torch.randn(3, 3, 32, 32, device=device)
    with torch.no_grad():
        expected, got = reference(images), hf(images)
    assert (got - expected).abs().max().item() <= bench.FP32_RTOL * expected.abs().max().item()


def test_settings_defaults_and_validation():
    settings = bench.make_settings(device="cpu")
    assert (settings.model, settings.dtype, settings.batch_size) == ("vit_small_patch16_224", "fp32", 8)
    assert settings.providers[0] == "eager" and "fast-triton" not in settings.providers
    compile_ok = registry.unavailable_reason("compile", "cpu", settings.config) is None
    assert ("compile" in settings.providers) == compile_ok  # a default wherever it can run
    assert "compile" in registry.default_providers("cuda", settings.config)
    assert bench.make_settings(device="cpu", providers="hf").providers == ["eager", "hf"]
    with pytest.raises(ValueError, match="unknown provider 'nope'"):
        bench.make_settings(device="cpu", providers="eager,nope")
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
        bench.make_settings(device="cpu", batch_size=0)
    with pytest.raises(ValueError, match="dtype must be one of"):
        bench.make_settings(device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        bench.make_settings(device="cpu", img_size=30)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            bench.make_settings(device="cuda")


def test_registry_rejects_duplicates_and_bad_names(injected):
    injected("dup", lambda ref: ref)
    with pytest.raises(ValueError, match="already registered"):
        registry.register_provider("dup", lambda ref: ref)
    with pytest.raises(ValueError, match="without commas"):
        registry.register_provider("a,b", lambda ref: ref)
    with pytest.raises(TypeError, match="build must be callable"):
        registry.register_provider("x", None)


def test_cli_errors_are_clear(tmp_path):
    code, _, err = _run(["bench", "--batch-size", "0", "--out", str(tmp_path)])
    assert code == 2 and "batch_size must be a positive integer, got 0" in err
    code, out, _ = _run(["bench", "--list-providers", "--device", "cpu"])
    assert code == 0 and "eager" in out and "fast-triton" in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "--model", "vit_gigantic"], stdout=io.StringIO(), stderr=io.StringIO())


def test_train_passes_every_argument_through(monkeypatch):
    seen = []
    fake = type(sys)("vit.tools.train")
    fake.main = lambda argv=None: seen.append(argv) or 7
    monkeypatch.setitem(sys.modules, "vit.tools.train", fake)
    argv = ["--steps", "3", "--help", "bench", "--out=x"]
    assert cli.main(["train", *argv]) == 7
    assert seen == [argv]

