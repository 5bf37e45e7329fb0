"""Hugging Face checkpoints of the ViT family: DINOv2 (+registers), CLIP, SigLIP, DeiT.

Each case is a random-init tiny transformers model with every parameter perturbed (LayerNorm
weights != 1, LayerScale != its init, biases != 0, so that a swapped or dropped key shows),
saved with ``save_pretrained``. Our reference and fast models loaded from it must give HF's
``pooler_output`` (DeiT: its logits) by the model parity rule.
"""

from __future__ import annotations

import json

import pytest
import torch

import vit
from fastvit_kernels.testing import MODEL_RTOL, assert_parity
from vit import weights as ckpt

transformers = pytest.importorskip("transformers")

IMG, PATCH = 56, 14  # a 4x4 grid
TOWER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
             image_size=IMG, patch_size=PATCH)
TEXT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, vocab_size=99,
            max_position_embeddings=16)


def _dinov2(**kw):
    return transformers.Dinov2Model(transformers.Dinov2Config(**TOWER, layerscale_value=0.5, **kw))


def _dinov2_reg(**kw):
    return transformers.Dinov2WithRegistersModel(
        transformers.Dinov2WithRegistersConfig(**TOWER, layerscale_value=0.5, num_register_tokens=4, **kw))


def _clip_vision(**kw):
    return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**TOWER, **kw))


def _clip(**kw):
    cfg = transformers.CLIPConfig(vision_config={**TOWER, **kw}, text_config=TEXT, projection_dim=16)
    return transformers.CLIPModel(cfg)


def _siglip_vision(**kw):
    return transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**TOWER, **kw))


def _siglip(**kw):
    return transformers.SiglipModel(transformers.SiglipConfig(vision_config={**TOWER, **kw}, text_config=TEXT))


def _deit_teacher(**kw):
    return transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**TOWER, num_labels=5, **kw))


def _deit_model(**kw):
    return transformers.DeiTModel(transformers.DeiTConfig(**TOWER, **kw))


def _deit_classifier(**kw):
    return transformers.DeiTForImageClassification(transformers.DeiTConfig(**TOWER, num_labels=5, **kw))


def _pooled(hf, x):
    """What our ``forward_head(forward_features(x), pre_logits=True)`` must equal."""
    if isinstance(hf, (transformers.CLIPModel, transformers.SiglipModel)):
        return hf.vision_model(pixel_values=x).pooler_output
    if isinstance(hf, transformers.DeiTModel):
        hidden = hf(pixel_values=x).last_hidden_state  # timm's DeiT embedding: mean of class and distillation
        return (hidden[:, 0] + hidden[:, 1]) / 2
    return hf(pixel_values=x).pooler_output


# name: (builder, model_type in config.json, what is compared: pooled embedding or logits)
CASES = {
    "dinov2": (_dinov2, "dinov2", "pooled"),
    "dinov2_with_registers": (_dinov2_reg, "dinov2_with_registers", "pooled"),
    "clip_vision_model": (_clip_vision, "clip_vision_model", "pooled"),
    "clip": (_clip, "clip", "pooled"),
    "siglip_vision_model": (_siglip_vision, "siglip_vision_model", "pooled"),
    "siglip": (_siglip, "siglip", "pooled"),
    "deit_with_teacher": (_deit_teacher, "deit", "logits"),
    "deit_model": (_deit_model, "deit", "pooled"),
    "deit_classifier": (_deit_classifier, "deit", "logits"),
}


def _perturbed(builder, **kw):
    torch.manual_seed(0)
    model = builder(**kw).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _images(batch=2):
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _expected(hf, what, x):
    with torch.no_grad():
        return hf(pixel_values=x).logits if what == "logits" else _pooled(hf, x)


def _ours(model, what, x):
    with torch.no_grad():
        if what == "logits":
            return model(x)
        return model.forward_head(model.forward_features(x), pre_logits=True)


@pytest.fixture(scope="module", params=list(CASES))
def saved(request, tmp_path_factory):
    """(case name, HF model, its save_pretrained directory)"""
    builder, _, _ = CASES[request.param]
    hf = _perturbed(builder)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_snapshot_matches_hf(saved, fast):
    name, hf, path = saved
    _, model_type, what = CASES[name]
    assert json.loads((path / "config.json").read_text())["model_type"] == model_type
    ours = vit.from_pretrained(path, fast=fast).eval()
    x = _images()
    assert_parity(f"{name} {what}", _ours(ours, what, x), _expected(hf, what, x), rtol=MODEL_RTOL)


