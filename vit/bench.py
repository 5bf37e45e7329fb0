"""``fastvit bench``: parity first, then images per second for every provider.

For one model, batch and dtype the job

1. runs the reference model in fp32 (and, for bf16/fp16, under autocast: the
   reference's own low-precision error sets the tolerance),
2. checks every provider's logits (and with ``train``, its gradients) against that
   reference on the same weights and images; a provider whose outputs are wrong is
   reported as failing parity with its max |diff| and is never timed,
3. times inference (and a training step: forward, cross-entropy, backward, AdamW
   step) of the providers that passed, warm-up and compilation excluded, CUDA
   synchronized, and records the peak memory of each,
4. prints a table, writes ``results.json`` (with machine, versions, commit, date and
   conditions) and, when matplotlib is installed, ``results.png``.

Parity rule (DESIGN.md, applied to logits): fp32 providers must agree with the fp32
reference to ``FP32_RTOL`` times the logits' magnitude; a provider run in bf16/fp16 may
be off by at most twice the reference's own low-precision error plus one ulp of the
logits' magnitude. NaN or inf never passes.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import providers as registry
from ._io import atomic_write_text
from .progress import Progress
from .config import ViTConfig, get_config
from .factory import resolve_device
from .model import ViT, count_flops

FP32_RTOL = 1e-4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_MODEL, CUDA_MODEL = "vit_small_patch16_224", "vit_base_patch16_224"
CPU_BATCH, CUDA_BATCH = 8, 128
# With --steps not given, time each provider for about this long (at least MIN_STEPS
# steps): enough for a stable median, and bounded when the machine is slow or busy.
TARGET_SECONDS = {"cpu": 4.0, "cuda": 3.0}
MIN_STEPS, MAX_STEPS = 3, 200


# ------------------------------------------------------------------------------ settings
@dataclass
class Settings:
    model: str
    config: ViTConfig
    device: torch.device
    dtype: str
    batch_size: int
    steps: int | None  # None: chosen per provider from TARGET_SECONDS
    warmup: int
    train: bool
    providers: list[str]
    out: Path | None
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _positive(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def make_settings(*, model: str | None = None, device: str | None = None, dtype: str | None = None,
                  batch_size: int | None = None, img_size: int | None = None,
                  steps: int | None = None, warmup: int | None = None, train: bool = False,
                  providers: list[str] | str | None = None, out=None, seed: int = 0) -> Settings:
    """Fill in what was not given from the device: model, dtype, batch, providers."""
    dev = resolve_device(device)
    on_cuda = dev.type == "cuda"
    model = model or (CUDA_MODEL if on_cuda else CPU_MODEL)
    dtype = dtype or ("bf16" if on_cuda else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    overrides = {} if img_size is None else {"img_size": _positive("img_size", img_size)}
    config = get_config(model, **overrides)
    batch_size = _positive("batch_size", batch_size if batch_size is not None
                           else (CUDA_BATCH if on_cuda else CPU_BATCH))
    _positive("steps", steps, allow_none=True)
    if warmup is None:
        warmup = 5 if on_cuda else (2 if train else 1)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
        raise ValueError(f"warmup must be an integer >= 1 (compilation happens there), got {warmup!r}")
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    if providers is None:
        providers = registry.default_providers(dev, config)
    else:
        for name in providers:
            registry.get_provider(name)  # raises for unknown names, listing the known ones
        # eager is the baseline every ratio refers to: always measured, first
        providers = ["eager"] + [p for p in dict.fromkeys(providers) if p != "eager"]
    return Settings(model, config, dev, dtype, batch_size, steps, warmup, bool(train), providers,
                    Path(out) if out is not None else None, seed)


# ----------------------------------------------------------------------------- memory
def _proc_status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _release_cpu_memory() -> None:
    gc.collect()
    try:  # hand freed heap pages back so that the next provider's RSS baseline is fair
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory a provider adds above ``baseline()``, between ``start()`` and ``stop()``, MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated at the baseline
    (weights, optimizer state, activations, workspaces of this provider). CPU: the
    process's peak resident set size (the kernel's VmHWM, reset at ``start``) above the
    baseline RSS -- approximate, the allocator may keep or reuse pages; None where the
    kernel does not offer it. Nothing runs during the timed steps (no sampling thread).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_allocated" if device.type == "cuda" else "rss"
        self._base: int | None = None
        self._armed = False

    def baseline(self) -> None:
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_cpu_memory()
            rss = _proc_status_kib("VmRSS")
            self._base = None if rss is None else rss * 1024

    def start(self) -> None:
        """Start recording the peak (called after warm-up: compilation transients excluded)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._armed = self._base is not None and _reset_peak_rss()

    def stop(self) -> float | None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        peak = _proc_status_kib("VmHWM") if self._armed else None
        if peak is None:
            return None
        return max(peak * 1024 - self._base, 0) / 2**20


