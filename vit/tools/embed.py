"""``fastvit embed``: every image of a folder through a ViT, the pooled embeddings into one file;
``fastvit search``: the images of such a file nearest to query images, by cosine similarity.

    fastvit embed photos/ --pretrained CKPT --out photos.safetensors     # rerun: continues where it stopped
    torchrun --nproc_per_node=8 -m vit.tools.cli embed photos/ --pretrained CKPT --out photos.safetensors
    fastvit search query.jpg --index photos.safetensors --k 5

The embedding is ``model.forward_head(model.forward_features(x), pre_logits=True)``, the
pooled feature the classifier would see. Files are decoded and preprocessed in DataLoader
workers with the checkpoint's recipe (``preprocess.for_checkpoint``, as ``fastvit predict``);
CUDA runs under autocast (bf16 unless ``--amp`` says otherwise). Rows are keyed by the path
relative to the folder: a rerun embeds only what the output lacks. Under torchrun each rank
embeds a contiguous shard of what is left and rank 0 merges. The file format and the
chunked, resumable writing are in ``vit.tools.embed_index``. With ``--keep-aspect`` each image
keeps its aspect ratio (at most ``--max-patches`` patches) and a batch goes through the model as
one list (``vit.packing``: packed, no padding).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from . import embed_index as store
from .data import IMAGE_EXTENSIONS
from .device import resolve_device
from .predict import default_max_patches
from .preprocess import ImageLoadError, Preprocess, for_checkpoint, keep_aspect, load_image, require_pillow
from .progress import Progress

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def list_images(root) -> list[str]:
    """The image files under ``root``, recursively, as sorted paths relative to it ('/'-separated);
    hidden files and folders are skipped."""
    root = Path(root)
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        rel = Path(folder).relative_to(root)
        found += [(rel / n).as_posix() for n in names
                  if not n.startswith(".") and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def shard(items: list, rank: int, world_size: int) -> list:
    """Rank's contiguous share of ``items`` (the shares of ranks 0, 1, ... concatenate to ``items``)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return items[rank * len(items) // world_size:(rank + 1) * len(items) // world_size]


# ------------------------------------------------------------------------------ model

def load_encoder(pretrained, *, model_name: str | None = None, fast: bool = True, device=None):
    """(model in eval mode on ``device``, the checkpoint's preprocessing), loaded as ``fastvit predict``
    loads a classifier (a head, if any, is kept and unused)."""
    from vit.factory import create_model, from_pretrained

    path = Path(pretrained)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    model = (create_model(model_name, fast=fast, pretrained=path) if model_name
             else from_pretrained(path, fast=fast))
    model = model.to(device or "cpu").eval()
    return model, for_checkpoint(path, model.config.img_hw, model.config.in_chans)


def embedding_dim(model) -> int:
    """The width of the pooled embedding (one forward pass of a blank image)."""
    cfg = model.config
    x = torch.zeros(1, cfg.in_chans, *cfg.img_hw, device=next(model.parameters()).device)
    with torch.inference_mode():
        return model.forward_head(model.forward_features(x), pre_logits=True).shape[-1]


