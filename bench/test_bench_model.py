"""End-to-end ViT: inference and training-step images/s and peak memory, per provider.

Providers (``vit.tools.bench.providers``, the same ones ``fastvit bench`` runs): ``eager`` (the
reference ``vit.ViT`` in eager PyTorch with SDPA attention: the baseline), ``compile``
(``torch.compile`` of it), ``hf`` (transformers' ViTForImageClassification with the same
weights), and the fast model under each kernel backend that runs on this device
(``fast-triton`` on CUDA, ``fast-cpp`` on CPU, ``fast-torch``).

Every provider's logits (and for training its gradients) are checked against the fp32
reference first, by the parity rule of ``vit.tools.bench``; a provider that fails is reported
as a failed test and never timed. Warm-up steps (compilation, autotuning, AdamW state)
run before the measurement; ``benchutil.measure`` synchronizes CUDA.

extra_info: ``img_per_s``; ``tflops`` (forward FLOPs from ``vit.count_flops``, x3 for a
training step); ``peak_mem_mb``: memory this provider adds above what was allocated
before it was built (CUDA: allocated bytes; CPU: peak RSS growth, approximate);
``parity_max_diff`` / ``parity_tol`` against the fp32 reference.

CPU: inference of ViT-S/16 and a training step of ViT-Ti/16, 224 px, batch 4, fp32, few
rounds (a few minutes on 2 cores, most of it torch.compile compiling; compiling the
training step is left out unless FASTVIT_BENCH_FULL=1). CUDA: ViT-S/B/L at 224 (batch 256, 256, 64) and ViT-B at
384 (batch 64), bf16 autocast.
"""

import os

import pytest
import torch
from benchutil import DEVICE, ON_CUDA, measure

from vit.config import get_config
from vit.model import ViT, count_flops
from vit.tools import bench as vb
from vit.tools.bench import providers as registry

if ON_CUDA:
    CASES = [(model, batch, mode) for model, batch in
             [("vit_small_patch16_224", 256), ("vit_base_patch16_224", 256),
              ("vit_large_patch16_224", 64), ("vit_base_patch16_384", 64)]
             for mode in ("infer", "train")]
    DTYPE = "bf16"
    ROUNDS = {"infer": 30, "train": 20}
    WARMUP = {"infer": 5, "train": 5}
else:
    # ViT-S for inference, ViT-Ti for the (3x costlier) training step
    CASES = [("vit_small_patch16_224", 4, "infer"), ("vit_tiny_patch16_224", 4, "train")]
    DTYPE = "fp32"
    ROUNDS = {"infer": 5, "train": 3}
    WARMUP = {"infer": 1, "train": 2}
# Compiling a training step on CPU costs about 75 CPU-seconds here (measured, cold cache),
# more than the rest of this file; FASTVIT_BENCH_FULL=1 includes it.
SKIP_CPU_COMPILE_TRAIN = not ON_CUDA and os.environ.get("FASTVIT_BENCH_FULL", "0") != "1"
# "fast" is the automatic choice among the fast-* providers: measured through them
PROVIDERS = [p for p in registry.provider_names() if p != "fast"]
TRAIN_FLOPS_FACTOR = 3  # backward ~ 2x forward

_case_cache: dict = {}


def _case(model_name: str, batch: int, train: bool):
    """Reference model, inputs and its outputs for one case (only the latest one kept)."""
    key = (model_name, batch, train)
    if key not in _case_cache:
        _case_cache.clear()
        vb.release_memory(DEVICE)
        torch.manual_seed(0)
        cfg = get_config(model_name)
        reference = ViT(cfg).to(DEVICE).eval()
        images = torch.randn(batch, cfg.in_chans, *cfg.img_hw, device=DEVICE)
        labels = torch.randint(0, cfg.num_classes, (batch,), device=DEVICE)
        ref = vb.reference_outputs(reference, images, labels, vb.DTYPES[DTYPE], with_grads=train)
        _case_cache[key] = (cfg, reference, ref)
    return _case_cache[key]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2]}-{c[0]}-b{c[1]}")
def test_model(benchmark, case, provider):
    model_name, batch, mode = case
    cfg = get_config(model_name)
    reason = registry.unavailable_reason(provider, DEVICE, cfg, DTYPE)
    if reason:
        pytest.skip(reason)
    if mode == "train" and not registry.get_provider(provider).trains:
        pytest.skip(f"{provider} runs inference only")
    if provider == "compile" and mode == "train" and SKIP_CPU_COMPILE_TRAIN:
        pytest.skip("torch.compile of a training step on CPU: ~75 s of compilation; "
                    "set FASTVIT_BENCH_FULL=1 to include it")
    dtype = vb.DTYPES[DTYPE]
    cfg, reference, ref = _case(model_name, batch, mode == "train")
    spec = registry.get_provider(provider)

    module = spec.build(reference)
    checks = vb.check_parity(module, ref, dtype, spec.context)
    module = None
    bad = [c for c in checks if not c.ok]
    if bad:
        pytest.fail(f"{provider} fails parity, not timed: {'; '.join(c.detail for c in bad)}")

    memory = vb.PeakMemory(DEVICE)
    memory.baseline()
    module = spec.build(reference)
    if mode == "infer":
        step = vb.inference_step(module, ref.images, dtype, spec.context)
    else:
        step = vb.train_step(module, ref.images, ref.labels, dtype, spec.context)
    for _ in range(WARMUP[mode]):  # compilation, autotuning and optimizer state: not timed
        step()
    memory.start()
    flops = count_flops(cfg) * batch * (TRAIN_FLOPS_FACTOR if mode == "train" else 1)
    measure(benchmark, step, provider=provider, group=f"model-{mode}-{model_name}-b{batch}-{DTYPE}",
            flops=flops, items=batch, rounds=ROUNDS[mode], warmup=0)
    peak = memory.stop()
    worst = max(checks, key=lambda c: c.max_diff / c.tolerance if c.tolerance else 0.0)
    benchmark.extra_info.update(
        model=model_name, batch_size=batch, dtype=DTYPE, mode=mode, peak_mem_mb=peak,
        peak_mem_kind=memory.kind, parity_max_diff=worst.max_diff, parity_tol=worst.tolerance)
    module = step = None
    vb.release_memory(DEVICE)