# ------------------------------------------------------------------------------ parity
@dataclass
class Parity:
    ok: bool
    max_diff: float
    tolerance: float
    what: str = "logits"
    detail: str = ""


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


@contextlib.contextmanager
def _exact_fp32():
    """No TF32 shortcuts while computing the fp32 reference on CUDA."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def tolerance(ref_hi: torch.Tensor, ref_lowp: torch.Tensor | None, dtype: torch.dtype) -> float:
    """The parity rule's tolerance on max |out - ref_hi| (see the module docstring)."""
    scale = ref_hi.double().abs().max().item()
    if dtype == torch.float32:
        return FP32_RTOL * scale
    if ref_lowp is None:
        raise ValueError(f"a low-precision reference is needed for {dtype}")
    base = (ref_lowp.double() - ref_hi.double()).abs().max().item()
    return 2 * base + torch.finfo(dtype).eps * scale


def compare(out, ref_hi: torch.Tensor, tol: float, what: str = "logits") -> Parity:
    """Check one output against the reference by the parity rule."""
    if not isinstance(out, torch.Tensor):
        return Parity(False, math.inf, tol, what, f"{what}: expected a tensor, got {type(out).__name__}")
    if out.shape != ref_hi.shape:
        return Parity(False, math.inf, tol, what,
                      f"{what}: shape {tuple(out.shape)}, expected {tuple(ref_hi.shape)}")
    if not torch.isfinite(out).all():
        return Parity(False, math.nan, tol, what, f"{what}: NaN or inf values")
    diff = (out.detach().double() - ref_hi.double()).abs().max().item()
    ok = diff <= tol
    detail = "" if ok else f"{what}: max |diff| {diff:.3e} > tolerance {tol:.3e}"
    return Parity(ok, diff, tol, what, detail)


def _canonical_grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameter gradients under our (timm) names, whatever wraps or renames them."""
    from .checkpoint import convert_state_dict

    grads = {name: (p.grad if p.grad is not None else torch.zeros_like(p))
             for name, p in module.named_parameters()}
    return convert_state_dict(grads)


def _flat(grads: dict[str, torch.Tensor], keys) -> torch.Tensor:
    return torch.cat([grads[k].detach().double().flatten() for k in keys])


@dataclass
class Reference:
    """The fp32 reference's outputs on the parity inputs, and the tolerances they give."""

    images: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    logits_tol: float
    grads: torch.Tensor | None = None
    grad_keys: list[str] = field(default_factory=list)
    grads_tol: float = 0.0


def _loss_and_grads(module, images, labels, device, dtype, context):
    module.zero_grad(set_to_none=True)
    with context():
        with _autocast(device, dtype):
            logits = module(images)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
    return logits.detach()


def reference_outputs(reference: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      dtype: torch.dtype, with_grads: bool) -> Reference:
    """Reference logits (and gradients) in fp32, and the tolerances for ``dtype``."""
    device = images.device
    reference.eval()
    with torch.no_grad(), _exact_fp32():
        hi = reference(images)
    with torch.no_grad(), _autocast(device, dtype):
        lowp = reference(images) if dtype != torch.float32 else None
    ref = Reference(images, labels, hi, tolerance(hi, lowp, dtype))
    if with_grads:
        with _exact_fp32():
            _loss_and_grads(reference, images, labels, device, torch.float32, contextlib.nullcontext)
        grads_hi = _canonical_grads(reference)
        ref.grad_keys = sorted(grads_hi)
        ref.grads = _flat(grads_hi, ref.grad_keys)
        grads_lowp = None
        if dtype != torch.float32:
            _loss_and_grads(reference, images, labels, device, dtype, contextlib.nullcontext)
            grads_lowp = _flat(_canonical_grads(reference), ref.grad_keys)
        ref.grads_tol = tolerance(ref.grads, grads_lowp, dtype)
        reference.zero_grad(set_to_none=True)
    return ref


