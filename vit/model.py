"""The reference Vision Transformer: plain PyTorch, timm's structure and parameter names.

``ViT(config)`` or ``ViT(**fields)`` (the fields of ``ViTConfig``), or both: keyword
arguments override the config. Subclasses swap the layer classes (``patch_embed_layer``,
``block_layer``, ``norm_layer``, ``attn_pool_layer``) and keep every parameter name.

The knobs of timm's ``VisionTransformer`` that the ViT family uses (DINOv2, CLIP, SigLIP,
DeiT) are config fields with timm's names; the embedding API is timm's
(``forward_features``, ``forward_head(x, pre_logits=True)``, ``forward_intermediates``).
``forward`` / ``forward_features`` also take a list of images of different sizes, packed
into one sequence without padding (``vit.packing``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ViTConfig
from .layers import AttentionPoolLatent, Block, PatchEmbed
from .packing import PackedTokens, PackLayout, PosEmbedCache, check_image_list, pack_images
from .weights import resample_pos_embed


def take_indices(depth: int, indices: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """timm's block selection: None -> all, an int n -> the last n, a list -> those (negative from the end)."""
    if indices is None:
        indices = depth
    if isinstance(indices, int) and not isinstance(indices, bool):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices} asks for the last {indices} blocks; expected 1 to {depth}")
        return list(range(depth - indices, depth))
    taken = []
    for i in indices:
        index = depth + i if i < 0 else i
        if not 0 <= index < depth:
            raise ValueError(f"block index {i} is out of range for {depth} blocks "
                             f"(expected {-depth} to {depth - 1})")
        taken.append(index)
    if not taken:
        raise ValueError("indices selects no block; expected an int >= 1 or a non-empty list")
    return taken


