"""The ViT family in the reference model (issue 18): timm's knobs, presets, the embedding API.

Each knob is checked against the few lines of arithmetic it stands for, on perturbed
parameters (LayerNorm weights != 1, LayerScale != its init), so that a knob that is
ignored or applied at the wrong place cannot pass.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from fast_cases import FAMILIES  # one config per family's knobs
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vit
from vit import ViT, ViTConfig, count_flops, get_config
from vit.config import PRESETS
from vit.layers import LayerScale, QuickGELU

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
GRID = 16  # patches of a TINY image



def perturbed(**overrides) -> ViT:
    torch.manual_seed(0)
    model = ViT(**{**TINY, **overrides})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.double().eval()


def images(batch: int = 2, size: int = 32) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 3, size, size, dtype=torch.float64)


# ------------------------------------------------------------------------- config
def test_new_fields_default_to_the_plain_vit_and_old_configs_load():
    cfg = ViTConfig()
    assert (cfg.init_values, cfg.reg_tokens, cfg.no_embed_class, cfg.pre_norm, cfg.act_layer,
            cfg.distilled) == (None, 0, False, False, "gelu", False)
    old = {k: v for k, v in cfg.to_dict().items()
           if k not in ("init_values", "reg_tokens", "no_embed_class", "pre_norm", "act_layer", "distilled")}
    assert ViTConfig.from_dict(old) == cfg  # a config saved before these fields existed


@pytest.mark.parametrize("name", [n for n in PRESETS if n.endswith(("dinov2", "_224")) and n != "vit_tiny_patch16_224"])
def test_config_round_trips_through_dict(name):
    cfg = get_config(name)
    assert ViTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("fields, match", [
    (dict(reg_tokens=-1), "reg_tokens must be an int >= 0, got -1"),
    (dict(reg_tokens=1.5), "reg_tokens must be an int >= 0, got 1.5"),
    (dict(init_values=0.0), "init_values must be None .* or a positive number, got 0.0"),
    (dict(init_values="1e-5"), "init_values must be None .* got '1e-5'"),
    (dict(act_layer="relu"), r"act_layer must be one of \('gelu', 'gelu_tanh', 'quick_gelu'\), got 'relu'"),
    (dict(global_pool="max"), r"global_pool must be one of \('token', 'avg', 'map'\), got 'max'"),
    (dict(distilled=True, class_token=False, global_pool="avg"), "distilled=True needs class_token=True, "
                                                                 "global_pool='token'.*got class_token=False"),
    (dict(distilled=True, global_pool="avg"), "distilled=True needs global_pool='token', fc_norm not True"),
    (dict(distilled=True, reg_tokens=4), "distilled=True needs reg_tokens=0; got .*reg_tokens=4"),
    (dict(distilled=True, drop_rate=0.1), r"distilled=True needs drop_rate=0 \(its heads have no dropout\)"),
    (dict(class_token=False), "global_pool='token' needs class_token=True"),
])
def test_bad_family_fields(fields, match):
    with pytest.raises(ValueError, match=match):
        ViTConfig(**fields)


def test_prefix_and_position_token_counts():
    assert ViTConfig().num_prefix_tokens == 1 and ViTConfig().pos_prefix_tokens == 1
    reg = ViTConfig(reg_tokens=4, no_embed_class=True)
    assert reg.num_prefix_tokens == 5 and reg.pos_prefix_tokens == 0 and reg.pos_embed_tokens == 196
    assert ViTConfig(reg_tokens=4).pos_embed_tokens == 196 + 5  # registers with positions, as timm allows
    assert ViTConfig(distilled=True).num_prefix_tokens == 2 and ViTConfig(distilled=True).pos_embed_tokens == 198
    assert ViTConfig(class_token=False, global_pool="map").num_prefix_tokens == 0


# ------------------------------------------------------------------------ presets
# Values from timm 1.0's model functions and their default pretrained configs
# (img_size from input_size, num_classes 0 for the image encoders).
EXPECTED_PRESETS = {
    # name: (img, patch, dim, depth, heads, hidden, classes, other fields)
    "vit_small_patch14_dinov2": (518, 14, 384, 12, 6, 1536, 0, dict(init_values=1e-5)),
    "vit_base_patch14_dinov2": (518, 14, 768, 12, 12, 3072, 0, dict(init_values=1e-5)),
    "vit_large_patch14_dinov2": (518, 14, 1024, 24, 16, 4096, 0, dict(init_values=1e-5)),
    "vit_base_patch14_reg4_dinov2": (518, 14, 768, 12, 12, 3072, 0,
                                     dict(init_values=1e-5, reg_tokens=4, no_embed_class=True)),
    "vit_base_patch16_clip_224": (224, 16, 768, 12, 12, 3072, 1000, dict(pre_norm=True, norm_eps=1e-5)),
    "vit_large_patch14_clip_224": (224, 14, 1024, 24, 16, 4096, 1000, dict(pre_norm=True, norm_eps=1e-5)),
    "vit_base_patch16_clip_quickgelu_224": (224, 16, 768, 12, 12, 3072, 512,
                                            dict(pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu")),
    "vit_large_patch14_clip_quickgelu_224": (224, 14, 1024, 24, 16, 4096, 768,
                                             dict(pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu")),
    "vit_base_patch16_siglip_224": (224, 16, 768, 12, 12, 3072, 0,
                                    dict(class_token=False, global_pool="map", act_layer="gelu")),
    "vit_so400m_patch14_siglip_224": (224, 14, 1152, 27, 16, 4304, 0,
                                      dict(class_token=False, global_pool="map", act_layer="gelu")),
    "deit_base_distilled_patch16_224": (224, 16, 768, 12, 12, 3072, 1000, dict(distilled=True)),
    "deit3_base_patch16_224": (224, 16, 768, 12, 12, 3072, 1000, dict(no_embed_class=True, init_values=1e-6)),
}
# Parameter counts of timm 1.0.31's models of these names (timm.create_model(name), meta device).
TIMM_PARAMS = {
    "vit_small_patch14_dinov2": 22_056_192, "vit_base_patch14_dinov2": 86_579_712,
    "vit_large_patch14_dinov2": 304_367_616, "vit_base_patch14_reg4_dinov2": 86_582_016,
    "vit_base_patch16_clip_224": 86_568_424, "vit_large_patch14_clip_224": 304_204_776,
    "vit_base_patch16_clip_quickgelu_224": 86_193_152, "vit_large_patch14_clip_quickgelu_224": 303_966_976,
    "vit_base_patch16_siglip_224": 92_884_224, "vit_so400m_patch14_siglip_224": 427_680_704,
    "deit_base_distilled_patch16_224": 87_338_192, "deit3_base_patch16_224": 86_585_320,
}


@pytest.mark.parametrize("name", list(EXPECTED_PRESETS))
def test_family_presets_match_timm(name):
    img, patch, dim, depth, heads, hidden, classes, other = EXPECTED_PRESETS[name]
    cfg = get_config(name)
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_hidden_dim,
            cfg.num_classes) == (img, patch, dim, depth, heads, hidden, classes)
    for field, value in other.items():
        assert getattr(cfg, field) == value, field
    with torch.device("meta"):  # the full size, without allocating it
        model = ViT(cfg)
    assert sum(p.numel() for p in model.parameters()) == TIMM_PARAMS[name]


def test_presets_build_small_and_run():
    for name in EXPECTED_PRESETS:
        cfg = get_config(name)
        small = cfg.replace(img_size=cfg.patch_size * 2, embed_dim=32, num_heads=2, depth=1)
        model = ViT(small).eval()
        out = model(torch.randn(1, 3, *small.img_hw))
        assert out.shape == (1, small.num_classes or 32), name


# ------------------------------------------------------------------- parameters
def test_parameter_names_are_timms():
    def keys(**fields):
        return set(ViT(**{**TINY, **fields}).state_dict())

    assert {"blocks.0.ls1.gamma", "blocks.1.ls2.gamma"} <= keys(init_values=1e-5)
    assert not any(".ls" in k for k in keys())
    assert "reg_token" in keys(reg_tokens=4)
    assert {"norm_pre.weight", "norm_pre.bias"} <= keys(pre_norm=True)
    assert "patch_embed.proj.bias" not in keys(pre_norm=True)
    assert {"dist_token", "head_dist.weight", "head_dist.bias"} <= keys(distilled=True)
    pool = {f"attn_pool.{name}" for name in (
        "latent", "q.weight", "q.bias", "kv.weight", "kv.bias", "proj.weight", "proj.bias",
        "norm.weight", "norm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")}
    siglip = keys(class_token=False, global_pool="map")
    assert pool <= siglip and "cls_token" not in siglip and "norm.weight" in siglip
    shapes = {k: tuple(v.shape) for k, v in ViT(**TINY, reg_tokens=3, no_embed_class=True).state_dict().items()}
    assert shapes["reg_token"] == (1, 3, 32) and shapes["pos_embed"] == (1, GRID, 32)
    shapes = {k: tuple(v.shape) for k, v in ViT(**TINY, class_token=False, global_pool="map").state_dict().items()}
    assert shapes["attn_pool.latent"] == (1, 1, 32) and shapes["attn_pool.kv.weight"] == (64, 32)
    assert shapes["attn_pool.mlp.fc1.weight"] == (128, 32)


def test_no_weight_decay_names_the_learned_tokens():
    model = ViT(**TINY, reg_tokens=2)
    names = {name for name, _ in model.named_parameters()}
    assert model.no_weight_decay() & names == {"pos_embed", "cls_token", "reg_token"}
    assert "dist_token" in ViT(**TINY, distilled=True).no_weight_decay() & set(ViT(**TINY, distilled=True).state_dict())


def test_init_values_and_activations():
    model = ViT(**TINY, init_values=1e-6, act_layer="quick_gelu")
    assert isinstance(model.blocks[0].ls1, LayerScale)
    assert torch.equal(model.blocks[1].ls2.gamma, torch.full((32,), 1e-6))
    assert isinstance(model.blocks[0].mlp.act, QuickGELU)
    assert ViT(**TINY, act_layer="gelu_tanh").blocks[0].mlp.act.approximate == "tanh"
    assert ViT(**TINY).blocks[0].mlp.act.approximate == "none"
    siglip = ViT(**TINY, class_token=False, global_pool="map", act_layer="gelu_tanh")
    assert siglip.attn_pool.mlp.act.approximate == "tanh"  # the head uses the model's activation


# -------------------------------------------------------------- knob semantics
def test_layer_scale_and_activation_in_the_block():
    model = perturbed(init_values=1e-5, act_layer="quick_gelu")
    block = model.blocks[0]
    x = torch.randn(2, 17, 32, dtype=torch.float64)
    with torch.no_grad():
        h = x + block.ls1.gamma * block.attn(block.norm1(x))
        n = block.norm2(h)
        hidden = block.mlp.fc1(n)
        mlp = block.mlp.fc2(hidden * torch.sigmoid(1.702 * hidden))
        torch.testing.assert_close(block(x), h + block.ls2.gamma * mlp)


@pytest.mark.parametrize("no_embed_class", [False, True])
def test_prefix_tokens_and_positions(no_embed_class):
    model = perturbed(reg_tokens=3, no_embed_class=no_embed_class)
    x = images()
    with torch.no_grad():
        tokens = model.embed(x)
        patches = model.patch_embed(x)
    pos = model.pos_embed
    prefix = torch.cat([model.cls_token, model.reg_token], dim=1).expand(2, -1, -1)
    assert tokens.shape == (2, 4 + GRID, 32)
    if no_embed_class:  # the prefix tokens have no position
        torch.testing.assert_close(tokens[:, :4], prefix)
        torch.testing.assert_close(tokens[:, 4:], patches + pos)
    else:
        torch.testing.assert_close(tokens, torch.cat([prefix, patches], dim=1) + pos)


def test_distillation_token_follows_the_class_token():
    model = perturbed(distilled=True)
    with torch.no_grad():
        tokens = model.embed(images())
    torch.testing.assert_close(tokens[:, 1], (model.dist_token + model.pos_embed[:, 1:2])[:, 0].expand(2, -1))


def test_pre_norm_before_the_blocks():
    model = perturbed(pre_norm=True, norm_eps=1e-5)
    x = images()
    assert model.patch_embed.proj.bias is None and model.norm_pre.eps == 1e-5
    with torch.no_grad():
        tokens = F.layer_norm(model.embed(x), (32,), model.norm_pre.weight, model.norm_pre.bias, 1e-5)
        for block in model.blocks:
            tokens = block(tokens)
        torch.testing.assert_close(model.forward_features(x), model.norm(tokens))


def test_map_head_is_single_query_attention_over_the_patches():
    model = perturbed(global_pool="map", act_layer="gelu_tanh")  # with a class token: it is left out
    pool = model.attn_pool
    feats = torch.randn(2, 1 + GRID, 32, dtype=torch.float64)
    with torch.no_grad():
        tokens = feats[:, 1:]
        q = pool.q(pool.latent).reshape(1, 2, 16)  # heads 2, head_dim 16
        k, v = pool.kv(tokens).reshape(2, GRID, 2, 2, 16).unbind(2)
        scores = torch.einsum("hd,bnhd->bhn", q[0], k) / math.sqrt(16)
        attended = torch.einsum("bhn,bnhd->bhd", scores.softmax(-1), v).reshape(2, 32)
        y = pool.proj(attended)
        normed = pool.norm(y)
        want = y + pool.mlp.fc2(F.gelu(pool.mlp.fc1(normed), approximate="tanh"))
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), want)
        torch.testing.assert_close(model.forward_head(feats), model.head(want))


def test_distilled_heads_in_eval_and_training():
    model = perturbed(distilled=True)
    x = images()
    with torch.no_grad():
        feats = model.forward_features(x)
        cls, dist = model.head(feats[:, 0]), model.head_dist(feats[:, 1])
        torch.testing.assert_close(model(x), (cls + dist) / 2)
        torch.testing.assert_close(model.forward_head(feats, pre_logits=True), (feats[:, 0] + feats[:, 1]) / 2)
        model.train()
        torch.testing.assert_close(model(x), (cls + dist) / 2)  # training without distillation: the mean
        model.set_distilled_training()
        both = model(x)
        assert isinstance(both, tuple) and len(both) == 2
        torch.testing.assert_close(both[0], cls)
        torch.testing.assert_close(both[1], dist)
        model.eval()
        torch.testing.assert_close(model(x), (cls + dist) / 2)  # eval: the mean whatever the switch
        model.train()
        model.set_distilled_training(False)
        torch.testing.assert_close(model(x), (cls + dist) / 2)
    with pytest.raises(ValueError, match="needs a distilled model"):
        ViT(**TINY).set_distilled_training()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_dynamic_img_size_resamples_the_grid_positions_only(family):
    model = perturbed(**FAMILIES[family], dynamic_img_size=True)
    cfg = model.config
    x = images(size=48)
    with torch.no_grad():
        tokens = model.embed(x)
    assert tokens.shape == (2, cfg.num_prefix_tokens + 36, 32)
    pos = model.pos_embed_for((6, 6))
    assert pos.shape == (1, cfg.pos_prefix_tokens + 36, 32)
    torch.testing.assert_close(pos[:, :cfg.pos_prefix_tokens], model.pos_embed[:, :cfg.pos_prefix_tokens])
    assert model(x).shape == (2, 5)


# ---------------------------------------------------------------- embedding API
@pytest.mark.parametrize("family", list(FAMILIES))
def test_forward_intermediates_are_the_block_outputs(family):
    model = perturbed(**FAMILIES[family], depth=3)
    prefix = model.num_prefix_tokens
    x = images()
    with torch.no_grad():
        tokens = model.norm_pre(model.embed(x))
        outputs = []
        for block in model.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(inter) == 3
        for got, want in zip(inter, outputs):
            assert got.shape == (2, 32, 4, 4)  # NCHW patch maps
            torch.testing.assert_close(got, want[:, prefix:].transpose(1, 2).reshape(2, 32, 4, 4))

        normed = model.forward_intermediates(x, indices=[0, -1], norm=True, output_fmt="NLC",
                                             intermediates_only=True)
        torch.testing.assert_close(normed[0], model.norm(outputs[0])[:, prefix:])
        torch.testing.assert_close(normed[1], model.norm(outputs[2])[:, prefix:])

        last_two = model.forward_intermediates(x, indices=2, output_fmt="NLC", return_prefix_tokens=True,
                                               intermediates_only=True)
        for got, want in zip(last_two, outputs[1:]):
            if prefix:
                patches, prefix_tokens = got
                torch.testing.assert_close(prefix_tokens, want[:, :prefix])
            else:
                patches = got  # nothing to return: timm gives the patches alone
            torch.testing.assert_close(patches, want[:, prefix:])

        dino = model.get_intermediate_layers(x, n=2, reshape=True, norm=True)
        torch.testing.assert_close(dino[1], model.norm(outputs[2])[:, prefix:].transpose(1, 2).reshape(2, 32, 4, 4))

        early, only_first = model.forward_intermediates(x, indices=[0], stop_early=True)
        torch.testing.assert_close(early, model.norm(outputs[0]))  # timm: the last block run, normed
        assert len(only_first) == 1


def test_forward_intermediates_bad_arguments():
    model = ViT(**TINY)
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NLC', got 'NHWC'"):
        model.forward_intermediates(x, output_fmt="NHWC")
    with pytest.raises(ValueError, match="indices=3 asks for the last 3 blocks; expected 1 to 2"):
        model.forward_intermediates(x, indices=3)
    with pytest.raises(ValueError, match="block index 2 is out of range for 2 blocks"):
        model.forward_intermediates(x, indices=[0, 2])
    with pytest.raises(ValueError, match="block index -3 is out of range"):
        model.forward_intermediates(x, indices=[-3])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_pooled_embedding_is_forward_head_pre_logits(family):
    model = perturbed(**FAMILIES[family])
    x = images()
    with torch.no_grad():
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        assert feats.shape == (2, model.num_prefix_tokens + GRID, 32) and pooled.shape == (2, 32)
        if family == "siglip":
            torch.testing.assert_close(pooled, model.attn_pool(feats))
        elif family != "deit-distilled":
            torch.testing.assert_close(pooled, feats[:, 0])  # the normed class token
        if family != "deit-distilled":
            torch.testing.assert_close(model(x), model.head(pooled))


# ---------------------------------------------------------------------- FLOPs
@pytest.mark.parametrize("family", ["plain", *FAMILIES])
def test_count_flops_matches_torch_flop_counter(family):
    """Every matmul of the forward counted (norms and activations are not), new parts included."""
    cfg = ViTConfig(**TINY, **FAMILIES.get(family, {}))
    model = ViT(cfg).eval()
    # The math attention: plain matmuls the counter sees (it does not count CPU flash attention).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    assert count_flops(cfg) == counter.get_total_flops()


def test_create_model_builds_the_family_presets():
    model = vit.create_model("vit_base_patch14_reg4_dinov2", img_size=28, depth=1, embed_dim=32, num_heads=2)
    assert model.reg_token.shape == (1, 4, 32) and model.pos_embed.shape == (1, 4, 32)
