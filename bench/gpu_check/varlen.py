"""Mixed-resolution batches (issue 20): packed varlen vs padded-to-max with a mask vs resize (to 224).

One batch of images of random sizes and aspect ratios (each side a multiple of the patch
between ``lo`` and ``hi`` pixels) goes through the same weights four ways, timed interleaved
(``vit.tools.bench.timing.time_interleaved``), inference only:

- ``packed``: the fast model on the list (``vit.packing``: one sequence, ``varlen_packed_attention``)
- ``packed-eager``: the reference model on the list (per-token layers on the pack, SDPA per image)
- ``padded-eager``: the reference model's layers on the tokens padded to the longest image, with a
  key-padding mask in SDPA (what timm's NaFlex does): the padding is computed and thrown away
- ``resize`` / ``resize-eager``: every image resized to the model's own size first (224 x 224 for
  the presets benchmarked; not timed), then the fast / reference model on one tensor batch.

tokens/s counts each image's real tokens (for resize: 197 per image at 224), so the padded path
gets no credit for its padding. Caveat: resize is not the same computation: resizing
changes the input (aspect ratio and detail), so its speed is bought with a different, usually
worse, image; packed and padded compute each image at its own resolution and are checked
against running each image alone.
"""

from __future__ import annotations

import contextlib
import random

import torch
import torch.nn.functional as F

from fastvit_kernels.reference import split_qkv
from fastvit_kernels.testing import compare, tolerance
from vit.fast import ViT as FastViT
from vit.model import ViT
from vit.tools.bench.parity import exact_fp32
from vit.tools.bench.timing import autocast, time_interleaved


def mixed_sizes(n: int, lo: int, hi: int, patch: int, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (height, width) pairs, each side a random multiple of ``patch`` in [lo, hi]."""
    rng = random.Random(seed)
    sides = list(range(-(-lo // patch) * patch, hi + 1, patch))
    return [(rng.choice(sides), rng.choice(sides)) for _ in range(n)]


def _masked_attention(attn, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The reference Attention on padded tokens (B, T, D), keys masked by ``keep`` (B, 1, 1, T)."""
    batch, tokens, dim = x.shape
    q, k, v = split_qkv(attn.qkv(x), attn.num_heads)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    return attn.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


def padded_forward(model: ViT, images: list[torch.Tensor]) -> torch.Tensor:
    """Logits of a list through the reference model's layers, padded to the longest image with
    a key-padding mask (class-token pooling; the configs benchmarked here)."""
    packed = model.embed_packed(images)
    x = torch.nn.utils.rnn.pad_sequence(packed.split(), batch_first=True)  # (B, T_max, D), zeros after each image
    lengths = torch.tensor(packed.layout.lengths, device=x.device)
    keep = (torch.arange(x.shape[1], device=x.device)[None] < lengths[:, None])[:, None, None, :]
    x = model.norm_pre(x)
    for block in model.blocks:
        x = x + block.ls1(_masked_attention(block.attn, block.norm1(x), keep))
        x = x + block.ls2(block.mlp(block.norm2(x)))
    return model.forward_head(model.norm(x))


def run(config, *, n: int, lo: int, hi: int, device: torch.device, dtype: torch.dtype, rounds: int,
        warmup: int = 1, seed: int = 0, on_round=None) -> dict:
    """Check, then time the paths above on one batch; returns the figures (see the module doc)."""
    if config.global_pool != "token" or config.distilled:
        raise ValueError(f"the padded path pools the class token: needs global_pool='token', not distilled; "
                         f"got global_pool={config.global_pool!r}, distilled={config.distilled}")
    torch.manual_seed(seed)
    reference = ViT(config).to(device).eval()
    fast = FastViT(config).to(device).eval()
    fast.load_state_dict(reference.state_dict())
    sizes = mixed_sizes(n, lo, hi, config.patch_size, seed)
    images = [torch.randn(3, h, w, device=device) for h, w in sizes]
    resized = torch.stack([F.interpolate(x[None], size=config.img_hw, mode="bilinear", antialias=True,
                                         align_corners=False)[0] for x in images])
    prefix = config.num_prefix_tokens
    real_tokens = sum((h // config.patch_size) * (w // config.patch_size) + prefix for h, w in sizes)
    longest = max((h // config.patch_size) * (w // config.patch_size) + prefix for h, w in sizes)
    resize_tokens = n * (config.grid_size[0] * config.grid_size[1] + prefix)

    def step(fn, x):
        def call():
            with torch.inference_mode(), autocast(device, dtype):
                return fn(x)
        return call

    fns = {
        "packed": step(fast, images),
        "packed-eager": step(reference, images),
        "padded-eager": step(lambda xs: padded_forward(reference, xs), images),
        "resize": step(fast, resized),
        "resize-eager": step(reference, resized),
    }
    # parity first: the packed and padded logits against each image run alone (fp32 reference)
    with torch.no_grad(), exact_fp32():
        ref_hi = torch.cat([reference([x]) for x in images])
    ref_lowp = None
    if dtype != torch.float32:
        with torch.no_grad(), autocast(device, dtype):
            ref_lowp = torch.cat([reference([x]) for x in images])
    tol = tolerance(ref_hi, ref_lowp, dtype, rtol=1e-4)
    parity = {}
    for name in ("packed", "packed-eager", "padded-eager"):
        with exact_fp32() if dtype == torch.float32 else contextlib.nullcontext():
            result = compare(name, fns[name]().float(), ref_hi, tol)
        parity[name] = {"ok": result.ok, "max_diff": result.max_diff, "tolerance": result.tolerance}
    times = time_interleaved(fns, device, rounds=rounds, warmup=warmup, on_round=on_round)
    rows = {}
    for name, seconds in times.items():
        median = sorted(seconds)[len(seconds) // 2]
        tokens = resize_tokens if name.startswith("resize") else real_tokens
        rows[name] = {"median_ms": median * 1e3, "img_per_s": n / median, "tokens_per_s": tokens / median,
                      "rounds": len(seconds), "round_ms": [t * 1e3 for t in seconds], "parity": parity.get(name)}
    rows["padded-eager"]["computed_tokens"] = n * longest
    return {
        "model": {k: getattr(config, k) for k in ("embed_dim", "depth", "num_heads", "patch_size")},
        "images": n, "sides_px": [lo, hi], "sizes": sizes, "dtype": str(dtype).removeprefix("torch."),
        "real_tokens": real_tokens, "padded_tokens": n * longest, "resize_hw": list(config.img_hw),
        "resize_tokens": resize_tokens,
        "results": rows,
        "caveat": "resize changes the input (aspect ratio, detail): not the same computation; "
                  "packed and padded-eager compute every image at its own size (checked against each image alone)",
    }
