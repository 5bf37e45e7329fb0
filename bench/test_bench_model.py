"""End-to-end ViT: inference and training-step images/s per provider, timed interleaved.

One benchmark per case (model, batch, inference or training step) runs the job of
``fastvit bench`` (``vit.tools.bench.run``) on every provider available here: ``eager``
(the reference ``vit.ViT`` in eager PyTorch with SDPA: the baseline), ``compile``
(``torch.compile``, inductor freezing for inference on CPU), ``hf`` (transformers),
``onnxruntime`` (CPU, with the ``[ort]`` extra) and the fast model under each kernel backend
that runs on this device (``fast-triton`` on CUDA, ``fast-cpp`` on CPU, ``fast-torch``).

Every provider's logits (and for training its gradients) are checked against the fp32
reference first, by the parity rule of ``vit.tools.bench``; one that fails is reported and
never timed, and the benchmark fails. The others are warmed up (compilation, autotuning,
AdamW state), then timed interleaved: each round one step of every provider in turn
(A B C A B C ...), so that the machine's drift lands on all of them alike. Per provider,
``extra_info["interleaved"]`` holds the median img/s, the median of the per-round ratios
vs eager with their quartiles and range, whether the quartiles exclude 1 (``rankable``),
peak memory and the parity figures; ``bench/report.py`` turns them into a table. The
pytest-benchmark time of these benchmarks is the whole job's (parity, warm-up, rounds),
not a speed.

CPU: inference of ViT-S/16 and a training step of ViT-Ti/16, 224 px, batch 8 and 1 (inference)
or 4 (training), fp32, ~20 s of rounds each (``timing.ROUND_TARGET_SECONDS``); compiling the
training step on CPU is left out unless FASTVIT_BENCH_FULL=1. CUDA: ViT-S/B/L at 224 (batch
256, 256, 64) and ViT-B at 384 (batch 64), bf16 autocast.
"""

import io
import os

import pytest
from benchutil import DEVICE, MALLOC_TUNED, ON_CUDA

from vit.config import get_config
from vit.model import count_flops
from vit.tools.bench import providers as registry
from vit.tools.bench.report import environment
from vit.tools.bench.run import failed, run
from vit.tools.bench.settings import make_settings

if ON_CUDA:
    CASES = [(model, batch, mode) for model, batch in
             [("vit_small_patch16_224", 256), ("vit_base_patch16_224", 256),
              ("vit_large_patch16_224", 64), ("vit_base_patch16_384", 64)]
             for mode in ("infer", "train")]
    DTYPE = "bf16"
    WARMUP = {"infer": 5, "train": 5}
else:
    # ViT-S for inference, ViT-Ti for the (3x costlier) training step
    CASES = [("vit_small_patch16_224", 8, "infer"), ("vit_small_patch16_224", 1, "infer"),
             ("vit_tiny_patch16_224", 4, "train")]
    DTYPE = "fp32"
    WARMUP = {"infer": 1, "train": 2}
# Compiling a training step on CPU costs about 75 CPU-seconds here (measured, cold cache),
# more than the rest of this file; FASTVIT_BENCH_FULL=1 includes it.
SKIP_CPU_COMPILE_TRAIN = not ON_CUDA and os.environ.get("FASTVIT_BENCH_FULL", "0") != "1"
TRAIN_FLOPS_FACTOR = 3  # backward ~ 2x forward
MODES = {"infer": "inference", "train": "train"}


def _providers(model_name: str, mode: str) -> tuple[list[str], dict[str, str]]:
    """Providers to time for a case, and why each of the others is left out."""
    cfg = get_config(model_name)
    chosen, left_out = [], {}
    # "fast" is the automatic choice among the fast-* providers: measured through them
    for name in (p for p in registry.provider_names() if p != "fast"):
        reason = registry.unavailable_reason(name, DEVICE, cfg, DTYPE)
        if reason is None and mode == "train" and not registry.get_provider(name).trains:
            reason = "runs inference only"
        if reason is None and name == "compile" and mode == "train" and SKIP_CPU_COMPILE_TRAIN:
            reason = "torch.compile of a training step on CPU: ~75 s of compilation; FASTVIT_BENCH_FULL=1 includes it"
        if reason is None:
            chosen.append(name)
        else:
            left_out[name] = reason
    return chosen, left_out


def _summary(results: dict, mode: str, items: int, flops: float) -> dict:
    """Per provider: the figures of one mode, compact enough for the JSON's extra_info."""
    out = {}
    for row in results["results"]:
        timed = row.get(mode) or {}
        spread = (row.get("vs_eager") or {}).get(mode) or {}
        worst = max(row["parity"], key=lambda c: c["max_diff"] / c["tolerance"] if c["tolerance"] else 0.0,
                    default=None)
        median = timed.get("median_s")
        out[row["provider"]] = {
            "status": row["status"], "reason": row["reason"],
            "img_per_s": items / median if median else None,
            "tflops": flops / median / 1e12 if median else None,
            "rounds": timed.get("steps"), "peak_mem_mb": timed.get("peak_mem_mb"),
            "vs_eager": {k: spread[k] for k in ("median", "q1", "q3", "min", "max", "rankable")} if spread else None,
            "parity_max_diff": worst["max_diff"] if worst else None,
            "parity_tol": worst["tolerance"] if worst else None,
        }
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2]}-{c[0]}-b{c[1]}")
def test_model(benchmark, case):
    model_name, batch, mode = case
    providers, left_out = _providers(model_name, mode)
    settings = make_settings(model=model_name, device=DEVICE.type, dtype=DTYPE, batch_size=batch,
                             warmup=WARMUP[mode], train=mode == "train", providers=providers)
    log, results = io.StringIO(), {}
    benchmark.group = f"model-{mode}-{model_name}-b{batch}-{DTYPE}"
    benchmark.pedantic(lambda: results.update(run(settings, stream=log, modes=[MODES[mode]])),
                       rounds=1, iterations=1, warmup_rounds=0)
    flops = count_flops(settings.config) * batch * (TRAIN_FLOPS_FACTOR if mode == "train" else 1)
    machine = environment(DEVICE)["machine"]
    benchmark.extra_info.update(
        provider="interleaved", device=machine.get("gpu", "cpu"), model=model_name, batch_size=batch,
        dtype=DTYPE, mode=mode, threads=machine["torch_threads"], cpu_flags=machine["cpu_flags"],
        malloc_tuned=MALLOC_TUNED, memory_kind=results["conditions"]["memory_kind"],
        interleaved=_summary(results, MODES[mode], batch, flops), left_out=left_out)
    bad = failed(results)
    if bad:
        pytest.fail(f"{', '.join(bad)} failed parity or could not run; not timed:\n{log.getvalue()}")
