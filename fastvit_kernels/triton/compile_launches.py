"""Step 1 of the offline compile check (``compile_check``): the kernel launches that the op
launchers make at ViT shapes, recorded on meta tensors for a GPU this machine does not have.

The launchers run on meta tensors that say they live on ``cuda:0`` (so they take their GPU
paths: split-K, GPU tile sizes, backward group counts), with ``_common``'s device queries
answering for the target. Each launch is intercepted instead of run: an autotuned kernel is
recorded once per config its own ``early_config_prune`` keeps, a plain ``triton.jit`` kernel
once, each as the JIT would compile it (signature, constexprs, specialization attributes
from Triton's own binder). ``WORKLOADS`` calls each op module's launchers by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import triton
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map


# ------------------------------------------------------------------------------ targets
@dataclass(frozen=True)
class Target:
    """A GPU to compile for: compute capability, SMs and opt-in shared memory per block."""

    arch: int
    sm_count: int
    shared_mem: int

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"

    def gpu_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", self.arch, 32)


TARGETS = {
    90: Target(90, sm_count=132, shared_mem=232448),  # H100 / H200 SXM: 227 KiB per block
    80: Target(80, sm_count=108, shared_mem=166912),  # A100: 163 KiB per block
}


# ------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class Shape:
    """The tensor shapes of one ViT: image side, patch, width, heads (MLP = 4x width)."""

    name: str
    img: int
    patch: int
    dim: int
    heads: int

    @property
    def tokens(self) -> int:
        return (self.img // self.patch) ** 2 + 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


SHAPES = {s.name: s for s in [
    Shape("Ti/16", 224, 16, 192, 3),
    Shape("S/16", 224, 16, 384, 6),
    Shape("B/16", 224, 16, 768, 12),
    Shape("B/32", 224, 32, 768, 12),
    Shape("B/16-384", 384, 16, 768, 12),
    Shape("L/16", 224, 16, 1024, 16),
    Shape("L/14", 224, 14, 1024, 16),
    Shape("H/16", 224, 16, 1280, 16),   # d = 80
    Shape("S/14", 224, 14, 384, 6),
    Shape("H/14", 224, 14, 1280, 16),   # d = 80
    # the other head dims the attention kernels take: 32, 96, 128
    Shape("S/16-d32", 224, 16, 384, 12),
    Shape("B/16-d96", 224, 16, 768, 8),
    Shape("L/16-d128", 224, 16, 1024, 8),
]}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Sweep:
    """Which workloads to record: shapes x batches x dtypes, and the extra variants
    (channels-last images, tanh GELU, norms without affine parameters) when ``extras``."""

    shapes: tuple[str, ...]
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    extras: bool = False


# The first batch listed stands for the others where launches differ only in alignment.
FULL = Sweep(tuple(SHAPES), (64, 1, 8, 32, 128, 256), tuple(DTYPES))
# CI: two shapes (d = 64, 197 tokens, patch 16; d = 80, 257 tokens, patch 14) at a batch
# large enough for split-K weight gradients; ``ci_subset`` picks the compiles.
CI = Sweep(("B/16", "H/14"), (64,), ("bf16", "fp32"))


# ---------------------------------------------------------------------------- recording
@dataclass
class Job:
    """One compile: a kernel, what the JIT would specialize it on, and one config."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict        # {(arg index,): value}
    attrs: dict             # {(arg index,): [[attribute, value]]}
    options: dict           # num_warps, num_stages, num_ctas, maxnreg
    source_hash: str
    dtype: str              # element type of the first pointer argument: "fp32", "bf16", ...
    variant: str            # the constexprs that are not part of the config
    config: str             # the autotune config (or launch options) in short form
    rank: int = 0           # position among the configs kept for its launch (0: tried first)
    origins: list = field(default_factory=list)  # "op dtype shape batch" that launched it

    def replace(self, *, options: dict | None = None, **constexprs) -> Job:
        """This job with other constexpr values (by name) or options (e.g. a config the
        autotuner would never keep, for testing the check)."""
        names = list(self.signature)  # the kernel's parameters, in order
        new = {**self.constexprs, **{(names.index(k),): v for k, v in constexprs.items()}}
        return dataclasses.replace(self, constexprs=new, options={**self.options, **(options or {})},
                                   config=f"{self.config} -> {constexprs} {options or ''}", origins=list(self.origins))

    def key(self, target: Target, *, exact: bool = True) -> str:
        """The cache key; ``exact=False`` leaves out the specialization attributes
        (alignment / divisibility), which merges launches that differ only in them."""
        data = [self.source_hash, triton.__version__, target.arch, self.module, self.kernel,
                sorted(self.signature.items()), sorted((repr(k), repr(v)) for k, v in self.constexprs.items()),
                sorted((repr(k), repr(v)) for k, v in self.attrs.items()) if exact else None,
                sorted(self.options.items())]
        return hashlib.sha256(json.dumps(data, default=repr).encode()).hexdigest()[:32]