def weights_fingerprint(model) -> str:
    """A short hash of the weights the embedding depends on (the classifier head excluded), from a
    sample of each tensor: cheap, and a checkpoint retrained at the same path is told apart."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith("head"):
            continue
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:512], flat[-512:]]).to("cpu", torch.float32)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


# ------------------------------------------------------------------------------- data

class ImageFiles(torch.utils.data.Dataset):
    """Files read and preprocessed when indexed (in DataLoader workers): (position, tensor, None),
    or (position, None, why) for a file that cannot be used."""

    def __init__(self, files: list[str], preprocess: Preprocess, in_chans: int, img_hw):
        self.files, self.preprocess, self.in_chans, self.img_hw = files, preprocess, in_chans, img_hw

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            x = self.preprocess(load_image(self.files[i]))
        except ImageLoadError as exc:
            return i, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
            return i, None, f"cannot preprocess: {type(exc).__name__}: {exc}"
        if x.shape[0] != self.in_chans:
            return i, None, f"preprocessing gave {x.shape[0]} channel(s), the model expects in_chans={self.in_chans}"
        if self.img_hw is not None and tuple(x.shape[-2:]) != tuple(self.img_hw):
            return i, None, (f"preprocessing gave a {x.shape[-2]}x{x.shape[-1]} image, the model expects "
                             f"{self.img_hw[0]}x{self.img_hw[1]}")
        return i, x, None


def collate(items):
    """([(positions, images)] one group per image size, [(position, why)] for the failures)."""
    groups: dict[tuple, tuple[list, list]] = {}
    for i, x, _ in items:
        if x is not None:
            positions, images = groups.setdefault(tuple(x.shape), ([], []))
            positions.append(i)
            images.append(x)
    return ([(p, torch.stack(xs)) for p, xs in groups.values()],
            [(i, why) for i, _, why in items if why is not None])


def embed_files(model, files: list[str], preprocess: Preprocess, *, batch_size: int = 64, workers: int = 0,
                amp: torch.dtype | None = None) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[int, str]]]]:
    """Per batch of ``files``, in order: (positions of the embedded files, their embeddings
    (n, D) float32 on the CPU, [(position, why)] of the files that could not be used).
    A recipe with ``max_patches`` (``--keep-aspect``) runs each batch as one list of sizes."""
    cfg = model.config
    device = next(model.parameters()).device
    packed = preprocess.max_patches is not None
    dataset = ImageFiles(files, preprocess, cfg.in_chans, None if cfg.dynamic_img_size or packed else cfg.img_hw)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                         pin_memory=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
    for groups, failed in loader:
        positions, rows = [], []
        if packed and groups:  # one list of every size: no padding, one pass
            groups = [([i for p, _ in groups for i in p], [x.to(device, non_blocking=True)
                                                         for _, xs in groups for x in xs])]
        for group_positions, images in groups:
            with torch.inference_mode(), autocast:
                tokens = model.forward_features(images if packed else images.to(device, non_blocking=True))
                pooled = model.forward_head(tokens, pre_logits=True)
            positions += group_positions
            rows.append(pooled.float().cpu())
        yield positions, (torch.cat(rows) if rows else torch.empty(0, 0)), failed


# ------------------------------------------------------------------------------ embed

@dataclasses.dataclass
class ShardResult:
    embedded: int
    failures: list[tuple[str, str]]
    wall_s: float
    chunks: int


def embed_shard(model, root: Path, files: list[str], preprocess: Preprocess, *, out: Path, rank: int, dim: int,
                dtype: torch.dtype, metadata: dict, batch_size: int, workers: int, chunk_size: int,
                amp, progress: Progress) -> ShardResult:
    """Embed ``files`` (relative to ``root``) into chunks of about ``chunk_size`` rows under the parts folder."""
    parts = store.parts_dir(out)
    seq, written = store.next_seq(parts, rank), 0
    paths: list[str] = []
    rows: list[torch.Tensor] = []
    failures: list[tuple[str, str]] = []
    embedded, start = 0, time.perf_counter()

    def flush():
        nonlocal seq, written, paths, rows
        parts.mkdir(parents=True, exist_ok=True)
        store.write(parts / store.chunk_name(rank, seq), rows, paths, dim, dtype, metadata)
        seq, written, paths, rows = seq + 1, written + 1, [], []

    for positions, embeddings, failed in embed_files(model, [str(root / f) for f in files], preprocess,
                                                     batch_size=batch_size, workers=workers, amp=amp):
        if positions:  # a batch of unreadable files only has no rows
            paths += [files[i] for i in positions]
            rows.append(embeddings)
        failures += [(files[i], why) for i, why in failed]
        embedded += len(positions)
        progress.update(len(positions) + len(failed))
        if len(paths) >= chunk_size:
            flush()
    if paths:
        flush()
    return ShardResult(embedded, failures, time.perf_counter() - start, written)


def _describe(model, args) -> str:
    cfg = model.config
    kind = "vit.fast.ViT" if args.fast else "vit.ViT"
    return (f"{kind} {args.model or Path(args.pretrained).name} (img {cfg.img_hw[0]}x{cfg.img_hw[1]}, "
            f"patch {cfg.patch_size}, dim {cfg.embed_dim}, depth {cfg.depth})")


def main_embed(args, stdout, stderr) -> int:
    """The ``fastvit embed`` command (arguments parsed by vit.tools.cli)."""
    from .train.dist import Dist
    from .train.errors import TrainError

    root, out = Path(args.images), Path(args.out)
    if not root.is_dir():
        print(f"error: {root} is not a directory (expected a folder of images)", file=stderr)
        return 2
    try:
        device = resolve_device(args.device)
        require_pillow("fastvit embed")
        dist = Dist(device.type)
    except (ValueError, ImportError, TrainError) as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    device = device if not dist.enabled else dist.device
    amp_name = args.amp if args.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    amp = AMP_DTYPES[amp_name]
    say = print if dist.main else (lambda *a, **k: None)  # rank 0 speaks for all
    try:
        files = list_images(root)
        model, preprocess = load_encoder(args.pretrained, model_name=args.model, fast=args.fast, device=device)
        if args.keep_aspect:
            preprocess = keep_aspect(preprocess, model.config.patch_size,
                                     args.max_patches or default_max_patches(model))
        dim = embedding_dim(model)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        say(f"error: cannot load {args.pretrained}: {exc}", file=stderr)
        return 2
    if not files:
        say(f"error: {root} holds no image files (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)",
            file=stderr)
        return 2
    dtype = store.DTYPES[args.dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "model": args.model or "", "checkpoint": str(Path(args.pretrained).resolve()),
        "weights": weights_fingerprint(model), "config": json.dumps(model.config.to_dict(), sort_keys=True),
        "preprocess": json.dumps(dataclasses.asdict(preprocess), sort_keys=True), "dtype": args.dtype,
        "root": str(root.resolve()), "fast": str(bool(args.fast)).lower(),
        "embedding": "forward_head(forward_features(x), pre_logits=True)",
    }
    try:
        existing = store.scan(out, metadata)
    except store.EmbeddingsFileError as exc:
        say(f"error: {exc}", file=stderr)
        return 2
    todo = [f for f in files if f not in existing.done]
    mine = shard(todo, dist.rank, dist.world_size)
    dist.barrier()  # every rank has listed what exists before any writes a chunk
    say(f"fastvit embed: {_describe(model, args)}, {dim}-d {args.dtype} embeddings of {len(files)} images in "
        f"{root}: {len(files) - len(todo)} already in {out}, {len(todo)} to embed on {dist.world_size} "
        f"process(es), {device}, amp {amp_name}", file=stdout)
    progress = Progress(len(mine), label="embed", unit="img", stream=stderr,
                        mode=args.progress if dist.main else "none")
    result = embed_shard(model, root, mine, preprocess, out=out, rank=dist.rank, dim=dim, dtype=dtype,
                         metadata=metadata, batch_size=args.batch_size, workers=args.workers,
                         chunk_size=args.chunk_size, amp=amp, progress=progress)
    progress.close()
    results = dist.gather(result)  # also waits until every rank's chunks are written
    code = _finish(out, files, results, metadata, dim, dtype, stdout, stderr) if dist.main else 0
    dist.close()
    return code


def _finish(out: Path, files: list[str], results: list[ShardResult], metadata, dim, dtype, stdout, stderr) -> int:
    """Rank 0: merge the output and the chunks (if anything changed) and print the summary."""
    existing = store.scan(out, metadata)
    embedded = sum(r.embedded for r in results)
    failures = sorted(f for r in results for f in r.failures)
    wall = max(r.wall_s for r in results)
    stale = existing.done - set(files)
    if store.parts_dir(out).exists() or stale or not out.exists():
        rows, dropped = store.merge(out, existing.sources, set(files), metadata, dim, dtype)
    else:  # nothing new: the output stays as it is
        rows, dropped = len(existing.done), 0
    rate = f"{embedded / wall:.1f} img/s" if wall > 0 and embedded else "-"
    print(f"done: embedded {embedded} images in {wall:.1f} s ({rate}); {len(failures)} unreadable (skipped); "
          f"{out}: {rows} x {dim} {metadata['dtype']}"
          + (f"; dropped {dropped} rows of files no longer in the folder" if dropped else ""), file=stdout)
    if failures:
        print(f"unreadable: {len(failures)} file(s) skipped (a rerun tries them again):", file=stderr)
        for path, why in failures:
            print(f"  {path}: {why}", file=stderr)
    return 0


# ----------------------------------------------------------------------------- search

def main_search(args, stdout, stderr) -> int:
    """The ``fastvit search`` command: the ``--k`` nearest indexed images of each query image."""
    try:
        device = resolve_device(args.device)
        require_pillow("fastvit search")
        index = store.open_index(args.index)
    except (ValueError, ImportError) as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    meta = index.metadata
    checkpoint = args.pretrained or meta.get("checkpoint")
    try:
        model, _ = load_encoder(checkpoint, model_name=args.model or meta.get("model") or None, fast=args.fast,
                                device=device)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        print(f"error: cannot load the model of {index.path} from {checkpoint} (pass --pretrained): {exc}",
              file=stderr)
        return 2
    if weights_fingerprint(model) != meta.get("weights"):
        print(f"error: the model at {checkpoint} is not the one that wrote {index.path} (weights fingerprint "
              f"{weights_fingerprint(model)}, the index has {meta.get('weights')})", file=stderr)
        return 2
    preprocess = Preprocess(**json.loads(meta["preprocess"]))  # the queries are prepared as the index was
    print(f"index {index.path}: {len(index)} images of {meta.get('root')}, {index.dim}-d", file=stderr)
    failures = 0
    for positions, embeddings, failed in embed_files(model, list(args.images), preprocess,
                                                     batch_size=args.batch_size, amp=None):
        for i, why in failed:
            failures += 1
            print(f"error: {args.images[i]}: {why}", file=stderr)
        if not positions:
            continue
        scores, rows = store.nearest(index, embeddings, args.k)
        for i, row_scores, row_ids in zip(positions, scores.tolist(), rows.tolist()):
            print(args.images[i], file=stdout)
            for rank, (score, row) in enumerate(zip(row_scores, row_ids), 1):
                print(f"  {rank}. {score:7.4f}  {index.paths[row]}", file=stdout)
    if failures:
        print(f"{failures} of {len(args.images)} query file(s) could not be read", file=stderr)
    return 1 if failures else 0
