"""The embeddings file of ``fastvit embed``: its format, chunked resumable writing, nearest neighbours.

One safetensors file holds

    embeddings  (N, D) float32 or float16: row i is the pooled embedding of image i
    paths       uint8: the N paths relative to the image folder, each as its file-system
                bytes (``os.fsencode``) followed by a NUL byte

and string metadata: the format, the model (config, weights fingerprint, checkpoint path),
the preprocessing, the dtype and the image folder.

The paths are a tensor, not metadata nor a sidecar JSON file: the metadata lives in the
safetensors header, one JSON string that every reader parses whole on opening and that the
Rust loader caps at 100 MB (a few million file names); a sidecar could fall out of step
with the matrix, since two files cannot be replaced in one atomic step. A byte tensor has
no size limit, is read lazily like the matrix, and is renamed into place together with it.

While ``fastvit embed`` runs, rows go to ``<out>.parts/`` in chunks, each a file of this
same format written under a temporary name and renamed (``vit._io.atomic_write``): a kill
loses at most the chunk being filled and never leaves a torn file. At the end the previous
output and the chunks are streamed, block by block, into a new output (again renamed into
place), and the parts folder is removed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from vit._io import atomic_write

FORMAT = "fastvit-embeddings/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16}
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16"}
# metadata that must agree for rows to belong in one file (a resumed run is refused otherwise)
MATCH_KEYS = ("weights", "config", "preprocess", "dtype", "root")
BLOCK_ROWS = 16384  # rows read or scored at a time: bounds memory whatever the file's size


class EmbeddingsFileError(ValueError):
    """An embeddings file that cannot be used here (unreadable, another format, other settings)."""


def parts_dir(out) -> Path:
    """The folder of the chunks of a run writing ``out``."""
    out = Path(out)
    return out.with_name(out.name + ".parts")


def chunk_name(rank: int, seq: int) -> str:
    # rank first: with contiguous shards, name order is path order within one run
    return f"chunk-r{rank:04d}-{seq:06d}.safetensors"


def chunks(parts: Path) -> list[Path]:
    """The complete chunks in ``parts`` by name (temporary files of a killed write are not chunks)."""
    if not parts.is_dir():
        return []
    return sorted(p for p in parts.glob("chunk-r*-*.safetensors") if p.is_file())


def next_seq(parts: Path, rank: int) -> int:
    """The first free chunk number of ``rank`` (a resumed run continues after the last one)."""
    seqs = [int(p.stem.rsplit("-", 1)[1]) for p in chunks(parts) if p.stem.startswith(f"chunk-r{rank:04d}-")]
    return max(seqs, default=-1) + 1


# ---------------------------------------------------------------------------- writing

def write(path, blocks: Iterable[torch.Tensor], paths: list[str], dim: int, dtype: torch.dtype,
          metadata: dict[str, str]) -> Path:
    """Write ``paths`` and their embeddings, given as consecutive row blocks, to ``path`` atomically.

    The file is streamed (header, then each block, then the paths), so merging a large
    output needs memory for one block only.
    """
    if dtype not in _ST_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(str, _ST_DTYPES))}, got {dtype}")
    names = b"".join(os.fsencode(p) + b"\0" for p in paths)
    rows, item = len(paths), torch.empty((), dtype=dtype).element_size()
    matrix_bytes = rows * dim * item
    header = {
        "__metadata__": {**{k: str(v) for k, v in metadata.items()}, "format": FORMAT},
        "embeddings": {"dtype": _ST_DTYPES[dtype], "shape": [rows, dim], "data_offsets": [0, matrix_bytes]},
        "paths": {"dtype": "U8", "shape": [len(names)], "data_offsets": [matrix_bytes, matrix_bytes + len(names)]},
    }
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors' own writer does

    def stream(tmp: Path) -> None:
        written = 0
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for block in blocks:
                if block.dim() != 2 or block.shape[1] != dim:
                    raise ValueError(f"embedding blocks must be (rows, {dim}), got {tuple(block.shape)}")
                f.write(block.detach().to("cpu", dtype).contiguous().numpy().tobytes())
                written += block.shape[0]
            if written != rows:
                raise ValueError(f"got {written} embedding rows for {rows} paths")
            f.write(names)
            f.flush()
            os.fsync(f.fileno())  # the rename must not land before the data does

    return atomic_write(path, stream)


# ---------------------------------------------------------------------------- reading

@dataclass
class IndexFile:
    """An embeddings file's header and paths; rows are read on demand (``blocks``, ``matrix``)."""

    path: Path
    metadata: dict[str, str]
    paths: list[str]
    dim: int
    dtype: torch.dtype

    def __len__(self) -> int:
        return len(self.paths)

    def blocks(self, size: int | None = None) -> Iterator[torch.Tensor]:
        """The rows in order, ``size`` (default BLOCK_ROWS) at a time."""
        from safetensors import safe_open

        size = size or BLOCK_ROWS

        with safe_open(str(self.path), framework="pt") as f:
            rows = f.get_slice("embeddings")
            for start in range(0, len(self.paths), size):
                yield rows[start:start + size]

    def matrix(self) -> torch.Tensor:
        return torch.cat(list(self.blocks()) or [torch.empty(0, self.dim, dtype=self.dtype)])