def check_parity(module: torch.nn.Module, ref: Reference, dtype: torch.dtype,
                 context=contextlib.nullcontext) -> list[Parity]:
    """Logits (and, if the reference has them, gradients) of ``module`` vs the reference."""
    device = ref.images.device
    module.eval()
    # fp32 is checked with PyTorch's TF32 shortcuts off, as the reference was computed
    exact = _exact_fp32 if dtype == torch.float32 else contextlib.nullcontext
    with torch.no_grad(), exact(), context(), _autocast(device, dtype):
        out = module(ref.images)
    checks = [compare(out, ref.logits, ref.logits_tol, "logits")]
    if ref.grads is not None and checks[0].ok:
        with exact():
            _loss_and_grads(module, ref.images, ref.labels, device, dtype, context)
        grads = _canonical_grads(module)
        missing = [k for k in ref.grad_keys if k not in grads]
        if missing:
            checks.append(Parity(False, math.inf, ref.grads_tol, "gradients",
                                 f"gradients: no gradient for {missing[:5]}"))
        else:
            checks.append(compare(_flat(grads, ref.grad_keys), ref.grads, ref.grads_tol, "gradients"))
        module.zero_grad(set_to_none=True)
    return checks


# ------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def inference_step(module, images, dtype, context):
    """One forward pass, as a user would run inference."""
    module.eval()

    def step():
        with torch.inference_mode(), context(), _autocast(images.device, dtype):
            return module(images)

    return step


def train_step(module, images, labels, dtype, context):
    """One training step: forward, cross-entropy, backward, AdamW step."""
    module.train()
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with context():
            with _autocast(images.device, dtype):
                loss = F.cross_entropy(module(images), labels)
            loss.backward()
            optimizer.step()
        return loss

    return step


def time_steps(step, device: torch.device, *, warmup: int, steps: int | None, label: str,
               target_s: float, memory: PeakMemory | None = None, stream=None) -> dict:
    """Run ``warmup`` untimed steps, then time ``steps`` (or enough for ``target_s``)."""
    # on a terminal a bar redrawn in place; elsewhere (logs, CI) only the finished line
    progress = Progress(warmup + (steps or MIN_STEPS), label=label, stream=stream)
    warm_start = time.perf_counter()
    for _ in range(warmup):
        step()
        _sync(device)
        progress.update()
    warmup_s = time.perf_counter() - warm_start
    if memory is not None:
        memory.start()
    times: list[float] = []
    try:
        while True:
            start = time.perf_counter()
            step()
            _sync(device)
            times.append(time.perf_counter() - start)
            if steps is None and len(times) == MIN_STEPS:
                # enough steps to fill target_s at the median pace so far (bounded)
                wanted = int(target_s / max(statistics.median(times), 1e-9))
                progress.total = warmup + min(max(wanted, MIN_STEPS), MAX_STEPS)
            progress.update()
            if len(times) >= progress.total - warmup:
                break
    finally:
        peak = memory.stop() if memory is not None else None
    median = statistics.median(times)
    progress.close(f"{median * 1e3:8.1f} ms/step")
    return {"steps": len(times), "warmup_steps": warmup, "warmup_s": warmup_s, "median_s": median,
            "mean_s": statistics.fmean(times), "min_s": min(times),
            "stdev_s": statistics.stdev(times) if len(times) > 1 else 0.0,
            "times_s": times, "peak_mem_mb": peak}


# ------------------------------------------------------------------------- environment
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


def _commit() -> dict | None:
    root = Path(__file__).resolve().parent.parent
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
               "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        machine.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                       cuda=torch.version.cuda)
    versions = {"torch": torch.__version__}
    for name in ("triton", "transformers", "numpy", "fastvit-engine"):
        versions[name] = _version(name)
    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "versions": versions, "commit": _commit()}


