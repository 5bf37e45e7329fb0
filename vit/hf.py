"""Hugging Face checkpoints of the ViT family: ``config.json`` -> ViTConfig, state_dict -> ours.

Families (``model_type``): vit, deit, dinov2, dinov2_with_registers, clip / clip_vision_model,
siglip / siglip_vision_model (for the two-tower clip and siglip, the ``vision_config``). Each
maps onto timm's knobs (see ``config_from_hf``), and every family's keys, in the older
(``encoder.layer.N.attention.attention.query``) and newer (``layers.N.attention.q_proj``)
transformers layouts, convert to our (timm's) names (``convert_state_dict``). What a vision
encoder has no place for (text towers, projections, poolers, mask tokens) is dropped with a
note; keys nobody knows raise.
"""

from __future__ import annotations

import re

import torch

from .config import ViTConfig

SUPPORTED_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "clip", "clip_vision_model",
                         "siglip", "siglip_vision_model")
_TWO_TOWER = {"clip": "clip_vision_model", "siglip": "siglip_vision_model"}

# HF's ``hidden_act`` -> our ``act_layer`` (gelu_new and gelu_pytorch_tanh are both tanh-GELU)
_ACTIVATIONS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                "quick_gelu": "quick_gelu"}

# What a family's config.json leaves out means transformers' default; and what a bare
# state_dict of that family implies (``family_defaults``).
_DEFAULTS = {
    "vit": dict(layer_norm_eps=1e-12, hidden_act="gelu"),
    "deit": dict(layer_norm_eps=1e-12, hidden_act="gelu"),
    "dinov2": dict(layer_norm_eps=1e-6, hidden_act="gelu"),
    "clip": dict(layer_norm_eps=1e-5, hidden_act="quick_gelu"),
    "siglip": dict(layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh"),
}


def _family(model_type: str) -> str:
    return {"dinov2_with_registers": "dinov2", "clip_vision_model": "clip",
            "siglip_vision_model": "siglip"}.get(model_type, model_type)


def family_defaults(family: str) -> dict:
    """ViTConfig fields a bare state_dict of ``family`` cannot show: its activation and eps."""
    hf = _DEFAULTS[family]
    return dict(act_layer=_ACTIVATIONS[hf["hidden_act"]], norm_eps=hf["layer_norm_eps"])


# ------------------------------------------------------------------------------ configs

def vision_config(hf: dict) -> dict:
    """The vision tower's config: ``hf`` itself, or the ``vision_config`` of a CLIP/SigLIP model."""
    if not isinstance(hf, dict):
        raise TypeError(f"expected a Hugging Face config.json as a dict, got {type(hf).__name__}")
    model_type = hf.get("model_type", "vit")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported Hugging Face model_type {model_type!r}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type in _TWO_TOWER:
        if not isinstance(hf.get("vision_config"), dict):
            raise ValueError(f"a {model_type!r} config needs its 'vision_config' dict, got "
                             f"{hf.get('vision_config')!r}")
        return {"model_type": _TWO_TOWER[model_type], **hf["vision_config"],
                "architectures": hf.get("architectures")}
    return hf


def _unsupported(hf: dict, field: str, value, expected) -> ValueError:
    return ValueError(f"unsupported {hf.get('model_type')} config: {field}={value!r} (supported: {expected})")


def config_from_hf(hf: dict) -> ViTConfig:
    """Translate a Hugging Face ``config.json`` dict of the ViT family into a ViTConfig.

    DINOv2 gets ``dynamic_img_size`` (its configs say 518 px, its processors crop 224 px, and
    HF's model interpolates the position embedding for any size). Anything the family's
    HF model can do but ours cannot (SwiGLU MLP, SigLIP without its head, other activations)
    raises a ValueError naming the field and its value.
    """
    hf = vision_config(hf)
    family = _family(hf.get("model_type", "vit"))
    get = {**_DEFAULTS[family], **hf}.get
    act = get("hidden_act")
    if act not in _ACTIVATIONS:
        raise _unsupported(hf, "hidden_act", act, ", ".join(_ACTIVATIONS))
    hidden = get("hidden_size", 768)
    architectures = get("architectures") or []
    fields = dict(
        img_size=get("image_size", 224), patch_size=get("patch_size", 16), in_chans=get("num_channels", 3),
        embed_dim=hidden, depth=get("num_hidden_layers", 12), num_heads=get("num_attention_heads", 12),
        mlp_ratio=get("intermediate_size", 4 * hidden) / hidden, norm_eps=get("layer_norm_eps"),
        act_layer=_ACTIVATIONS[act], num_classes=0,
    )
    if family in ("vit", "deit", "dinov2"):
        fields.update(qkv_bias=get("qkv_bias", True), proj_drop_rate=get("hidden_dropout_prob", 0.0),
                      pos_drop_rate=get("hidden_dropout_prob", 0.0),
                      attn_drop_rate=get("attention_probs_dropout_prob", 0.0))
    else:
        fields.update(attn_drop_rate=get("attention_dropout", 0.0))
    if family in ("vit", "deit") and (not architectures or any("Classification" in a for a in architectures)):
        fields["num_classes"] = get("num_labels", len(get("id2label") or {}) or 2)
    if family == "deit":
        fields["distilled"] = True  # HF's DeiT always has the distillation token
    elif family == "dinov2":
        if get("use_swiglu_ffn", False):
            raise _unsupported(hf, "use_swiglu_ffn", get("use_swiglu_ffn"), "False (an fc1-GELU-fc2 MLP)")
        fields.update(mlp_ratio=float(get("mlp_ratio", 4.0)), init_values=float(get("layerscale_value", 1.0)),
                      drop_path_rate=get("drop_path_rate", 0.0), dynamic_img_size=True)
        if hf.get("model_type") == "dinov2_with_registers":
            # HF adds the class token's position before inserting the registers:
            # convert_state_dict folds it into cls_token, so the grid alone has positions
            fields.update(reg_tokens=get("num_register_tokens", 4), no_embed_class=True)
    elif family == "clip":
        fields.update(pre_norm=True)  # pre_layrnorm, bias-free patch conv; post_layernorm = norm
    elif family == "siglip":
        if not get("vision_use_head", True):
            raise _unsupported(hf, "vision_use_head", False, "True (the attention-pool head)")
        fields.update(class_token=False, global_pool="map")
    return ViTConfig(**fields)


# ------------------------------------------------------------------------------ weights

# model prefixes of the task heads and two-tower models around a vision encoder
_MODEL_PREFIXES = ("vit.", "deit.", "dinov2.", "vision_model.")
# keys outside the vision encoder: dropped, with a note
_OTHER_TOWERS = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "logit_bias")

