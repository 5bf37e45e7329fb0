"""``fastvit embed`` / ``fastvit search`` on scikit-learn's digits written as PNG files.

The Done-when of issue 18: with the digits-trained model (``fastvit train``'s default
recipe, 400 steps, ~10 s here) the nearest neighbour (cosine, leave-one-out) of each of the
1797 digit images has the same class in >= 90% of cases. Then: resume after a SIGKILL
re-embeds nothing already written, unreadable files are skipped and reported, torchrun
shards are merged into what one process writes, and the file format itself.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vit
import vit.tools.cli as cli
from vit import weights as weights_io
from vit.tools import embed as vembed
from vit.tools import embed_index as store
from vit.tools.preprocess import for_checkpoint, load_image

Image = pytest.importorskip("PIL.Image")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--progress", "none", "--device", "cpu"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _embed(images: Path, checkpoint: Path, out: Path, *args: str):
    return _run(["embed", str(images), "--pretrained", str(checkpoint), "--out", str(out), *QUIET,
                 "--workers", "0", *args])


def write_digit_pngs(root: Path, indices=None) -> list[str]:
    """scikit-learn's digits as 16x16 gray PNGs, ``root/<digit>/<index>.png`` (upscaled as
    ``fastvit train`` upscales them); returns the relative paths written."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = F.interpolate(torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0,
                           size=(16, 16), mode="bilinear", align_corners=False)
    written = []
    for i in range(len(bunch.target)) if indices is None else indices:
        rel = f"{bunch.target[i]}/{i:04d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((images[i, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()).save(root / rel)
        written.append(rel)
    return written


def random_checkpoint(path: Path, seed: int = 0) -> Path:
    """An untrained model of the vit_digits shape (16x16 gray, patch 4, width 64) with its config."""
    from vit.tools.train import args as train_args

    base, preset = train_args.TRAIN_PRESETS["vit_digits"]
    torch.manual_seed(seed)
    model = vit.create_model(base, **{**preset, "num_classes": 10})
    weights_io.save(model, path, config=model.config)
    return path


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    write_digit_pngs(root)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """``fastvit train``'s digits recipe (400 steps; 96.9% test top-1) in this process."""
    from vit.tools import train

    out = tmp_path_factory.mktemp("train")
    assert train.main(["--out", str(out), "--threads", "1", "--progress", "none", "--steps", "400",
                       "--eval-every", "0", "--ckpt-every", "0"]) == 0
    return out / "model.safetensors"


@pytest.fixture(scope="module")
def digits_index(digits, trained, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("index") / "digits.safetensors"
    code, stdout, err = _embed(digits, trained, out, "--workers", "2", "--chunk-size", "500")
    assert code == 0, err
    assert "done: embedded 1797 images" in stdout and "0 unreadable" in stdout, stdout
    return out


@pytest.fixture
def counted_reads(monkeypatch):
    """The files ``fastvit embed`` reads (in this process: --workers 0)."""
    reads = []

    def load_and_count(path):
        reads.append(Path(path))
        return load_image(path)

    monkeypatch.setattr(vembed, "load_image", load_and_count)
    return reads


def _rel(paths, root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in paths}


# ------------------------------------------------------------------------- Done when

def test_leave_one_out_nearest_neighbour_has_the_same_digit(digits, trained, digits_index):
    index = store.open_index(digits_index)
    assert index.paths == sorted(vembed.list_images(digits)) and len(index) == 1797
    assert (index.dim, index.dtype, index.metadata["dtype"]) == (64, torch.float32, "float32")
    assert index.metadata["checkpoint"] == str(trained.resolve()) and index.metadata["root"] == str(digits.resolve())
    embeddings = F.normalize(index.matrix(), dim=1)
    labels = torch.tensor([int(p.split("/")[0]) for p in index.paths])
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-2.0)  # leave one out: an image is not its own neighbour
    accuracy = (labels[similarity.argmax(dim=1)] == labels).float().mean().item()
    print(f"\nfastvit embed, digits-trained vit_digits, 1797 PNGs: leave-one-out cosine 1-NN "
          f"accuracy {accuracy:.4f}")
    assert accuracy >= 0.90
    # Rows belong to their paths: a few recomputed with the reference model, outside the tool.
    reference = vit.from_pretrained(trained).eval()
    recipe = for_checkpoint(trained, (16, 16), in_chans=1)
    picks = [0, 500, 1234, 1796]
    x = torch.stack([recipe(load_image(digits / index.paths[i])) for i in picks])
    with torch.no_grad():
        expected = reference.forward_head(reference.forward_features(x), pre_logits=True)
    got = index.matrix()[picks]
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()  # the model parity rule, fp32


