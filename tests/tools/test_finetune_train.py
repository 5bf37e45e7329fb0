"""``fastvit train --init``: fine-tuning from timm / HF / fastvit checkpoints, layer-wise lr decay,
head lr scale, linear probe, the fine-tuning drop path, resume, and the errors.

Tiny models on the bundled digits, ``--threads 1``; the 400-step convergence run is ``slow``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vit
from vit import ViT
from vit import weights as weights_io
from vit.tools import data as vdata
from vit.tools import train
from vit.tools.train import args as train_args
from vit.tools.train.dist import Dist
from vit.tools.train.state import STATE_FILE
from vit.tools.train.trainer import Trainer

QUIET = ["--threads", "1", "--progress", "none"]
DIGITS = ["--model", "vit_digits", "--steps", "400", "--lr", "2e-3", "--eval-every", "0", "--ckpt-every", "0"]
SHORT = ["--eval-every", "0", "--ckpt-every", "0", "--log-every", "1"]


def run(out: Path, *args: str) -> int:
    return train.main(["--out", str(out), *QUIET, *args])


def losses(out: Path) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def saved_config(weights: Path) -> dict:
    return json.loads(weights_io.load_metadata(weights)[weights_io.CONFIG_METADATA_KEY])


def digits_model(**overrides) -> vit.ViT:
    """A model of the vit_digits preset's shape (16x16 gray, patch 4, width 64, depth 2)."""
    base, preset = train_args.TRAIN_PRESETS["vit_digits"]
    return vit.create_model(base, **{**preset, **overrides})


def checkpoint(tmp_path: Path, name: str = "pre.safetensors", with_config: bool = True, **overrides) -> Path:
    model = digits_model(**overrides)
    path = tmp_path / name
    weights_io.save(model, path, config=model.config if with_config else None)
    return path


# ---------------------------------------------------------------------- convergence, transfer

@pytest.mark.slow
def test_init_from_a_1000_class_checkpoint_reaches_95_percent(tmp_path, capsys):
    pre = checkpoint(tmp_path, num_classes=1000)
    assert run(tmp_path / "out", *DIGITS, "--init", str(pre)) == 0
    out = capsys.readouterr().out
    assert "re-initialized: head.weight (10, 64), head.bias (10,)" in out, out
    assert "dropped: head.weight (1000, 64)" in out and "drop_path_rate 0.0" in out, out
    result = summary(tmp_path / "out")
    print(f"\n--init from a 1000-class checkpoint, digits: {result['steps']} steps, eval top-1 "
          f"{result['eval_acc']:.4f} (loss {result['eval_loss']:.4f}), train {result['wall_s']:.1f} s")
    assert result["eval_acc"] >= 0.95, result
    assert result["init"].startswith(f"loaded 30 tensors from {pre}")
    # The run's model is the checkpoint's, with the data's 10 classes.
    assert saved_config(tmp_path / "out" / "model.safetensors")["num_classes"] == 10


