"""`fastvit predict` and its preprocessing, on real image files (scikit-learn's samples)."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vit
import vit.tools.cli as cli
from vit import weights as ckpt
from vit.tools import predict as vp
from vit.tools.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageLoadError,
    Preprocess,
    default_preprocess,
    for_checkpoint,
    from_hf_config,
    load_image,
)

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

NAMES = ["tench", "goldfish", "great white shark", "tiger shark", "hammerhead", "electric ray",
         "stingray", "cock", "hen", "ostrich"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sample_images():
    datasets = pytest.importorskip("sklearn.datasets")
    paths = [Path(p) for p in datasets.load_sample_images().filenames]
    assert [p.name for p in paths] == ["china.jpg", "flower.jpg"]
    return paths


def _perturb(model):
    with torch.no_grad():  # random init leaves norms at (1, 0) and biases at 0
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture
def hf_snapshot(tmp_path):
    """A tiny HF ViT classifier saved as a snapshot dir, with labels and its image processor."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, image_size=32, patch_size=8, num_labels=10,
                                 id2label=dict(enumerate(NAMES)), label2id={n: i for i, n in enumerate(NAMES)})
    model = _perturb(transformers.ViTForImageClassification(cfg)).eval()
    model.save_pretrained(tmp_path / "snap")
    processor_cls = getattr(transformers, "ViTImageProcessorPil", None) or transformers.ViTImageProcessor
    processor = processor_cls(size={"height": 32, "width": 32})
    processor.save_pretrained(tmp_path / "snap")
    return tmp_path / "snap", model, processor


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(argv, stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def _blocks(stdout: str) -> dict[str, list[str]]:
    blocks, current = {}, None
    for line in stdout.splitlines():
        if not line.startswith("  "):
            current = blocks.setdefault(Path(line).name, [])
        else:
            current.append(line.strip())
    return blocks


def test_predict_top5_labelled_and_bad_files_reported(hf_snapshot, sample_images, tmp_path):
    snap, _, _ = hf_snapshot
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("this is not a JPEG")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(sample_images[0].read_bytes()[:2000])
    missing = tmp_path / "missing.png"
    files = [sample_images[0], not_image, truncated, missing, sample_images[1]]
    code, out, err = _run(["predict", *map(str, files), "--pretrained", str(snap), "--batch-size", "2",
                           "--device", "cpu"])
    assert code == 1  # some files failed; the rest were still classified
    blocks = _blocks(out)
    assert list(blocks) == ["china.jpg", "flower.jpg"]
    for rows in blocks.values():
        assert len(rows) == 5
        assert [int(r.split(".")[0]) for r in rows] == [1, 2, 3, 4, 5]
        probs = [float(r.split()[1].rstrip("%")) for r in rows]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 100.01
        for row in rows:  # "1.  23.45%  great white shark (2)"
            label, index = row.split("%", 1)[1].strip().rsplit(" (", 1)
            assert label == NAMES[int(index.rstrip(")"))]
    for bad in (not_image, truncated, missing):
        assert f"error: {bad}:" in err
    assert "not an image" in err and "no such file" in err and "cannot decode" in err
    assert "3 of 5 file(s) could not be classified" in err


def test_predict_matches_transformers_pipeline(hf_snapshot, sample_images):
    snap, hf_model, processor = hf_snapshot
    model, preprocess, labels = vp.load_classifier(snap, device="cpu")
    assert labels == NAMES
    assert preprocess == Preprocess(resize=(32, 32), crop=None, mean=(0.5,) * 3, std=(0.5,) * 3,
                                    interpolation="bilinear", rescale=1 / 255)
    images = [Image.open(p).convert("RGB") for p in sample_images]
    theirs = processor(images=images, return_tensors="pt")["pixel_values"]
    ours = torch.stack([preprocess(im) for im in images])
    assert (ours - theirs).abs().max().item() <= 1e-5
    with torch.no_grad():
        expected = hf_model(pixel_values=theirs).logits.softmax(-1)
    got = list(vp.predict(sample_images, model, preprocess, labels, batch_size=1, topk=3))
    for pred, probs in zip(got, expected):
        assert pred.error is None
        values, indices = probs.topk(3)
        assert [i for i, _, _ in pred.top] == indices.tolist()
        assert [p for _, _, p in pred.top] == pytest.approx(values.tolist(), abs=1e-5)
        assert [n for _, n, _ in pred.top] == [NAMES[i] for i in indices.tolist()]


def test_our_checkpoint_default_preprocessing_and_metadata_labels(tmp_path, sample_images):
    cfg = vit.get_config("vit_tiny_patch16_224", img_size=32, depth=2, num_classes=7)
    model = _perturb(vit.ViT(cfg)).eval()
    names = {i: f"kind-{i}" for i in range(7)}
    path = tmp_path / "tiny.safetensors"
    ckpt.save(model, path, config=cfg, metadata={"id2label": json.dumps(names)})
    loaded, preprocess, labels = vp.load_classifier(path, device="cpu")
    assert labels == list(names.values())
    assert preprocess == default_preprocess((32, 32)) == for_checkpoint(path, (32, 32))
    assert (preprocess.resize, preprocess.crop, preprocess.mean) == (36, (32, 32), IMAGENET_MEAN)
    one_by_one = list(vp.predict(sample_images * 2, loaded, preprocess, labels, batch_size=1))
    batched = list(vp.predict(sample_images * 2, loaded, preprocess, labels, batch_size=3))
    for a, b in zip(one_by_one, batched):
        assert [i for i, _, _ in a.top] == [i for i, _, _ in b.top]
        assert [p for _, _, p in a.top] == pytest.approx([p for _, _, p in b.top], abs=1e-5)
    # the same numbers as the model run on the preprocessed tensor directly
    x = preprocess(load_image(sample_images[1]))[None]
    with torch.no_grad():
        top = model(x).softmax(-1)[0].topk(5)
    assert [i for i, _, _ in batched[1].top] == top.indices.tolist()


def test_predict_with_the_fast_model(hf_snapshot, sample_images):
    snap, _, _ = hf_snapshot
    code, fast_out, err = _run(["predict", str(sample_images[0]), "--pretrained", str(snap), "--fast",
                                "--device", "cpu"])
    assert code == 0, err
    code, ref_out, _ = _run(["predict", str(sample_images[0]), "--pretrained", str(snap), "--device", "cpu"])
    labels = lambda out: [r.split("%", 1)[1] for r in _blocks(out)["china.jpg"]]  # noqa: E731
    assert labels(fast_out) == labels(ref_out)


def test_shorter_side_resize_and_center_crop():
    pixels = np.random.randint(0, 256, (60, 90, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    recipe = Preprocess(resize=40, crop=(32, 32), mean=(0.5, 0.25, 0.0), std=(0.5, 0.5, 2.0))
    assert recipe.output_size(60, 90) == (32, 32)
    out = recipe(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    resized = np.asarray(image.resize((60, 40), Image.Resampling.BICUBIC), dtype=np.float32)
    assert resized.shape == (40, 60, 3)
    crop = resized[4:36, 14:46] / 255
    expected = (crop - np.array([0.5, 0.25, 0.0])) / np.array([0.5, 0.5, 2.0])
    np.testing.assert_allclose(out.permute(1, 2, 0).numpy(), expected, atol=1e-6)
    # grayscale and RGBA inputs become RGB
    assert recipe(image.convert("L")).shape == (3, 32, 32)
    assert recipe(image.convert("RGBA")).shape == (3, 32, 32)


def test_hf_preprocessor_variants():
    convnext = from_hf_config({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "resample": 3,
                               "image_mean": IMAGENET_MEAN, "image_std": IMAGENET_STD})
    assert (convnext.resize, convnext.crop, convnext.interpolation) == (256, (224, 224), "bicubic")
    deit = from_hf_config({"size": {"height": 256, "width": 256}, "do_center_crop": True,
                           "crop_size": {"height": 224, "width": 224}})
    assert (deit.resize, deit.crop) == ((256, 256), (224, 224))
    legacy = from_hf_config({"size": 224, "do_normalize": False})
    assert (legacy.resize, legacy.normalize) == ((224, 224), False)
    with pytest.raises(ValueError, match="unsupported size"):
        from_hf_config({"size": {"longest_edge": 224}})


def test_bad_arguments_are_clear(tmp_path, sample_images):
    with pytest.raises(ValueError, match="resize must be"):
        Preprocess(resize=0, crop=None)
    with pytest.raises(ValueError, match=r"mean must have 3 values \(RGB\) or 1 \(gray\)"):
        Preprocess(resize=8, crop=None, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="mean and std must have as many values"):
        Preprocess(resize=8, crop=None, mean=(0.5,))
    with pytest.raises(ValueError, match="in_chans=2"):
        default_preprocess((16, 16), in_chans=2)
    with pytest.raises(ValueError, match="interpolation must be one of"):
        Preprocess(resize=8, crop=None, interpolation="fancy")
    with pytest.raises(TypeError, match="expected a PIL.Image.Image"):
        Preprocess(resize=8, crop=None)(np.zeros((8, 8, 3)))
    with pytest.raises(ImageLoadError, match="is a directory"):
        load_image(tmp_path)
    code, _, err = _run(["predict", str(sample_images[0]), "--pretrained", str(tmp_path / "nope")])
    assert code == 2 and "no checkpoint at" in err
    code, _, err = _run(["predict", str(sample_images[0]), "--pretrained", str(tmp_path), "--topk", "0"])
    assert code == 2 and "--topk must be a positive integer, got 0" in err


def _train(out: Path, *args: str) -> Path:
    from vit.tools import train

    assert train.main(["--out", str(out), "--threads", "1", "--progress", "none", "--no-fast", "--steps", "2",
                       "--batch-size", "8", "--eval-every", "0", "--ckpt-every", "0", *args]) == 0
    return out / "model.safetensors"


def test_predict_with_a_trained_gray_digits_model(tmp_path, sample_images):
    """`fastvit train`'s default model (vit_digits: 1 channel, 16x16) -> predict: digit names, 5 rows."""
    weights = _train(tmp_path / "run")
    assert vit.factory.read_config(weights).in_chans == 1
    assert json.loads(ckpt.load_metadata(weights)["id2label"]) == {str(i): str(i) for i in range(10)}
    _, preprocess, labels = vp.load_classifier(weights, device="cpu")
    assert (preprocess.channels, preprocess.crop) == (1, (16, 16)) and labels == [str(i) for i in range(10)]
    code, out, err = _run(["predict", str(sample_images[0]), "--pretrained", str(weights), "--device", "cpu"])
    assert code == 0, err
    rows = _blocks(out)["china.jpg"]
    assert len(rows) == 5, out
    assert all(r.split("%", 1)[1].strip() in labels for r in rows), rows


def test_predict_shows_image_folder_class_names_and_at_most_num_classes_rows(tmp_path, sample_images):
    names = ["cat", "dog"]
    for name in names:
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.random.randint(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    weights = _train(tmp_path / "run", "--data", str(tmp_path / "images"), "--set", "in_chans=3",
                     "--workers", "0", "--batch-size", "4")
    code, out, err = _run(["predict", str(sample_images[1]), "--pretrained", str(weights), "--device", "cpu"])
    assert code == 0, err
    rows = _blocks(out)["flower.jpg"]
    assert len(rows) == 2, out  # top-5 of a 2-class model: min(5, num_classes) rows
    assert sorted(r.split("%", 1)[1].strip().split(" (")[0] for r in rows) == names


def test_gray_preprocess_matches_its_definition(sample_images):
    """One channel: gray image, shorter side to floor(16 / 0.875), bicubic, center crop, channel-mean stats."""
    recipe = default_preprocess((16, 16), in_chans=1)
    image = load_image(sample_images[0])
    x = recipe(image)
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and recipe.resize == 18
    gray = image.convert("L")
    assert gray.height < gray.width
    resized = gray.resize((int(18 * gray.width / gray.height), 18), Image.Resampling.BICUBIC)
    top, left = round((resized.height - 16) / 2), round((resized.width - 16) / 2)
    expected = np.asarray(resized.crop((left, top, left + 16, top + 16)), np.float32) / 255
    expected = (expected - sum(IMAGENET_MEAN) / 3) / (sum(IMAGENET_STD) / 3)
    torch.testing.assert_close(x[0], torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


def test_predict_device_and_pillow_errors_are_clear(tmp_path, sample_images, monkeypatch):
    cfg = vit.get_config("vit_tiny_patch16_224", img_size=16, patch_size=8, depth=1, num_classes=3)
    path = tmp_path / "tiny.safetensors"
    ckpt.save(vit.ViT(cfg), path, config=cfg)
    for device, message in [("tpu", "--device must be cpu, cuda or cuda:N"), ("nonsense", "--device must be")]:
        code, _, err = _run(["predict", str(sample_images[0]), "--pretrained", str(path), "--device", device])
        assert code == 2 and message in err and "Traceback" not in err, err
    if not torch.cuda.is_available():
        code, _, err = _run(["predict", str(sample_images[0]), "--pretrained", str(path), "--device", "cuda"])
        assert code == 2 and "CUDA is not available" in err, err
    import sys
    monkeypatch.setitem(sys.modules, "PIL.Image", None)  # as if Pillow were not installed
    code, _, err = _run(["predict", str(sample_images[0]), "--pretrained", str(path), "--device", "cpu"])
    assert code == 2 and "pip install pillow" in err, err
