"""Image preprocessing for inference: resize, center crop, scale to [0, 1], normalize.

``Preprocess`` is the recipe; ``for_checkpoint`` reads it from a checkpoint: a Hugging
Face snapshot's ``preprocessor_config.json`` when there is one, else the timm/ImageNet
defaults for the model's image size and channels (resize the shorter side to
size / 0.875, bicubic, center crop, ImageNet mean and std; one-channel models get gray
images and the channel means of those statistics).

This module holds the one evaluation recipe and the one copy of the ImageNet statistics:
``vit.tools.data`` (the training job's evaluation split) uses them too, so a model is evaluated
during training exactly as ``fastvit predict`` will feed it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# gray images (in_chans=1) use the channel means of the ImageNet statistics
GRAY_MEAN = (sum(IMAGENET_MEAN) / 3,)
GRAY_STD = (sum(IMAGENET_STD) / 3,)
DEFAULT_CROP_PCT = 0.875
_FILTERS = ("nearest", "lanczos", "bilinear", "bicubic", "box", "hamming")  # PIL's codes 0..5


class ImageLoadError(ValueError):
    """A file that cannot be read as an image."""


def require_pillow(purpose: str = "reading images"):
    """The PIL package, or an ImportError that says what to install."""
    try:
        import PIL.Image  # noqa: F401
        import PIL.ImageOps  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{purpose} needs Pillow: install it with `pip install pillow`") from exc
    import PIL

    return PIL


def aspect_size(height: int, width: int, patch_size: int, max_patches: int) -> tuple[int, int]:
    """The largest (h, w), multiples of ``patch_size``, of about the aspect ratio of a
    ``height`` x ``width`` image whose patch grid has at most ``max_patches`` patches (like
    NaFlex's ``max_seq_len``): the image is scaled up or down to fill the budget; each side
    is rounded down to whole patches (at least one), so the aspect changes by under a patch."""
    for name, value in (("patch_size", patch_size), ("max_patches", max_patches), ("height", height),
                        ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    per_pixel = math.sqrt(max_patches / (height * width))  # patches per pixel along a side
    # (the 1e-9: 100 * sqrt(196 / 40000) is 6.999...; the budget is enforced by the min())
    rows = max(1, min(max_patches, math.floor(height * per_pixel + 1e-9)))
    cols = max(1, min(max_patches // rows, math.floor(width * per_pixel + 1e-9)))
    return rows * patch_size, cols * patch_size


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return int(value[0]), int(value[1])


@dataclass(frozen=True)
class Preprocess:
    """resize: an int resizes the shorter side to it (aspect kept), (h, w) resizes to exactly
    that, None keeps the size; crop: center crop (h, w) or None; the pixels are then
    multiplied by ``rescale`` and, with ``normalize``, standardized by mean and std.
    Three mean/std values give RGB images, one value gray ("L") images. ``crop_offset``:
    where an odd margin puts the crop, "round" (timm / torchvision: round((H - h) / 2)) or
    "floor" (transformers: (H - h) // 2).

    ``max_patches`` (with ``patch_size``) is the aspect-preserving variant for mixed-size
    batches (``keep_aspect``): each image is resized to ``aspect_size``, its own size
    within a budget of patches, instead of resize + crop."""

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    rescale: float = 1 / 255
    normalize: bool = True
    crop_offset: str = "round"
    max_patches: int | None = None
    patch_size: int | None = None

    def __post_init__(self):
        if (self.max_patches is None) != (self.patch_size is None):
            raise ValueError(f"max_patches and patch_size go together, got max_patches={self.max_patches!r}, "
                             f"patch_size={self.patch_size!r}")
        if self.max_patches is not None:
            aspect_size(1, 1, self.patch_size, self.max_patches)  # validates both
            if self.resize is not None or self.crop is not None:
                raise ValueError(f"max_patches sizes each image itself: resize and crop must be None, got "
                                 f"resize={self.resize!r}, crop={self.crop!r}")
        if self.resize is not None and not isinstance(self.resize, int):
            object.__setattr__(self, "resize", _pair("resize", self.resize))
        elif isinstance(self.resize, bool) or (isinstance(self.resize, int) and self.resize <= 0):
            raise ValueError(f"resize must be a positive int, (height, width) or None, got {self.resize!r}")
        if self.crop is not None:
            object.__setattr__(self, "crop", _pair("crop", self.crop))
        if self.crop_offset not in ("round", "floor"):
            raise ValueError(f"crop_offset must be 'round' or 'floor', got {self.crop_offset!r}")
        if self.crop is None:
            object.__setattr__(self, "crop_offset", "round")  # no crop: the rule means nothing
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {', '.join(_FILTERS)}, got {self.interpolation!r}")
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) not in (1, 3):
                raise ValueError(f"{name} must have 3 values (RGB) or 1 (gray), got {getattr(self, name)!r}")
            object.__setattr__(self, name, values)
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean and std must have as many values, got {self.mean!r} and {self.std!r}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std!r}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the tensor produced from an image of this size."""
        if self.crop is not None:
            return self.crop
        return self._resized(height, width)

    def _resized(self, height: int, width: int) -> tuple[int, int]:
        if self.max_patches is not None:
            return aspect_size(height, width, self.patch_size, self.max_patches)
        if self.resize is None:
            return height, width
        if isinstance(self.resize, tuple):
            return self.resize
        short, long = (height, width) if height <= width else (width, height)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if height <= width else (new_long, self.resize)

    def __call__(self, image) -> torch.Tensor:
        """A PIL image -> float32 tensor (channels, H, W)."""
        require_pillow()
        from PIL import Image

        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL.Image.Image, got {type(image).__name__}")
        image = image.convert("RGB" if self.channels == 3 else "L")
        size = self._resized(image.height, image.width)
        if size != (image.height, image.width):
            image = image.resize((size[1], size[0]), Image.Resampling[self.interpolation.upper()])
        if self.crop is not None:
            ch, cw = self.crop
            if self.crop_offset == "floor":
                top, left = (image.height - ch) // 2, (image.width - cw) // 2
            else:
                top, left = int(round((image.height - ch) / 2.0)), int(round((image.width - cw) / 2.0))
            # outside the image PIL fills with zeros, i.e. pads small images with black
            image = image.crop((left, top, left + cw, top + ch))
        pixels = np.asarray(image, dtype=np.float32).reshape(image.height, image.width, self.channels)
        pixels = pixels * np.float32(self.rescale)
        if self.normalize:
            pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def default_preprocess(img_hw, crop_pct: float = DEFAULT_CROP_PCT, in_chans: int = 3) -> Preprocess:
    """timm's ImageNet evaluation recipe for a model taking ``img_hw`` images with
    ``in_chans`` (1: gray, 3: RGB) channels."""
    height, width = _pair("img_hw", img_hw)
    if in_chans not in (1, 3):
        raise ValueError(f"images have 1 (gray) or 3 (RGB) channels, the model expects in_chans={in_chans!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct!r}")
    resize = math.floor(min(height, width) / crop_pct)
    if in_chans == 1:
        return Preprocess(resize=resize, crop=(height, width), mean=GRAY_MEAN, std=GRAY_STD)
    return Preprocess(resize=resize, crop=(height, width))


def keep_aspect(recipe: Preprocess, patch_size: int, max_patches: int) -> Preprocess:
    """``recipe`` (its interpolation, rescale and normalization) with each image resized to its
    own aspect-preserving size of at most ``max_patches`` patches, no crop (``aspect_size``)."""
    return dataclasses.replace(recipe, resize=None, crop=None, max_patches=max_patches, patch_size=patch_size)


# Processors whose bare-int ``size`` (legacy configs, e.g. OpenAI's CLIP: "size": 224) is the
# shorter side, as transformers reads them (default_to_square=False); others read a square.
_SHORTEST_EDGE_PROCESSORS = ("CLIP", "ChineseCLIP", "Bit", "Siglip")


def _hf_size(value, name: str, int_is_shortest_edge: bool = False):
    """HF's size / crop_size field -> (an int (shorter side) or (h, w), its kind)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, "shortest_edge") if int_is_shortest_edge else ((value, value), None)
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an int or a dict, got {value!r}")
    if "height" in value and "width" in value:
        return (int(value["height"]), int(value["width"])), None
    if "shortest_edge" in value and not value.get("longest_edge"):
        return int(value["shortest_edge"]), "shortest_edge"
    raise ValueError(f"unsupported {name} {value!r}: expected {{'height', 'width'}} or {{'shortest_edge'}}")


def from_hf_config(cfg: dict) -> Preprocess:
    """The recipe of a Hugging Face image processor config (``preprocessor_config.json``):
    ViT, DeiT, BiT (DINOv2), CLIP, SigLIP, ConvNeXt-style crop_pct; crops placed as
    transformers places them (``crop_offset="floor"``)."""
    if not isinstance(cfg, dict):
        raise TypeError(f"expected the preprocessor config as a dict, got {type(cfg).__name__}")
    resample = cfg.get("resample", 2)
    interpolation = _FILTERS[resample] if isinstance(resample, int) and 0 <= resample < len(_FILTERS) \
        else str(resample).lower()
    kind_name = str(cfg.get("image_processor_type") or cfg.get("feature_extractor_type") or "")
    shortest = kind_name.startswith(_SHORTEST_EDGE_PROCESSORS)
    resize, crop = None, None
    if cfg.get("do_resize", True) and "size" in cfg:
        resize, kind = _hf_size(cfg["size"], "size", int_is_shortest_edge=shortest)
        if kind == "shortest_edge" and cfg.get("crop_pct"):
            # ConvNeXt-style: resize the shorter side to size / crop_pct, then crop size
            crop = (resize, resize)
            resize = int(resize / float(cfg["crop_pct"]))
    if cfg.get("do_center_crop", False) and "crop_size" in cfg:
        size, _ = _hf_size(cfg["crop_size"], "crop_size")  # a bare-int crop is square everywhere
        crop = size if isinstance(size, tuple) else (size, size)
    return Preprocess(
        resize=resize, crop=crop,
        mean=tuple(cfg.get("image_mean", IMAGENET_MEAN)), std=tuple(cfg.get("image_std", IMAGENET_STD)),
        interpolation=interpolation,
        rescale=float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0,
        normalize=bool(cfg.get("do_normalize", True)), crop_offset="floor")


PREPROCESSOR_FILE = "preprocessor_config.json"


def stored_preprocess(path) -> Preprocess | None:
    """The recipe of the ``preprocessor_config.json`` stored with the checkpoint at ``path``
    (a snapshot directory, or beside a weights file); None when there is none."""
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / PREPROCESSOR_FILE
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config} is not valid JSON: {exc}") from exc
    return from_hf_config(data)


def for_checkpoint(path, img_hw, in_chans: int = 3) -> Preprocess:
    """The recipe stored with the checkpoint at ``path``, else the defaults for ``img_hw``
    and ``in_chans``."""
    recipe = stored_preprocess(path)
    if recipe is None:
        return default_preprocess(img_hw, in_chans=in_chans)
    if recipe.channels != in_chans:
        raise ValueError(f"the {PREPROCESSOR_FILE} of {path} normalizes {recipe.channels}-channel images, "
                         f"the model expects in_chans={in_chans}")
    return recipe


def load_image(path):
    """Open ``path`` as an RGB PIL image, fully decoded; ImageLoadError says why not."""
    require_pillow()
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise ImageLoadError("no such file")
    if path.is_dir():
        raise ImageLoadError("is a directory, not an image file")
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except UnidentifiedImageError:
        raise ImageLoadError("not an image, or an image format PIL cannot read") from None
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(f"refused, too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"cannot decode image: {exc}") from None
