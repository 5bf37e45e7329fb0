"""The results of ``fastvit bench``: environment record, text table, bar chart, results.json."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from vit._io import atomic_write_text


def _version(module: str) -> str | None:
    from importlib import metadata

    for dist in (module, module.replace("_", "-")):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# the /proc/cpuinfo flags that decide which GEMM / vector kernels a CPU gets
_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_bf16", "amx_int8")


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [f for f in _CPU_FLAGS if f in present]
    except OSError:
        pass
    return []


def _cpu_capability() -> str | None:
    """What PyTorch's CPU kernels were dispatched to (e.g. AVX512), None where torch cannot say."""
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        return None


def cpu_line(machine: dict | None = None) -> str:
    """One line: CPU model, its vector/matrix flags and torch's CPU capability."""
    machine = machine or {"cpu": _cpu_name(), "cpu_flags": _cpu_flags(), "cpu_capability": _cpu_capability()}
    return (f"{machine['cpu']}; flags: {' '.join(machine.get('cpu_flags') or []) or '-'}; "
            f"torch CPU capability: {machine.get('cpu_capability') or '-'}")


def _commit() -> dict | None:
    root = Path(__file__).resolve().parents[3]  # the repository
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"id": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    """Machine, library versions, commit and date: what a result needs to be reproduced."""
    machine = {"platform": platform.platform(), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
               "cpu_flags": _cpu_flags(), "cpu_capability": _cpu_capability()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                       cuda=torch.version.cuda)
    versions = {"torch": torch.__version__}
    for name in ("triton", "transformers", "onnxruntime", "onnx", "onnxscript", "numpy", "fastvit-engine"):
        versions[name] = _version(name)
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "versions": versions, "commit": _commit()}


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _spread(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['q1']:.2f}-{stats['q3']:.2f}"


def _verdict(row: dict, mode: str) -> str:
    """Faster / slower than eager, or "too wide" when the rounds' ratios do not agree."""
    stats = row.get("vs_eager", {}).get(mode)
    if row["provider"] == "eager":
        return "baseline" if stats else "-"
    if not stats:
        return "-"
    if not stats["rankable"]:
        return "too wide"
    return "faster" if stats["median"] > 1 else "slower"


