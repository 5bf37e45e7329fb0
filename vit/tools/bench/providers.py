"""What ``fastvit bench`` and ``bench/test_bench_model.py`` measure: a registry of providers.

A provider turns the reference model (eval mode, on the benchmark device, fp32) into a
module with the same weights that maps images to logits: the reference itself in eager
PyTorch ("eager", the baseline for ratios), ``torch.compile`` of it ("compile"), Hugging
Face transformers' ``ViTForImageClassification`` ("hf"), ONNX Runtime on an ONNX export of
it ("onnxruntime", inference only; the ``[ort]`` extra), and the fast model ``vit.fast.ViT``
under each kernel backend ("fast-triton", "fast-cpp", "fast-torch"; "fast" is its
automatic dispatch). Each provider also says whether it can run here and, if not, why
(a provider whose package is not installed is listed as unavailable, never an error).

Tests and users add their own with ``register_provider`` (a deliberately broken one
shows that the parity check catches it).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from vit import weights
from vit.config import ViTConfig


def _no_context() -> AbstractContextManager:
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Provider:
    """One way of running the model.

    build(reference) -> nn.Module with the reference's weights (never the reference
    itself: training mutates it) whose forward(images) returns logits.
    unavailable(device, config) -> None when it can run there, else the reason.
    context() -> context manager every step of this provider runs in (forward, backward
    and optimizer step), e.g. ``fastvit_kernels.backend("cpp")``.
    default: part of the list ``fastvit bench`` runs when --providers is not given (a
    bool, or a predicate on the device).
    trains: False for an inference-only provider (no gradients, no training step).
    dtypes: the ``--dtype`` values it runs ("fp32", "bf16", "fp16"); None: all.
    """

    name: str
    build: Callable[[nn.Module], nn.Module]
    description: str = ""
    unavailable: Callable[[torch.device, ViTConfig], str | None] = lambda device, config: None
    context: Callable[[], AbstractContextManager] = _no_context
    default: bool | Callable[[torch.device], bool] = True
    trains: bool = True
    dtypes: tuple[str, ...] | None = None

    def is_default(self, device: torch.device) -> bool:
        return bool(self.default(device) if callable(self.default) else self.default)


_REGISTRY: dict[str, Provider] = {}


def register_provider(name: str, build: Callable[[nn.Module], nn.Module], *, description: str = "",
                      unavailable: Callable[[torch.device, ViTConfig], str | None] | None = None,
                      context: Callable[[], AbstractContextManager] | None = None,
                      default: bool | Callable[[torch.device], bool] = True,
                      trains: bool = True, dtypes: tuple[str, ...] | None = None,
                      replace: bool = False) -> Provider:
    """Add a provider (see ``Provider``); ``replace=True`` overwrites one of the same name."""
    if not isinstance(name, str) or not name or "," in name or name != name.strip():
        raise ValueError(f"provider name must be a non-empty string without commas or "
                         f"surrounding spaces, got {name!r}")
    if not callable(build):
        raise TypeError(f"build must be callable (reference model -> module), got {type(build).__name__}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"provider {name!r} is already registered; pass replace=True to overwrite it")
    provider = Provider(name, build, description,
                        unavailable or (lambda device, config: None),
                        context or _no_context, default, bool(trains),
                        None if dtypes is None else tuple(dtypes))
    _REGISTRY[name] = provider
    return provider


def unregister_provider(name: str) -> None:
    if name not in _REGISTRY:
        raise KeyError(f"no provider {name!r}; registered: {', '.join(_REGISTRY)}")
    del _REGISTRY[name]


def get_provider(name: str) -> Provider:
    if name not in _REGISTRY:
        raise ValueError(f"unknown provider {name!r}; registered: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def provider_names() -> list[str]:
    return list(_REGISTRY)


def unavailable_reason(name: str, device: torch.device, config: ViTConfig,
                       dtype: str | None = None) -> str | None:
    """None when provider ``name`` can run on ``device`` for ``config`` (and ``dtype``), else why not."""
    provider = get_provider(name)
    if dtype is not None and provider.dtypes is not None and dtype not in provider.dtypes:
        return f"runs {'/'.join(provider.dtypes)} only, not {dtype}"
    try:
        return provider.unavailable(torch.device(device), config)
    except Exception as exc:  # a provider whose check itself fails cannot run
        return f"{type(exc).__name__}: {exc}"


def default_providers(device, config: ViTConfig, dtype: str | None = None) -> list[str]:
    """The default providers that can run on ``device`` (in ``dtype``), "eager" first."""
    device = torch.device(device)
    names = [n for n, p in _REGISTRY.items()
             if p.is_default(device) and unavailable_reason(n, device, config, dtype) is None]
    return sorted(names, key=lambda n: n != "eager")


# ------------------------------------------------------------------------ eager / compile
def _build_eager(reference: nn.Module) -> nn.Module:
    return copy.deepcopy(reference)


def _build_compile(reference: nn.Module) -> nn.Module:
    return torch.compile(copy.deepcopy(reference))


def _compile_unavailable(device: torch.device, config: ViTConfig) -> str | None:
    if device.type == "cpu":
        import shutil

        if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
            return "torch.compile on CPU needs a C++ compiler (none found on PATH)"
    return None


def _compile_context() -> AbstractContextManager:
    """Inductor freezing: for inference the weights become constants, prepacked for the GEMMs
    (what a user deploying a compiled model would turn on). Training graphs are not frozen."""
    import torch._inductor.config as inductor_config

    return inductor_config.patch(freezing=True)


# ------------------------------------------------------------------------ ONNX Runtime
class _OnnxRuntime(nn.Module):
    """ONNX Runtime (CPU execution provider) on ``torch.onnx.export`` of a model.

    Exported on the first call for each input shape (the graph has fixed shapes) into a
    temporary directory that lives as long as this module; torch's intra-op thread count
    is given to ONNX Runtime, so both use the same cores.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        import tempfile

        self.model = model
        self._dir = tempfile.TemporaryDirectory(prefix="fastvit-onnx-")
        self._sessions: dict[tuple, object] = {}

    def _session(self, images: torch.Tensor):
        key = tuple(images.shape)
        if key not in self._sessions:
            import os
            import warnings

            import onnxruntime

            path = os.path.join(self._dir.name, f"model-{'x'.join(map(str, key))}.onnx")
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(self.model.eval(), (images,), path, dynamo=True, verbose=False,
                                  external_data=False)
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            self._sessions[key] = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        return self._sessions[key]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        session = self._session(images)
        feed = {session.get_inputs()[0].name: images.detach().float().contiguous().numpy()}
        return torch.from_numpy(session.run(None, feed)[0])