def test_state_dict_file_alone_matches_hf(saved, tmp_path):
    """model.safetensors without its config.json: the config comes from the weights' shapes
    (num_heads, which shapes cannot tell, given), the activation and eps from the family."""
    name, hf, path = saved
    _, _, what = CASES[name]
    alone = tmp_path / "weights.safetensors"
    alone.write_bytes((path / "model.safetensors").read_bytes())
    ours = vit.from_pretrained(alone, num_heads=TOWER["num_attention_heads"]).eval()
    assert ours.config == vit.from_pretrained(path).config.replace(
        # not in the weights: dropout rates, DINOv2's LayerScale init and dynamic size
        init_values=ours.config.init_values, dynamic_img_size=False, drop_path_rate=0.0)
    x = _images()
    assert_parity(f"{name} {what} (file alone)", _ours(ours, what, x), _expected(hf, what, x), rtol=MODEL_RTOL)


def test_timm_layout_round_trip(saved, tmp_path):
    """Our state_dict (timm's layout): with our config in the file, and as a bare timm file."""
    name, _, path = saved
    ours = vit.from_pretrained(path).eval()
    with_config, bare = tmp_path / "ours.safetensors", tmp_path / "timm.safetensors"
    ckpt.save(ours, with_config, config=ours.config)
    ckpt.save({f"module.{k}": v for k, v in ours.state_dict().items()}, bare)  # a DDP-wrapped timm file
    again = vit.from_pretrained(with_config).eval()
    assert again.config == ours.config
    cfg = ours.config
    timm = vit.from_pretrained(bare, num_heads=cfg.num_heads, act_layer=cfg.act_layer, norm_eps=cfg.norm_eps).eval()
    for model in (again, timm):
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)
    x = _images()
    torch.testing.assert_close(timm.forward_features(x), ours.forward_features(x), rtol=0, atol=0)


# ------------------------------------------------------------------------ configs

def test_config_knobs_per_family(tmp_path):
    cfg = {}
    for name, (builder, _, _) in CASES.items():
        builder().save_pretrained(tmp_path / name)  # config.json names the architecture
        cfg[name] = vit.factory.read_config(tmp_path / name)
    assert cfg["dinov2"].init_values == 0.5 and cfg["dinov2"].norm_eps == 1e-6 and cfg["dinov2"].num_classes == 0
    assert cfg["dinov2_with_registers"].reg_tokens == 4 and cfg["dinov2_with_registers"].no_embed_class
    for name in ("clip_vision_model", "clip"):
        assert cfg[name].pre_norm and cfg[name].act_layer == "quick_gelu" and cfg[name].norm_eps == 1e-5
        assert cfg[name].num_classes == 0 and cfg[name].embed_dim == 32 and cfg[name].mlp_ratio == 1.5
    for name in ("siglip_vision_model", "siglip"):
        assert not cfg[name].class_token and cfg[name].global_pool == "map"
        assert cfg[name].act_layer == "gelu_tanh" and cfg[name].norm_eps == 1e-6
    for name in ("deit_with_teacher", "deit_classifier"):
        assert cfg[name].distilled and cfg[name].num_classes == 5 and cfg[name].norm_eps == 1e-12
    assert cfg["deit_model"].distilled and cfg["deit_model"].num_classes == 0


def test_load_report_notes_what_was_dropped(tmp_path):
    _clip().save_pretrained(tmp_path / "clip")
    _deit_model().save_pretrained(tmp_path / "deit")
    _deit_classifier().save_pretrained(tmp_path / "deit_cls")
    model = vit.ViT(vit.factory.read_config(tmp_path / "clip"))
    report = vit.factory.load_checkpoint(model, tmp_path / "clip")
    assert any("text tower" in n and "visual_projection.weight" in n for n in report.notes), report.notes
    model = vit.ViT(vit.factory.read_config(tmp_path / "deit"))
    assert any("pooler" in n for n in vit.factory.load_checkpoint(model, tmp_path / "deit").notes)
    model = vit.ViT(vit.factory.read_config(tmp_path / "deit_cls"))
    assert "head = 2 x classifier" in str(vit.factory.load_checkpoint(model, tmp_path / "deit_cls"))


# ------------------------------------------------------------------ unsupported variants

def test_swiglu_dinov2_is_refused_by_name(tmp_path):
    _dinov2(use_swiglu_ffn=True).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"use_swiglu_ffn=True"):
        vit.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"SwiGLU MLP \(DINOv2 use_swiglu_ffn=True: encoder.layer.0.mlp.gate_proj"):
        ckpt.convert_state_dict(_dinov2(use_swiglu_ffn=True).state_dict())


@pytest.mark.parametrize("config, message", [
    ({"model_type": "swin"}, r"unsupported Hugging Face model_type 'swin'; supported: vit, deit, dinov2"),
    ({"model_type": "clip"}, r"'clip' config needs its 'vision_config' dict, got None"),
    ({"model_type": "siglip_vision_model", "vision_use_head": False}, r"vision_use_head=False"),
    ({"model_type": "clip_vision_model", "hidden_act": "relu"}, r"hidden_act='relu' \(supported: gelu"),
])
def test_unsupported_configs_name_field_and_value(config, message):
    with pytest.raises(ValueError, match=message):
        vit.factory.config_from_hf(config)


