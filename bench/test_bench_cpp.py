"""The cpp backend (csrc/) against the eager PyTorch composition each op replaces, on CPU.

ViT-S/16 shapes, batch 8, fp32: images 8x3x224x224, 197 tokens of width 384, 6 heads of
64, MLP 1536. Per op, forward ("fwd") and forward+backward ("fwd+bwd"), providers:

* ``cpp``   -- ``fastvit_kernels.<op>`` under ``backend("cpp")`` (the functional API,
  validation and dispatch included, as users call it);
* ``eager`` -- the plain PyTorch composition: ``reference.<op>`` (conv2d + cat + add,
  ``x + r`` + ``F.layer_norm``, ``F.linear`` (the qkv projection, 384 -> 1152),
  ``F.linear`` + ``F.gelu``, and
  ``F.scaled_dot_product_attention`` -- its own CPU flash kernel -- for attention).

End to end: ViT-S/16 inference, batch 8, fp32 and bf16 autocast, the fast model
(``vit.fast.ViT`` under ``backend("cpp")``) against the plain reference ``vit.ViT`` with
the same weights, in the same run (``img_per_s`` in extra_info); the fast model's logits
are checked against the reference by the parity rule (``vit.tools.bench.check_parity``).
(bench/test_bench_model.py times ViT-S at batch 4 only, so batch 8 stays here.)

    pytest bench/test_bench_cpp.py --benchmark-only --benchmark-json=out.json

CPU only (on CUDA the cpp backend is not what runs); skipped when the extension is
unavailable.
"""

from __future__ import annotations

import pytest
import torch
from benchutil import ON_CUDA, available, measure

import fastvit_kernels as fk
from fastvit_kernels import reference
from vit.tools import bench as vb

pytestmark = pytest.mark.skipif(ON_CUDA or available("cpp") is not None,
                                reason=f"cpp backend is CPU-only here: {available('cpp') or 'CUDA run'}")

BATCH, TOKENS, DIM, HEADS, HIDDEN, IMG, PATCH = 8, 197, 384, 6, 1536, 224, 16
ROUNDS = 15  # shared, noisy 2-core machine: medians over enough rounds
CHEAP_ROUNDS = 101  # the norms take ~0.2 ms: more rounds cost nothing and steady the median


def _rand(*shape, std=1.0, grad=False):
    return (torch.randn(*shape) * std).requires_grad_(grad)


def _case(op: str, grad: bool):
    """(args, eager function) for one op at ViT-S/16 shapes."""
    if op == "patch_embed":
        args = (_rand(BATCH, 3, IMG, IMG), _rand(DIM, 3, PATCH, PATCH, std=0.02, grad=grad),
                _rand(DIM, grad=grad), _rand(1, TOKENS, DIM, grad=grad), _rand(1, 1, DIM, grad=grad))
        return args, reference.patch_embed
    if op == "layer_norm":
        args = (_rand(BATCH, TOKENS, DIM, grad=grad), _rand(DIM, grad=grad), _rand(DIM, grad=grad), 1e-6)
        return args, reference.layer_norm
    if op == "add_layer_norm":
        args = (_rand(BATCH, TOKENS, DIM, grad=grad), _rand(BATCH, TOKENS, DIM, grad=grad),
                _rand(DIM, grad=grad), _rand(DIM, grad=grad), 1e-6)
        return args, reference.add_layer_norm
    if op == "linear_gelu":
        args = (_rand(BATCH, TOKENS, DIM, grad=grad), _rand(HIDDEN, DIM, std=0.02, grad=grad),
                _rand(HIDDEN, grad=grad), "none")
        return args, reference.linear_gelu
    if op == "linear":  # the qkv projection
        args = (_rand(BATCH, TOKENS, DIM, grad=grad), _rand(3 * DIM, DIM, std=0.02, grad=grad),
                _rand(3 * DIM, grad=grad))
        return args, reference.linear
    if op == "attention":
        args = tuple(_rand(BATCH, HEADS, TOKENS, DIM // HEADS, grad=grad) for _ in range(3)) + (None,)
        return args, reference.attention
    if op == "packed_attention":
        return (_rand(BATCH, TOKENS, 3 * DIM, grad=grad), HEADS, None), reference.packed_attention
    raise ValueError(op)


FLOPS = {  # forward multiply-adds x 2
    "patch_embed": 2 * BATCH * (TOKENS - 1) * 3 * PATCH * PATCH * DIM,
    "linear_gelu": 2 * BATCH * TOKENS * DIM * HIDDEN,
    "linear": 2 * BATCH * TOKENS * DIM * 3 * DIM,
    "attention": 4 * BATCH * HEADS * TOKENS * TOKENS * (DIM // HEADS),
    "packed_attention": 4 * BATCH * HEADS * TOKENS * TOKENS * (DIM // HEADS),
}


def _timed(fn, args, backward: bool):
    tensors = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if not backward:
        def run():
            with torch.no_grad():
                return fn(*args)
        return run
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = [torch.randn_like(o) for o in outs]

    def run():
        res = fn(*args)
        res = res if isinstance(res, tuple) else (res,)
        return torch.autograd.grad(res, tensors, grads)
    return run


@pytest.mark.parametrize("provider", ["eager", "cpp"])
@pytest.mark.parametrize("direction", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("op", ["patch_embed", "layer_norm", "add_layer_norm", "linear", "linear_gelu",
                                "attention", "packed_attention"])
def test_op(benchmark, op, direction, provider):
    backward = direction == "fwd+bwd"
    args, eager = _case(op, grad=backward)
    public = getattr(fk, op)

    def cpp(*a):
        with fk.backend("cpp"):
            return public(*a)

    fn = _timed(cpp if provider == "cpp" else eager, args, backward)
    flops = FLOPS.get(op)
    measure(benchmark, fn, provider=provider, group=f"cpp-{op}-{direction}-vit_s16-b{BATCH}-fp32",
            flops=None if flops is None else flops * (3 if backward else 1),
            rounds=CHEAP_ROUNDS if op.endswith("layer_norm") else ROUNDS, warmup=2)


# ------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def models():
    from vit import ViT
    from vit.config import get_config
    from vit.fast import ViT as FastViT

    torch.manual_seed(0)
    ref = ViT(get_config("vit_small_patch16_224")).eval()
    fast = FastViT(get_config("vit_small_patch16_224")).eval()
    fast.load_state_dict(ref.state_dict(), strict=True)
    return ref, fast


@pytest.mark.parametrize("provider", ["eager", "cpp"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_vit_s16_inference(benchmark, models, dtype, provider):
    ref, fast = models
    images = torch.randn(BATCH, 3, IMG, IMG)
    model = fast if provider == "cpp" else ref

    def run():
        with torch.inference_mode(), fk.backend("cpp" if provider == "cpp" else "torch"), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            return model(images)

    measure(benchmark, run, provider=provider, group=f"cpp-vit_s16-inference-b{BATCH}-{dtype}",
            items=BATCH, rounds=8, warmup=2)
    if provider == "cpp":  # the timed fast model must agree with the reference by the parity rule
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        labels = torch.zeros(BATCH, dtype=torch.long)  # unused: logits only
        want = vb.reference_outputs(ref, images, labels, torch_dtype, with_grads=False)
        for check in vb.check_parity(fast, want, torch_dtype, lambda: fk.backend("cpp")):
            assert check.ok, check.detail