def _build_onnxruntime(reference: nn.Module) -> nn.Module:
    return _OnnxRuntime(copy.deepcopy(reference).eval())


def _onnxruntime_unavailable(device: torch.device, config: ViTConfig) -> str | None:
    missing = [m for m in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install 'fastvit-engine[ort]')"
    if device.type != "cpu":
        return f"measured with ONNX Runtime's CPU execution provider only, not on {device.type}"
    return None


# ------------------------------------------------------------------------ Hugging Face
class _Logits(nn.Module):
    """transformers' model output -> its logits tensor; ``module.`` prefix keeps key names."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values=images).logits


# The ViTConfig knobs of the other families (DINOv2, CLIP, SigLIP, DeiT) at their vanilla values.
_VANILLA = {"init_values": None, "reg_tokens": 0, "no_embed_class": False, "pre_norm": False, "act_layer": "gelu",
            "distilled": False}


def _hf_unavailable(device: torch.device, config: ViTConfig) -> str | None:
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    family = [name for name, vanilla in _VANILLA.items() if getattr(config, name) != vanilla]
    if family:
        return f"the hf provider builds transformers' vanilla ViT, not a model with {', '.join(family)}"
    if config.global_pool != "token" or config.use_fc_norm:
        return "transformers' ViT pools the class token after the final norm only"
    if config.num_classes == 0:
        return "transformers' ViTForImageClassification needs a classification head"
    if config.img_hw[0] != config.img_hw[1]:
        return "transformers' ViT config takes square images only"
    if config.mlp_hidden_dim != config.embed_dim * config.mlp_ratio:
        return "mlp_ratio does not give an integer hidden size"
    return None


def to_hf_state_dict(state_dict: dict, hf_keys) -> dict:
    """Our (timm) ViT weights under the given Hugging Face ViT keys.

    The inverse of ``vit.weights.convert_state_dict`` for one transformers model: the
    fused qkv projection is split into query/key/value. HF keys an image classifier does
    not use (pooler, mask token) are left out.
    """
    embed = weights._HF_EMBED
    out, unknown = {}, []
    for key in hf_keys:
        short = key[len("vit."):] if key.startswith("vit.") else key
        if short in embed:
            out[key] = state_dict[embed[short]]
            continue
        if short in weights._HF_UNUSED:
            continue
        match = weights._HF_BLOCK_KEY.match(short)
        if match:
            index, name, kind = match.groups()
            if name in weights._HF_BLOCK:
                out[key] = state_dict[f"blocks.{index}.{weights._HF_BLOCK[name]}.{kind}"]
                continue
            if name in weights._HF_QKV:
                qkv = state_dict[f"blocks.{index}.attn.qkv.{kind}"]
                out[key] = qkv.chunk(3, dim=0)[weights._HF_QKV[name]]
                continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"no counterpart in our ViT for Hugging Face keys {unknown[:10]}")
    return out


def _build_hf(reference: nn.Module) -> nn.Module:
    import transformers

    cfg = reference.config
    hf_config = transformers.ViTConfig(
        hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.mlp_hidden_dim, hidden_act="gelu", image_size=cfg.img_hw[0],
        patch_size=cfg.patch_size, num_channels=cfg.in_chans, num_labels=cfg.num_classes,
        qkv_bias=cfg.qkv_bias, layer_norm_eps=cfg.norm_eps, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0)
    # SDPA attention, as in the reference (transformers' default for ViT today; asked for
    # explicitly so that a change of default cannot change what is measured)
    hf_config._attn_implementation = "sdpa"
    model = transformers.ViTForImageClassification(hf_config)
    ours = reference.state_dict()
    hf_weights = to_hf_state_dict(ours, model.state_dict().keys())
    missing, unexpected = model.load_state_dict(hf_weights, strict=False)
    unused = [k for k in missing if k.removeprefix("vit.") not in weights._HF_UNUSED]
    if unused or unexpected:
        raise ValueError(f"Hugging Face ViT weights incomplete: missing {unused}, unexpected {unexpected}")
    param = next(reference.parameters())
    return _Logits(model.to(device=param.device, dtype=param.dtype).eval())


# ------------------------------------------------------------------------ fast model
def _build_fast(reference: nn.Module) -> nn.Module:
    from vit.factory import model_class

    param = next(reference.parameters())
    fast = model_class(True)(reference.config).to(device=param.device, dtype=param.dtype)
    fast.load_state_dict(reference.state_dict(), strict=True)
    return fast.train(reference.training)


def _fast_unavailable(backend: str | None):
    def check(device: torch.device, config: ViTConfig) -> str | None:
        if backend is None:
            return None
        import fastvit_kernels

        info = fastvit_kernels.available_backends()[backend]
        if not info.available:
            return f"backend {backend!r} is unavailable: {info.reason}"
        if backend == "triton" and device.type == "cpu":
            return "Triton on CPU tensors is the interpreter (for tests), never benchmarked"
        if device.type not in info.devices:
            return f"backend {backend!r} runs on {'/'.join(info.devices)} tensors, not {device.type}"
        return None

    return check


def _backend_context(backend: str):
    def context() -> AbstractContextManager:
        import fastvit_kernels

        return fastvit_kernels.backend(backend)

    return context


register_provider("eager", _build_eager,
                  description="reference vit.ViT, eager PyTorch (SDPA attention): the baseline")
# On CPU compiling ViT-S costs tens of CPU-seconds on a cold cache (inductor's FX graph
# cache makes later runs faster): the price of showing what a user would pick instead.
register_provider("compile", _build_compile, unavailable=_compile_unavailable, context=_compile_context,
                  description="torch.compile(reference), inductor, freezing for inference")
register_provider("onnxruntime", _build_onnxruntime, unavailable=_onnxruntime_unavailable, trains=False,
                  dtypes=("fp32",),
                  description="ONNX Runtime, CPU execution provider, on torch.onnx.export(reference)")
register_provider("hf", _build_hf, unavailable=_hf_unavailable,
                  description="transformers ViTForImageClassification (SDPA), same weights")
for _backend in ("triton", "cpp", "torch"):
    register_provider(f"fast-{_backend}", _build_fast, unavailable=_fast_unavailable(_backend),
                      context=_backend_context(_backend),
                      description=f"vit.fast.ViT, every op on the {_backend} backend")
register_provider("fast", _build_fast, unavailable=_fast_unavailable(None), default=False,
                  description="vit.fast.ViT, automatic backend choice (what a user gets by default)")