class _MetaCuda(torch.Tensor):
    """A meta tensor (no storage) that the launchers see as a CUDA tensor."""


def _as_meta_cuda(t):
    return t.as_subclass(_MetaCuda) if isinstance(t, torch.Tensor) and not isinstance(t, _MetaCuda) else t


class _FakeCuda(TorchFunctionMode):
    """Tensors are made on the meta device, and report ``cuda:0`` as their device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func == torch.Tensor.device.__get__:
            return torch.device("cuda", 0)
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == "cuda":
            kwargs = {**kwargs, "device": "meta"}
        return tree_map(_as_meta_cuda, func(*args, **kwargs))


_CONFIG_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def _short(name: str, value) -> str:
    return name if value is True else f"{name}={value}"


class Recorder:
    """Intercepts kernel launches (see the module doc) and collects distinct ``Job``s."""

    def __init__(self, target: Target):
        from triton.compiler import make_backend
        self.target = target
        self.backend = make_backend(target.gpu_target())
        self.binders = {}
        self.jobs: dict[str, Job] = {}
        self.errors: list[str] = []
        self.origin = ""

    # A launch of a plain jit kernel, or of one autotune config (``config_keys`` are the
    # constexprs that the config sets).
    def launch(self, jit, args, kwargs, config_keys=(), rank=0):
        from triton.runtime.jit import create_function_from_signature
        kwargs = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
        if jit not in self.binders:
            self.binders[jit] = create_function_from_signature(jit.signature, jit.params, self.backend)
        bound, specialization, options = self.binders[jit](*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound, specialization, options)
        names = [p.name for p in jit.params]
        named = {names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        opts = {k: getattr(options, k) for k in _CONFIG_KEYS if getattr(options, k, None) is not None}
        pointer = next((t for t in signature.values() if isinstance(t, str) and t.startswith("*")), "*?")
        config = " ".join([f"{k}={named[k]}" for k in config_keys]
                          + [f"w{opts['num_warps']}", f"s{opts['num_stages']}"])
        variant = ",".join(_short(k, v) for k, v in named.items()
                           if k not in config_keys and v not in (False, 0, None))
        job = Job(jit.module, jit.fn.__name__, signature, constexprs, attrs, opts, jit.cache_key,
                  pointer[1:], variant, config, rank)
        # Launches that differ only in alignment / divisibility compile to nearly the same
        # code: the first one recorded stands for them (see the batch order in FULL).
        job = self.jobs.setdefault(job.key(self.target, exact=False), job)
        job.rank = min(job.rank, rank)
        if self.origin not in job.origins:
            job.origins.append(self.origin)

    @contextlib.contextmanager
    def active(self):
        """Launches are recorded, not run, and the device answers for the target."""
        from triton.runtime.autotuner import Autotuner
        from triton.runtime.jit import JITFunction

        from fastvit_kernels.triton import _common

        recorder = self

        def jit_run(jit, *args, **kwargs):
            recorder.launch(jit, args, kwargs)

        def autotuner_run(tuner, *args, **kwargs):
            # What Autotuner.run benchmarks: the configs early_config_prune keeps.
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs) if len(tuner.configs) > 1 else tuner.configs
            inner = tuner.fn
            while not isinstance(inner, JITFunction):  # e.g. triton.heuristics in between
                inner = inner.fn
            for rank, config in enumerate(configs):
                if tuner.fn is not inner:
                    raise NotImplementedError(f"{inner.fn.__name__}: autotune over a wrapper")
                recorder.launch(inner, args, {**kwargs, **config.all_kwargs()}, tuple(config.kwargs), rank)
            tuner.nargs = None

        saved = (JITFunction.run, Autotuner.run, _common._sm_count, _common._shared_mem)
        JITFunction.run, Autotuner.run = jit_run, autotuner_run
        _common._sm_count = lambda index: self.target.sm_count
        _common._shared_mem = lambda index: self.target.shared_mem
        try:
            with _FakeCuda():
                yield self
        finally:
            JITFunction.run, Autotuner.run, _common._sm_count, _common._shared_mem = saved

    def run(self, name: str, workload: Callable, *args):
        self.origin = name
        try:
            workload(*args)
        except Exception as exc:  # noqa: BLE001 -- a launcher that cannot run is a finding
            self.errors.append(f"{name}: {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------- workloads
def _empty(*shape, dtype):
    return torch.empty(shape, device="cuda", dtype=dtype)


def _patch_embed(s: Shape, batch: int, dtype, extras: bool):
    from fastvit_kernels.triton.patch_embed import patch_embed_forward, patch_embed_images_grad, patch_embed_weight_grad
    layouts = [torch.contiguous_format] + ([torch.channels_last] if extras else [])
    for layout in layouts:
        images = _empty(batch, 3, s.img, s.img, dtype=dtype).contiguous(memory_format=layout)
        weight = _empty(s.dim, 3, s.patch, s.patch, dtype=dtype)
        pos, cls = _empty(1, s.tokens, s.dim, dtype=dtype), _empty(1, 1, s.dim, dtype=dtype)
        bias = _empty(s.dim, dtype=dtype)
        patch_embed_forward(images, weight, bias, pos, cls)
        grad = _empty(batch, s.tokens, s.dim, dtype=dtype)
        patch_embed_weight_grad(grad, images, weight)
        patch_embed_images_grad(grad, weight, images)


def _layer_norms(s: Shape, batch: int, dtype, extras: bool):
    from fastvit_kernels.triton.layer_norm import layer_norm_backward, layer_norm_forward
    x, r, dy, ds = (_empty(batch, s.tokens, s.dim, dtype=dtype) for _ in range(4))
    affine = [(_empty(s.dim, dtype=dtype), _empty(s.dim, dtype=dtype))] + ([(None, None)] if extras else [])
    for w, b in affine:
        _, _, mean, rstd = layer_norm_forward(x, None, w, b, 1e-6)
        layer_norm_backward(dy, None, x, w, mean, rstd, b is not None)
        _, summed, mean, rstd = layer_norm_forward(x, r, w, b, 1e-6)     # add_layer_norm
        layer_norm_backward(dy, ds, summed, w, mean, rstd, b is not None)


def _linear_gelu(s: Shape, batch: int, dtype, extras: bool):
    from fastvit_kernels.triton.linear_gelu import (
        linear_gelu_backward,
        linear_gelu_backward_recompute,
        linear_gelu_forward,
    )
    hidden = 4 * s.dim
    x = _empty(batch, s.tokens, s.dim, dtype=dtype)
    weight, bias = _empty(hidden, s.dim, dtype=dtype), _empty(hidden, dtype=dtype)
    grad = _empty(batch, s.tokens, hidden, dtype=dtype)
    for approximate in ["none"] + (["tanh"] if extras else []):
        linear_gelu_forward(x, weight, bias, approximate)                          # inference
        _, act_grad = linear_gelu_forward(x, weight, bias, approximate, save_act_grad=True)  # training
        linear_gelu_backward(grad, x, weight, act_grad)
        linear_gelu_backward_recompute(grad, x, weight, bias, approximate)


def _attention(q, k, v, out, dout, d_q, d_k, d_v):
    from fastvit_kernels.triton.attention import attention_backward, attention_forward
    scale = q.shape[-1] ** -0.5
    lse = attention_forward(q, k, v, out, scale)
    attention_backward(dout, None, q, k, v, out, lse, d_q, d_k, d_v, scale)


def _unpacked_attention(s: Shape, batch: int, dtype, extras: bool):
    """(B, H, N, d) contiguous q, k, v, as ``attention(q, k, v)`` gets them."""
    _attention(*(_empty(batch, s.heads, s.tokens, s.head_dim, dtype=dtype) for _ in range(8)))


def _packed_attention(s: Shape, batch: int, dtype, extras: bool):
    """Views of the qkv Linear's (B, N, 3*D) output laid out (B, N, 3, H, d), as
    ``packed_attention(qkv, H)`` reads it; outputs (B, N, D) = (B, N, H, d)."""
    def split(t):
        return t.unflatten(-1, (3, s.heads, s.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)

    def heads(t):
        return t.unflatten(-1, (s.heads, s.head_dim)).transpose(1, 2)

    qkv, dqkv = (_empty(batch, s.tokens, 3 * s.dim, dtype=dtype) for _ in range(2))
    out, dout = (heads(_empty(batch, s.tokens, s.dim, dtype=dtype)) for _ in range(2))
    q, k, v = split(qkv)
    dq, dk, dv = split(dqkv)
    _attention(q, k, v, out, dout, dq, dk, dv)


def _varlen(s: Shape, batch: int, dtype, packed: bool):
    """``batch`` sequences of the shape's token count packed into one (total, ...) tensor: q,
    k, v (total, H, d) contiguous, or views of the qkv Linear's (total, 3*D) output (packed).
    The launchers never read cu_seqlens' values, only its length."""
    from fastvit_kernels.triton.varlen_attention import (
        _split_packed,
        _token_heads,
        varlen_attention_backward,
        varlen_attention_forward,
    )
    total, scale = batch * s.tokens, s.head_dim ** -0.5
    cu_seqlens = _empty(batch + 1, dtype=torch.int32)
    if packed:
        (q, k, v), (dq, dk, dv) = (_split_packed(_empty(total, 3 * s.dim, dtype=dtype), s.heads) for _ in range(2))
        out, dout = (_token_heads(_empty(total, s.dim, dtype=dtype), s.heads) for _ in range(2))
    else:
        q, k, v, out, dout, dq, dk, dv = (_empty(total, s.heads, s.head_dim, dtype=dtype) for _ in range(8))
    lse = varlen_attention_forward(q, k, v, out, cu_seqlens, s.tokens, scale)
    varlen_attention_backward(dout, None, q, k, v, out, lse, cu_seqlens, s.tokens, dq, dk, dv, scale)


