"""The preprocessing of the ViT family's Hugging Face checkpoints: our recipe read from a
saved ``preprocessor_config.json`` gives the pixels transformers' own processor gives."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vit.tools.preprocess import Preprocess, for_checkpoint, from_hf_config

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

# the PIL backends (no torchvision needed), with sizes small enough to be quick and odd
# margins so that the crop's placement shows
PROCESSORS = {
    "clip": lambda: transformers.CLIPImageProcessorPil(size={"shortest_edge": 40},
                                                       crop_size={"height": 32, "width": 32}),
    "dinov2 (bit)": lambda: transformers.BitImageProcessorPil(size={"shortest_edge": 41},
                                                              crop_size={"height": 28, "width": 28}),
    "siglip": lambda: transformers.SiglipImageProcessorPil(size={"height": 32, "width": 32}),
    "deit": lambda: transformers.DeiTImageProcessorPil(size={"height": 39, "width": 39},
                                                       crop_size={"height": 32, "width": 32}),
    "vit": lambda: transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}),
}


def _image(height, width, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return PIL.fromarray(pixels, "RGB")


def _theirs(processor, image):
    return torch.as_tensor(np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]))


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_same_pixels_as_transformers(name, tmp_path):
    processor = PROCESSORS[name]()
    processor.save_pretrained(tmp_path)
    recipe = for_checkpoint(tmp_path, img_hw=(32, 32))
    assert recipe.mean == tuple(processor.image_mean) and recipe.std == tuple(processor.image_std)
    for height, width in ((57, 83), (83, 57), (50, 50), (21, 30)):  # wide, tall, square, smaller than the crop
        image = _image(height, width)
        expected = _theirs(processor, image)
        got = recipe(image)
        assert got.shape == expected.shape, f"{name} {height}x{width}"
        torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-5, msg=f"{name} {height}x{width}")


def test_legacy_clip_config_int_size_is_the_shorter_side():
    """OpenAI's CLIP snapshots: "size": 224 and "crop_size": 224 (CLIPFeatureExtractor)."""
    legacy = from_hf_config({"feature_extractor_type": "CLIPFeatureExtractor", "size": 40, "crop_size": 32,
                             "do_center_crop": True, "resample": 3,
                             "image_mean": [0.48145466, 0.4578275, 0.40821073],
                             "image_std": [0.26862954, 0.26130258, 0.27577711]})
    assert (legacy.resize, legacy.crop) == (40, (32, 32))
    assert legacy == from_hf_config(json.loads(PROCESSORS["clip"]().to_json_string()))
    vit_legacy = from_hf_config({"feature_extractor_type": "ViTFeatureExtractor", "size": 40})
    assert vit_legacy.resize == (40, 40)


def test_crop_offset_rules():
    image = _image(10, 13)  # margins 3 (rows) and 6 (columns) around an (7, 7) crop
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    plain = dict(resize=None, crop=(7, 7), normalize=False)
    torch.testing.assert_close(Preprocess(**plain, crop_offset="floor")(image), pixels[:, 1:8, 3:10])
    torch.testing.assert_close(Preprocess(**plain)(image), pixels[:, 2:9, 3:10])  # round(1.5) = 2
    assert Preprocess(resize=None, crop=None, crop_offset="floor") == Preprocess(resize=None, crop=None)
    with pytest.raises(ValueError, match="crop_offset must be 'round' or 'floor', got 'ceil'"):
        Preprocess(resize=None, crop=(7, 7), crop_offset="ceil")
