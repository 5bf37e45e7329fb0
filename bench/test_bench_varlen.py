"""Mixed-resolution batches (issue 20): packed varlen vs padded-to-max with a mask vs resize-to-224.

The job is ``bench/gpu_check/varlen.py`` (also the GPU check's ``varlen`` section): one batch of
images of random sizes and aspect ratios through the same weights as a packed list (fast
model: ``varlen_packed_attention``; reference: SDPA per image), padded to the longest image
with a key mask (reference layers, SDPA), and resized to 224 x 224 (fast and reference). The
packed and padded logits are checked against each image run alone first; the paths are
timed interleaved. ``extra_info["varlen"]`` holds img/s, tokens/s (real tokens; 197 per image
for resize) and the parity figures; the pytest-benchmark time is the whole job's.

Caveat: resize (to 224 x 224) changes the input (aspect ratio, detail); it is not the same computation.

CPU: ViT-S/16, 8 images with sides 64 to 256 px, fp32, 7 rounds (about a minute here).
CUDA: ViT-B/16, 64 images with sides 128 to 384 px, bf16 autocast, 20 rounds.
"""

import pytest
import torch
from benchutil import DEVICE, MALLOC_TUNED, ON_CUDA
from gpu_check import varlen
from gpu_check.record import varlen_table

from vit.config import get_config
from vit.tools.bench.report import environment

if ON_CUDA:
    CASE = dict(model="vit_base_patch16_224", n=64, lo=128, hi=384, dtype=torch.bfloat16, rounds=20, warmup=3)
else:
    CASE = dict(model="vit_small_patch16_224", n=8, lo=64, hi=256, dtype=torch.float32, rounds=7, warmup=1)


def test_varlen_batch(benchmark):
    config = get_config(CASE["model"])
    result = {}
    benchmark.group = f"varlen-{CASE['model']}-n{CASE['n']}-{CASE['lo']}to{CASE['hi']}px"
    benchmark.pedantic(lambda: result.update(varlen.run(
        config, n=CASE["n"], lo=CASE["lo"], hi=CASE["hi"], device=DEVICE, dtype=CASE["dtype"],
        rounds=CASE["rounds"], warmup=CASE["warmup"])), rounds=1, iterations=1, warmup_rounds=0)
    machine = environment(DEVICE)["machine"]
    benchmark.extra_info.update(
        provider="interleaved", device=machine.get("gpu", "cpu"), model=CASE["model"], threads=machine["torch_threads"],
        cpu_flags=machine["cpu_flags"], malloc_tuned=MALLOC_TUNED, varlen=result)
    print("\n" + "\n".join(varlen_table(result)))
    bad = [name for name, row in result["results"].items() if row["parity"] is not None and not row["parity"]["ok"]]
    if bad:
        pytest.fail(f"{', '.join(bad)}: logits differ from each image run alone: {result['results']}")
