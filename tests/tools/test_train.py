"""``fastvit train`` (vit.tools.train): convergence, parity, torchrun, exact resume, faults.

Runs on CPU. Tiny models and ``--threads 1`` (on a busy 2-core machine one thread is
several times faster than two for these sizes). The longest tests are marked ``slow``.
Subprocesses run without TRITON_INTERPRET: training never uses the Triton interpreter.
Killed runs are started under ``kill_at_step.py``, which SIGKILLs them when a given step
begins: the production loop has no test hook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vit
from vit import weights as weights_io
from vit.tools import data as vdata
from vit.tools import train
from vit.tools.train import args as train_args
from vit.tools.train import schedule
from vit.tools.train.state import STATE_FILE, WEIGHTS_FILE, find_state

ROOT = Path(__file__).resolve().parents[2]
KILL_AT_STEP = Path(__file__).with_name("kill_at_step.py")
QUIET = ["--threads", "1", "--progress", "none"]
# The digits recipe the convergence tests use (vit_digits preset: 16x16 gray, patch 4).
DIGITS = ["--model", "vit_digits", "--steps", "400", "--lr", "2e-3", "--eval-every", "0", "--ckpt-every", "0"]


def run(tmp: Path, *args: str) -> int:
    return train.main(["--out", str(tmp), *QUIET, *args])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out) if "loss" in r}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def env() -> dict:
    e = dict(os.environ)
    e.pop("TRITON_INTERPRET", None)  # never train under the interpreter
    e["OMP_NUM_THREADS"] = "1"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def subprocess_train(*args: str, kill_at: int | None = None, torchrun: int = 0,
                     timeout: float = 300) -> subprocess.CompletedProcess:
    """``fastvit train`` in a new process (or ``torchrun`` processes); with ``kill_at`` each
    process is SIGKILLed when step ``kill_at`` begins (after step ``kill_at``'s state was saved)."""
    target = ["-m", "vit.tools.train"] if kill_at is None else [str(KILL_AT_STEP), str(kill_at)]
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={torchrun}", *target]
    else:
        launcher = [sys.executable, *target]
    return subprocess.run([*launcher, *QUIET, *args], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=timeout)


def digits_accuracy(weights: Path) -> float:
    """Top-1 of the saved weights on the digits test split, computed independently of the trainer."""
    model = vit.from_pretrained(weights).eval()
    _, test = vdata.load_digits(model.config.in_chans, model.config.img_hw)
    with torch.no_grad():
        return (model(test.images).argmax(-1) == test.labels).float().mean().item()


# ---------------------------------------------------------------------------- convergence

@pytest.mark.slow
def test_digits_reaches_95_percent(tmp_path):
    start = time.perf_counter()
    assert run(tmp_path, *DIGITS) == 0
    wall = time.perf_counter() - start
    result = summary(tmp_path)
    print(f"\ndigits fp32: {result['steps']} steps, global batch {result['global_batch']}, "
          f"{'fast' if result['fast'] else 'reference'} model, eval top-1 {result['eval_acc']:.4f}, "
          f"train {result['wall_s']:.1f} s, test wall {wall:.1f} s")
    assert result["eval_acc"] >= 0.95, result
    assert result["eval_images"] == 359
    # The saved weights reload through vit.from_pretrained and give the same accuracy.
    assert digits_accuracy(tmp_path / "model.safetensors") == pytest.approx(result["eval_acc"], abs=1e-6)


@pytest.mark.slow
def test_bf16_autocast_converges_on_digits(tmp_path):
    # CPU bf16 is emulated here (no AVX-512 BF16): half the batch keeps the test short.
    assert run(tmp_path, *DIGITS, "--amp", "bf16", "--batch-size", "32") == 0
    result = summary(tmp_path)
    curve = [r["loss"] for r in records(tmp_path) if "loss" in r]
    print(f"\ndigits bf16: {result['steps']} steps, eval top-1 {result['eval_acc']:.4f}, "
          f"train {result['wall_s']:.1f} s")
    assert result["skipped_steps"] == 0
    assert sum(curve[-5:]) / 5 < 0.5 * sum(curve[:5]) / 5, curve
    assert result["eval_acc"] >= 0.90, result  # 93.0% observed (fp32: 96.9%)


# --------------------------------------------------------------------------------- parity

def test_fast_and_reference_loss_curves_agree(tmp_path):
    args = ["--steps", "50", "--log-every", "1", "--eval-every", "0", "--ckpt-every", "0", "--batch-size", "32"]
    assert run(tmp_path / "fast", "--fast", *args) == 0
    assert run(tmp_path / "ref", "--no-fast", *args) == 0
    fast, ref = losses(tmp_path / "fast"), losses(tmp_path / "ref")
    assert sorted(fast) == sorted(ref) == list(range(1, 51))
    worst = max(abs(fast[s] - ref[s]) / abs(ref[s]) for s in ref)
    print(f"\nfast vs reference, 50 fp32 steps: max relative loss difference {worst:.2e}")
    assert worst <= 0.02
    assert ref[50] < ref[1]  # and it is a curve that goes somewhere


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    args = ["--no-fast", "--steps", "6", "--log-every", "1", "--eval-every", "0", "--ckpt-every", "0",
            "--batch-size", "32"]
    assert run(tmp_path / "one", *args) == 0
    assert run(tmp_path / "four", *args, "--accum-steps", "4") == 0
    one, four = losses(tmp_path / "one"), losses(tmp_path / "four")
    for step in one:
        assert four[step] == pytest.approx(one[step], rel=1e-5), (step, one, four)


def test_grad_checkpointing_does_not_change_the_losses(tmp_path):
    args = ["--no-fast", "--steps", "4", "--log-every", "1", "--eval-every", "0", "--ckpt-every", "0",
            "--batch-size", "16"]
    assert run(tmp_path / "plain", *args) == 0
    assert run(tmp_path / "ckpt", *args, "--grad-checkpointing") == 0
    assert losses(tmp_path / "ckpt") == losses(tmp_path / "plain")  # recomputation is exact in fp32


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    args = ["--no-fast", "--steps", "15", "--log-every", "1", "--eval-every", "0", "--ckpt-every", "0",
            "--batch-size", "32"]
    assert run(tmp_path / "single", *args) == 0
    proc = subprocess_train(*args, "--out", str(tmp_path / "ddp"), torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DDP x2" in proc.stdout
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert sorted(single) == sorted(ddp) == list(range(1, 16))
    worst = max(abs(single[s] - ddp[s]) / abs(single[s]) for s in single)
    print(f"\ntorchrun x2 (gloo, DDP) vs 1 process, same global batch: max relative loss diff {worst:.2e}")
    # Per-rank half batches change only the fp32 summation order; over 15 steps of Adam
    # that stays around 1e-6 relative. A wrong shard or missing all-reduce is >1e-2.
    assert worst <= 1e-4
    # Only rank 0 wrote: one record per step.
    assert len([r for r in records(tmp_path / "ddp") if "loss" in r]) == 15


@pytest.mark.slow
def test_torchrun_fsdp_matches_one_process_and_resumes(tmp_path):
    args = ["--no-fast", "--steps", "8", "--log-every", "1", "--eval-every", "0", "--batch-size", "32"]
    assert run(tmp_path / "single", *args, "--ckpt-every", "0") == 0
    proc = subprocess_train(*args, "--out", str(tmp_path / "fsdp"), "--fsdp", "--ckpt-every", "4",
                            torchrun=2, kill_at=6)
    assert proc.returncode != 0 and "FSDP2 x2" in proc.stdout
    proc = subprocess_train("--resume", str(tmp_path / "fsdp"), torchrun=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, fsdp = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert sorted(fsdp) == list(range(1, 9))
    worst = max(abs(single[s] - fsdp[s]) / abs(single[s]) for s in single)
    print(f"\ntorchrun x2 FSDP2 (killed at 6, resumed from 4) vs 1 process: max relative loss diff {worst:.2e}")
    assert worst <= 1e-4
    a = weights_io.load(tmp_path / "single" / "model.safetensors")
    b = weights_io.load(tmp_path / "fsdp" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------- resume

@pytest.mark.slow
def test_sigkill_then_resume_gives_bitwise_identical_weights(tmp_path):
    # Stochastic depth on, so the restored RNG state matters too.
    args = ["--no-fast", "--steps", "30", "--ckpt-every", "10", "--eval-every", "10", "--log-every", "1",
            "--batch-size", "32", "--set", "drop_path_rate=0.1"]
    proc = subprocess_train(*args, "--out", str(tmp_path / "full"))
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = subprocess_train(*args, "--out", str(tmp_path / "killed"), kill_at=17)
    assert proc.returncode == -9, (proc.returncode, proc.stderr[-3000:])  # SIGKILL: no cleanup ran
    assert (tmp_path / "killed" / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    state = torch.load(tmp_path / "killed" / "checkpoints" / "step_00000010" / STATE_FILE,
                       weights_only=True)
    assert state["step"] == 10 and state["batch_in_epoch"] == 10

    proc = subprocess_train("--resume", str(tmp_path / "killed"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steps 10->30" in proc.stdout

    full = weights_io.load(tmp_path / "full" / "model.safetensors")
    resumed = weights_io.load(tmp_path / "killed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    different = [k for k in full if not torch.equal(full[k], resumed[k])]
    assert not different, f"weights differ after resume: {different}"
    # The metrics file continues without duplicates and with the same losses.
    assert losses(tmp_path / "killed") == losses(tmp_path / "full")
    assert summary(tmp_path / "killed")["resumed_from"] == 10


# ---------------------------------------------------------------------------------- faults

def _short_run(out: Path, *extra: str) -> int:
    return run(out, "--no-fast", "--steps", "4", "--ckpt-every", "2", "--eval-every", "0",
               "--batch-size", "16", *extra)


def test_corrupted_checkpoint_is_reported_and_nothing_is_lost(tmp_path, capsys):
    assert _short_run(tmp_path) == 0
    step4 = tmp_path / "checkpoints" / "step_00000004"
    good = (tmp_path / "model.safetensors").read_bytes()
    blob = (step4 / WEIGHTS_FILE).read_bytes()
    (step4 / WEIGHTS_FILE).write_bytes(blob[: len(blob) // 2])  # a torn file
    capsys.readouterr()
    assert run(tmp_path, "--resume", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "corrupted" in err and "model.safetensors" in err and "an older checkpoint remains" in err, err
    (step4 / WEIGHTS_FILE).write_bytes(blob)
    (step4 / STATE_FILE).write_bytes(os.urandom(300))
    assert run(tmp_path, "--resume", str(step4)) == 1
    err = capsys.readouterr().err
    assert "corrupted" in err and STATE_FILE in err, err
    # The failed resumes touched nothing: the other checkpoint and the final weights remain.
    assert (tmp_path / "model.safetensors").read_bytes() == good
    assert (tmp_path / "checkpoints" / "step_00000002" / STATE_FILE).is_file()


def test_mismatched_checkpoint_is_reported(tmp_path, capsys):
    assert _short_run(tmp_path) == 0
    capsys.readouterr()
    assert run(tmp_path, "--resume", str(tmp_path), "--embed-dim", "32") == 1
    err = capsys.readouterr().err
    assert "checkpoint mismatch" in err and "--embed-dim" in err, err
    # Weights from another step than the training state (e.g. files mixed by hand).
    step2, step4 = (tmp_path / "checkpoints" / f"step_0000000{i}" for i in (2, 4))
    (step4 / WEIGHTS_FILE).write_bytes((step2 / WEIGHTS_FILE).read_bytes())
    assert run(tmp_path, "--resume", str(step4)) == 1
    err = capsys.readouterr().err
    assert "checkpoint mismatch" in err and "step 2" in err, err


def test_empty_dataset_directory_is_reported(tmp_path, capsys):
    data = tmp_path / "images"
    (data / "cats").mkdir(parents=True)
    (data / "cats" / "notes.txt").write_text("not an image")
    assert run(tmp_path / "out", "--data", str(data), "--steps", "2") == 1
    err = capsys.readouterr().err
    assert "holds no images" in err and str(data) in err, err
    assert run(tmp_path / "out", "--data", str(tmp_path / "missing"), "--steps", "2") == 1
    assert "neither 'digits'" in capsys.readouterr().err


def test_configuration_and_data_errors_are_clean(tmp_path, capsys, monkeypatch):
    assert run(tmp_path / "out", "--set", "in_chans=2", "--steps", "2") == 1
    err = capsys.readouterr().err
    assert "in_chans=2" in err and "Traceback" not in err, err
    (tmp_path / "file.txt").write_text("not a folder")
    assert run(tmp_path / "out", "--data", str(tmp_path / "file.txt"), "--steps", "2") == 1
    assert "not a directory" in capsys.readouterr().err
    assert run(tmp_path / "out", "--num-classes", "7", "--steps", "2") == 1  # digits has 10
    err = capsys.readouterr().err
    assert "--num-classes 7" in err and "10 classes" in err, err
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # as if scikit-learn were not installed
    assert run(tmp_path / "out", "--steps", "2") == 1
    assert "pip install scikit-learn" in capsys.readouterr().err


def test_latest_naming_a_missing_directory_falls_back_to_the_newest_complete_one(tmp_path, capsys):
    root = tmp_path / "checkpoints"
    for name in ("step_00000002", "step_00000004", "step_00000006"):
        (root / name).mkdir(parents=True)
        if name != "step_00000006":  # 6 is incomplete (no training state)
            (root / name / STATE_FILE).write_bytes(b"x")
    (root / "latest").write_text("step_00000008\n")
    assert find_state(tmp_path) == root / "step_00000004"
    assert "step_00000008" in capsys.readouterr().err
    (root / "latest").write_text("step_00000004\n")
    assert find_state(tmp_path) == root / "step_00000004"
    for name in ("step_00000002", "step_00000004"):
        (root / name / STATE_FILE).unlink()
    with pytest.raises(train.TrainError, match="no other complete checkpoint"):
        find_state(tmp_path)


@pytest.mark.parametrize("amp", ["none", "fp16"])
def test_non_finite_loss_skips_steps_then_stops(tmp_path, capsys, amp):
    base, overrides = train_args.TRAIN_PRESETS["vit_digits"]
    model = vit.ViT(vit.get_config(base, **overrides, num_classes=10))
    state = model.state_dict()
    state["head.weight"] = torch.full_like(state["head.weight"], float("nan"))
    weights_io.save(state, tmp_path / "nan.safetensors")
    out = tmp_path / "out"
    code = run(out, "--no-fast", "--init", str(tmp_path / "nan.safetensors"), "--amp", amp, "--steps", "20",
               "--max-bad-steps", "3", "--log-every", "1", "--batch-size", "16", "--ckpt-every", "0")
    assert code == 1
    err = capsys.readouterr().err
    assert "non-finite for 3 consecutive steps" in err and "stopping at step 3" in err, err
    logged = records(out)
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3]
    assert all(r["loss"] is None for r in logged if "loss" in r)  # NaN is logged as null
    assert not (out / "model.safetensors").exists()


def test_per_rank_batch_must_split_into_micro_batches(tmp_path, capsys):
    assert run(tmp_path, "--steps", "2", "--batch-size", "30", "--accum-steps", "4") == 1
    assert "not divisible by --accum-steps 4" in capsys.readouterr().err


# ---------------------------------------------------------------------------- data, optim

def _write_images(root: Path, classes: int = 2, per_class: int = 5) -> None:
    from PIL import Image

    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(20 + i, 24, 3) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")


def test_image_folder_training_with_workers(tmp_path):
    _write_images(tmp_path / "images")
    assert run(tmp_path / "out", "--no-fast", "--data", str(tmp_path / "images"), "--set", "in_chans=3",
               "--steps", "3", "--batch-size", "4", "--workers", "1", "--val-fraction", "0.2",
               "--eval-every", "0", "--ckpt-every", "0") == 0
    result = summary(tmp_path / "out")
    assert result["eval_images"] == 2  # one held-out image per class
    assert 0.0 <= result["eval_acc"] <= 1.0


def test_image_folder_resume_with_dropout_is_exact_with_the_fast_model(tmp_path):
    """DataLoaders must not draw from the global RNG: a resume creates its loaders at another
    point of the dropout stream than the uninterrupted run did. Default (fast) model."""
    _write_images(tmp_path / "images", classes=2, per_class=6)
    args = ["--data", str(tmp_path / "images"), "--set", "in_chans=3", "--set", "drop_path_rate=0.2",
            "--set", "drop_rate=0.2", "--steps", "4", "--batch-size", "2", "--workers", "0",
            "--ckpt-every", "2", "--eval-every", "2", "--log-every", "1", "--val-fraction", "0.2"]
    assert run(tmp_path / "full", *args) == 0
    assert summary(tmp_path / "full")["fast"] is True
    assert run(tmp_path / "resumed", "--resume", str(tmp_path / "full" / "checkpoints" / "step_00000002")) == 0
    full = weights_io.load(tmp_path / "full" / "model.safetensors")
    resumed = weights_io.load(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert not [k for k in full if not torch.equal(full[k], resumed[k])]  # step 2 is mid-epoch (5 per epoch)
    labels = json.loads(weights_io.load_metadata(tmp_path / "full" / "model.safetensors")["id2label"])
    assert labels == {"0": "class0", "1": "class1"}


def test_image_transforms_shapes_and_determinism():
    image = torch.rand(3, 37, 53)
    box = vdata.random_resized_crop_box(37, 53, torch.Generator().manual_seed(1))
    top, left, h, w = box
    assert 0 <= top and 0 <= left and top + h <= 37 and left + w <= 53 and h > 0 and w > 0
    a = vdata.train_transform(image, (16, 16), torch.Generator().manual_seed(5))
    b = vdata.train_transform(image, (16, 16), torch.Generator().manual_seed(5))
    assert a.shape == (3, 16, 16) and torch.equal(a, b)



def test_image_folder_eval_is_the_predict_recipe(tmp_path):
    """The eval split is preprocessed exactly as ``fastvit predict`` preprocesses a file."""
    from vit.tools.preprocess import default_preprocess, load_image

    _write_images(tmp_path / "images", classes=2, per_class=3)
    for in_chans in (1, 3):
        _, held_out = vdata.load_image_folder(tmp_path / "images", in_chans, (16, 16), val_fraction=0.4)
        path, label = held_out.samples[0]
        image, got_label = held_out[0]
        expected = default_preprocess((16, 16), in_chans=in_chans)(load_image(path))
        assert image.shape == (in_chans, 16, 16) and got_label == label
        assert torch.equal(image, expected)


def test_batches_shard_one_global_batch():
    full = vdata.batch_indices(100, 32, seed=3, step=5)
    halves = [vdata.batch_indices(100, 32, seed=3, step=5, rank=r, world_size=2) for r in range(2)]
    assert torch.equal(torch.cat(halves), full)
    # Epoch 1 (3 batches per epoch) is another permutation of the same images.
    assert not torch.equal(vdata.batch_indices(100, 32, 3, 3), vdata.batch_indices(100, 32, 3, 0))
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        vdata.batch_indices(100, 32, 0, 0, rank=0, world_size=3)
    idx, valid = vdata.eval_indices(7, rank=1, world_size=2)
    assert idx.tolist() == [4, 5, 6, 0] and valid.tolist() == [True, True, True, False]


def test_weight_decay_skips_norms_biases_pos_embed_and_cls_token():
    model = vit.ViT(vit.get_config("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=5))
    decay, no_decay = schedule.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert {"pos_embed", "cls_token", "norm.weight", "blocks.0.norm1.weight", "head.bias"} <= no_decay_names
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"} <= decay_names
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay_names) + len(no_decay_names) == len(names)


def test_warmup_cosine_schedule():
    sched = schedule.WarmupCosine(peak=1e-3, floor=1e-5, warmup=10, total=110)
    assert sched.lr(0) == pytest.approx(1e-4)
    assert sched.lr(9) == pytest.approx(1e-3)
    assert sched.lr(60) == pytest.approx((1e-3 + 1e-5) / 2)
    assert sched.lr(110) == pytest.approx(1e-5)
    rates = [sched.lr(s) for s in range(10, 110)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
