"""Checkpoint interop: Hugging Face and timm layouts, safetensors, bad checkpoints."""

import json

import pytest
import torch

import vit
from vit import ViT
from vit import weights as ckpt

transformers = pytest.importorskip("transformers")

HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                image_size=32, patch_size=8, num_channels=3, num_labels=10, layer_norm_eps=1e-12)


def _hf_model(**overrides):
    cfg = transformers.ViTConfig(**{**HF_SMALL, **overrides})
    model = transformers.ViTForImageClassification(cfg).eval()
    # random init leaves LayerNorms at (1, 0) and biases at 0: perturb so that every
    # parameter matters and a swapped key cannot go unnoticed
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _our_model_for(hf_model):
    cfg = vit.factory.config_from_hf(hf_model.config.to_dict())
    return ViT(cfg).eval()


def _to_legacy_hf_layout(state_dict):
    """transformers >= 5 names (layers.N.attention.q_proj ...) -> the older encoder.layer.N layout."""
    renames = {"attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
               "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
               "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("vit.layers."):
            key = key.replace("vit.layers.", "vit.encoder.layer.", 1)
            for new, old in renames.items():
                key = key.replace(f".{new}.", f".{old}.")
        out[key] = value
    return out


def test_hf_logits_match_after_conversion():
    hf = _hf_model()
    ours = _our_model_for(hf)
    ours.load_state_dict(ckpt.convert_state_dict(hf.state_dict()), strict=True)
    assert ours.config.norm_eps == 1e-12
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        diff = (ours(x) - hf(pixel_values=x).logits).abs().max().item()
    assert diff <= 1e-4


def test_legacy_hf_layout_converts_to_same_weights():
    hf = _hf_model()
    new_layout = ckpt.convert_state_dict(hf.state_dict(), source="hf")
    legacy = _to_legacy_hf_layout(hf.state_dict())
    assert any(".attention.attention.query." in k for k in legacy)
    old_layout = ckpt.convert_state_dict(legacy)
    assert new_layout.keys() == old_layout.keys()
    for key in new_layout:
        torch.testing.assert_close(old_layout[key], new_layout[key], rtol=0, atol=0)


def test_hf_snapshot_directory_through_from_pretrained(tmp_path):
    hf = _hf_model()
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    ours = vit.from_pretrained(tmp_path).eval()
    assert json.loads((tmp_path / "config.json").read_text())["layer_norm_eps"] == ours.config.norm_eps
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-4


def test_hf_qkv_without_bias():
    hf = _hf_model(qkv_bias=False)
    ours = _our_model_for(hf)
    assert ours.blocks[0].attn.qkv.bias is None
    ours.load_state_dict(ckpt.convert_state_dict(hf.state_dict()), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-4


def test_timm_layout_round_trip(tmp_path):
    model = ViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)
    # timm checkpoints often carry wrapper prefixes (DDP's "module.")
    timm_sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "w.safetensors"
    ckpt.save(ckpt.convert_state_dict(timm_sd, source="timm"), path, config=model.config)
    loaded = ckpt.load(path)
    fresh = ViT(model.config)
    fresh.load_state_dict(loaded, strict=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value, rtol=0, atol=0)
    again = vit.from_pretrained(path)  # config came back from the file's metadata
    assert again.config == model.config


def test_pth_loads_with_weights_only(tmp_path):
    model = ViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": model.state_dict()}, path)
    loaded = vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                              num_heads=2, num_classes=4, pretrained=path)
    torch.testing.assert_close(loaded.pos_embed, model.pos_embed)


def test_pickled_objects_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(Exception, match="(?i)weights.only|unsupported|global"):
        ckpt.load(path)


def test_pretrained_pos_embed_resampled_to_new_grid(tmp_path):
    small = ViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    path = tmp_path / "w.safetensors"
    ckpt.save(small, path)
    big = vit.create_model("vit_tiny_patch16_224", img_size=48, patch_size=8, embed_dim=32, depth=1,
                           num_heads=2, num_classes=4, pretrained=path)
    expected = ckpt.resample_pos_embed(small.pos_embed, (6, 6))
    torch.testing.assert_close(big.pos_embed, expected)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = ViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4)
    sd = model.state_dict()
    sd.pop("blocks.1.mlp.fc2.weight")
    sd["blocks.7.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.safetensors"
    ckpt.save(sd, path, config=model.config)
    with pytest.raises(ValueError, match=r"missing keys \['blocks.1.mlp.fc2.weight'\].*"
                                         r"unexpected keys \['blocks.7.extra.weight'\]"):
        vit.from_pretrained(path)


def test_shape_mismatch_is_named(tmp_path):
    # (a classifier of another size is re-initialized for fine-tuning: tests/test_finetune.py)
    model = ViT(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=4)
    path = tmp_path / "w.safetensors"
    ckpt.save(model, path)
    with pytest.raises(ValueError, match=r"blocks.0.mlp.fc1.weight: expected \(64, 32\), got \(128, 32\)"):
        vit.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=1,
                         num_heads=2, num_classes=4, mlp_ratio=2.0, pretrained=path)


def test_unknown_hf_keys_raise():
    with pytest.raises(ValueError, match="unrecognised Hugging Face ViT keys"):
        ckpt.convert_state_dict({"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(1),
                                 "vit.something.else": torch.zeros(1)})
    with pytest.raises(ValueError, match="cannot tell the layout"):
        ckpt.convert_state_dict({"foo.bar": torch.zeros(1)})


def test_create_model_with_hf_snapshot_uses_the_snapshot_config(tmp_path):
    """The snapshot's config.json wins over the preset's: eps 1e-12, its labels and sizes."""
    hf = _hf_model(num_labels=7)
    hf.save_pretrained(tmp_path)
    preset = vit.get_config("vit_tiny_patch16_224")
    assert preset.norm_eps != 1e-12 and preset.num_classes != 7
    ours = vit.create_model("vit_tiny_patch16_224", pretrained=tmp_path).eval()
    assert ours.config.norm_eps == 1e-12 and ours.config.num_classes == 7 and ours.config.embed_dim == 64
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (ours(x) - hf(pixel_values=x).logits).abs().max().item() <= 1e-4
    # overrides still apply on top of the snapshot's config, and the preset name is checked
    tuned = vit.create_model("vit_tiny_patch16_224", pretrained=tmp_path, drop_path_rate=0.1)
    assert tuned.config.drop_path_rate == 0.1 and tuned.config.norm_eps == 1e-12
    with pytest.raises((KeyError, ValueError), match="vit_nonexistent"):
        vit.create_model("vit_nonexistent", pretrained=tmp_path)