_EMBED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.distillation_token": "dist_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",  # CLIP, SigLIP
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "pre_layrnorm.weight": "norm_pre.weight",  # (sic) CLIP
    "pre_layrnorm.bias": "norm_pre.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
    "cls_classifier.weight": "head.weight",  # DeiT with teacher
    "cls_classifier.bias": "head.bias",
    "distillation_classifier.weight": "head_dist.weight",
    "distillation_classifier.bias": "head_dist.bias",
    "head.probe": "attn_pool.latent",  # SigLIP's attention-pool head
    "head.attention.out_proj.weight": "attn_pool.proj.weight",
    "head.attention.out_proj.bias": "attn_pool.proj.bias",
    "head.layernorm.weight": "attn_pool.norm.weight",
    "head.layernorm.bias": "attn_pool.norm.bias",
    "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight",
    "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
    "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight",
    "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
}
_DROPPED = {
    "embeddings.mask_token": "the masked-image-modeling token (pretraining only)",
    "pooler.dense.weight": "the pooler (dense + tanh), which is not the embedding",
    "pooler.dense.bias": "the pooler (dense + tanh), which is not the embedding",
}
# per-block names, all families and transformers versions -> ours
_BLOCK = {
    "layernorm_before": "norm1", "norm1": "norm1", "layer_norm1": "norm1",
    "layernorm_after": "norm2", "norm2": "norm2", "layer_norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj", "self_attn.out_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_QKV = {}
for _names in (("attention.attention.query", "attention.attention.key", "attention.attention.value"),
               ("attention.q_proj", "attention.k_proj", "attention.v_proj"),
               ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
    _QKV.update({name: i for i, name in enumerate(_names)})
_BLOCK_KEY = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_SCALE_KEY = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.layer_scale([12])\.lambda1$")


def is_hf_state_dict(keys) -> bool:
    return any("embeddings.patch_embeddings." in k or "embeddings.patch_embedding." in k for k in keys)


def _strip_model(key: str) -> str:
    for prefix in _MODEL_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def convert_state_dict(state_dict: dict, notes: list | None = None) -> dict:
    """A Hugging Face ViT-family state_dict (wrapper prefixes already stripped) in our layout.

    Query/key/value Linears become one qkv; CLIP's (D,) class embedding and (N, D)
    position table get timm's (1, 1, D) and (1, N, D) shapes; SigLIP's head attention splits
    into q (first D rows) and kv. DINOv2 with registers: HF adds the class token's position
    before inserting the registers, so it is folded into cls_token and pos_embed keeps the
    grid's rows (no_embed_class, exact). DeiTForImageClassification reads the class token
    only: its classifier becomes head = 2 x classifier with head_dist = 0, whose average is
    its logits. What is dropped is appended to ``notes``; unknown keys raise.
    """
    notes = [] if notes is None else notes
    out, qkv_parts, unknown, dropped = {}, {}, [], {}
    for raw_key, value in state_dict.items():
        key = _strip_model(raw_key)
        if key.startswith(_OTHER_TOWERS):
            dropped.setdefault("the text tower and the projections (not part of the image encoder)", []).append(key)
        elif key in _DROPPED:
            dropped.setdefault(_DROPPED[key], []).append(key)
        elif key in _EMBED:
            out[_EMBED[key]] = value
        elif key == "embeddings.class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "embeddings.position_embedding.weight":
            out["pos_embed"] = value.unsqueeze(0)
        elif key in ("head.attention.in_proj_weight", "head.attention.in_proj_bias"):
            kind = key.rsplit("_", 1)[1]
            dim = value.shape[0] // 3
            out[f"attn_pool.q.{kind}"], out[f"attn_pool.kv.{kind}"] = value[:dim], value[dim:]
        elif key in ("classifier.weight", "classifier.bias"):
            out[key.replace("classifier", "head")] = value
        elif match := _LAYER_SCALE_KEY.match(key):
            out[f"blocks.{match[1]}.ls{match[2]}.gamma"] = value
        elif (match := _BLOCK_KEY.match(key)) and match[2] in _BLOCK:
            out[f"blocks.{match[1]}.{_BLOCK[match[2]]}.{match[3]}"] = value
        elif match and match[2] in _QKV:
            qkv_parts.setdefault((match[1], match[3]), [None] * 3)[_QKV[match[2]]] = value
        else:
            unknown.append(raw_key)
    swiglu = [k for k in unknown if re.search(r"\.mlp\.(weights_in|gate_proj|up_proj)\.", k)]
    if swiglu:
        raise ValueError(f"a SwiGLU MLP (DINOv2 use_swiglu_ffn=True: {swiglu[0]} ...) is not supported; "
                         "expected the fc1-GELU-fc2 MLP (mlp.fc1 / mlp.fc2)")
    if unknown:
        raise ValueError(f"unrecognised Hugging Face ViT keys: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    for (index, kind), parts in qkv_parts.items():
        if any(p is None for p in parts):
            missing = [n for n, p in zip("qkv", parts) if p is None]
            raise ValueError(f"block {index} has an incomplete query/key/value {kind}: missing {missing}")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat(parts, dim=0)
    _fold_class_position(out, notes)
    _classifier_heads(out, notes)
    for why, keys in dropped.items():
        notes.append(f"dropped {why}: {_listing(keys)}")
    return out


def _listing(keys: list[str]) -> str:
    """Keys grouped by their first name: 'text_model.* (20 tensors), logit_scale'."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(key.split(".")[0], []).append(key)
    return ", ".join(found[0] if len(found) == 1 else f"{top}.* ({len(found)} tensors)"
                     for top, found in groups.items())


def _fold_class_position(out: dict, notes: list) -> None:
    if "reg_token" not in out or "cls_token" not in out or "pos_embed" not in out:
        return
    pos = out["pos_embed"]
    out["cls_token"] = out["cls_token"] + pos[:, :1]
    out["pos_embed"] = pos[:, 1:]
    notes.append("folded the class token's position embedding into cls_token (registers: no_embed_class)")


def _classifier_heads(out: dict, notes: list) -> None:
    weight = out.get("head.weight")
    dim = out["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in out else None
    if weight is not None and dim is not None and weight.dim() == 2 and weight.shape[1] != dim:
        # Dinov2ForImageClassification: the classifier reads [class token, mean patch token]
        out.pop("head.weight")
        out.pop("head.bias", None)
        notes.append(f"dropped the classifier (in_features {weight.shape[1]}, not embed_dim {dim}: "
                     "DINOv2's class+mean-patch head has no place here)")
        return
    if weight is not None and "dist_token" in out and "head_dist.weight" not in out:
        out["head.weight"] = 2 * weight
        out["head_dist.weight"] = torch.zeros_like(weight)
        if "head.bias" in out:
            out["head.bias"] = 2 * out["head.bias"]
            out["head_dist.bias"] = torch.zeros_like(out["head.bias"])
        notes.append("DeiTForImageClassification's class-token classifier: head = 2 x classifier, "
                     "head_dist = 0 (their average is its logits)")


def detect_family(state_dict: dict) -> str:
    """The family of a state_dict in our layout, from the parameters only it has."""
    if "attn_pool.latent" in state_dict:
        return "siglip"
    if "norm_pre.weight" in state_dict:
        return "clip"
    if "dist_token" in state_dict:
        return "deit"
    if any(k.endswith(".ls1.gamma") for k in state_dict):
        return "dinov2"
    return "vit"