def _digits_0_to_4_as_pngs(root: Path) -> None:
    """The digits train split's images of classes 0-4, 16x16 gray PNGs in class folders."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # the 80% train split of vdata.load_digits (the test images are never seen)
    order = torch.randperm(len(bunch.target), generator=torch.Generator().manual_seed(0))
    train_idx = order[round(len(bunch.target) * 0.2):].tolist()
    images = F.interpolate(torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0,
                           size=(16, 16), mode="bilinear", align_corners=False)
    for i in train_idx:
        label = int(bunch.target[i])
        if label < 5:
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            pixels = (images[i, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / str(label) / f"{i}.png")


def test_backbone_from_digits_0_to_4_speeds_up_all_10_classes(tmp_path):
    _digits_0_to_4_as_pngs(tmp_path / "digits04")
    assert run(tmp_path / "pre", "--data", str(tmp_path / "digits04"), "--workers", "0", "--steps", "200",
               "--eval-every", "0", "--ckpt-every", "0") == 0
    pre = summary(tmp_path / "pre")
    assert saved_config(tmp_path / "pre" / "model.safetensors")["num_classes"] == 5
    steps = ["--steps", "30", *SHORT]
    assert run(tmp_path / "tuned", *steps, "--init", str(tmp_path / "pre" / "model.safetensors")) == 0
    assert run(tmp_path / "scratch", *steps) == 0
    tuned, scratch = losses(tmp_path / "tuned"), losses(tmp_path / "scratch")
    late_tuned = sum(tuned[s] for s in range(21, 31)) / 10
    late_scratch = sum(scratch[s] for s in range(21, 31)) / 10
    t, s = summary(tmp_path / "tuned"), summary(tmp_path / "scratch")
    print(f"\nbackbone pretrained on digits 0-4 (200 steps, {pre['eval_acc']:.3f} top-1 on its 5 classes), then "
          f"30 steps on all 10: mean train loss of steps 21-30 {late_tuned:.4f} vs {late_scratch:.4f} from "
          f"scratch; eval loss {t['eval_loss']:.4f} vs {s['eval_loss']:.4f}, top-1 {t['eval_acc']:.4f} vs "
          f"{s['eval_acc']:.4f}")
    assert late_tuned < late_scratch - 0.1, (tuned, scratch)
    assert t["eval_loss"] < s["eval_loss"] and t["eval_acc"] > s["eval_acc"]


# ----------------------------------------------------------------------- Hugging Face snapshot

def _hf_headless_snapshot(directory: Path) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=4, num_channels=1)
    transformers.ViTModel(cfg, add_pooling_layer=False).save_pretrained(directory)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=[0.5], image_std=[0.25]
                                   ).save_pretrained(directory)


def test_headless_hf_directory_trains_a_10_class_model_and_resumes_exactly(tmp_path, capsys):
    snapshot = tmp_path / "hf"
    _hf_headless_snapshot(snapshot)
    args = ["--steps", "4", "--batch-size", "16", "--ckpt-every", "2", "--eval-every", "0", "--log-every", "1"]
    assert run(tmp_path / "full", "--init", str(snapshot), *args) == 0
    out = capsys.readouterr().out
    assert "(config of " in out and "dim 32, depth 2" in out, out
    assert "re-initialized: head.weight (10, 32), head.bias (10,)" in out, out
    assert "normalization mean [0.5] std [0.25] (from preprocessor_config.json" in out, out
    config = saved_config(tmp_path / "full" / "model.safetensors")
    assert {k: config[k] for k in ("embed_dim", "depth", "num_heads", "mlp_ratio", "img_size", "patch_size",
                                   "in_chans", "num_classes", "norm_eps")} == \
        {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "img_size": 16, "patch_size": 4,
         "in_chans": 1, "num_classes": 10, "norm_eps": 1e-12}
    state = torch.load(tmp_path / "full" / "checkpoints" / "step_00000004" / STATE_FILE, weights_only=True)
    assert state["args"]["mean"] == [0.5] and state["args"]["std"] == [0.25]

    # Resume needs neither the snapshot nor the command line: the saved config and mean/std win.
    for path in snapshot.iterdir():
        path.unlink()
    snapshot.rmdir()
    assert run(tmp_path / "resumed", "--resume", str(tmp_path / "full" / "checkpoints" / "step_00000002")) == 0
    full = weights_io.load(tmp_path / "full" / "model.safetensors")
    resumed = weights_io.load(tmp_path / "resumed" / "model.safetensors")
    assert full.keys() == resumed.keys()
    assert not [k for k in full if not torch.equal(full[k], resumed[k])]


def test_mean_and_std_reach_both_splits(tmp_path):
    digits_train, _ = vdata.load_digits(1, (16, 16), mean=[0.5], std=[0.25])
    default_train, _ = vdata.load_digits(1, (16, 16))
    pixels = default_train.images * vdata.GRAY_STD[0] + vdata.GRAY_MEAN[0]  # back to [0, 1]
    torch.testing.assert_close(digits_train.images, (pixels - 0.5) / 0.25)
    from PIL import Image

    (tmp_path / "a").mkdir()
    Image.fromarray((torch.rand(20, 20) * 255).to(torch.uint8).numpy()).save(tmp_path / "a" / "0.png")
    train_set, eval_set = vdata.load_image_folder(tmp_path, 1, (16, 16), mean=[0.5], std=[0.25])
    assert (train_set.mean, train_set.std) == ((0.5,), (0.25,)) == (eval_set.eval_recipe.mean, eval_set.eval_recipe.std)


def test_normalization_sources(tmp_path):
    from vit.tools.preprocess import Preprocess
    from vit.tools.train import pretrained

    def resolved(in_chans, preprocess=None, *typed):
        args = train_args.parse_args(list(typed))
        source = pretrained.InitSource(tmp_path, None, preprocess)
        note = pretrained.resolve_normalization(args, in_chans, source)
        return args.mean, args.std, note

    assert resolved(3) == (None, None, None)  # ImageNet's, as without --init
    mean, std, note = resolved(3, None, "--mean", "0.5", "--std", "0.2")
    assert (mean, std) == ([0.5] * 3, [0.2] * 3) and "--mean/--std" in note
    rgb = Preprocess(resize=None, crop=None, mean=(0.3, 0.6, 0.9), std=(0.1, 0.2, 0.3))
    mean, std, note = resolved(1, rgb)  # an RGB checkpoint adapted to gray input
    assert mean == pytest.approx([0.6]) and std == pytest.approx([0.2]) and "preprocessor_config.json" in note
    assert resolved(3, Preprocess(resize=None, crop=None, normalize=False))[:2] == ([0.0] * 3, [1.0] * 3)
    with pytest.raises(train.TrainError, match="--mean has 2 values, the model takes 3-channel images"):
        resolved(3, None, "--mean", "0.5", "0.5", "--std", "0.2")


# ------------------------------------------------------------------------- optimizer groups

def _trainer(tmp_path: Path, *argv: str) -> Trainer:
    return Trainer(train_args.parse_args(["--out", str(tmp_path), *QUIET, "--steps", "20", *argv]), Dist("cpu"), None)


def _expected_layer(name: str, depth: int) -> int:
    if name.startswith(("patch_embed.", "cls_token", "pos_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1  # final norm, fc_norm, head


def test_layer_decay_and_head_scale_give_each_block_its_lr(tmp_path):
    pre = checkpoint(tmp_path, depth=3)
    trainer = _trainer(tmp_path / "out", "--init", str(pre), "--layer-decay", "0.5", "--head-lr-scale", "3")
    depth = trainer.cfg.depth
    assert depth == 3  # the checkpoint's config
    names = [name for group in trainer.optimizer.param_groups for name in group["names"]]
    assert sorted(names) == sorted(n for n, _ in trainer.module.named_parameters())
    for step in (0, 1, 10, 19):
        base = trainer.schedule.apply(trainer.optimizer, step)
        assert base == trainer.schedule.lr(step)
        for group in trainer.optimizer.param_groups:
            for name in group["names"]:
                expected = base * 0.5 ** (depth + 1 - _expected_layer(name, depth))
                expected *= 3 if name.startswith("head.") else 1
                assert group["lr"] == pytest.approx(expected, rel=1e-12), (step, name)
    by_name = {n: g for g in trainer.optimizer.param_groups for n in g["names"]}
    assert by_name["blocks.0.attn.qkv.weight"]["lr_scale"] == 0.5 ** 3
    assert by_name["pos_embed"]["lr_scale"] == 0.5 ** 4 and by_name["pos_embed"]["weight_decay"] == 0.0
    assert by_name["head.weight"]["lr_scale"] == 3 and by_name["head.weight"]["weight_decay"] == 0.05


def test_without_finetune_options_the_optimizer_groups_are_the_plain_recipe(tmp_path):
    trainer = _trainer(tmp_path / "out")
    groups = trainer.optimizer.param_groups
    assert len(groups) == 2 and [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert not any("lr_scale" in g for g in groups)
    assert trainer.cfg.drop_path_rate == 0.0 and trainer.model_name == "vit_digits"
    assert trainer.schedule.apply(trainer.optimizer, 5) == groups[0]["lr"] == groups[1]["lr"]


def test_layer_decay_run_resumes_exactly(tmp_path):
    args = ["--steps", "4", "--batch-size", "16", "--ckpt-every", "2", "--eval-every", "0", "--log-every", "1",
            "--layer-decay", "0.6", "--head-lr-scale", "2", "--init", str(checkpoint(tmp_path, num_classes=1000))]
    assert run(tmp_path / "full", *args) == 0
    assert run(tmp_path / "resumed", "--resume", str(tmp_path / "full" / "checkpoints" / "step_00000002")) == 0
    full = weights_io.load(tmp_path / "full" / "model.safetensors")
    resumed = weights_io.load(tmp_path / "resumed" / "model.safetensors")
    assert not [k for k in full if not torch.equal(full[k], resumed[k])]
    assert losses(tmp_path / "resumed") == {s: v for s, v in losses(tmp_path / "full").items() if s > 2}
    # a different decay on resume is not "continuing where it stopped"
    assert run(tmp_path / "full", "--resume", str(tmp_path / "full"), "--layer-decay", "0.7") == 1


def test_freeze_backbone_trains_the_head_only_and_resumes_exactly(tmp_path, capsys):
    pre = checkpoint(tmp_path, num_classes=10)
    assert run(tmp_path / "out", "--init", str(pre), "--freeze-backbone", "--steps", "4", "--batch-size", "16",
               "--ckpt-every", "2", "--eval-every", "0", "--log-every", "1") == 0
    before, after = weights_io.load(pre), weights_io.load(tmp_path / "out" / "model.safetensors")
    assert before.keys() == after.keys()
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["head.bias", "head.weight"], changed
    assert "loaded 32 tensors" in capsys.readouterr().out  # the 10-class head was loaded too
    assert run(tmp_path / "resumed", "--resume", str(tmp_path / "out" / "checkpoints" / "step_00000002")) == 0
    resumed = weights_io.load(tmp_path / "resumed" / "model.safetensors")
    assert not [k for k in after if not torch.equal(after[k], resumed[k])]


# ------------------------------------------------------------------------------------ errors

def test_mismatching_depth_is_refused_naming_the_keys(tmp_path, capsys):
    deeper = checkpoint(tmp_path, "deep.safetensors", with_config=False, depth=3)
    assert run(tmp_path / "out", "--init", str(deeper), "--steps", "2") == 1  # built from --model: depth 2
    err = capsys.readouterr().err
    assert "checkpoint mismatch in" in err and "deep.safetensors" in err, err
    assert "unexpected keys" in err and "blocks.2.attn.qkv.weight" in err and "Traceback" not in err, err
    # With a config, an explicit --depth overrides it, and is refused the same way.
    deeper = checkpoint(tmp_path, "deep_cfg.safetensors", depth=3)
    assert run(tmp_path / "out", "--init", str(deeper), "--depth", "2", "--steps", "2") == 1
    err = capsys.readouterr().err
    assert "blocks.2.mlp.fc1.weight" in err and "deep_cfg.safetensors" in err, err


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_unreadable_init_file_is_a_clean_error(tmp_path, capsys, damage):
    path = tmp_path / "pre.safetensors"
    if damage == "garbage":
        path.write_bytes(b"\xff" * 64 + b"not a safetensors file")
    elif damage == "truncated":
        blob = checkpoint(tmp_path, "good.safetensors").read_bytes()
        path.write_bytes(blob[: len(blob) // 2])
    assert run(tmp_path / "out", "--init", str(path), "--steps", "2") == 1
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err, err
    assert ("no such file" in err) if damage == "missing" else ("corrupt" in err), err


def test_family_parameters_in_the_optimizer_groups():
    """The tokens a model says take no decay (timm's set) take none; DeiT's head_dist is a
    head (linear probe, head lr scale); norm_pre and dist_token are embedding-side."""
    from vit.tools.train import finetune, schedule

    model = ViT(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3, distilled=True,
                pre_norm=True, init_values=0.1)
    tokens = {name for name, p in model.named_parameters() if p.ndim == 3}
    assert tokens == {"pos_embed", "cls_token", "dist_token"}
    assert schedule.NO_DECAY_TOKENS >= model.no_weight_decay()
    undecayed = {n for g in finetune.param_groups(model, 0.05, depth=2) if g["weight_decay"] == 0
                 for n in g["names"]}
    assert tokens <= undecayed and "blocks.0.ls1.gamma" in undecayed
    assert "blocks.0.attn.qkv.weight" not in undecayed
    plain = schedule.param_groups(model, 0.05)
    assert {id(p) for p in plain[1]["params"]} == {id(p) for n, p in model.named_parameters() if n in undecayed}
    assert finetune.layer_id("dist_token", 2) == finetune.layer_id("norm_pre.weight", 2) == 0
    assert sorted(finetune.freeze_backbone(model)) == ["head.bias", "head.weight", "head_dist.bias",
                                                      "head_dist.weight"]
