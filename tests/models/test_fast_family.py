"""vit.fast.ViT against the reference vit.ViT for the ViT family (issue 18): DINOv2 (+registers),
CLIP, SigLIP, DeiT distilled, DeiT-III.

Same rule and helpers as test_fast_model.py (``fast_cases``); the fused ops run on each
backend where it takes the call and on torch where it declines the new arguments
(``preferring``), as ``auto`` does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fast_cases import (
    BACKENDS,
    CFG,
    DEVICE,
    FAMILIES,
    MODEL_RTOL,
    NATIVE,
    _grads,
    _images,
    _pair,
    dispatched_ops,
    grads_vs_reference,
    preferring,
    same_seed_training_grads,
)

import fastvit_kernels as fk
import vit
from fastvit_kernels.testing import assert_parity, rand
from vit.fast import MODEL_OPS
from vit.fast import ViT as FastViT


def _cases(backends) -> list:
    return [pytest.param(b, f, id=f"{b}-{f}") for b in backends for f in FAMILIES]


def _features(model, x):
    """What the embedding API gives: all tokens, the pooled embedding, intermediates."""
    feats = model.forward_features(x)
    final, inter = model.forward_intermediates(x, indices=[0, -1], norm=True, output_fmt="NLC",
                                               return_prefix_tokens=True)
    out = {"features": feats, "pooled": model.forward_head(feats, pre_logits=True), "final": final}
    for i, item in enumerate(inter):
        patches, prefix = item if isinstance(item, tuple) else (item, None)
        out[f"intermediate {i}"] = patches
        if prefix is not None:
            out[f"intermediate {i} prefix"] = prefix
    return out


# ------------------------------------------------------------------------ structure
@pytest.mark.parametrize("family", list(FAMILIES))
def test_state_dict_identical_and_loads_strict_both_ways(family):
    cfg = {**CFG, **FAMILIES[family]}
    ref, fast = vit.ViT(**cfg), FastViT(**cfg)
    ref_sd = ref.state_dict()
    assert {k: v.shape for k, v in fast.state_dict().items()} == {k: v.shape for k, v in ref_sd.items()}
    fast.load_state_dict(ref_sd, strict=True)
    ref.load_state_dict(fast.state_dict(), strict=True)


def test_forward_path_carries_the_knobs_into_the_fused_ops():
    depth = CFG["depth"]
    x = rand(2, 3, 32, 32)

    model = FastViT(**CFG, **FAMILIES["dinov2-reg"])
    calls = dispatched_ops(model, x)
    (embed_args,) = [args for op, args in calls if op == "patch_embed"]
    assert embed_args[4] is not None and embed_args[5].shape == (1, 4, CFG["embed_dim"])  # cls, then registers
    assert embed_args[3].shape == (1, 16, CFG["embed_dim"])  # the grid's positions only
    adds = [args for op, args in calls if op == "add_layer_norm"]
    assert len(adds) == 2 * depth and all(args[5] is not None for args in adds)  # every add with its LayerScale
    gammas = [args[5] for args in adds]
    blocks = model.blocks
    assert gammas == [blocks[0].ls1.gamma, blocks[0].ls2.gamma, blocks[1].ls1.gamma, blocks[1].ls2.gamma]

    calls = dispatched_ops(FastViT(**CFG, **FAMILIES["clip"]), x)
    assert [op for op, _ in calls].count("layer_norm") == 2  # norm_pre, then block 0's norm1
    assert {args[3] for op, args in calls if op == "linear_gelu"} == {"quick"}
    (embed_args,) = [args for op, args in calls if op == "patch_embed"]
    assert embed_args[2] is None  # pre_norm: no patch-embedding bias

    model = FastViT(**CFG, **FAMILIES["siglip"])
    calls = dispatched_ops(model, x)
    attention = [args for op, args in calls if op == "attention"]
    assert len(attention) == 1 and attention[0][0].shape == (2, CFG["num_heads"], 1, 32)  # one query
    assert attention[0][1].shape == (2, CFG["num_heads"], 16, 32)  # over the 16 patches
    assert [args[3] for op, args in calls if op == "linear_gelu"] == ["tanh"] * (depth + 1)  # blocks + head

    model = FastViT(**CFG, **FAMILIES["deit-distilled"])
    (embed_args,) = [args for op, args in dispatched_ops(model, x) if op == "patch_embed"]
    assert torch.equal(embed_args[5], model.dist_token)  # after the class token, with a position


@pytest.mark.parametrize("family", list(FAMILIES))
def test_backends_report_the_ops_each_family_calls(family):
    model = FastViT(**CFG, **FAMILIES[family])
    expected = tuple(op for op in MODEL_OPS if op != "attention" or family == "siglip")
    assert model.ops() == expected
    assert tuple(model.backends()) == expected  # the new arguments resolve (auto falls back)
    with fk.backend("torch"):
        assert model.backends() == dict.fromkeys(expected, "torch")
    assert "backends[" in repr(model)


# ------------------------------------------------------------------- fp32 parity
@pytest.mark.parametrize("backend, family", _cases(BACKENDS))
def test_logits_and_embeddings_parity_eval(backend, family):
    fast, _, ref_hi = _pair(backend, **FAMILIES[family])
    fast.eval(), ref_hi.eval()
    x = _images(fast, batch=3)
    with preferring(backend), torch.no_grad():
        logits = fast(x)
        got = _features(fast, x)
    with torch.no_grad():
        assert_parity("logits", logits, ref_hi(x.double()), rtol=MODEL_RTOL)
        want = _features(ref_hi, x.double())
    assert got.keys() == want.keys()
    for name in want:
        assert_parity(name, got[name], want[name], rtol=MODEL_RTOL)


@pytest.mark.parametrize("backend, family", _cases(NATIVE))
def test_gradient_parity_every_parameter(backend, family):
    fast, _, ref_hi = _pair(backend, **FAMILIES[family])
    fast.train(), ref_hi.train()  # dropout rates are 0: training mode, deterministic
    got, want = grads_vs_reference(fast, ref_hi, _images(fast), preferring(backend))
    assert got.keys() == want.keys()
    for name in want:
        assert_parity(f"grad {name}", got[name], want[name], rtol=MODEL_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dinov2_training_step_matches_reference(backend):
    """DINOv2 with registers (LayerScale, registers, no_embed_class) in a training step on
    a pooled-embedding loss: gradients of every parameter, then the step's new weights."""
    fast, _, ref_hi = _pair(backend, **FAMILIES["dinov2-reg"], num_classes=0, global_pool="avg")
    fast.train(), ref_hi.train()
    x = _images(fast, batch=3)
    target = rand(3, CFG["embed_dim"], device=DEVICE)
    steps = {}
    for name, model, images, tgt in (("fast", fast, x, target), ("ref", ref_hi, x.double(), target.double())):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        optimizer.zero_grad(set_to_none=True)
        with preferring(backend):
            loss = F.mse_loss(model(images), tgt)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        steps[name] = (loss.detach(), grads, {n: p.detach().clone() for n, p in model.named_parameters()})
    assert_parity("loss", steps["fast"][0], steps["ref"][0], rtol=MODEL_RTOL)
    for name, want in steps["ref"][1].items():
        assert_parity(f"grad {name}", steps["fast"][1][name], want, rtol=MODEL_RTOL)
        assert want.abs().max() > 0, f"{name} gets no gradient"
    for name, want in steps["ref"][2].items():
        assert_parity(f"stepped {name}", steps["fast"][2][name], want, rtol=MODEL_RTOL)


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("family", ["dinov2-reg", "deit3", "siglip"])
def test_dynamic_img_size_other_resolution(backend, family):
    fast, _, ref_hi = _pair(backend, **FAMILIES[family], dynamic_img_size=True)
    got, want = grads_vs_reference(fast, ref_hi, _images(fast, hw=(24, 40)), preferring(backend))
    for name in ("pos_embed", "patch_embed.proj.weight", "images"):
        assert_parity(f"grad {name}", got[name], want[name], rtol=MODEL_RTOL)