def test_bare_state_dict_without_num_heads_says_what_to_pass(tmp_path):
    path = tmp_path / "w.safetensors"
    ckpt.save(vit.ViT(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=1, num_heads=4, num_classes=0), path)
    with pytest.raises(ValueError, match="pass num_heads="):
        vit.from_pretrained(path)


# ------------------------------------------------------------------ other image sizes

@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("size", [70, 42], ids=["larger", "smaller"])
def test_dinov2_other_image_sizes_match_hf(size, fast, tmp_path):
    """DINOv2 configs get dynamic_img_size; the position embedding is resampled as timm does
    it, which is Dinov2WithRegisters' way (antialiased bicubic in fp32). (HF's plain
    Dinov2Model resamples without antialiasing: about 1e-3 apart at other sizes.)"""
    builder = _dinov2_reg
    hf = _perturbed(builder)
    hf.save_pretrained(tmp_path)
    ours = vit.from_pretrained(tmp_path, fast=fast).eval()
    assert ours.config.dynamic_img_size and ours.config.img_size == IMG
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    assert_parity(f"pooled at {size} px", _ours(ours, "pooled", x), _expected(hf, "pooled", x), rtol=MODEL_RTOL)


def test_bare_timm_file_takes_the_rest_from_the_preset_of_its_structure(tmp_path, monkeypatch):
    """A timm state dict without config: a preset of the same structure gives num_heads, the
    activation and eps (e.g. vit_base_patch14_dinov2 for timm's DINOv2 weights)."""
    preset = vit.ViTConfig(img_size=IMG, patch_size=PATCH, embed_dim=32, depth=2, num_heads=2, mlp_ratio=1.5,
                           pre_norm=True, act_layer="quick_gelu", norm_eps=1e-5, num_classes=16)
    monkeypatch.setitem(vit.factory.PRESETS, "test_tiny_clip_quickgelu", preset)
    monkeypatch.setitem(vit.factory.PRESETS, "test_tiny_clip", preset.replace(act_layer="gelu", num_classes=0))
    model = vit.ViT(preset).eval()
    ckpt.save(model, tmp_path / "timm.safetensors")
    loaded = vit.from_pretrained(tmp_path / "timm.safetensors").eval()
    assert loaded.config == preset  # the preset whose classifier width matches the file's head
    x = _images()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_sharded_snapshot(tmp_path):
    hf = _perturbed(_clip_vision)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and not (tmp_path / "model.safetensors").exists()
    ours = vit.from_pretrained(tmp_path).eval()
    x = _images()
    assert_parity("sharded clip pooled", _ours(ours, "pooled", x), _expected(hf, "pooled", x), rtol=MODEL_RTOL)


def test_meta_dinov2_registers_layout():
    """Meta's own DINOv2 files: timm's names plus register_tokens (after the position
    embedding, like HF's) and mask_token; converted like the HF port of the same weights."""
    hf = _perturbed(_dinov2_reg)
    ours = ckpt.convert_state_dict(hf.state_dict())
    meta = {k: v for k, v in ours.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    cls_position = torch.randn(1, 1, TOWER["hidden_size"])  # what the fold must add back
    meta.update(register_tokens=ours["reg_token"], mask_token=torch.zeros(1, TOWER["hidden_size"]),
                cls_token=ours["cls_token"] - cls_position, pos_embed=torch.cat([cls_position, ours["pos_embed"]], 1))
    notes = []
    converted = ckpt.convert_state_dict(meta, notes=notes)
    assert converted.keys() == ours.keys() and any("mask_token" in n for n in notes)
    for key, value in ours.items():
        torch.testing.assert_close(converted[key], value, rtol=1e-6, atol=1e-6)


def test_bare_hf_file_keeps_its_family_defaults_over_a_preset(saved, tmp_path, monkeypatch):
    """A preset of the same structure gives num_heads, but the activation and eps of HF
    weights are transformers' (HF CLIP is QuickGELU where timm's *_clip_224 is GELU)."""
    name, hf, path = saved
    _, _, what = CASES[name]
    expected_cfg = vit.from_pretrained(path).config
    timm_like = expected_cfg.replace(act_layer="gelu", norm_eps=1e-3, num_heads=2 * expected_cfg.num_heads,
                                     init_values=expected_cfg.init_values and 1e-5)
    monkeypatch.setitem(vit.factory.PRESETS, "test_same_structure", timm_like)
    alone = tmp_path / "weights.safetensors"
    alone.write_bytes((path / "model.safetensors").read_bytes())
    ours = vit.from_pretrained(alone, num_heads=expected_cfg.num_heads).eval()
    assert (ours.config.act_layer, ours.config.norm_eps) == (expected_cfg.act_layer, expected_cfg.norm_eps)
    assert vit.from_pretrained(alone).config.num_heads == 2 * expected_cfg.num_heads  # from the preset
