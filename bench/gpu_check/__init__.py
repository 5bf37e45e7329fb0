"""``make gpu-check``: one command that spends a lent GPU well (issue 14, part 2).

    python -m bench.gpu_check --out DIR            # CUDA GPU, <= 8 minutes, one process tree
    python -m bench.gpu_check --out DIR --smoke    # CPU (Triton interpreter), ~1-2 minutes, in CI

What runs, in this order (most valuable first; ``plan.py`` holds the budgets):

1. env      device, versions, commit; the copy-bandwidth and bf16-GEMM ceilings measured here
2. tests    the CUDA tests (Triton ops, fast model, opcheck), pytest in a subprocess with a timeout
3. ops-B    per-op fwd and fwd+bwd at ViT-B/16 shapes vs what each op replaces (+ issue-15 attention)
4. e2e-B    ViT-B/16 img/s: fast vs eager vs torch.compile(reference) vs Hugging Face, parity first
5. compile  one fullgraph torch.compile of the fast model (inductor), compared by value to eager
6. varlen   64 mixed-size images (issue 20): packed varlen vs padded with a mask vs resize-to-224
7. ops-L    per-op at ViT-L/16 shapes
8. e2e-L    ViT-L/16 img/s (no torch.compile: its compile costs minutes)
9. autotune the autotuners' chosen config per kernel and key

Each section runs under its own budget and the global deadline; one that does not fit, or
overruns, is recorded as skipped or timed out, never dropped. Everything lands in DIR:
``gpu_check.json`` (all numbers), ``summary.md`` (ratios, issue-15 targets met/missed),
``log.txt`` and ``pytest.txt``; all are rewritten or flushed as each result comes in, so a
kill at any point leaves a valid partial record.

On a lent GPU (the device tool; no internet, torch + triton preinstalled, no .git there):

    FASTVIT_COMMIT=<sha> PYTHONPATH=. PYTHONUNBUFFERED=1 python3 -m bench.gpu_check --out $OUT/gpu

(``make gpu-check OUT=$OUT/gpu`` is the same); the exit status is 1 if a test, a parity check
or the compile check failed. ``--deadline S`` cuts a shorter rerun.

This package must not import torch or triton at import time: ``--smoke`` sets
TRITON_INTERPRET before either is imported.
"""
