"""ViT configuration: one dataclass and the named presets (timm's names)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

GLOBAL_POOLS = ("token", "avg", "map")
ACT_LAYERS = ("gelu", "gelu_tanh", "quick_gelu")


@dataclass
class ViTConfig:
    img_size: int | tuple[int, int] = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    class_token: bool = True
    global_pool: str = "token"  # 'token' (class token), 'avg' (mean of patch tokens), 'map' (attention pool)
    fc_norm: bool | None = None  # norm after pooling instead of before; None: timm's default (avg -> True)
    norm_eps: float = 1e-6
    init_values: float | None = None  # LayerScale's initial gamma (DINOv2, DeiT-III); None: no LayerScale
    reg_tokens: int = 0  # register tokens after the class token (DINOv2 with registers)
    no_embed_class: bool = False  # pos_embed covers the patch grid only; prefix tokens get no position
    pre_norm: bool = False  # LayerNorm `norm_pre` before the blocks, patch-embed conv without bias (CLIP)
    act_layer: str = "gelu"  # the MLP activation: 'gelu' (erf), 'gelu_tanh', 'quick_gelu' (CLIP)
    distilled: bool = False  # DeiT: a distillation token after the class token, and a second head
    drop_rate: float = 0.0  # dropout before the head
    pos_drop_rate: float = 0.0  # dropout after the position embedding
    proj_drop_rate: float = 0.0  # dropout after attention proj and in the MLP
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, linearly increasing over blocks
    dynamic_img_size: bool = False  # accept other image sizes by resampling pos_embed

    def __post_init__(self) -> None:
        size = self.img_size
        if isinstance(size, (list, tuple)):
            if len(size) != 2:
                raise ValueError(f"img_size must be an int or (height, width), got {size!r}")
            self.img_size = (int(size[0]), int(size[1]))
        self._validate()

    def _validate(self) -> None:
        def positive(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

        for name in ("patch_size", "in_chans", "embed_dim", "depth", "num_heads"):
            positive(name)
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0: no head), got {self.num_classes!r}")
        for side in self.img_hw:
            if side <= 0 or side % self.patch_size:
                raise ValueError(f"img_size {self.img_size} must be a positive multiple of "
                                 f"patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if self.act_layer not in ACT_LAYERS:
            raise ValueError(f"act_layer must be one of {ACT_LAYERS}, got {self.act_layer!r}")
        if isinstance(self.reg_tokens, bool) or not isinstance(self.reg_tokens, int) or self.reg_tokens < 0:
            raise ValueError(f"reg_tokens must be an int >= 0, got {self.reg_tokens!r}")
        if self.init_values is not None and (isinstance(self.init_values, bool)
                                             or not isinstance(self.init_values, (int, float))
                                             or not 0 < self.init_values < math.inf):
            raise ValueError(f"init_values must be None (no LayerScale) or a positive number, "
                             f"got {self.init_values!r}")
        if self.distilled:
            # timm's VisionTransformerDistilled: two heads on the class and distillation tokens.
            problems = {
                "class_token=True": self.class_token, "global_pool='token'": self.global_pool == "token",
                "reg_tokens=0": self.reg_tokens == 0, "fc_norm not True": not self.use_fc_norm,
                "drop_rate=0 (its heads have no dropout)": self.drop_rate == 0,
            }
            wrong = [need for need, ok in problems.items() if not ok]
            if wrong:
                got = (f"class_token={self.class_token}, global_pool={self.global_pool!r}, reg_tokens="
                       f"{self.reg_tokens}, fc_norm={self.fc_norm}, drop_rate={self.drop_rate}")
                raise ValueError(f"distilled=True needs {', '.join(wrong)}; got {got}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps!r}")
        for name in ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}")

    @property
    def img_hw(self) -> tuple[int, int]:
        size = self.img_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def grid_size(self) -> tuple[int, int]:
        h, w = self.img_hw
        return h // self.patch_size, w // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: class, then registers or the distillation token."""
        return int(self.class_token) + self.reg_tokens + int(self.distilled)

    @property
    def pos_prefix_tokens(self) -> int:
        """Rows of ``pos_embed`` before the grid's: the prefix tokens, or 0 with ``no_embed_class``."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def pos_embed_tokens(self) -> int:
        grid = self.grid_size
        return grid[0] * grid[1] + self.pos_prefix_tokens

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def use_fc_norm(self) -> bool:
        return self.global_pool == "avg" if self.fc_norm is None else self.fc_norm

    def replace(self, **overrides) -> ViTConfig:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown ViTConfig field(s) {sorted(unknown)}; "
                            f"known: {[f.name for f in dataclasses.fields(self)]}")
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ViTConfig:
        return cls().replace(**data)


_DINOV2 = dict(img_size=518, patch_size=14, init_values=1e-5, num_classes=0)
_CLIP = dict(pre_norm=True, norm_eps=1e-5)
_SIGLIP = dict(class_token=False, global_pool="map", num_classes=0)

PRESETS: dict[str, ViTConfig] = {
    "vit_tiny_patch16_224": ViTConfig(embed_dim=192, depth=12, num_heads=3),
    "vit_small_patch16_224": ViTConfig(embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch32_224": ViTConfig(patch_size=32, embed_dim=768, depth=12, num_heads=12),
    "vit_base_patch16_384": ViTConfig(img_size=384, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch16_224": ViTConfig(embed_dim=1024, depth=24, num_heads=16),
    "vit_large_patch14_224": ViTConfig(patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    "vit_huge_patch14_224": ViTConfig(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    # DINOv2 (img 518 as timm's pretrained configs; no classifier: an image encoder)
    "vit_small_patch14_dinov2": ViTConfig(**_DINOV2, embed_dim=384, depth=12, num_heads=6),
    "vit_base_patch14_dinov2": ViTConfig(**_DINOV2, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_dinov2": ViTConfig(**_DINOV2, embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch14_reg4_dinov2": ViTConfig(**_DINOV2, embed_dim=768, depth=12, num_heads=12,
                                              reg_tokens=4, no_embed_class=True),
    # CLIP image towers. timm's *_clip_224 use exact GELU (its default weights are fine-tuned
    # classifiers); OpenAI's CLIP weights need QuickGELU: *_clip_quickgelu_224, whose `head` is
    # CLIP's image projection (512 / 768 wide), as timm's default weights for those names.
    "vit_base_patch16_clip_224": ViTConfig(**_CLIP, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_clip_224": ViTConfig(**_CLIP, patch_size=14, embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch16_clip_quickgelu_224": ViTConfig(**_CLIP, patch_size=16, embed_dim=768, depth=12,
                                                     num_heads=12, act_layer="quick_gelu", num_classes=512),
    "vit_large_patch14_clip_quickgelu_224": ViTConfig(**_CLIP, patch_size=14, embed_dim=1024, depth=24,
                                                      num_heads=16, act_layer="quick_gelu", num_classes=768),
    # SigLIP image towers (timm's names use exact GELU, as timm does for them)
    "vit_base_patch16_siglip_224": ViTConfig(**_SIGLIP, patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_so400m_patch14_siglip_224": ViTConfig(**_SIGLIP, patch_size=14, embed_dim=1152, depth=27,
                                               num_heads=16, mlp_ratio=3.7362),
    # DeiT
    "deit_base_distilled_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12, distilled=True),
    "deit3_base_patch16_224": ViTConfig(embed_dim=768, depth=12, num_heads=12, no_embed_class=True,
                                        init_values=1e-6),
}


def get_config(name: str, **overrides) -> ViTConfig:
    """The preset ``name`` with ``overrides`` applied (e.g. ``num_classes=10``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