# ------------------------------------------------------------------ training modes
def test_distilled_training_returns_both_heads():
    fast, ref, _ = _pair(**FAMILIES["deit-distilled"])
    fast.train(), ref.train()
    fast.set_distilled_training(), ref.set_distilled_training()
    x = _images(fast)
    got, want = fast(x), ref(x)
    assert isinstance(got, tuple) and len(got) == 2
    for g, w in zip(got, want):
        assert_parity("head", g, w.double(), rtol=MODEL_RTOL)
    sum(F.cross_entropy(head, torch.zeros(2, dtype=torch.long, device=DEVICE)) for head in got).backward()
    assert fast.dist_token.grad.abs().max() > 0 and fast.head_dist.weight.grad.abs().max() > 0
    fast.eval()
    with torch.no_grad():
        assert fast(x).shape == (2, CFG["num_classes"])  # eval: the mean of the two heads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_dropout_drop_path_and_layer_scale_match_reference_in_training(checkpointing):
    """Drop-path's per-sample mask and LayerScale commute: the same masks for the same seed
    give the same gradients, with or without checkpointing."""
    fast, ref, _ = _pair(**FAMILIES["dinov2-reg"], drop_path_rate=0.3, proj_drop_rate=0.2, pos_drop_rate=0.1)
    got, want, _, _ = same_seed_training_grads(fast, ref, checkpointing)
    for name in want:
        assert_parity(f"grad {name}", got[name], want[name].double(), rtol=MODEL_RTOL)


# ---------------------------------------------------------- low precision, compile
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_autocast_parity_logits(backend, family):
    dtype = torch.bfloat16
    fast, ref, ref_hi = _pair(backend, **FAMILIES[family])
    fast.eval(), ref.eval(), ref_hi.eval()
    x = _images(fast)
    with torch.no_grad():
        want = ref_hi(x.double())
        with torch.autocast(DEVICE.type, dtype=dtype):
            with preferring(backend):
                logits = fast(x)
                pooled = fast.forward_head(fast.forward_features(x), pre_logits=True)
            ref_logits = ref(x)
            ref_pooled = ref.forward_head(ref.forward_features(x), pre_logits=True)
        want_pooled = ref_hi.forward_head(ref_hi.forward_features(x.double()), pre_logits=True)
    assert logits.dtype == ref_logits.dtype and pooled.dtype == ref_pooled.dtype
    assert_parity("logits", logits, want, ref_logits)
    # fp32 where the residual stream is (a norm's output on CPU): judged in the compute dtype
    assert_parity("pooled", pooled.to(dtype), want_pooled, ref_pooled)


@pytest.mark.parametrize("family", ["dinov2-reg", "siglip", "clip"])
def test_compile_fullgraph_matches_eager(family):
    """aot_eager through the fused ops' fake kernels and autograd, LayerScale and the MAP head included."""
    fast, _, _ = _pair(**FAMILIES[family])
    fast.train()
    x = _images(fast)
    upstream = rand(2, CFG["num_classes"], device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    eager = _grads(fast, x, upstream)
    traced = _grads(compiled, x, upstream)
    for name in eager:
        torch.testing.assert_close(traced[name], eager[name], msg=name)