# ------------------------------------------------------------------------------ the job
def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:300]


def run(settings: Settings, stream=None) -> dict:
    """The whole job; returns what goes into results.json (progress goes to ``stream``)."""
    stream = stream or sys.stderr
    device, dtype = settings.device, settings.torch_dtype
    job_start = time.perf_counter()
    torch.manual_seed(settings.seed)
    reference = ViT(settings.config).to(device).eval()
    cfg = settings.config
    images = torch.randn(settings.batch_size, cfg.in_chans, *cfg.img_hw, device=device)
    labels = torch.randint(0, max(cfg.num_classes, 1), (settings.batch_size,), device=device)

    stream.write(f"parity vs the fp32 reference ({settings.dtype}"
                 f"{', logits + gradients' if settings.train else ', logits'}):\n")
    ref = reference_outputs(reference, images, labels, dtype, with_grads=settings.train)
    rows = []
    for name in settings.providers:
        provider = registry.get_provider(name)
        row = {"provider": name, "description": provider.description, "status": "ok",
               "reason": "", "parity": [], "inference": None, "train": None}
        rows.append(row)
        reason = registry.unavailable_reason(name, device, cfg)
        if reason:
            row.update(status="unavailable", reason=reason)
            stream.write(f"  {name:<14s} unavailable: {reason}\n")
            continue
        try:
            module = provider.build(reference)
            checks = check_parity(module, ref, dtype, provider.context)
        except Exception as exc:  # a provider that cannot even run is reported, not fatal
            row.update(status="error", reason=_error(exc))
            stream.write(f"  {name:<14s} error: {row['reason']}\n")
            continue
        finally:
            module = None
            release_memory(device)
        row["parity"] = [asdict(c) for c in checks]
        failed = [c for c in checks if not c.ok]
        if failed:
            row.update(status="parity-failed", reason="; ".join(c.detail for c in failed))
        summary = ", ".join(f"{c.what} max|diff| {c.max_diff:.2e} (tol {c.tolerance:.2e})" for c in checks)
        stream.write(f"  {name:<14s} {'ok    ' if not failed else 'FAILED'} {summary}\n")

    stream.write(f"timing ({settings.batch_size} images per step, warm-up "
                 f"{settings.warmup} step(s) not timed):\n")
    target = TARGET_SECONDS[device.type]
    for row in rows:
        if row["status"] != "ok":
            continue
        provider = registry.get_provider(row["provider"])
        for mode in ["inference"] + (["train"] if settings.train else []):
            memory = PeakMemory(device)
            try:
                memory.baseline()
                module = provider.build(reference)
                if mode == "inference":
                    step = inference_step(module, images, dtype, provider.context)
                else:
                    step = train_step(module, images, labels, dtype, provider.context)
                timing = time_steps(step, device, warmup=settings.warmup, steps=settings.steps,
                                    label=f"{row['provider']} {mode}", target_s=target,
                                    memory=memory, stream=stream)
            except Exception as exc:
                stream.write("\n")
                row.update(status="error", reason=f"{mode}: {_error(exc)}")
                break
            finally:
                module = step = None
                release_memory(device)
            timing["img_per_s"] = settings.batch_size / timing["median_s"]
            row[mode] = timing
    _add_ratios(rows)
    flops = count_flops(cfg)
    return {
        "schema": 1,
        **environment(device),
        "conditions": {
            "model": settings.model, "img_size": list(cfg.img_hw), "patch_size": cfg.patch_size,
            "embed_dim": cfg.embed_dim, "depth": cfg.depth, "num_heads": cfg.num_heads,
            "num_classes": cfg.num_classes, "batch_size": settings.batch_size, "dtype": settings.dtype,
            "autocast": settings.dtype != "fp32", "device": str(device), "steps": settings.steps,
            "warmup": settings.warmup, "train": settings.train, "providers": settings.providers,
            "gflops_per_image_forward": flops / 1e9, "memory_kind": PeakMemory(device).kind,
            "parity_rule": (f"fp32: max|diff| <= {FP32_RTOL:g} * max|ref|; low precision: "
                            "<= 2 * reference's own low-precision error + 1 ulp * max|ref|"),
            "timing": "median of timed steps; warm-up and compilation excluded; CUDA synchronized",
        },
        "results": rows,
        "elapsed_s": time.perf_counter() - job_start,
    }


