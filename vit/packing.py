"""Mixed-resolution batches without padding: a list of images packed into one token sequence.

Each image keeps its own patch grid: its tokens (prefix tokens, then patches, position
embedding resampled to its grid) follow the previous image's, and attention stays within
each image through ``cu_seqlens`` (flash-attention's varlen convention). LayerNorm, MLP
and residual adds are per token, so they run on the pack as on any batch.

A list is always taken at each image's own size, whatever ``dynamic_img_size`` says: that
flag guards the tensor path against an unintended size; a list asks for mixed sizes.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class PackLayout:
    """Where each image's tokens are in a pack: image i is rows ``cu_seqlens[i]:cu_seqlens[i+1]``
    (``num_prefix_tokens`` prefix tokens, then its ``grids[i]`` patches row by row)."""

    grids: tuple[tuple[int, int], ...]
    num_prefix_tokens: int
    cu_seqlens: torch.Tensor  # int32 (n + 1,), on the tokens' device
    max_seqlen: int

    @property
    def lengths(self) -> list[int]:
        return [rows * cols + self.num_prefix_tokens for rows, cols in self.grids]

    @property
    def starts(self) -> list[int]:
        starts, offset = [], 0
        for length in self.lengths:
            starts.append(offset)
            offset += length
        return starts

    def __len__(self) -> int:
        return len(self.grids)


@dataclass(frozen=True)
class PackedTokens:
    """The tokens of several images, packed: ``tokens`` (1, total, D) and their ``layout``."""

    tokens: torch.Tensor
    layout: PackLayout

    def __len__(self) -> int:
        return len(self.layout)

    def with_tokens(self, tokens: torch.Tensor) -> PackedTokens:
        return replace(self, tokens=tokens)

    def split(self) -> list[torch.Tensor]:
        """Each image's tokens (T_i, D), as views."""
        return list(torch.split(self.tokens[0], self.layout.lengths))

    def patch_tokens(self) -> list[torch.Tensor]:
        """Each image's patch tokens (N_i, D), the prefix tokens dropped."""
        return [t[self.layout.num_prefix_tokens:] for t in self.split()]

    def prefix_tokens(self) -> torch.Tensor:
        """Every image's prefix tokens, (B, num_prefix_tokens, D)."""
        prefix = self.layout.num_prefix_tokens
        starts = torch.tensor(self.layout.starts, device=self.tokens.device)
        rows = starts[:, None] + torch.arange(prefix, device=self.tokens.device)
        return self.tokens[0, rows]


def check_image_list(images, in_chans: int, patch_size: int) -> list[tuple[int, int]]:
    """Validate a list of images (C, H_i, W_i) for packing; returns their patch grids."""
    if not isinstance(images, (list, tuple)):
        raise TypeError(f"expected a list of image tensors, got {type(images).__name__}")
    if not images:
        raise ValueError("expected a non-empty list of images, got an empty list")
    grids = []
    first = images[0]
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"image {i} must be a torch.Tensor, got {type(image).__name__}")
        if image.dim() != 3:
            raise ValueError(f"image {i} must be ({in_chans}, height, width), got shape {tuple(image.shape)}")
        if not image.is_floating_point():
            raise TypeError(f"image {i} must be a floating-point tensor, got dtype {image.dtype}")
        if image.shape[0] != in_chans:
            raise ValueError(f"image {i}: expected {in_chans} channels, got {image.shape[0]} "
                             f"(shape {tuple(image.shape)})")
        if image.device != first.device or image.dtype != first.dtype:
            raise ValueError(f"image {i} is {image.dtype} on {image.device}, image 0 is {first.dtype} on "
                             f"{first.device}: a list must share one dtype and device")
        height, width = image.shape[-2:]
        if height == 0 or width == 0 or height % patch_size or width % patch_size:
            raise ValueError(f"image {i} is {height}x{width}: each side must be a positive multiple of "
                             f"the patch size {patch_size}")
        grids.append((height // patch_size, width // patch_size))
    return grids


def pack_images(images: Sequence[torch.Tensor], embed: Callable[[torch.Tensor], torch.Tensor],
                grids: list[tuple[int, int]], num_prefix_tokens: int) -> PackedTokens:
    """Embed images of different sizes and pack their tokens, in order.

    ``embed`` maps a batch (g, C, H, W) of one size to its tokens (g, T, D) (the model's
    embedding: prefix tokens, patches, position embedding for that grid); images of one
    size go through it together, so a mostly uniform batch costs few calls.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape[-2:]), []).append(i)
    pieces: list[torch.Tensor | None] = [None] * len(images)
    for indices in groups.values():
        batch = torch.stack([images[i] for i in indices]) if len(indices) > 1 else images[indices[0]][None]
        for i, tokens in zip(indices, embed(batch)):
            pieces[i] = tokens
    layout_lengths = [rows * cols + num_prefix_tokens for rows, cols in grids]
    device = images[0].device
    # A normal tensor even under inference_mode: its version counter lets the attention op
    # check its values once per pack instead of once per block (a device sync each on a GPU).
    with torch.inference_mode(False):
        offsets = torch.tensor([0, *layout_lengths]).cumsum(0).to(device=device, dtype=torch.int32)
    layout = PackLayout(tuple(grids), num_prefix_tokens, offsets, max(layout_lengths))
    return PackedTokens(torch.cat(pieces)[None], layout)


def sequence_ids(layout: PackLayout, device) -> torch.Tensor:
    """(total,) the image index of every token of a pack."""
    lengths = torch.tensor(layout.lengths, device=device)
    return torch.repeat_interleave(torch.arange(len(layout), device=device), lengths)


class PosEmbedCache:
    """Resampled position embeddings, one per patch grid, for inference.

    An entry is valid only for the very ``pos_embed`` it came from: the same Parameter
    object, storage, in-place version, dtype and device (an optimizer step, a
    ``load_state_dict`` or ``.to()`` invalidates it). The cache keeps a detached alias of the
    data its entries came from: ``model.half(); model.float()`` swaps ``param.data`` without a
    version bump, and without the alias the new data can land at the freed old address.
    Used only with autograd off (no_grad, inference_mode): a result that carries a graph is
    never kept; nor under ``torch.compile``.
    """

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._source = None  # weakref to the pos_embed the entries came from
        self._alias = None  # its data then, kept alive so that no other data takes its address

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._source = self._alias = None

    def get(self, pos_embed: torch.Tensor, grid: tuple[int, int],
            compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return compute()
        if (self._source is None or self._source() is not pos_embed
                or self._alias.data_ptr() != pos_embed.data_ptr()):
            self.clear()
            self._source, self._alias = weakref.ref(pos_embed), pos_embed.detach()
        key = (tuple(grid), pos_embed._version, pos_embed.dtype, pos_embed.device)
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            return hit
        value = compute()
        # an entry of an older version of the parameter can never match again
        for old in [k for k in self._entries if k[0] == key[0]]:
            del self._entries[old]
        self._entries[key] = value
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return value

    def __deepcopy__(self, memo) -> PosEmbedCache:
        return PosEmbedCache(self.max_entries)  # a copy's pos_embed is another tensor


__all__ = ["PackLayout", "PackedTokens", "PosEmbedCache", "check_image_list", "pack_images", "sequence_ids"]
