"""The plan: sections in order, each with a time budget, and the deadline they share."""

from __future__ import annotations

import time
from dataclasses import dataclass

# Seconds. The GPU plan fits 8 minutes of wall time with ~25 s for interpreter start-up,
# imports and the final writes; the smoke plan fits CI's ~2 minutes on a 2-core machine.
GPU_DEADLINE_S, SMOKE_DEADLINE_S = 455.0, 150.0
H200_BF16_DENSE_TFLOPS = 989.0   # datasheet (H200.md): the MFU denominator on CUDA

GPU_BUDGETS = {
    "env": 15,        # copy bandwidth and GEMM ceilings: a few ms each, plus CUDA start-up
    "tests": 100,     # JIT compiles of every tested kernel variant (no autotuning: FASTVIT_AUTOTUNE=0)
    "ops-B": 70,      # includes the autotuning of every ViT-B key (~9 GEMM configs per key)
    "e2e-B": 130,     # torch.compile(reference) inference + train compiles dominate
    "compile": 45,    # inductor on the fast ViT-B, fullgraph
    "varlen": 30,     # one mixed-size batch, 5 paths: Triton compiles + one autotuning of the varlen kernel
    "ops-L": 25,
    "e2e-L": 35,
    "autotune": 5,
}
SMOKE_BUDGETS = {"env": 5, "tests": 50, "ops-B": 25, "e2e-B": 25, "compile": 20, "varlen": 10, "ops-L": 10,
                 "e2e-L": 10, "autotune": 5}
SECTIONS = list(GPU_BUDGETS)
WHAT = {
    "env": "device, versions, commit; copy bandwidth and bf16 GEMM rate measured",
    "tests": "pytest: Triton op tests + fast-model tests (bf16/fp16, opcheck), subprocess",
    "ops-B": "per-op fwd (b256), fwd+bwd (b128) at ViT-B/16 vs F.layer_norm, gelu(linear), SDPA, ...",
    "e2e-B": "ViT-B/16 img/s: fast vs eager vs compile(reference) vs HF; parity first",
    "compile": "torch.compile(fast ViT-B, fullgraph) vs fp32 reference by value",
    "varlen": "64 mixed-size images (128-384 px), ViT-B/16: packed varlen vs padded+mask vs resize-to-224",
    "ops-L": "per-op at ViT-L/16",
    "e2e-L": "ViT-L/16 img/s: fast vs eager vs HF",
    "autotune": "the autotuners' chosen config per kernel and key",
}


class SectionTimeout(Exception):
    """Raised (from a timer signal) inside a section that ran past its budget."""


@dataclass
class Deadline:
    """A global deadline and the current section's; times from time.monotonic()."""

    end: float
    section_end: float = float("inf")

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    def left(self) -> float:
        """Seconds left to the nearer of the two deadlines (never negative)."""
        return max(0.0, min(self.end, self.section_end) - time.monotonic())

    def global_left(self) -> float:
        return max(0.0, self.end - time.monotonic())

    def start_section(self, budget: float) -> float:
        """Open a section of ``budget`` seconds, cut to the global deadline; returns its length."""
        length = max(0.0, min(budget, self.global_left()))
        self.section_end = time.monotonic() + length
        return length

    def allows(self, estimate_s: float) -> bool:
        """Whether an item expected to take ``estimate_s`` seconds fits in what is left."""
        return self.left() >= estimate_s


def format_plan(budgets: dict, deadline_s: float) -> str:
    lines = [f"plan (global deadline {deadline_s:.0f} s):"]
    total = 0
    for name, budget in budgets.items():
        total += budget
        lines.append(f"  {name:<9s} {budget:4.0f} s  (by {total:4.0f} s)  {WHAT.get(name, '')}")
    return "\n".join(lines)