def test_search_prints_the_nearest_images(digits, trained, digits_index, tmp_path):
    queries = [digits / "3" / "0003.png", digits / "8" / "0008.png"]
    code, out, err = _run(["search", *map(str, queries), str(tmp_path / "missing.png"), "--index",
                           str(digits_index), "--k", "5", "--device", "cpu"])
    assert code == 1 and "missing.png: no such file" in err, err
    blocks: dict[str, list[tuple[float, str]]] = {}
    for line in out.splitlines():
        if not line.startswith("  "):
            current = blocks.setdefault(line, [])
        else:  # "  1.  0.9987  3/0003.png"
            rank, score, path = line.split()
            assert rank == f"{len(current) + 1}."
            current.append((float(score), path))
    assert list(blocks) == [str(q) for q in queries]
    for query, rows in zip(queries, blocks.values()):
        scores, paths = zip(*rows)
        assert len(rows) == 5 and list(scores) == sorted(scores, reverse=True) and -1 <= scores[-1]
        assert paths[0] == query.relative_to(digits).as_posix() and scores[0] == pytest.approx(1.0, abs=1e-4)
        assert sum(p.split("/")[0] == query.parent.name for p in paths) >= 3, rows
    # a model other than the index's is refused, not silently compared
    other = random_checkpoint(tmp_path / "other.safetensors")
    code, _, err = _run(["search", str(queries[0]), "--index", str(digits_index), "--pretrained", str(other)])
    assert code == 2 and "is not the one that wrote" in err, err


# ----------------------------------------------------------------------------- resume

KILL_ON_WRITE = """
import os, signal, sys
from vit.tools import cli
from vit.tools import embed_index as store

KILL_AT, calls, real = int(sys.argv[1]), [0], store.atomic_write

def write_then_die(path, write):
    calls[0] += 1
    if calls[0] == KILL_AT:  # the file complete under its temporary name, killed before the rename
        write(path.with_name(f".{path.name}.{os.getpid()}.tmp"))
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, write)

store.atomic_write = write_then_die
sys.exit(cli.main(sys.argv[2:]))
"""


