"""Issue 15's targets, evaluated on whatever results exist so far (pure functions)."""

from __future__ import annotations

SDPA_BACKENDS = ("sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")


def _op(results: dict, op: str, shape: str, direction: str = "fwd") -> dict | None:
    return next((c for c in results.get("ops", [])
                 if c["op"] == op and c["shape"] == shape and c["direction"] == direction), None)


def _median(case: dict | None, provider: str) -> float | None:
    p = (case or {}).get("providers", {}).get(provider, {})
    return p.get("median_us")


def _e2e(results: dict, model: str, mode: str, provider: str) -> dict | None:
    return next((r for r in results.get("e2e", []) if r["model"] == model and r["mode"] == mode
                 and r["provider"] == provider and r.get("status") == "ok"), None)


def _ratio(num, den):
    return None if num is None or den is None or den == 0 else num / den


def _row(target: str, value, needed: float | None, text: str, higher_is_better: bool = True) -> dict:
    if value is None:
        verdict = "not measured"
    elif needed is None:
        verdict = "reported"
    elif (value >= needed) if higher_is_better else (value <= needed):
        verdict = "met"
    else:
        verdict = f"missed by {abs(value - needed) / needed:.0%}"
    return {"target": target, "value": value, "needed": text, "verdict": verdict}


def evaluate(results: dict, model: str = "vit_b16") -> list[dict]:
    """One row per target: the measured value, what is needed and met / missed / not measured."""
    rows = []
    fast_inf = _e2e(results, model, "inference", "fast")
    for base, need in (("eager", 1.3), ("compile", 1.1), ("hf", 1.3)):
        other = _e2e(results, model, "inference", base)
        value = _ratio(fast_inf and fast_inf["img_per_s"], other and other["img_per_s"])
        rows.append(_row(f"{model} inference fast / {base}", value, need, f">= {need}x"))
    rows.append(_row(f"{model} inference MFU (fast)", fast_inf and fast_inf.get("mfu"), None, "reported"))
    fast_tr, eager_tr = _e2e(results, model, "train", "fast"), _e2e(results, model, "train", "eager")
    rows.append(_row(f"{model} train fast / eager", _ratio(fast_tr and fast_tr["img_per_s"],
                                                           eager_tr and eager_tr["img_per_s"]), 1.2, ">= 1.2x"))
    rows.append(_row(f"{model} train peak memory fast / eager",
                     _ratio(fast_tr and fast_tr.get("peak_mem_mb"), eager_tr and eager_tr.get("peak_mem_mb")),
                     1.0, "< 1.0", higher_is_better=False))

    attn = _op(results, "attention", "256x12x197x64")
    sdpa = [t for t in (_median(attn, b) for b in SDPA_BACKENDS) if t is not None]
    rows.append(_row("attention fwd 256x12x197x64: best SDPA time / fast time",
                     _ratio(min(sdpa) if sdpa else None, _median(attn, "fast")), 1.0, ">= 1.0x"))
    long = _op(results, "attention", "32x16x1025x64")
    rows.append(_row("attention fwd 32x16x1025x64 TFLOP/s (fast)",
                     ((long or {}).get("providers", {}).get("fast") or {}).get("tflops"), 300.0, ">= 300"))

    copy = results.get("env", {}).get("copy_gb_per_s")
    for op in ("layer_norm", "add_layer_norm"):
        case = _op(results, op, model)
        gbs = ((case or {}).get("providers", {}).get("fast") or {}).get("gb_per_s")
        rows.append(_row(f"{op} fwd {model}: fast GB/s / copy GB/s", _ratio(gbs, copy), 0.85, ">= 0.85"))
    lg = _op(results, "linear_gelu", model)
    rows.append(_row(f"linear_gelu fwd {model}: gelu(linear) time / fast time",
                     _ratio(_median(lg, "eager"), _median(lg, "fast")), 1.2, ">= 1.2x"))
    rows.append(_row(f"linear_gelu fwd {model}: bare F.linear time / fast time",
                     _ratio(_median(lg, "linear"), _median(lg, "fast")), 1 / 1.1, ">= 0.91x (within 10%)"))
    return rows
