"""The sections, in the order plan.SECTIONS runs them; each returns a one-line note."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vit.config import get_config

from . import checks, e2e, ops, varlen
from .plan import H200_BF16_DENSE_TFLOPS, Deadline

# GPU shapes (bf16): ViT-B/16 and ViT-L/16, forwards at batch 256 and forward + backward at 128
# (the end-to-end inference and training batches: GEMM autotuning keys on M, and these share
# the end-to-end runs' keys, so each is tuned once); issue 15's attention cases.
VIT_B = ops.Shapes("vit_b16", batch=256, train_batch=128, img=224, patch=16, dim=768, hidden=3072, heads=12)
VIT_L = ops.Shapes("vit_l16", batch=256, train_batch=128, img=224, patch=16, dim=1024, hidden=4096, heads=16)
ATTN_B = [(256, 12, 197, 64), (32, 16, 1025, 64)]
ATTN_L = [(128, 16, 197, 64)]
# --smoke: tiny shapes in fp32 (the interpreter has no bf16 dot), one round.
TINY = ops.Shapes("vit_b16", batch=2, train_batch=1, img=32, patch=16, dim=32, hidden=64, heads=2)
TINY_L = ops.Shapes("vit_l16", batch=1, train_batch=1, img=32, patch=16, dim=32, hidden=64, heads=2)
SMOKE_ESTIMATES = {"eager": 0.5, "fast": 0.5, "hf": 0.5}
TINY_MODEL = dict(img_size=32, depth=1, embed_dim=32, num_heads=2, num_classes=10)


@dataclass
class Context:
    rec: object
    deadline: Deadline
    smoke: bool
    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.smoke else torch.bfloat16


def env(ctx: Context) -> str:
    info = checks.environment(ctx.device)
    # MFU over the datasheet's dense bf16 peak on H100/H200; elsewhere over the GEMM rate measured below
    hopper = any(name in info["device"] for name in ("H100", "H200"))
    info["peak_tflops"] = H200_BF16_DENSE_TFLOPS if hopper and not ctx.smoke else None
    ctx.rec.results["env"].update(info)
    ctx.rec.save()
    ctx.rec.results["env"].update(checks.ceilings(ctx.device, ctx.smoke))
    env = ctx.rec.results["env"]
    return f"{env['device']}: copy {env['copy_gb_per_s']:.0f} GB/s, GEMM {env['gemm_tflops']:.0f} TFLOP/s"


def tests(ctx: Context) -> str:
    out = ctx.rec.out
    result = checks.run_tests(out, max(ctx.deadline.left() - 2, 1), ctx.smoke, ctx.rec.log)
    ctx.rec.results["tests"] = result
    bad = result["counts"].get("failed", 0) + result["counts"].get("error", 0)
    note = f"{result['counts']}"
    if result.get("timed_out"):
        return f"TIMED OUT after {result['elapsed_s']:.0f} s: {note}"
    return f"FAILED {note}" if bad or result["returncode"] not in (0, 5) else note


def _ops(ctx: Context, shapes, attention) -> str:
    rounds = 1 if ctx.smoke else 15
    done = skipped = 0
    # every forward first: they carry issue 15's targets; then forward + backward
    for direction in ("fwd", "fwd+bwd"):
        batch = shapes.batch if direction == "fwd" else shapes.train_batch
        for op, shape, make in ops.cases(replace(shapes, batch=batch), ctx.device, ctx.dtype, attention):
            if not ctx.deadline.allows(1 if ctx.smoke else 4):
                ctx.rec.results["ops"].append({"op": op, "shape": shape, "case": f"{op} {shape}",
                                               "direction": direction, "providers": {}, "skipped": "budget"})
                skipped += 1
                continue
            row = ops.run_case(op, shape, make, direction, ctx.device, rounds)
            row["batch"] = None if op == "attention" else batch
            ctx.rec.results["ops"].append(row)
            ctx.rec.save()
            ctx.rec.log(f"op {op} {shape} {direction}: " + ", ".join(
                f"{n} {p['median_us']:.1f}us" if "median_us" in p else f"{n} error"
                for n, p in row["providers"].items()))
            done += 1
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    return f"{done} cases timed, {skipped} skipped (budget)"


def ops_b(ctx: Context) -> str:
    return _ops(ctx, TINY if ctx.smoke else VIT_B, [(2, 2, 5, 16)] if ctx.smoke else ATTN_B)


def ops_l(ctx: Context) -> str:
    return _ops(ctx, TINY_L if ctx.smoke else VIT_L, [] if ctx.smoke else ATTN_L)


def _e2e(ctx: Context, label: str, preset: str, providers: list[str], estimates: dict) -> str:
    if ctx.smoke:
        config = get_config("vit_tiny_patch16_224", **TINY_MODEL)
        batches, steps, warmup = {"inference": 2, "train": 2}, 1, 1
    else:
        config = get_config(preset)
        batches, steps, warmup = {"inference": 256, "train": 128}, 20, 3
    peak = ctx.rec.results["env"].get("peak_tflops") or ctx.rec.results["env"].get("gemm_tflops") or 1.0
    e2e.run_model(ctx.rec, ctx.deadline, label=label, config=config, providers=providers, dtype=ctx.dtype,
                  device=ctx.device, batches=batches, steps=steps, warmup=warmup, peak_tflops=peak,
                  estimates=estimates)
    rows = [r for r in ctx.rec.results["e2e"] if r["model"] == label]
    bad = [f"{r['mode']} {r['provider']}" for r in rows if r["status"] in ("parity-failed", "error")]
    note = f"{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} timed"
    return f"FAILED {', '.join(bad)}; {note}" if bad else note


def e2e_b(ctx: Context) -> str:
    # the smoke's compile provider would cost a minute of C++ compiles on CPU: left out there
    providers = ["eager", "fast", "hf"] + ([] if ctx.smoke else ["compile"])
    return _e2e(ctx, "vit_b16", "vit_base_patch16_224", providers,
                {"eager": 3, "fast": 20, "hf": 5, "compile": 50} if not ctx.smoke else SMOKE_ESTIMATES)


def e2e_l(ctx: Context) -> str:
    return _e2e(ctx, "vit_l16", "vit_large_patch16_224", ["eager", "fast", "hf"],
                {"eager": 4, "fast": 15, "hf": 5} if not ctx.smoke else SMOKE_ESTIMATES)


def compile_check(ctx: Context) -> str:
    if ctx.smoke:  # aot_eager: the same fullgraph trace and fake-tensor / autograd paths, no C++ build
        config, backend = get_config("vit_tiny_patch16_224", **TINY_MODEL), "aot_eager"
    else:
        config, backend = get_config("vit_base_patch16_224"), "inductor"
    result = checks.compile_fast_model(config, ctx.device, ctx.dtype, backend)
    ctx.rec.results["compile"] = result
    note = f"{backend} fullgraph: max|diff| {result['max_diff_vs_fp32']:.2e} (tol {result['tolerance']:.2e}), " \
           f"compile {result['compile_s']} s"
    return note if result["ok"] else f"FAILED {note} {result['detail']}"


def varlen_batch(ctx: Context) -> str:
    """Issue 20: a mixed-size batch packed (varlen) vs padded with a mask vs resized to 224."""
    if ctx.smoke:  # the interpreter: a tiny model and three small images, one round
        config = get_config("vit_tiny_patch16_224", **TINY_MODEL)
        shape = dict(n=3, lo=16, hi=48, rounds=1, warmup=0)
    else:
        config = get_config("vit_base_patch16_224")
        shape = dict(n=64, lo=128, hi=384, rounds=10, warmup=2)
    result = varlen.run(config, device=ctx.device, dtype=ctx.dtype, **shape)
    ctx.rec.results["varlen"] = result
    ctx.rec.save()
    rows = result["results"]
    bad = [n for n, r in rows.items() if r["parity"] is not None and not r["parity"]["ok"]]
    note = ", ".join(f"{n} {r['img_per_s']:.0f} img/s" for n, r in rows.items())
    return f"FAILED parity {', '.join(bad)}; {note}" if bad else note


def autotune(ctx: Context) -> str:
    ctx.rec.results["autotune"] = checks.autotune_choices()
    return f"{len(ctx.rec.results['autotune'])} kernel/key rows"


SECTION_FUNCS = {"env": env, "tests": tests, "ops-B": ops_b, "e2e-B": e2e_b, "compile": compile_check,
                 "varlen": varlen_batch, "ops-L": ops_l, "e2e-L": e2e_l, "autotune": autotune}
