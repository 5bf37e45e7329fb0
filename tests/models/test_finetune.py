"""Fine-tuning from pretrained weights: new head, new resolution, new channels, bad files."""

import pytest
import torch
import torch.nn.functional as F

import vit
from vit import ViT, weights

SMALL = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


def _perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _saved(tmp_path, model, name="pre.safetensors", with_config=True):
    path = tmp_path / name
    weights.save(model, path, config=model.config if with_config else None)
    return path


def _backbone(model):
    return {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}


def test_new_classifier_is_initialized_and_backbone_loaded(tmp_path):
    pre = _perturbed(ViT(**SMALL, num_classes=1000))
    path = _saved(tmp_path, pre)
    fresh = ViT(**SMALL, num_classes=10)
    tuned = ViT(**SMALL, num_classes=10)
    report = vit.factory.load_checkpoint(tuned, path)
    for key, value in _backbone(pre).items():
        torch.testing.assert_close(tuned.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert tuned.head.weight.shape == (10, 32)
    # the new head is the model's own init (timm's: trunc normal std .02, zero bias), not the old rows
    assert tuned.head.bias.abs().max() == 0 and 0.005 < tuned.head.weight.std() < 0.05
    assert not torch.equal(tuned.head.weight, pre.head.weight[:10])
    assert fresh.head.weight.shape == tuned.head.weight.shape
    assert report.reinitialized == ["head.weight (10, 32)", "head.bias (10,)"]
    assert report.dropped == ["head.weight (1000, 32)", "head.bias (1000,)"]
    assert "re-initialized: head.weight (10, 32)" in str(report)


@pytest.mark.parametrize("entry", ["create_model", "from_pretrained"])
def test_num_classes_override_and_headless(tmp_path, entry):
    pre = _perturbed(ViT(**SMALL, num_classes=1000))
    path = _saved(tmp_path, pre)
    x = torch.randn(2, 3, 32, 32)

    def build(**overrides):
        if entry == "create_model":
            return vit.create_model("vit_tiny_patch16_224", **{**SMALL, **overrides}, pretrained=path).eval()
        return vit.from_pretrained(path, **overrides).eval()

    tuned = build(num_classes=10)
    assert tuned(x).shape == (2, 10)
    features = build(num_classes=0)
    with torch.no_grad():
        torch.testing.assert_close(features(x), pre.forward_head(pre.forward_features(x), pre_logits=True))


def test_headless_checkpoint_into_classifier(tmp_path):
    pre = _perturbed(ViT(**SMALL, num_classes=0))
    tuned = vit.create_model("vit_tiny_patch16_224", **SMALL, num_classes=10, pretrained=_saved(tmp_path, pre))
    assert tuned.head.weight.shape == (10, 32)
    for key, value in _backbone(pre).items():
        torch.testing.assert_close(tuned.state_dict()[key], value, rtol=0, atol=0)


def test_headless_hf_directory_to_ten_classes(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=32, patch_size=8, num_channels=3, layer_norm_eps=1e-12)
    hf = _perturbed(transformers.ViTModel(cfg, add_pooling_layer=False))
    hf.save_pretrained(tmp_path)
    ours = vit.from_pretrained(tmp_path, num_classes=10).eval()
    assert ours.head.weight.shape == (10, 32)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        got, want = ours.forward_features(x), hf(pixel_values=x).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert ours(x).shape == (2, 10)


def _timm_resample_formula(pos_embed, old, new, prefix=1):
    """timm's resample_abs_pos_embed written out: prefix kept, grid bicubic (antialiased) in fp32."""
    grid = pos_embed[:, prefix:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)
    return torch.cat([pos_embed[:, :prefix], grid.to(pos_embed.dtype)], dim=1)


def test_224_to_384_pos_embed_resampling(tmp_path):
    base = dict(patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=5)
    pre = _perturbed(ViT(img_size=224, **base))
    path = _saved(tmp_path, pre, with_config=False)  # the grid is inferred (square)
    big = vit.create_model("vit_base_patch16_224", img_size=384, **base, pretrained=path)
    assert big.pos_embed.shape == (1, 1 + 24 * 24, 32)
    torch.testing.assert_close(big.pos_embed, _timm_resample_formula(pre.pos_embed, 14, 24))
    torch.testing.assert_close(big.pos_embed[:, :1], pre.pos_embed[:, :1], rtol=0, atol=0)
    report = vit.factory.load_checkpoint(ViT(img_size=384, **base), path)
    assert report.resampled == ["pos_embed: 14x14 -> 24x24"]


def test_dynamic_img_size_model_from_other_resolution(tmp_path):
    pre = _perturbed(ViT(**SMALL, num_classes=3))
    model = vit.create_model("vit_tiny_patch16_224", **{**SMALL, "img_size": 48}, num_classes=3,
                             dynamic_img_size=True, pretrained=_saved(tmp_path, pre)).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():  # at the checkpoint's own size: resampled twice, close to the original
        assert model(x).shape == (1, 3)
        assert model(torch.randn(1, 3, 64, 40)).shape == (1, 3)


@pytest.mark.parametrize("in_chans", [1, 6])
def test_input_channels_adapted(tmp_path, in_chans):
    rgb = _perturbed(ViT(**SMALL, num_classes=4))
    model = vit.create_model("vit_tiny_patch16_224", **SMALL, num_classes=4, in_chans=in_chans,
                             pretrained=_saved(tmp_path, rgb)).eval()
    gray = torch.randn(2, 1, 32, 32)
    with torch.no_grad():  # an image with equal channels gives the RGB model's output
        torch.testing.assert_close(model(gray.expand(-1, in_chans, -1, -1)), rgb(gray.expand(-1, 3, -1, -1)),
                                   rtol=1e-5, atol=1e-5)
    report = vit.factory.load_checkpoint(ViT(**SMALL, num_classes=4, in_chans=in_chans), _saved(tmp_path, rgb))
    assert report.adapted == [f"patch_embed.proj.weight: 3 -> {in_chans} channels"]


def test_adapt_input_conv_rule():
    w = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(weights.adapt_input_conv(w, 1), w.sum(1, keepdim=True))
    five = weights.adapt_input_conv(w, 5)
    torch.testing.assert_close(five, torch.cat([w, w[:, :2]], dim=1) * 3 / 5)
    assert weights.adapt_input_conv(w, 3) is w
    with pytest.raises(ValueError, match="in_chans must be a positive int, got 0"):
        weights.adapt_input_conv(w, 0)


@pytest.mark.parametrize("change, message", [
    (dict(depth=3), r"missing keys \['blocks.2.attn.proj.bias'"),
    (dict(embed_dim=64), r"cls_token: expected \(1, 1, 64\), got \(1, 1, 32\)"),
    (dict(num_heads=4, embed_dim=32, mlp_ratio=4.0), r"blocks.0.mlp.fc1.weight: expected \(128, 32\), got \(64, 32\)"),
    (dict(patch_size=4), r"patch_embed.proj.weight: expected \(32, 3, 4, 4\), got \(32, 3, 8, 8\)"),
])
def test_architecture_mismatch_is_refused(tmp_path, change, message):
    path = _saved(tmp_path, ViT(**SMALL, num_classes=4))
    with pytest.raises(ValueError, match=message) as info:
        vit.create_model("vit_tiny_patch16_224", **{**SMALL, **change}, num_classes=4, pretrained=path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name, content", [
    ("junk.safetensors", b"\xff" * 64),
    ("short.safetensors", None),
    ("junk.pth", b"not a zip archive at all"),
])
def test_corrupt_weights_file_names_the_file(tmp_path, name, content):
    path = tmp_path / name
    if content is None:  # a real file cut in half
        full = _saved(tmp_path, ViT(**SMALL, num_classes=4), "full.safetensors").read_bytes()
        content = full[: len(full) // 2]
    path.write_bytes(content)
    with pytest.raises(ValueError, match="cannot read .*" + name) as info:
        vit.create_model("vit_tiny_patch16_224", **SMALL, num_classes=4, pretrained=path)
    assert "checkpoint" in str(info.value)