def _add_ratios(rows: list[dict]) -> None:
    eager = next((r for r in rows if r["provider"] == "eager"), None)
    for row in rows:
        row["speedup_vs_eager"] = {}
        for mode in ("inference", "train"):
            base = eager and eager.get(mode)
            if row.get(mode) and base:
                row["speedup_vs_eager"][mode] = row[mode]["img_per_s"] / base["img_per_s"]


def failed(results: dict) -> list[str]:
    """Providers that failed parity or errored."""
    return [r["provider"] for r in results["results"] if r["status"] in ("parity-failed", "error")]


# ----------------------------------------------------------------------------- output
def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_table(results: dict) -> str:
    """The results as a plain-text table (one row per provider)."""
    cond = results["conditions"]
    machine = results["machine"]
    where = machine.get("gpu") or f"{machine['cpu']} ({machine['torch_threads']} threads)"
    train = cond["train"]
    lines = [f"{cond['model']} {cond['img_size'][0]}x{cond['img_size'][1]}, batch {cond['batch_size']}, "
             f"{cond['dtype']}{' autocast' if cond['autocast'] else ''}, {cond['device']}: {where}; "
             f"torch {results['versions']['torch']}, triton {results['versions'].get('triton') or '-'}"]
    head = f"{'provider':<14s} {'status':<13s} {'infer img/s':>11s} {'vs eager':>8s}"
    if train:
        head += f" {'train img/s':>11s} {'vs eager':>8s}"
    head += f" {'max |diff|':>10s} {'tolerance':>10s} {'peak MiB':>9s} {'warm-up s':>9s}"
    lines += [head, "-" * len(head)]
    notes = []
    for row in results["results"]:
        inf, trn, ratio = row.get("inference"), row.get("train"), row.get("speedup_vs_eager", {})
        logits = next((p for p in row["parity"] if p["what"] == "logits"), None)
        worst = max(row["parity"], key=lambda p: p["max_diff"] / p["tolerance"] if p["tolerance"] else 0,
                    default=None)
        peak = max([m["peak_mem_mb"] for m in (inf, trn) if m and m["peak_mem_mb"] is not None],
                   default=None)
        line = (f"{row['provider']:<14s} {row['status']:<13s} "
                f"{_fmt(inf and inf['img_per_s'], '11.1f', '-'):>11s} "
                f"{_fmt(ratio.get('inference'), '7.2f') + ('x' if 'inference' in ratio else ''):>8s}")
        if train:
            line += (f" {_fmt(trn and trn['img_per_s'], '11.1f'):>11s} "
                     f"{_fmt(ratio.get('train'), '7.2f') + ('x' if 'train' in ratio else ''):>8s}")
        diff = worst or logits
        line += (f" {_fmt(diff and diff['max_diff'], '10.2e'):>10s} {_fmt(diff and diff['tolerance'], '10.2e'):>10s}"
                 f" {_fmt(peak, '9.0f'):>9s}"
                 f" {_fmt(inf and inf['warmup_s'], '9.1f'):>9s}")
        lines.append(line)
        if row["reason"]:
            notes.append(f"  {row['provider']}: {row['reason']}")
    if notes:
        lines += ["", "not timed:"] + notes
    kind = "peak GPU memory allocated" if cond["memory_kind"] == "cuda_allocated" \
        else "peak process RSS growth (approximate)"
    lines += ["", f"img/s: median step; vs eager: img/s ratio; max |diff| vs the fp32 reference "
                  f"(worst of logits/gradients); peak MiB: {kind};",
              "warm-up s: untimed inference warm-up (includes torch.compile's compilation)."]
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
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8)
    cond = results["conditions"]
    ax.set_xticks(range(len(rows)), [r["provider"] for r in rows])
    ax.set_ylabel("images / s (higher is better)")
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
