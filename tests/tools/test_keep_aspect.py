"""``--keep-aspect [--max-patches N]`` of ``fastvit predict`` / ``fastvit embed`` (issue 20): each
image at its own aspect-preserving size within a patch budget, a batch run as one packed list,
the same numbers as each image run alone."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import pytest
import torch
from test_embed import random_checkpoint

import vit
import vit.tools.cli as cli
from fastvit_kernels.testing import FP32_RTOL, assert_parity
from vit import weights as ckpt
from vit.tools import embed_index as store
from vit.tools import predict as vp
from vit.tools.preprocess import Preprocess, aspect_size, default_preprocess, keep_aspect, load_image

Image = pytest.importorskip("PIL.Image")

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


# ------------------------------------------------------------------------ the size rule
@pytest.mark.parametrize("hw,patch,budget,expected", [
    ((224, 224), 16, 196, (224, 224)),  # the model's own size stays
    ((100, 400), 16, 196, (112, 448)),  # 7 x 28 = 196 patches, aspect 1:4 kept
    ((427, 640), 16, 196, (176, 272)),  # 11 x 17 = 187 patches
    ((10, 1000), 4, 16, (4, 64)),  # very wide: one row, the budget's 16 columns
    ((1000, 10), 4, 16, (64, 4)),
    ((8, 8), 8, 1, (8, 8)),  # a 1-patch budget
    ((20, 30), 16, 400, (256, 384)),  # small images are scaled up to the budget
])
def test_aspect_size(hw, patch, budget, expected):
    assert aspect_size(*hw, patch, budget) == expected


def test_aspect_size_keeps_the_budget_and_the_aspect():
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        height, width = (int(v) for v in torch.randint(1, 2000, (2,), generator=gen))
        patch = int(torch.randint(1, 33, (1,), generator=gen))
        budget = int(torch.randint(1, 1025, (1,), generator=gen))
        h, w = aspect_size(height, width, patch, budget)
        rows, cols = h // patch, w // patch
        assert h % patch == 0 and w % patch == 0 and rows >= 1 and cols >= 1
        assert rows * cols <= budget
        ideal = math.sqrt(budget / (height * width))  # patches per pixel that fill the budget exactly
        if rows > 1 and cols > 1 and rows < budget and cols < budget:  # not clamped: within a patch
            assert height * ideal - 1 < rows <= height * ideal + 1e-6
            assert width * ideal - 1 < cols <= width * ideal + 1e-6


def test_aspect_size_errors():
    with pytest.raises(ValueError, match="max_patches must be a positive int, got 0"):
        aspect_size(10, 10, 4, 0)
    with pytest.raises(ValueError, match="patch_size must be a positive int, got 2.5"):
        aspect_size(10, 10, 2.5, 4)


def test_keep_aspect_recipe(tmp_path):
    base = default_preprocess((32, 32))
    recipe = keep_aspect(base, patch_size=8, max_patches=16)
    assert (recipe.resize, recipe.crop, recipe.max_patches, recipe.patch_size) == (None, None, 16, 8)
    assert (recipe.mean, recipe.std, recipe.interpolation) == (base.mean, base.std, base.interpolation)
    image = Image.new("RGB", (90, 30), (200, 100, 50))  # 30 high, 90 wide
    x = recipe(image)
    assert tuple(x.shape) == (3, *aspect_size(30, 90, 8, 16)) == (3, 16, 48)
    assert Preprocess(**json.loads(json.dumps(dataclasses.asdict(recipe)))) == recipe  # as `fastvit embed` stores it
    with pytest.raises(ValueError, match="max_patches and patch_size go together"):
        Preprocess(resize=None, crop=None, max_patches=16)
    with pytest.raises(ValueError, match="resize and crop must be None, got resize=36"):
        Preprocess(resize=36, crop=None, max_patches=16, patch_size=8)


# ------------------------------------------------------------------------ fastvit predict
@pytest.fixture
def classifier(tmp_path):
    cfg = vit.get_config("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=7)
    model = vit.ViT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "tiny.safetensors"
    ckpt.save(model, path, config=cfg)
    return path


def _image_files(tmp_path, sizes) -> list[Path]:
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i, (w, h) in enumerate(sizes):
        pixels = torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy()
        paths.append(tmp_path / f"img{i}_{w}x{h}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


@pytest.mark.parametrize("fast", [False, True], ids=["ref", "fast"])
def test_predict_keep_aspect_equals_each_image_alone(classifier, tmp_path, fast):
    files = _image_files(tmp_path, [(64, 32), (30, 90), (50, 50), (200, 20)])
    model, recipe, labels = vp.load_classifier(classifier, fast=fast, device="cpu")
    recipe = keep_aspect(recipe, model.config.patch_size, 12)
    results = list(vp.predict(files, model, recipe, labels, batch_size=3, topk=7))
    assert all(r.error is None for r in results)
    sizes = set()
    for path, result in zip(files, results):
        x = recipe(load_image(path))
        sizes.add(tuple(x.shape))
        assert (x.shape[1] // 8) * (x.shape[2] // 8) <= 12
        with torch.no_grad():
            probs = model([x]).softmax(-1)[0]
        got = torch.zeros(7)
        for index, _, p in result.top:
            got[index] = p
        assert_parity(f"probabilities of {path.name}", got, probs, rtol=FP32_RTOL)
    assert len(sizes) == 4  # every image at its own size


def test_predict_cli_keep_aspect(classifier, tmp_path):
    files = _image_files(tmp_path, [(64, 32), (30, 90)])
    code, out, err = _run(["predict", *map(str, files), "--pretrained", str(classifier), "--device", "cpu",
                           "--keep-aspect", "--max-patches", "6", "--topk", "3"])
    assert code == 0, err
    assert out.count("%") == 6
    # the default budget is the model's own grid (32 px, patch 8: 16 patches)
    code, out_default, err = _run(["predict", *map(str, files), "--pretrained", str(classifier),
                                   "--device", "cpu", "--keep-aspect"])
    assert code == 0, err
    assert out_default.count("%") == 10 and out_default != out
    model, _, _ = vp.load_classifier(classifier, device="cpu")
    assert vp.default_max_patches(model) == 16


@pytest.mark.parametrize("argv,message", [
    (["--max-patches", "6"], "--max-patches needs --keep-aspect"),
    (["--keep-aspect", "--max-patches", "0"], "--max-patches must be a positive integer, got 0"),
])
@pytest.mark.parametrize("command", ["predict", "embed"])
def test_bad_keep_aspect_options(classifier, tmp_path, command, argv, message):
    target = [str(tmp_path)] if command == "embed" else [str(_image_files(tmp_path, [(8, 8)])[0])]
    code, _, err = _run([command, *target, "--pretrained", str(classifier), "--device", "cpu", *argv])
    assert code == 2 and message in err


# ------------------------------------------------------------------------ fastvit embed
def test_embed_keep_aspect_equals_each_image_alone(tmp_path):
    checkpoint = random_checkpoint(tmp_path / "digits.safetensors")  # 16x16 gray, patch 4
    root = tmp_path / "images"
    root.mkdir()
    gen = torch.Generator().manual_seed(2)
    for i, (w, h) in enumerate([(16, 16), (40, 10), (12, 30), (7, 7), (64, 48)]):
        pixels = torch.randint(0, 256, (h, w), generator=gen, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"{i}.png")
    out = tmp_path / "emb.safetensors"
    code, _, err = _run(["embed", str(root), "--pretrained", str(checkpoint), "--out", str(out), "--workers", "0",
                         "--progress", "none", "--device", "cpu", "--keep-aspect", "--max-patches", "9",
                         "--batch-size", "4"])
    assert code == 0, err
    index = store.open_index(out)
    meta = json.loads(index.metadata["preprocess"])
    assert (meta["max_patches"], meta["patch_size"], meta["resize"], meta["crop"]) == (9, 4, None, None)
    model, _ = vp.load_classifier(checkpoint, fast=True, device="cpu")[:2]
    recipe = Preprocess(**meta)
    stored = index.matrix()
    for row, rel in enumerate(index.paths):
        x = recipe(load_image(root / rel))
        with torch.no_grad():
            alone = model.forward_head(model.forward_features([x]), pre_logits=True)[0]
        assert_parity(f"embedding of {rel}", stored[row], alone, rtol=FP32_RTOL)
    # `fastvit search` prepares queries with the index's recipe: the same packed, aspect-kept path
    code, out, err = _run(["search", str(root / "1.png"), str(root / "4.png"), "--index", str(out), "--k", "1",
                           "--device", "cpu"])
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split()[-1] == "1.png" and lines[3].split()[-1] == "4.png"
    assert float(lines[1].split()[1]) == pytest.approx(1.0, abs=1e-5)