def open_index(path) -> IndexFile:
    """Read the header and the paths of an embeddings file; EmbeddingsFileError says why it cannot be used."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise EmbeddingsFileError(f"no embeddings file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            if metadata.get("format") != FORMAT or set(f.keys()) != {"embeddings", "paths"}:
                raise EmbeddingsFileError(f"{path} is not a fastvit embeddings file: expected format {FORMAT!r} with "
                                  f"tensors embeddings and paths, got format {metadata.get('format')!r} "
                                  f"with {sorted(f.keys())}")
            shape = f.get_slice("embeddings").get_shape()
            dtype = f.get_slice("embeddings").get_dtype()
            names = f.get_tensor("paths").numpy().tobytes()
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise EmbeddingsFileError(f"cannot read {path} as an embeddings file: {type(exc).__name__}: {exc}") from exc
    paths = [os.fsdecode(p) for p in names.split(b"\0")[:-1]]
    if len(shape) != 2 or shape[0] != len(paths):
        raise EmbeddingsFileError(f"{path} holds embeddings of shape {shape} for {len(paths)} paths")
    dtypes = {"F32": torch.float32, "F16": torch.float16}
    if dtype not in dtypes:
        raise EmbeddingsFileError(f"{path} holds {dtype} embeddings, expected F32 or F16")
    return IndexFile(path, metadata, paths, shape[1], dtypes[dtype])


def check_matches(index: IndexFile, expected: dict[str, str], out) -> None:
    """Refuse to add rows computed with other settings (another model, preprocessing, dtype, folder)."""
    for key in MATCH_KEYS:
        if index.metadata.get(key) != expected[key]:
            raise EmbeddingsFileError(
                f"{index.path} was written with {key} {index.metadata.get(key)!r}, this run has {expected[key]!r}: "
                f"use another --out, or delete {out} and {parts_dir(out)} to start over")


# ----------------------------------------------------------------------------- resume

@dataclass
class Existing:
    """What earlier runs wrote for ``out``: the output itself, then the chunks, and the paths they hold."""

    sources: list[IndexFile]
    done: set[str]


def scan(out, expected: dict[str, str]) -> Existing:
    """The rows already written for ``out`` (its file and its chunks), checked against ``expected``."""
    out = Path(out)
    sources = [open_index(out)] if out.exists() else []
    sources += [open_index(p) for p in chunks(parts_dir(out))]
    for source in sources:
        check_matches(source, expected, out)
    return Existing(sources, {p for s in sources for p in s.paths})


def merge(out, sources: list[IndexFile], keep: set[str], metadata: dict[str, str], dim: int,
          dtype: torch.dtype) -> tuple[int, int]:
    """Stream the rows of ``sources`` whose path is in ``keep`` (first occurrence wins) into ``out``,
    then remove the parts folder. Returns (rows written, rows dropped)."""
    seen: set[str] = set()
    masks = []
    for source in sources:
        mask = []
        for p in source.paths:
            mask.append(p in keep and p not in seen)
            seen.add(p)
        masks.append(torch.tensor(mask, dtype=torch.bool))
    paths = [p for s, m in zip(sources, masks) for p, k in zip(s.paths, m.tolist()) if k]
    total = sum(len(s) for s in sources)

    def rows() -> Iterator[torch.Tensor]:
        for source, mask in zip(sources, masks):
            start = 0
            for block in source.blocks():
                yield block[mask[start:start + block.shape[0]]]
                start += block.shape[0]

    out = Path(out)
    for stale in out.parent.glob(f".{out.name}.*.tmp"):  # left by a run killed while writing out
        stale.unlink(missing_ok=True)
    write(out, rows(), paths, dim, dtype, metadata)
    shutil.rmtree(parts_dir(out), ignore_errors=True)  # after the rename: a kill here leaves chunks already in out
    return len(paths), total - len(paths)


# ------------------------------------------------------------------------- neighbours

def nearest(index: IndexFile, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, rows), each (Q, min(k, N)): the cosine similarity of each query with its k nearest
    rows of ``index``, best first. The file is scored a block at a time."""
    if queries.dim() != 2 or queries.shape[1] != index.dim:
        raise ValueError(f"queries must be (Q, {index.dim}) to match {index.path}, got {tuple(queries.shape)}")
    queries = torch.nn.functional.normalize(queries.float(), dim=1)
    best_scores = torch.empty(queries.shape[0], 0)
    best_rows = torch.empty(queries.shape[0], 0, dtype=torch.long)
    start = 0
    for block in index.blocks():
        scores = queries @ torch.nn.functional.normalize(block.float(), dim=1).T
        best_scores = torch.cat([best_scores, scores], dim=1)
        best_rows = torch.cat([best_rows, torch.arange(start, start + block.shape[0]).expand_as(scores)], dim=1)
        best_scores, order = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
        best_rows = best_rows.gather(1, order)
        start += block.shape[0]
    return best_scores, best_rows