def _varlen_attention(s: Shape, batch: int, dtype, extras: bool):
    _varlen(s, batch, dtype, packed=False)


def _varlen_packed_attention(s: Shape, batch: int, dtype, extras: bool):
    _varlen(s, batch, dtype, packed=True)


WORKLOADS: dict[str, Callable] = {
    "patch_embed": _patch_embed,
    "layer_norm": _layer_norms,
    "linear_gelu": _linear_gelu,
    "attention": _unpacked_attention,
    "packed_attention": _packed_attention,
    "varlen_attention": _varlen_attention,
    "varlen_packed_attention": _varlen_packed_attention,
}


def record(sweep: Sweep, target: Target, ops: Iterable[str] = tuple(WORKLOADS)) -> tuple[list[Job], list[str]]:
    """The distinct compiles of ``sweep`` on ``target``, and the launchers that failed."""
    from fastvit_kernels.triton import _common
    if _common.INTERPRET:
        raise RuntimeError("the kernel modules were imported with TRITON_INTERPRET=1: "
                           "unset it before fastvit_kernels.triton is imported")
    recorder = Recorder(target)
    with recorder.active():
        for shape in sweep.shapes:
            for batch in sweep.batches:
                for dtype in sweep.dtypes:
                    for op in ops:
                        recorder.run(f"{op} {dtype} {shape} b{batch}", WORKLOADS[op], SHAPES[shape],
                                     batch, DTYPES[dtype], sweep.extras)
    return list(recorder.jobs.values()), recorder.errors