def format_table(results: dict) -> str:
    """The results as a plain-text table (one row per provider)."""
    cond = results["conditions"]
    machine = results["machine"]
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['torch_threads']} threads)"
    train = cond["train"]
    lines = [f"{cond['model']} {cond['img_size'][0]}x{cond['img_size'][1]}, batch {cond['batch_size']}, "
             f"{cond['dtype']}{' autocast' if cond['autocast'] else ''}, {cond['device']}: {where}; "
             f"torch {results['versions']['torch']}, triton {results['versions'].get('triton') or '-'}"]
    if not machine.get("gpu"):
        malloc = {True: "glibc keeps freed memory (mallopt)", False: "default allocator settings"}
        lines.append(f"cpu: {cpu_line(machine)}; malloc: {malloc[bool(cond.get('malloc_tuned'))]}")
    rounds = [m["steps"] for r in results["results"] for m in (r.get("inference"), r.get("train")) if m]
    if rounds:
        lines.append(f"interleaved: {max(rounds)} rounds, one step of every provider per round")
    head = f"{'provider':<14s} {'status':<13s} {'infer img/s':>11s} {'vs eager':>8s} {'IQR':>9s} {'rank':<8s}"
    if train:
        head += f" {'train img/s':>11s} {'vs eager':>8s} {'IQR':>9s} {'rank':<8s}"
    head += f" {'max |diff|':>10s} {'tolerance':>10s} {'peak MiB':>9s} {'setup s':>8s} {'warm-up s':>9s}"
    lines += [head, "-" * len(head)]
    notes = []
    for row in results["results"]:
        inf, trn, ratio = row.get("inference"), row.get("train"), row.get("speedup_vs_eager", {})
        spread = row.get("vs_eager", {})
        logits = next((p for p in row["parity"] if p["what"] == "logits"), None)
        worst = max(row["parity"], key=lambda p: p["max_diff"] / p["tolerance"] if p["tolerance"] else 0,
                    default=None)
        peak = max([m["peak_mem_mb"] for m in (inf, trn) if m and m["peak_mem_mb"] is not None],
                   default=None)
        line = (f"{row['provider']:<14s} {row['status']:<13s} "
                f"{_fmt(inf and inf['img_per_s'], '11.1f', '-'):>11s} "
                f"{_fmt(ratio.get('inference'), '7.2f') + ('x' if 'inference' in ratio else ''):>8s} "
                f"{_spread(spread.get('inference')):>9s} {_verdict(row, 'inference'):<8s}")
        if train:
            line += (f" {_fmt(trn and trn['img_per_s'], '11.1f'):>11s} "
                     f"{_fmt(ratio.get('train'), '7.2f') + ('x' if 'train' in ratio else ''):>8s} "
                     f"{_spread(spread.get('train')):>9s} {_verdict(row, 'train'):<8s}")
        diff = worst or logits
        line += (f" {_fmt(diff and diff['max_diff'], '10.2e'):>10s} {_fmt(diff and diff['tolerance'], '10.2e'):>10s}"
                 f" {_fmt(peak, '9.0f'):>9s} {_fmt(row.get('setup_s'), '8.1f'):>8s}"
                 f" {_fmt(inf and inf['warmup_s'], '9.1f'):>9s}")
        lines.append(line)
        if row["reason"]:
            notes.append(f"  {row['provider']}: {row['reason']}")
    if notes:
        lines += ["", "notes (not timed, or not in every mode):"] + notes
    kind = "peak GPU memory allocated" if cond["memory_kind"] == "cuda_allocated" \
        else "peak process RSS growth over one step (approximate)"
    lines += ["", "img/s: median step; vs eager: median of the per-round ratios (eager step time / provider's);",
              "IQR: their interquartile range; rank: faster/slower than eager, or 'too wide' when the IQR",
              "contains 1.00x (this run cannot rank the provider against eager);",
              f"max |diff| vs the fp32 reference (worst of logits/gradients); peak MiB: {kind};",
              "setup s: build + parity check (torch.compile's compilation and the ONNX export happen there);",
              "warm-up s: the untimed inference warm-up steps after it."]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    """A bar chart of img/s per provider; False (nothing written) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results["results"] if r.get("inference")]
    if not rows:
        return False
    modes = [m for m in ("inference", "train") if any(r.get(m) for r in rows)]
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(rows) * len(modes)), 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        values = [r[mode]["img_per_s"] if r.get(mode) else 0 for r in rows]
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(rows))]
        bars = ax.bar(xs, values, width, label=mode)
        for bar, row in zip(bars, rows):
            ratio = row["speedup_vs_eager"].get(mode)
            stats = row.get("vs_eager", {}).get(mode)
            if ratio is not None:
                label = f"{ratio:.2f}x" if not stats or row["provider"] == "eager" else \
                    f"{ratio:.2f}x\n({stats['q1']:.2f}-{stats['q3']:.2f}{'' if stats['rankable'] else ', ?'})"
                ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    cond = results["conditions"]
    ax.margins(y=0.15)  # room for the two-line labels above the tallest bar
    ax.set_xticks(range(len(rows)), [r["provider"] for r in rows])
    ax.set_ylabel("images / s, median (higher is better)")
    ax.set_xlabel("labels: median ratio vs eager (IQR of the per-round ratios; ?: too wide to rank)",
                  fontsize=8)
    ax.set_title(f"{cond['model']} batch {cond['batch_size']} {cond['dtype']} on {cond['device']}",
                 fontsize=10)
    if len(modes) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write(results: dict, out: Path) -> list[Path]:
    """results.json (+ results.png with matplotlib) under ``out``; returns what was written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [atomic_write_text(out / "results.json", json.dumps(results, indent=2, default=str) + "\n")]
    if plot(results, out / "results.png"):
        written.append(out / "results.png")
    return written
