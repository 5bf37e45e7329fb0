"""The reference ViT: presets, shapes, pooling, resampling, checkpointing, bad input."""

import pytest
import torch

import vit
from vit import ViT, ViTConfig, get_config
from vit.weights import resample_pos_embed

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)


def test_presets_match_timm_shapes():
    expected = {
        "vit_tiny_patch16_224": (192, 12, 3, 16), "vit_small_patch16_224": (384, 12, 6, 16),
        "vit_base_patch16_224": (768, 12, 12, 16), "vit_large_patch16_224": (1024, 24, 16, 16),
        "vit_base_patch32_224": (768, 12, 12, 32), "vit_base_patch16_384": (768, 12, 12, 16),
        "vit_large_patch14_224": (1024, 24, 16, 14), "vit_huge_patch14_224": (1280, 32, 16, 14),
    }
    for name, (dim, depth, heads, patch) in expected.items():
        cfg = get_config(name)
        assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.patch_size) == (dim, depth, heads, patch)
    assert get_config("vit_huge_patch14_224").head_dim == 80
    assert get_config("vit_base_patch16_384").grid_size == (24, 24)


def test_state_dict_uses_timm_names():
    keys = set(ViT(**TINY).state_dict())
    for key in ["patch_embed.proj.weight", "patch_embed.proj.bias", "cls_token", "pos_embed",
                "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                "blocks.0.attn.proj.weight", "blocks.0.norm2.bias", "blocks.1.mlp.fc1.weight",
                "blocks.1.mlp.fc2.bias", "norm.weight", "head.weight", "head.bias"]:
        assert key in keys
    assert ViT(**TINY).state_dict()["pos_embed"].shape == (1, 17, 32)


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_forward_shapes_and_pooling(pool):
    model = ViT(**TINY, global_pool=pool).eval()
    x = torch.randn(3, 3, 32, 32)
    assert model(x).shape == (3, 5)
    feats = model.forward_features(x)
    assert feats.shape == (3, 17, 32)
    pooled = model.forward_head(feats, pre_logits=True)
    expected = feats[:, 1:].mean(1) if pool == "avg" else feats[:, 0]
    if pool == "avg":
        expected = model.fc_norm(expected)
        assert "fc_norm.weight" in model.state_dict()
    torch.testing.assert_close(pooled, expected)


def test_avg_pool_without_class_token():
    model = ViT(**TINY, class_token=False, global_pool="avg").eval()
    assert model.pos_embed.shape == (1, 16, 32) and model.cls_token is None
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_resample_to_same_size_is_identity():
    pos = torch.randn(1, 1 + 14 * 14, 16)
    assert resample_pos_embed(pos, (14, 14)) is pos


def test_resample_keeps_prefix_and_interpolates_in_fp32():
    pos = torch.randn(1, 1 + 4 * 4, 8, dtype=torch.bfloat16)
    out = resample_pos_embed(pos, (6, 6))
    assert out.shape == (1, 37, 8) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    # a constant grid stays constant under interpolation
    const = torch.ones(1, 1 + 16, 8)
    torch.testing.assert_close(resample_pos_embed(const, (7, 5))[:, 1:], torch.ones(1, 35, 8))


@pytest.mark.parametrize("size", [160, 288])
def test_dynamic_img_size_runs_other_sizes(size):
    model = ViT(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3,
                dynamic_img_size=True).eval()
    x = torch.randn(1, 3, size, size)
    assert model(x).shape == (1, 3)
    grid = size // 16
    tokens = model.embed(x)
    expected_pos = resample_pos_embed(model.pos_embed, (grid, grid), (14, 14))
    assert tokens.shape == (1, grid * grid + 1, 32)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + expected_pos[:, :1])[:, 0])


def test_dynamic_img_size_same_size_matches_static():
    static = ViT(**TINY).eval()
    dynamic = ViT(**TINY, dynamic_img_size=True).eval()
    dynamic.load_state_dict(static.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(dynamic(x), static(x))


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = ViT(**TINY, drop_path_rate=0.2, proj_drop_rate=0.1)
    x = torch.randn(2, 3, 32, 32)

    def grads(checkpointing):
        model.zero_grad()
        model.set_grad_checkpointing(checkpointing)
        torch.manual_seed(1)  # same dropout / drop-path masks in both runs
        model(x).square().sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)
    assert any(g.abs().sum() > 0 for g in plain.values())


def test_dropout_and_drop_path_only_in_training():
    model = ViT(**TINY, drop_path_rate=0.5, proj_drop_rate=0.5, attn_drop_rate=0.5, drop_rate=0.5)
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


@pytest.mark.parametrize("images, match", [
    (torch.randn(2, 1, 32, 32), "expected 3 image channels, got 1"),
    (torch.randn(2, 3, 30, 32), "not divisible by the patch size 8"),
    (torch.randn(3, 32, 32), r"must be \(batch, 3, height, width\), got shape \(3, 32, 32\)"),
    (torch.randn(2, 3, 40, 40), "expected image size 32x32, got 40x40"),
    (torch.zeros(2, 3, 32, 32, dtype=torch.long), "floating-point"),
])
def test_bad_images(images, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ViT(**TINY)(images)


def test_bad_config_and_preset():
    with pytest.raises(ValueError, match="unknown model preset 'vit_gigantic'.*vit_base_patch16_224"):
        vit.create_model("vit_gigantic")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ViTConfig(embed_dim=30, num_heads=4)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ViTConfig(img_size=225)
    with pytest.raises(TypeError, match="unknown ViTConfig field"):
        ViT(**TINY, depht=3)
    with pytest.raises(ValueError, match="needs class_token"):
        ViTConfig(class_token=False, global_pool="token")


def test_create_model_overrides():
    model = vit.create_model("vit_tiny_patch16_224", num_classes=7, depth=1)
    assert model.config.depth == 1 and model.head.out_features == 7