def _tokens(job: Job) -> set:
    return set(job.variant.split(","))


# CI: (kernel prefix, dtype, variant tokens) whose every kept config is compiled; everything
# else in the CI sweep is compiled at its first kept config only (16-bit) or not at all (fp32).
_CI_ALL_CONFIGS = [
    ("attn_", "bf16", set()),                                    # both head dims, fwd and bwd
    ("varlen_attn_", "bf16", set()),                             # the same tiles, per packed sequence
    ("_layer_norm", "bf16", set()),
    ("_gemm_kernel", "bf16", {"ACT_GRAD_OUT"}),                  # training forward, saves GELU'
    ("_gemm_kernel", "bf16", {"EPI_GELU_GRAD"}),                 # recompute backward
    ("_gemm_kernel", "bf16", {"P=14", "HAS_CLS"}),               # patch-14 forward, K = 588
    ("_gemm_kernel", "fp32", {"PROLOGUE_SCALE", "ROWSUM_A"}),    # dW + bias grad from saved GELU'
    ("_layer_norm", "fp32", set()),
    # fp32 attention at d = 64 only: its ieee dots at BLOCK_D = 128 take minutes per backward kernel.
    ("attn_", "fp32", {"BLOCK_D=64"}),
]
# fp32 compiled at the first kept config only (besides the above): the recompute backward's
# dW + bias grad (row sums without a prologue) crashed triton 3.6's compiler in every config.
_CI_FP32_FIRST_CONFIG = [("_gemm_kernel", "fp32", {"ROWSUM_A"})]
# sm_80 (A100): one spot check of each op family's first config (shared memory is smaller).
_SM80_SPOT = [("attn_fwd", "bf16", set()), ("_gemm_kernel", "bf16", {"ACT_GRAD_OUT"})]


def ci_subset(jobs: list[Job], target: Target) -> list[Job]:
    """The compiles CI runs out of the CI sweep: every kernel and every 16-bit variant
    (epilogue, prologue, index maps, patch size, head dim) at least at the config the
    autotuner tries first; every kept config where spills and shared memory were found
    before (``_CI_ALL_CONFIGS``); fp32 where it crashed or overflowed. sm_80: a spot check."""
    def matches(job, rules):
        return any(job.kernel.startswith(k) and job.dtype == d and t <= _tokens(job) for k, d, t in rules)

    if target.arch != 90:
        return [j for j in jobs if j.rank == 0 and matches(j, _SM80_SPOT)]
    return [j for j in jobs if matches(j, _CI_ALL_CONFIGS)
            or (j.rank == 0 and (j.dtype != "fp32" or matches(j, _CI_FP32_FIRST_CONFIG)))]