class ViT(nn.Module):
    patch_embed_layer = PatchEmbed
    block_layer = Block
    norm_layer = nn.LayerNorm
    attn_pool_layer = AttentionPoolLatent
    linear_layer = nn.Linear  # the heads (blocks take theirs from their layers' classes)

    def __init__(self, config: ViTConfig | None = None, **overrides):
        super().__init__()
        if config is not None and not isinstance(config, ViTConfig):
            raise TypeError(f"config must be a ViTConfig or None, got {type(config).__name__}")
        cfg = (config or ViTConfig()).replace(**overrides)
        self.config = cfg
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.grad_checkpointing = False
        self.distilled_training = False  # DeiT: forward returns both heads' logits in training
        self._pos_embed_cache = PosEmbedCache()  # resampled pos_embed per grid, for inference

        dim = cfg.embed_dim
        # CLIP's pre-norm models have no patch-embedding bias (timm: bias=not pre_norm).
        self.patch_embed = self.patch_embed_layer(cfg.patch_size, cfg.in_chans, dim, bias=not cfg.pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, dim)) if cfg.reg_tokens else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.distilled else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_tokens, dim))
        self.pos_drop = nn.Dropout(cfg.pos_drop_rate)
        self.norm_pre = self.norm_layer(dim, eps=cfg.norm_eps) if cfg.pre_norm else nn.Identity()
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # also under a meta device
        self.blocks = nn.Sequential(*[
            self.block_layer(dim, cfg.num_heads, cfg.mlp_hidden_dim, cfg.qkv_bias,
                             proj_drop=cfg.proj_drop_rate, attn_drop=cfg.attn_drop_rate,
                             drop_path=rate, norm_eps=cfg.norm_eps, init_values=cfg.init_values,
                             act_layer=cfg.act_layer)
            for rate in rates
        ])
        self.norm = nn.Identity() if cfg.use_fc_norm else self.norm_layer(dim, eps=cfg.norm_eps)
        self.attn_pool = (self.attn_pool_layer(dim, cfg.num_heads, cfg.mlp_hidden_dim, cfg.norm_eps, cfg.act_layer)
                          if cfg.global_pool == "map" else None)
        self.fc_norm = self.norm_layer(dim, eps=cfg.norm_eps) if cfg.use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = self.linear_layer(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        if cfg.distilled:
            self.head_dist = self.linear_layer(dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    # ------------------------------------------------------------------ init / settings
    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default init: truncated normal (std .02) for Linear and pos_embed, the
        class and register tokens near 0, the MAP latent at std D^-1/2; LayerScale
        gammas keep their ``init_values``."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        if self.attn_pool is not None:
            latent = self.attn_pool.latent
            nn.init.trunc_normal_(latent, std=latent.shape[-1] ** -0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = bool(enable)

    def set_distilled_training(self, enable: bool = True) -> None:
        """DeiT (``distilled``): in training, return ``(class-head logits, distillation-head
        logits)`` for a distillation loss instead of their mean (timm's switch)."""
        if not self.config.distilled:
            raise ValueError("set_distilled_training needs a distilled model (config distilled=True)")
        self.distilled_training = bool(enable)

    def no_weight_decay(self) -> set[str]:
        """Parameters that take no weight decay, by name (timm's set)."""
        return {"pos_embed", "cls_token", "reg_token", "dist_token"}

    @property
    def num_features(self) -> int:
        return self.config.embed_dim

    # ------------------------------------------------------------------------ forward
    def check_images(self, x, any_size: bool = False) -> tuple[int, int]:
        """Validate an image batch; returns its patch grid (rows, cols). ``any_size``: any
        multiple of the patch size, whatever ``dynamic_img_size`` says (the packed path)."""
        cfg = self.config
        if not isinstance(x, torch.Tensor):
            hint = " (a list of images goes through forward / forward_features, packed)" \
                if isinstance(x, (list, tuple)) else ""
            raise TypeError(f"images must be a torch.Tensor, got {type(x).__name__}{hint}")
        if x.dim() != 4:
            raise ValueError(f"images must be (batch, {cfg.in_chans}, height, width), "
                             f"got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"images must be a floating-point tensor, got dtype {x.dtype}")
        if x.shape[1] != cfg.in_chans:
            raise ValueError(f"expected {cfg.in_chans} image channels, got {x.shape[1]} "
                             f"(images of shape {tuple(x.shape)})")
        height, width = x.shape[-2:]
        if height % cfg.patch_size or width % cfg.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size "
                             f"{cfg.patch_size}")
        if not (cfg.dynamic_img_size or any_size) and (height, width) != cfg.img_hw:
            raise ValueError(f"expected image size {cfg.img_hw[0]}x{cfg.img_hw[1]}, got "
                             f"{height}x{width} (build with dynamic_img_size=True for other sizes)")
        return height // cfg.patch_size, width // cfg.patch_size

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a patch grid, resampled if it is not the config's
        (cached per grid with autograd off, see ``packing.PosEmbedCache``)."""
        if tuple(grid) == self.config.grid_size:
            return self.pos_embed
        cfg = self.config
        return self._pos_embed_cache.get(self.pos_embed, grid, lambda: resample_pos_embed(
            self.pos_embed, grid, cfg.grid_size, cfg.pos_prefix_tokens))

    def prefix_tokens(self) -> list[torch.Tensor]:
        """The learned tokens put before the patches, in order: class, registers, distillation."""
        return [t for t in (self.cls_token, self.reg_token, self.dist_token) if t is not None]

    def embed(self, x: torch.Tensor, any_size: bool = False) -> torch.Tensor:
        """Images -> tokens: patch embedding, prefix tokens prepended, position embedding
        added (to the patches only with ``no_embed_class``), dropout."""
        grid = self.check_images(x, any_size)
        x = self.patch_embed(x)
        pos = self.pos_embed_for(grid)
        prefix = [t.expand(x.shape[0], -1, -1) for t in self.prefix_tokens()]
        if self.config.no_embed_class:
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        return self.pos_drop(x)

    def embed_packed(self, images) -> PackedTokens:
        """A list of images (C, H_i, W_i) -> their tokens packed into one sequence (see
        ``vit.packing``), each with its prefix tokens and its grid's position embedding."""
        grids = check_image_list(images, self.config.in_chans, self.config.patch_size)
        return pack_images(images, lambda batch: self.embed(batch, any_size=True), grids, self.num_prefix_tokens)

    def _run_block(self, block: nn.Module, *state, layout: PackLayout | None = None):
        kwargs = {} if layout is None else {"layout": layout}  # the tensor path calls blocks as before
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *state, use_reentrant=False, **kwargs)
        return block(*state, **kwargs)

    def iter_blocks(self, x: torch.Tensor, blocks=None, layout: PackLayout | None = None) -> Iterator:
        """Run ``blocks`` (default: all) on tokens ``x``, yielding each block's output
        (as a state that ``summed`` turns into tokens; here the tokens themselves).
        ``layout``: ``x`` is a pack (1, total, D) of several images (``vit.packing``)."""
        for block in self.blocks if blocks is None else blocks:
            x = self._run_block(block, x, layout=layout)
            yield x

    def summed(self, state) -> torch.Tensor:
        """A block's output as tokens (B, T, D) (the fast model keeps it unsummed)."""
        return state

    def final_norm(self, state) -> torch.Tensor:
        """The final norm (identity for fc_norm models) of a block's output."""
        return self.norm(self.summed(state))

    def last_block_output(self, x: torch.Tensor, layout: PackLayout | None = None):
        """Tokens -> the last block's output state (earlier ones are not kept alive)."""
        return deque(self.iter_blocks(x, layout=layout), maxlen=1)[0]

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens -> the last block's output."""
        return self.summed(self.last_block_output(x))

    def forward_features(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor | PackedTokens:
        """Images (B, C, H, W) -> every token after the final norm (B, T, D).

        A list of images (C, H_i, W_i) of any sizes (multiples of the patch size) -> a
        ``PackedTokens``: every image's tokens packed (1, total, D), each image attending
        only to itself; ``.split()`` gives them per image, ``forward_head`` pools per image.
        """
        if isinstance(x, (list, tuple)):
            return self.forward_features_packed(x)
        return self.final_norm(self.last_block_output(self.norm_pre(self.embed(x))))

    def forward_features_packed(self, images) -> PackedTokens:
        """A list of images -> their final tokens, packed (see ``forward_features``)."""
        packed = self.embed_packed(images)
        state = self.last_block_output(self.norm_pre(packed.tokens), layout=packed.layout)
        return packed.with_tokens(self.final_norm(state))

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None,
                              return_prefix_tokens: bool = False, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False):
        """The outputs of chosen blocks, for dense heads (segmentation, depth), as timm has it.

        ``indices``: None for every block, an int n for the last n, or a list of block
        indices (negative from the end). ``norm`` applies the final norm to each;
        ``output_fmt`` "NCHW" gives patch maps (B, D, H/P, W/P), "NLC" patch tokens
        (B, N, D); the prefix tokens are dropped unless ``return_prefix_tokens`` (then
        each entry is ``(patches, prefix (B, n_prefix, D))``). Returns
        ``(final features, intermediates)``, or only the list with ``intermediates_only``.
        ``stop_early`` skips the blocks after the last one taken (the final features are
        then those of that block, normed, as in timm).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        depth = len(self.blocks)
        taken = take_indices(depth, indices)
        grid = self.check_images(x)
        blocks = self.blocks[:max(taken) + 1] if stop_early else self.blocks
        intermediates, state = [], None
        for i, state in enumerate(self.iter_blocks(self.norm_pre(self.embed(x)), blocks)):
            if i in taken:
                out = self.summed(state)
                intermediates.append(self.norm(out) if norm else out)
        prefix = self.num_prefix_tokens
        prefixes = [y[:, :prefix] for y in intermediates]
        intermediates = [y[:, prefix:] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(y.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous()
                             for y in intermediates]
        if return_prefix_tokens and prefix:
            intermediates = list(zip(intermediates, prefixes))
        if intermediates_only:
            return intermediates
        return self.final_norm(state), intermediates

    def get_intermediate_layers(self, x: torch.Tensor, n: int | list[int] = 1, reshape: bool = False,
                                return_prefix_tokens: bool = False, norm: bool = False) -> list:
        """DINOv2's interface to ``forward_intermediates`` (timm keeps it too): the last ``n``
        blocks (or those listed), as patch tokens, or patch maps with ``reshape``."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True)

    def pool(self, x: torch.Tensor | PackedTokens) -> torch.Tensor:
        """Tokens (B, T, D) -> (B, D): the class token, the mean of the patch tokens, or the
        MAP head over the patch tokens (the prefix tokens excluded, as timm does). A pack
        of B images is pooled per image."""
        if isinstance(x, PackedTokens):
            if self.attn_pool is not None:
                return torch.cat([self.attn_pool(p[None]) for p in x.patch_tokens()])
            if self.config.global_pool == "avg":
                return torch.stack([p.mean(dim=0) for p in x.patch_tokens()])
            return x.prefix_tokens()[:, 0]
        if self.attn_pool is not None:
            return self.attn_pool(x[:, self.num_prefix_tokens:])
        if self.config.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor | PackedTokens, pre_logits: bool = False):
        """Tokens (B, T, D), or a pack of B images' tokens -> logits (B, num_classes), or the
        pooled embedding (B, D) if ``pre_logits``. Distilled (DeiT): the mean of the class and
        distillation tokens' embeddings / logits; in training after
        ``set_distilled_training()``, both logits."""
        if self.config.distilled:
            prefix = x.prefix_tokens() if isinstance(x, PackedTokens) else x
            cls, dist = prefix[:, 0], prefix[:, 1]
            if pre_logits:
                return (cls + dist) / 2
            cls, dist = self.head(cls), self.head_dist(dist)
            if self.distilled_training and self.training:
                return cls, dist
            return (cls + dist) / 2
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor | list[torch.Tensor]):
        """Images (B, C, H, W), or a list of B images (C, H_i, W_i) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


def count_flops(config: ViTConfig, img_hw: tuple[int, int] | None = None) -> int:
    """Forward FLOPs (2 per multiply-add) of one image: the matmuls and attention
    (blocks, MAP head, classifier heads; norms and activations are not counted)."""
    height, width = img_hw or config.img_hw
    patches = (height // config.patch_size) * (width // config.patch_size)
    tokens = patches + config.num_prefix_tokens
    dim, hidden = config.embed_dim, config.mlp_hidden_dim
    embed = 2 * patches * dim * config.in_chans * config.patch_size ** 2
    per_block = 2 * tokens * dim * (3 * dim + dim + 2 * hidden) + 4 * tokens * tokens * dim
    pool = 0
    if config.global_pool == "map":  # over the patch tokens: q and proj on 1 token, kv on all
        pool = 2 * dim * dim * 2 + 2 * patches * dim * 2 * dim + 4 * patches * dim + 2 * dim * 2 * hidden
    head = 2 * dim * config.num_classes * (2 if config.distilled else 1)
    return embed + config.depth * per_block + pool + head


__all__ = ["ViT", "count_flops", "take_indices"]
