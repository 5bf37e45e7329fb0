"""The fast ViT: ``vit.model.ViT`` assembled from layers that call ``fastvit_kernels``' fused ops.

Same constructor, parameter names and outputs; the backend of each op is the dispatch's
choice, never decided here (``model.backends()`` says what it resolves to). Forward path::

    patch_embed (patchify + projection + class/register/distillation tokens + position
                 embedding, one op); norm_pre (CLIP) as one layer_norm
    per block:   n1, x = add_layer_norm(previous block's MLP branch, x, gamma)  # x += gamma * branch, norm1
                 a = proj(packed_attention(qkv(n1)))
                 n2, x = add_layer_norm(a, x, ls1.gamma)                        # x += ls1 * a, norm2
                 branch = fc2(linear_gelu(n2))                                 # fc1 + activation fused
    final norm:  add_layer_norm(last branch, x, ls2.gamma)                     # last residual add fused
    MAP head:    attention(q(latent), kv(tokens)) with one query; its MLP's fc1 as linear_gelu

So a block returns the unsummed pair ``(x, branch)``, and the branch's LayerScale (None
without) travels with it to the next fused add. Dropout and drop-path are the reference's
modules at the same points (same masks for the same seed; drop-path's per-sample mask
commutes with LayerScale); where a fused op cannot honour the configuration (attention
dropout in training, an activation no op computes) the layer runs the reference code.
Parameters are read at forward time, so DDP/FSDP and torch.compile see plain modules.
A list of images (``vit.packing``) runs the same blocks on the pack (1, total, D) with
``varlen_packed_attention`` in place of ``packed_attention``.
"""

from __future__ import annotations

import torch
from torch import nn

import fastvit_kernels as fk
from fastvit_kernels.reference import default_scale

from . import layers, model
from .config import ViTConfig
from .packing import PackLayout

# Every fused op a fast model may call (``ViT.ops()``: those of one model, ``backends()`` reports on them).
MODEL_OPS = ("patch_embed", "layer_norm", "add_layer_norm", "linear_gelu", "linear", "packed_attention", "attention")
# ... and on a list of images (``vit.packing``), attention within each image of the pack.
PACKED_OPS = ("varlen_packed_attention",)

# A config's act_layer -> linear_gelu's ``approximate``.
APPROXIMATE = {"gelu": "none", "gelu_tanh": "tanh", "quick_gelu": "quick"}


def layer_scale(module: nn.Module) -> torch.Tensor | None:
    """A block's ``ls1`` / ``ls2``: its gamma, or None for the identity (no LayerScale)."""
    return module.gamma if isinstance(module, layers.LayerScale) else None


def _like_nn_layer_norm(out: torch.Tensor) -> torch.Tensor:
    """Give a norm's output the dtype ``nn.LayerNorm`` would have.

    Under CUDA autocast ``layer_norm`` is on PyTorch's fp32 list (on CPU it keeps the
    input dtype, as the fused ops always do); the reference model's features follow that.
    """
    if out.is_cuda and torch.is_autocast_enabled("cuda"):
        return out.float()
    return out


class FastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters and init) on the fused ``layer_norm`` op."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _like_nn_layer_norm(fk.layer_norm(x, self.weight, self.bias, self.eps))

    def add_norm(self, branch: torch.Tensor, residual: torch.Tensor, gamma: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(residual + gamma * branch), residual + gamma * branch)`` in one fused pass
        (``gamma``: the branch's LayerScale, or None).

        The normed output keeps the activations' dtype: inside a block it only feeds a
        Linear, which autocast casts anyway (the caller applies ``_like_nn_layer_norm``
        where the output is visible).
        """
        return fk.add_layer_norm(branch, residual, self.weight, self.bias, self.eps, gamma)


class FastPatchEmbed(layers.PatchEmbed):
    """Patch embedding fused with the prefix tokens and the position embedding.

    Those parameters belong to the model, which passes them in: the layer returns the
    tokens the reference's ``embed`` builds (prefix tokens, then patches; the position
    embedding covering both, or the patches only when it has just the grid's rows).
    ``reg_tokens`` are the register tokens, or DeiT's distillation token (both follow the
    class token). Called without ``pos_embed`` it is the reference layer (patch tokens only).
    """

    def forward(self, x: torch.Tensor, pos_embed: torch.Tensor | None = None,
                cls_token: torch.Tensor | None = None, reg_tokens: torch.Tensor | None = None) -> torch.Tensor:
        if pos_embed is None:
            if cls_token is not None or reg_tokens is not None:
                raise ValueError("cls_token / reg_tokens need pos_embed: the fused op adds them together")
            return super().forward(x)
        tokens = fk.patch_embed(x, self.proj.weight, self.proj.bias, pos_embed, cls_token, reg_tokens)
        # The reference adds the position embedding after the conv, so under autocast its
        # tokens come out in the parameters' dtype (bf16 conv + fp32 pos -> fp32), and so
        # does its whole residual stream. Keep the same dtype (a no-op outside autocast).
        return tokens.to(torch.promote_types(tokens.dtype, pos_embed.dtype))


class FastLinear(nn.Linear):
    """``nn.Linear`` (same parameters and init) on the ``linear`` op, so that the backend picks
    the GEMM (the cpp backend's oneDNN one beats eager's MKL sgemm on some CPUs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fk.linear(x, self.weight, self.bias)


class FastAttention(layers.Attention):
    """qkv Linear -> packed attention straight from the (B, N, 3*D) qkv -> proj."""

    linear_layer = FastLinear

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        if self.training and self.attn_drop > 0:
            return super().attend(qkv)  # the fused kernels have no attention dropout
        return fk.packed_attention(qkv, self.num_heads)

    def attend_packed(self, qkv: torch.Tensor, layout: PackLayout) -> torch.Tensor:
        """A pack's qkv (1, total, 3*D) -> (1, total, D) through the varlen kernel."""
        if self.training and self.attn_drop > 0:
            return super().attend_packed(qkv, layout)
        return fk.varlen_packed_attention(qkv[0], layout.cu_seqlens, layout.max_seqlen, self.num_heads)[None]


class FastMlp(layers.Mlp):
    """fc1 + activation (GELU, tanh-GELU or QuickGELU) as one fused ``linear_gelu``, then
    dropout, fc2, dropout."""

    linear_layer = FastLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        approximate = layers.gelu_approximation(self.act)
        if approximate is None:
            return super().forward(x)  # someone swapped the activation: no fused op for it
        hidden = fk.linear_gelu(x, self.fc1.weight, self.fc1.bias, approximate)
        return self.drop2(self.fc2(self.drop1(hidden)))


class FastBlock(layers.Block):
    """The reference block with the residual adds (and LayerScales) fused into the
    following LayerNorms.

    ``forward(x, pending, gamma)`` computes the block on ``x + gamma * pending``
    (``pending`` is the previous block's last branch or None, ``gamma`` its LayerScale or
    None) and returns ``(x', branch)``; the block's output is ``x' + out_gamma * branch``
    with ``out_gamma`` its own ``ls2`` (``layer_scale(block.ls2)``), an add the caller
    fuses into the next norm.
    """

    attn_layer = FastAttention
    mlp_layer = FastMlp
    norm_layer = FastLayerNorm

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None = None,
                gamma: torch.Tensor | None = None, layout: PackLayout | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if pending is None:
            normed = self.norm1(x)
        else:
            normed, x = self.norm1.add_norm(pending, x, gamma)
        if layout is not None:  # a pack of images (vit.packing): attention and drop-path per image
            branch = self.drop_path1(self.attn(normed, layout), layout)
            normed, x = self.norm2.add_norm(branch, x, layer_scale(self.ls1))
            return x, self.drop_path2(self.mlp(normed), layout)
        branch = self.drop_path1(self.attn(normed))
        normed, x = self.norm2.add_norm(branch, x, layer_scale(self.ls1))
        return x, self.drop_path2(self.mlp(normed))


class FastAttentionPoolLatent(layers.AttentionPoolLatent):
    """The MAP head with its single-query attention on ``fastvit_kernels.attention`` and
    its MLP's fc1 + activation on ``linear_gelu``."""

    mlp_layer = FastMlp
    norm_layer = FastLayerNorm
    linear_layer = FastLinear

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return fk.attention(q, k, v)


class ViT(model.ViT):
    """Drop-in for ``vit.ViT`` (same arguments, ``state_dict``, outputs) on the fused ops."""

    patch_embed_layer = FastPatchEmbed
    block_layer = FastBlock
    norm_layer = FastLayerNorm
    attn_pool_layer = FastAttentionPoolLatent
    linear_layer = FastLinear

    def embed(self, x: torch.Tensor, any_size: bool = False) -> torch.Tensor:
        grid = self.check_images(x, any_size)
        # Registers and DeiT's distillation token never coexist (the config says so); both
        # follow the class token, which is what the op's reg_tokens are.
        extra = self.reg_token if self.reg_token is not None else self.dist_token
        return self.pos_drop(self.patch_embed(x, self.pos_embed_for(grid), self.cls_token, extra))

    def iter_blocks(self, x: torch.Tensor, blocks=None, layout: PackLayout | None = None):
        """Yields each block's output as the unsummed ``(x, branch, gamma)``: the output is
        ``x + gamma * branch`` (``x + branch`` when gamma is None)."""
        pending = gamma = None
        for block in self.blocks if blocks is None else blocks:
            # A checkpoint unit is one block including the add of the branch it receives:
            # the same arithmetic as without checkpointing, so the same gradients.
            x, pending = self._run_block(block, x, pending, gamma, layout=layout)
            gamma = layer_scale(block.ls2)
            yield x, pending, gamma

    def summed(self, state) -> torch.Tensor:
        x, pending, gamma = state
        return x + (pending if gamma is None else pending * gamma)

    def final_norm(self, state) -> torch.Tensor:
        if isinstance(self.norm, FastLayerNorm):  # the last residual add fused into it
            x, pending, gamma = state
            return _like_nn_layer_norm(self.norm.add_norm(pending, x, gamma)[0])
        return self.summed(state)  # fc_norm models: no norm before pooling

    def ops(self) -> tuple[str, ...]:
        """The fused ops this model calls."""
        return tuple(op for op in MODEL_OPS if op != "attention" or self.attn_pool is not None)

    # ------------------------------------------------------------------- introspection
    def _example_args(self, device: torch.device, dtype: torch.dtype | None) -> dict[str, tuple]:
        """Empty tensors with this model's shapes (batch 1), the arguments each op gets."""
        cfg: ViTConfig = self.config
        param_dtype = self.pos_embed.dtype
        if dtype is None:  # what the functional autocast policy would hand the backend
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else param_dtype
        act_dtype = torch.promote_types(dtype, param_dtype)  # the residual stream (see FastPatchEmbed)
        dim, hidden, tokens = cfg.embed_dim, cfg.mlp_hidden_dim, cfg.grid_size[0] * cfg.grid_size[1]
        tokens += cfg.num_prefix_tokens
        heads, head_dim = cfg.num_heads, cfg.head_dim

        def empty(*shape, dt=dtype):
            return torch.empty(shape, device=device, dtype=dt)

        proj = self.patch_embed.proj
        extra = cfg.reg_tokens or int(cfg.distilled)
        x = empty(1, tokens, dim, dt=act_dtype)
        norm_w, norm_b = empty(dim, dt=act_dtype), empty(dim, dt=act_dtype)
        gamma = empty(dim, dt=act_dtype) if cfg.init_values is not None else None
        args = {
            "patch_embed": (empty(1, cfg.in_chans, *cfg.img_hw), empty(*proj.weight.shape),
                            None if proj.bias is None else empty(dim), empty(*self.pos_embed.shape),
                            None if self.cls_token is None else empty(1, 1, dim),
                            empty(1, extra, dim) if extra else None),
            "layer_norm": (x, norm_w, norm_b, cfg.norm_eps),
            "add_layer_norm": (x, x, norm_w, norm_b, cfg.norm_eps, gamma),
            "linear_gelu": (empty(1, tokens, dim), empty(hidden, dim), empty(hidden), APPROXIMATE[cfg.act_layer]),
            "linear": (empty(1, tokens, dim), empty(3 * dim, dim), empty(3 * dim)),
            "packed_attention": (empty(1, tokens, 3 * dim), heads, None),
        }
        if self.attn_pool is not None:  # one query over the patch tokens
            patches = tokens - cfg.num_prefix_tokens
            args["attention"] = (empty(1, heads, 1, head_dim), empty(1, heads, patches, head_dim),
                                 empty(1, heads, patches, head_dim), default_scale(head_dim))
        return args

    def backends(self, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> dict[str, str]:
        """{op: backend} that each fused op resolves to for this model's shapes.

        ``device`` defaults to the parameters' device, ``dtype`` to what the ops would
        receive right now (the autocast dtype inside ``torch.autocast``). The answer
        follows the current ``fastvit_kernels.backend(...)`` / ``FASTVIT_BACKEND``
        setting; an explicitly requested backend that cannot run an op raises, as the
        forward would.
        """
        device = torch.device(device) if device is not None else self.pos_embed.device
        args = self._example_args(device, dtype)
        return {op: fk.resolved_backend(op, device, *args[op]) for op in self.ops()}

    def extra_repr(self) -> str:
        try:
            resolved = ", ".join(f"{op}={name}" for op, name in self.backends().items())
        except (fk.BackendUnavailableError, ValueError) as exc:
            resolved = f"unresolved ({exc})"
        return f"backends[{self.pos_embed.device.type}]: {resolved}"


__all__ = ["FastAttention", "FastAttentionPoolLatent", "FastBlock", "FastLayerNorm", "FastMlp",
           "FastLinear", "FastPatchEmbed", "MODEL_OPS", "PACKED_OPS", "ViT", "layer_scale"]