def test_resume_after_sigkill_embeds_only_what_was_not_written(tmp_path, counted_reads):
    images = tmp_path / "images"
    files = write_digit_pngs(images, range(0, 1797, 9))  # 200 images
    ckpt = random_checkpoint(tmp_path / "model.safetensors")
    out = tmp_path / "emb.safetensors"
    args = ["embed", str(images), "--pretrained", str(ckpt), "--out", str(out), *QUIET, "--workers", "0",
            "--batch-size", "8", "--chunk-size", "40"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", KILL_ON_WRITE, "3", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-3000:])
    parts = store.parts_dir(out)
    assert [p.name for p in store.chunks(parts)] == ["chunk-r0000-000000.safetensors", "chunk-r0000-000001.safetensors"]
    assert any(p.name.endswith(".tmp") for p in parts.iterdir())  # the third chunk, never renamed
    assert not out.exists()
    written = {p for c in store.chunks(parts) for p in store.open_index(c).paths}
    assert len(written) == 80

    code, stdout, err = _run(args)
    assert code == 0, err
    assert f"80 already in {out}, 120 to embed" in stdout, stdout
    assert _rel(counted_reads, images) == set(files) - written and len(counted_reads) == 120
    assert not parts.exists()
    resumed = store.open_index(out)
    assert resumed.paths == sorted(files)
    # the same rows as one uninterrupted run
    code, _, err = _run([*args[:5], str(tmp_path / "clean.safetensors"), *args[6:]])
    assert code == 0, err
    torch.testing.assert_close(resumed.matrix(), store.open_index(tmp_path / "clean.safetensors").matrix())

    counted_reads.clear()  # a third run: nothing to do
    code, stdout, _ = _run(args)
    assert code == 0 and "200 already in" in stdout and "0 to embed" in stdout and counted_reads == []


def test_killed_between_the_output_rename_and_the_chunk_removal(tmp_path, counted_reads, monkeypatch):
    images = tmp_path / "images"
    files = write_digit_pngs(images, range(0, 120))
    ckpt = random_checkpoint(tmp_path / "model.safetensors")
    out = tmp_path / "emb.safetensors"
    with monkeypatch.context() as m:
        m.setattr(store.shutil, "rmtree", lambda *a, **k: None)  # as if killed right after the rename
        assert _embed(images, ckpt, out, "--chunk-size", "50", "--batch-size", "10")[0] == 0
    assert len(store.chunks(store.parts_dir(out))) == 3 and len(store.open_index(out)) == 120
    counted_reads.clear()
    before = store.open_index(out).matrix()
    code, stdout, err = _embed(images, ckpt, out)
    assert code == 0 and "120 already in" in stdout, err
    assert counted_reads == [] and not store.parts_dir(out).exists()
    after = store.open_index(out)
    assert after.paths == sorted(files) and torch.equal(after.matrix(), before)  # each path once


def test_unreadable_files_are_reported_and_skipped(tmp_path, counted_reads):
    images = tmp_path / "images"
    files = write_digit_pngs(images, range(6))
    (images / "bad").mkdir()
    (images / "bad" / "notes.png").write_text("not an image")
    noise = Image.fromarray(torch.randint(0, 256, (64, 64, 3), dtype=torch.uint8).numpy())
    noise.save(images / "bad" / "truncated.png")
    data = (images / "bad" / "truncated.png").read_bytes()
    (images / "bad" / "truncated.png").write_bytes(data[:len(data) // 2])
    (images / ".hidden.png").write_bytes((images / files[0]).read_bytes())  # hidden: not listed
    (images / "readme.txt").write_text("not listed either")
    ckpt = random_checkpoint(tmp_path / "model.safetensors")
    out = tmp_path / "emb.safetensors"
    code, stdout, err = _embed(images, ckpt, out, "--batch-size", "3")
    assert code == 0, err
    assert "embedded 6 images" in stdout and "2 unreadable (skipped)" in stdout, stdout
    assert "unreadable: 2 file(s) skipped" in err
    assert "bad/notes.png: not an image" in err and "bad/truncated.png: cannot decode" in err, err
    assert store.open_index(out).paths == sorted(files)
    counted_reads.clear()  # a rerun tries the unreadable files again, and only them
    code, stdout, err = _embed(images, ckpt, out)
    assert code == 0 and "2 unreadable" in stdout and "bad/notes.png" in err
    assert _rel(counted_reads, images) == {"bad/notes.png", "bad/truncated.png"}


def test_folder_changes_and_other_settings(tmp_path, counted_reads):
    images = tmp_path / "images"
    files = write_digit_pngs(images, range(10))
    ckpt = random_checkpoint(tmp_path / "model.safetensors")
    out = tmp_path / "emb.safetensors"
    assert _embed(images, ckpt, out)[0] == 0
    (images / files[0]).unlink()
    added = write_digit_pngs(images, [100])
    counted_reads.clear()
    code, stdout, err = _embed(images, ckpt, out)
    assert code == 0, err
    assert _rel(counted_reads, images) == set(added)
    assert "dropped 1 rows of files no longer in the folder" in stdout, stdout
    assert set(store.open_index(out).paths) == set(files[1:] + added)
    # rows computed otherwise are never mixed in
    code, _, err = _embed(images, ckpt, out, "--dtype", "float16")
    assert code == 2 and "with dtype 'float32', this run has 'float16'" in err, err
    code, _, err = _embed(images, random_checkpoint(tmp_path / "other.safetensors", seed=1), out)
    assert code == 2 and "written with weights" in err and "delete" in err, err


def test_errors_are_clear(tmp_path):
    ckpt = random_checkpoint(tmp_path / "model.safetensors")
    code, _, err = _embed(tmp_path / "nope", ckpt, tmp_path / "e.safetensors")
    assert code == 2 and "is not a directory" in err
    (tmp_path / "empty").mkdir()
    code, _, err = _embed(tmp_path / "empty", ckpt, tmp_path / "e.safetensors")
    assert code == 2 and "holds no image files" in err
    code, _, err = _embed(tmp_path, ckpt, tmp_path / "e.safetensors", "--batch-size", "0")
    assert code == 2 and "--batch-size must be a positive integer, got 0" in err
    code, _, err = _embed(tmp_path, tmp_path / "missing.safetensors", tmp_path / "e.safetensors")
    assert code == 2 and "no checkpoint at" in err
    code, _, err = _run(["search", "q.png", "--index", str(ckpt)])
    assert code == 2 and "not a fastvit embeddings file" in err, err


# ----------------------------------------------------------------------- shard, merge

def test_shards_concatenate_to_the_whole():
    for n in range(14):
        items = list(range(n))
        for world in range(1, 6):
            shards = [vembed.shard(items, r, world) for r in range(world)]
            assert sum(shards, []) == items and max(map(len, shards)) - min(map(len, shards)) <= 1
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\), got 2"):
        vembed.shard(items, 2, 2)


def test_two_ranks_merged_equal_one_process(tmp_path):
    """The torchrun path without processes: each rank's shard into chunks, then rank 0's merge."""
    images = tmp_path / "images"
    files = sorted(write_digit_pngs(images, range(0, 1797, 60)))
    ckpt = random_checkpoint(tmp_path / "model.safetensors")
    assert _embed(images, ckpt, tmp_path / "one.safetensors")[0] == 0
    one = store.open_index(tmp_path / "one.safetensors")
    model, recipe = vembed.load_encoder(ckpt)
    out = tmp_path / "two.safetensors"
    results = [vembed.embed_shard(model, images, vembed.shard(files, rank, 2), recipe, out=out, rank=rank,
                                  dim=64, dtype=torch.float32, metadata=one.metadata, batch_size=4, workers=0,
                                  chunk_size=8, amp=None, progress=vembed.Progress(1, mode="none"))
               for rank in (1, 0)]
    assert [r.embedded for r in results] == [len(files) - len(files) // 2, len(files) // 2]
    assert vembed._finish(out, files, results, one.metadata, 64, torch.float32, io.StringIO(), io.StringIO()) == 0
    two = store.open_index(out)
    assert two.paths == one.paths == files  # rank 0's shard first: path order
    torch.testing.assert_close(two.matrix(), one.matrix())


@pytest.mark.slow
def test_torchrun_two_processes_write_what_one_process_writes(tmp_path):
    images = tmp_path / "images"
    write_digit_pngs(images, range(0, 1797, 20))
    ckpt = random_checkpoint(tmp_path / "model.safetensors")
    assert _embed(images, ckpt, tmp_path / "one.safetensors")[0] == 0
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "vit.tools.cli", "embed", str(images), "--pretrained", str(ckpt), "--out",
                           str(tmp_path / "two.safetensors"), *QUIET, "--workers", "0", "--chunk-size", "16"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout and proc.stdout.count("done: embedded 90 images") == 1, proc.stdout
    one, two = store.open_index(tmp_path / "one.safetensors"), store.open_index(tmp_path / "two.safetensors")
    assert two.paths == one.paths
    torch.testing.assert_close(two.matrix(), one.matrix())


# ------------------------------------------------------------------------ file format

def test_file_format_round_trip(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    paths = ["a b/ü.png", "x\ny.png", "z.png"]
    rows = torch.randn(3, 5)
    path = store.write(tmp_path / "e.safetensors", [rows[:2], rows[2:]], paths, 5, torch.float16, {"model": "m"})
    index = store.open_index(path)
    assert index.paths == paths and index.dtype == torch.float16 and index.metadata["model"] == "m"
    torch.testing.assert_close(index.matrix(), rows.half())
    raw = load_file(str(path))  # a plain safetensors file for any reader
    assert raw["embeddings"].shape == (3, 5) and bytes(raw["paths"].tolist()).split(b"\0")[:-1] == [
        os.fsencode(p) for p in paths]
    empty = store.open_index(store.write(tmp_path / "empty.safetensors", [], [], 5, torch.float32, {}))
    assert len(empty) == 0 and empty.matrix().shape == (0, 5)
    with pytest.raises(ValueError, match="got 1 embedding rows for 3 paths"):
        store.write(tmp_path / "bad.safetensors", [rows[:1]], paths, 5, torch.float32, {})
    assert not (tmp_path / "bad.safetensors").exists() and not list(tmp_path.glob(".bad*"))
    (tmp_path / "torn.safetensors").write_bytes(path.read_bytes()[:100])
    with pytest.raises(store.EmbeddingsFileError, match="cannot read"):
        store.open_index(tmp_path / "torn.safetensors")
    # nearest(): a block at a time equals all at once
    many = torch.randn(11, 5)
    store.write(path, [many], [f"{i}.png" for i in range(11)], 5, torch.float32, {})
    queries = torch.randn(3, 5)
    expected = (F.normalize(queries, dim=1) @ F.normalize(many, dim=1).T).topk(4, dim=1)
    monkeypatch.setattr(store, "BLOCK_ROWS", 2)
    scores, ids = store.nearest(store.open_index(path), queries, 4)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(scores, expected.values)


def test_progress_lines_when_updates_come_in_batches():
    """``fastvit embed`` advances its progress a batch at a time: the 5% lines still appear."""
    out = io.StringIO()
    bar = vembed.Progress(1000, stream=out, mode="lines", unit="img")
    for _ in range(15):
        bar.update(64)
    bar.update(40)
    lines = out.getvalue().splitlines()
    assert len(lines) == 16 and lines[0].startswith("64/1000") and lines[-1].startswith("1000/1000"), lines
