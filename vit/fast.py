"""The fast ViT: ``vit.model.ViT`` assembled from layers that call ``fastvit_kernels``' fused ops.

Same constructor, parameter names and outputs; the backend of each op is the dispatch's
choice, never decided here (``model.backends()`` says what it resolves to). Forward path::

    patch_embed (patchify + projection + class token + position embedding, one op)
    per block:   n1, x = add_layer_norm(previous block's MLP branch, x)   # x += branch, norm1
                 a = proj(packed_attention(qkv(n1)))
                 n2, x = add_layer_norm(a, x)                             # x += a, norm2
                 branch = fc2(linear_gelu(n2))                            # fc1 + GELU fused
    final norm:  add_layer_norm(last branch, x)                           # last residual add fused

So a block returns the unsummed pair ``(x, branch)``. Dropout and drop-path are the
reference's modules at the same points (same masks for the same seed); where a fused op
cannot honour the configuration (attention dropout in training) the layer runs the reference
code. Parameters are read at forward time, so DDP/FSDP and torch.compile see plain modules.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import fastvit_kernels as fk

from . import layers, model
from .config import ViTConfig

# The fused ops the fast model calls (what ``backends()`` reports on).
MODEL_OPS = ("patch_embed", "layer_norm", "add_layer_norm", "linear_gelu", "packed_attention")


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

    def add_norm(self, branch: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(residual + branch), residual + branch)`` in one fused pass.

        The normed output keeps the activations' dtype: inside a block it only feeds a
        Linear, which autocast casts anyway (the caller applies ``_like_nn_layer_norm``
        where the output is visible).
        """
        return fk.add_layer_norm(branch, residual, self.weight, self.bias, self.eps)


class FastPatchEmbed(layers.PatchEmbed):
    """Patch embedding fused with the class token and the position embedding.

    Those two parameters belong to the model, which passes them in: the layer returns
    the tokens the reference gets from ``patch_embed`` + ``cat(cls)`` + ``+ pos_embed``.
    Called without them it is the reference layer (patch tokens only).
    """

    def forward(self, x: torch.Tensor, pos_embed: torch.Tensor | None = None,
                cls_token: torch.Tensor | None = None) -> torch.Tensor:
        if pos_embed is None:
            if cls_token is not None:
                raise ValueError("cls_token needs pos_embed: the fused op adds both")
            return super().forward(x)
        tokens = fk.patch_embed(x, self.proj.weight, self.proj.bias, pos_embed, cls_token)
        # The reference adds the position embedding after the conv, so under autocast its
        # tokens come out in the parameters' dtype (bf16 conv + fp32 pos -> fp32), and so
        # does its whole residual stream. Keep the same dtype (a no-op outside autocast).
        return tokens.to(torch.promote_types(tokens.dtype, pos_embed.dtype))


class FastAttention(layers.Attention):
    """qkv Linear -> packed attention straight from the (B, N, 3*D) qkv -> proj."""

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        if self.training and self.attn_drop > 0:
            return super().attend(qkv)  # the fused kernels have no attention dropout
        return fk.packed_attention(qkv, self.num_heads)


class FastMlp(layers.Mlp):
    """fc1 + GELU as one fused ``linear_gelu``, then dropout, fc2, dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.act, nn.GELU):
            return super().forward(x)  # someone swapped the activation: no fused op for it
        hidden = fk.linear_gelu(x, self.fc1.weight, self.fc1.bias, self.act.approximate)
        return self.drop2(self.fc2(self.drop1(hidden)))


class FastBlock(layers.Block):
    """The reference block with the residual adds fused into the following LayerNorms.

    ``forward(x, pending)`` computes the block on ``x + pending`` (``pending`` is the
    previous block's last branch, or None) and returns ``(x', branch)`` whose sum is the
    block's output; the caller fuses that add into the next norm.
    """

    attn_layer = FastAttention
    mlp_layer = FastMlp
    norm_layer = FastLayerNorm

    def forward(self, x: torch.Tensor, pending: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if pending is None:
            normed = self.norm1(x)
        else:
            normed, x = self.norm1.add_norm(pending, x)
        branch = self.drop_path1(self.attn(normed))
        normed, x = self.norm2.add_norm(branch, x)
        return x, self.drop_path2(self.mlp(normed))


class ViT(model.ViT):
    """Drop-in for ``vit.ViT`` (same arguments, ``state_dict``, outputs) on the fused ops."""

    patch_embed_layer = FastPatchEmbed
    block_layer = FastBlock
    norm_layer = FastLayerNorm

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.check_images(x)
        return self.pos_drop(self.patch_embed(x, self.pos_embed_for(grid), self.cls_token))

    def run_blocks_unsummed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens -> the last block's output as the pair ``(x, branch)`` (output = sum)."""
        pending = None
        for block in self.blocks:
            # A checkpoint unit is one block including the add of the branch it receives:
            # the same arithmetic as without checkpointing, so the same gradients.
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, pending = checkpoint(block, x, pending, use_reentrant=False)
            else:
                x, pending = block(x, pending)
        return x, pending

    def run_blocks(self, x: torch.Tensor) -> torch.Tensor:
        x, pending = self.run_blocks_unsummed(x)
        return x + pending

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x, pending = self.run_blocks_unsummed(self.embed(x))
        if isinstance(self.norm, FastLayerNorm):
            return _like_nn_layer_norm(self.norm.add_norm(pending, x)[0])
        return x + pending  # fc_norm models: no norm before pooling

    # ------------------------------------------------------------------- introspection
    def _example_args(self, device: torch.device, dtype: torch.dtype | None) -> dict[str, tuple]:
        """Empty tensors with this model's shapes (batch 1), the arguments each op gets."""
        cfg: ViTConfig = self.config
        param_dtype = self.pos_embed.dtype
        if dtype is None:  # what the functional autocast policy would hand the backend
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else param_dtype
        act_dtype = torch.promote_types(dtype, param_dtype)  # the residual stream (see FastPatchEmbed)
        dim, hidden, tokens = cfg.embed_dim, cfg.mlp_hidden_dim, self.pos_embed.shape[1]

        def empty(*shape, dt=dtype):
            return torch.empty(shape, device=device, dtype=dt)

        proj = self.patch_embed.proj
        x = empty(1, tokens, dim, dt=act_dtype)
        norm_w, norm_b = empty(dim, dt=act_dtype), empty(dim, dt=act_dtype)
        return {
            "patch_embed": (empty(1, cfg.in_chans, *cfg.img_hw), empty(*proj.weight.shape),
                            empty(dim), empty(*self.pos_embed.shape),
                            None if self.cls_token is None else empty(1, 1, dim)),
            "layer_norm": (x, norm_w, norm_b, cfg.norm_eps),
            "add_layer_norm": (x, x, norm_w, norm_b, cfg.norm_eps),
            "linear_gelu": (empty(1, tokens, dim), empty(hidden, dim), empty(hidden), "none"),
            "packed_attention": (empty(1, tokens, 3 * dim), cfg.num_heads, None),
        }

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
        return {op: fk.resolved_backend(op, device, *args[op]) for op in MODEL_OPS}

    def extra_repr(self) -> str:
        try:
            resolved = ", ".join(f"{op}={name}" for op, name in self.backends().items())
        except (fk.BackendUnavailableError, ValueError) as exc:
            resolved = f"unresolved ({exc})"
        return f"backends[{self.pos_embed.device.type}]: {resolved}"


__all__ = ["FastAttention", "FastBlock", "FastLayerNorm", "FastMlp", "FastPatchEmbed",
           "MODEL_OPS", "ViT"]
