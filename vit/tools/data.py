"""Datasets for ``fastvit train``: bundled digits, synthetic tensors, ImageFolder directories.

Every dataset yields images already shaped for the model, ``(C, H, W)`` float32,
normalized, with ``C`` and ``H, W`` taken from the model config, and int64 labels.

- ``load_digits``: scikit-learn's bundled 8x8 handwritten digits (1797 real images,
  no download), split train/test deterministically, upscaled bilinearly.
- ``synthetic``: random images and labels, for throughput runs.
- ``ImageFolder``: ``root/<class>/<image>`` decoded with PIL inside DataLoader
  workers; random-resized-crop + horizontal flip for training (torch ops, no
  torchvision); for evaluation the recipe of ``fastvit predict``
  (``vit.tools.preprocess.default_preprocess``), so that the accuracy measured during
  training is the accuracy ``fastvit predict`` gets.

Randomness never comes from the global RNG: the data order is a function of
``(seed, epoch)`` (``batch_indices``) and an augmentation is a function of
``(seed, epoch, index)``, so a resumed run sees exactly the same batches and crops.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .preprocess import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, ImageLoadError, default_preprocess, load_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A dataset that cannot be used (empty directory, too few images ...)."""


@dataclass
class TensorData:
    """A whole split held in memory: ``images`` (N, C, H, W) float32, ``labels`` (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device) -> TensorData:
        return TensorData(self.images.to(device), self.labels.to(device), self.num_classes)


def _check_image_spec(in_chans: int, img_hw) -> tuple[int, int]:
    if in_chans not in (1, 3):
        raise ValueError(f"datasets produce 1- or 3-channel images, the model expects in_chans={in_chans}")
    img_hw = (img_hw, img_hw) if isinstance(img_hw, int) else tuple(img_hw)
    if len(img_hw) != 2 or min(img_hw) <= 0:
        raise ValueError(f"img_hw must be a positive (height, width), got {img_hw!r}")
    return img_hw


def _normalize(images: torch.Tensor, mean=None, std=None) -> torch.Tensor:
    """Scale [0, 1] images with ``mean``/``std`` (one value per channel), by default the
    ImageNet statistics (gray: their channel means), as ``vit.tools.preprocess`` does."""
    if mean is None or std is None:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if images.shape[1] == 3 else (GRAY_MEAN, GRAY_STD)
    mean, std = torch.tensor(mean, dtype=images.dtype), torch.tensor(std, dtype=images.dtype)
    return (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


# ------------------------------------------------------------------------------ digits

def load_digits(in_chans: int, img_hw, test_fraction: float = 0.2, split_seed: int = 0,
                mean=None, std=None) -> tuple[TensorData, TensorData]:
    """scikit-learn's digits as (train, test), upscaled to ``img_hw`` with ``in_chans`` channels,
    normalized with ``mean``/``std`` (default: the ImageNet statistics).

    The split is a fixed permutation (``split_seed``), independent of the training seed,
    so that every run is evaluated on the same held-out images.
    """
    img_hw = _check_image_spec(in_chans, img_hw)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise ImportError("the digits dataset (--data digits) needs scikit-learn: install it with "
                          "`pip install scikit-learn`") from exc

    bunch = sk_load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    images = F.interpolate(images, size=img_hw, mode="bilinear", align_corners=False)
    images = _normalize(images.expand(-1, in_chans, -1, -1).contiguous(), mean, std)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(split_seed))
    num_test = round(len(labels) * test_fraction)
    test, train = order[:num_test], order[num_test:]
    return (TensorData(images[train].contiguous(), labels[train], 10),
            TensorData(images[test].contiguous(), labels[test], 10))


# --------------------------------------------------------------------------- synthetic

def synthetic(in_chans: int, img_hw, num_classes: int = 1000, size: int = 512, seed: int = 0) -> TensorData:
    """``size`` random normal images with random labels (deterministic in ``seed``)."""
    img_hw = _check_image_spec(in_chans, img_hw)
    if size <= 0 or num_classes <= 0:
        raise ValueError(f"synthetic data needs size > 0 and num_classes > 0, got {size}, {num_classes}")
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(size, in_chans, *img_hw, generator=gen)
    labels = torch.randint(0, num_classes, (size,), generator=gen)
    return TensorData(images, labels, num_classes)


# ------------------------------------------------------------------------- ImageFolder

def find_images(root) -> tuple[list[tuple[str, int]], list[str]]:
    """``root/<class>/**/<image>`` -> ([(path, class index)], class names), sorted."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise DataError(f"dataset path {root} is a file, not a directory (expected root/<class>/<image>)")
    if not root.is_dir():
        raise DataError(f"dataset directory {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    samples = []
    for index, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                samples.append((str(path), index))
    if not samples:
        raise DataError(f"dataset directory {root} holds no images: expected class subfolders "
                        f"with image files (root/<class>/<image>{IMAGE_EXTENSIONS[0]}), found "
                        f"{len(classes)} subfolder(s) and no file ending in {', '.join(IMAGE_EXTENSIONS)}")
    return samples, classes


def resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(C, H, W) -> (C, *size), bilinear with antialiasing (as PIL/torchvision resize)."""
    return F.interpolate(image.unsqueeze(0), size=size, mode="bilinear", align_corners=False,
                         antialias=True).squeeze(0)


def random_resized_crop_box(height: int, width: int, gen: torch.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random crop covering ``scale`` of the area at aspect ``ratio``.

    Ten tries at the sampled area and aspect, then the largest centered crop whose aspect
    is within ``ratio`` (the standard Inception-style recipe).
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=gen).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen))
            return top, left, h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def train_transform(image: torch.Tensor, size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
    """Random resized crop to ``size`` and a horizontal flip with probability 1/2."""
    top, left, h, w = random_resized_crop_box(image.shape[-2], image.shape[-1], gen)
    image = resize(image[:, top:top + h, left:left + w], size)
    if torch.rand(1, generator=gen).item() < 0.5:
        image = image.flip(-1)
    return image


class ImageFolder(torch.utils.data.Dataset):
    """Images in ``root/<class>/...`` decoded by PIL when indexed (i.e. in DataLoader workers).

    ``train=True`` augments with a crop and flip drawn from a generator seeded by
    ``(seed, epoch, index)``; set ``epoch`` before building each epoch's DataLoader.
    ``mean``/``std`` normalize both splits (default: the ImageNet statistics).
    """

    def __init__(self, samples: list[tuple[str, int]], num_classes: int, in_chans: int, img_hw,
                 train: bool, seed: int = 0, classes: list[str] | None = None, mean=None, std=None):
        self.samples = list(samples)
        self.num_classes = num_classes
        self.classes = list(classes) if classes is not None else [str(i) for i in range(num_classes)]
        self.in_chans = in_chans
        self.img_hw = _check_image_spec(in_chans, img_hw)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.eval_recipe = default_preprocess(self.img_hw, in_chans=in_chans)
        if mean is not None and std is not None:
            self.eval_recipe = dataclasses.replace(self.eval_recipe, mean=tuple(mean), std=tuple(std))
        self.mean, self.std = self.eval_recipe.mean, self.eval_recipe.std

    def __len__(self) -> int:
        return len(self.samples)

    def open(self, path: str):
        """The file as a PIL image with the model's channels (``vit.tools.preprocess.load_image``)."""
        try:
            image = load_image(path)
        except ImageLoadError as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from exc
        return image if self.in_chans == 3 else image.convert("L")

    def decode(self, path: str) -> torch.Tensor:
        """(C, H, W) float32 in [0, 1]."""
        img = self.open(path)
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return data.view(img.size[1], img.size[0], self.in_chans).permute(2, 0, 1).float() / 255.0

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        if not self.train:  # exactly what ``fastvit predict`` feeds the model
            return self.eval_recipe(self.open(path)), label
        gen = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, index))
        image = train_transform(self.decode(path), self.img_hw, gen)
        return _normalize(image.unsqueeze(0), self.mean, self.std).squeeze(0), label


def load_image_folder(root, in_chans: int, img_hw, seed: int = 0, val_fraction: float = 0.1,
                      mean=None, std=None) -> tuple[ImageFolder, ImageFolder]:
    """(train, eval) datasets from ``root``.

    ``root/train`` and ``root/val`` (or ``root/test``) are used when present; otherwise
    ``root`` itself holds the class folders and a deterministic ``val_fraction`` of each
    class is held out for evaluation.
    """
    root = Path(root)
    img_hw = _check_image_spec(in_chans, img_hw)
    val_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        train, classes = find_images(root / "train")
        held_out, val_classes = find_images(val_dir)
        if val_classes != classes:
            raise DataError(f"{val_dir} has classes {val_classes[:5]}... but {root / 'train'} "
                            f"has {classes[:5]}...: the class folders must be the same")
    else:
        samples, classes = find_images(root)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        gen = torch.Generator().manual_seed(0)
        train, held_out = [], []
        for index in range(len(classes)):
            mine = [s for s in samples if s[1] == index]
            order = torch.randperm(len(mine), generator=gen).tolist()
            cut = round(len(mine) * val_fraction) if len(mine) > 1 else 0
            held_out += [mine[i] for i in order[:cut]]
            train += [mine[i] for i in order[cut:]]
        if not held_out:
            held_out = train
    norm = dict(classes=classes, mean=mean, std=std)
    return (ImageFolder(train, len(classes), in_chans, img_hw, train=True, seed=seed, **norm),
            ImageFolder(held_out, len(classes), in_chans, img_hw, train=False, seed=seed, **norm))


# ------------------------------------------------------------------------------ order

def mix_seed(*values: int) -> int:
    """A 63-bit seed from several ints (splitmix-style), so nearby inputs give unrelated streams."""
    state = 0x9E3779B97F4A7C15
    for value in values:
        state = (state ^ (int(value) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
    return state & 0x7FFFFFFFFFFFFFFF


def batches_per_epoch(num_samples: int, global_batch: int) -> int:
    """Whole global batches in one epoch (the incomplete last one is dropped)."""
    count = num_samples // global_batch
    if count == 0:
        raise DataError(f"the training set has {num_samples} images, fewer than one global batch "
                        f"of {global_batch}: lower --batch-size")
    return count


def batch_indices(num_samples: int, global_batch: int, seed: int, step: int, rank: int = 0,
                  world_size: int = 1) -> torch.Tensor:
    """The sample indices this rank trains on at global step ``step``.

    Epoch ``e = step // batches_per_epoch`` is a permutation seeded by ``(seed, e)``;
    step ``step`` takes the next global batch of it and rank ``r`` its r-th contiguous
    slice, so the union over ranks is the same batch whatever the world size.
    """
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    per_epoch = batches_per_epoch(num_samples, global_batch)
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))
    per_rank = global_batch // world_size
    start = position * global_batch + rank * per_rank
    return order[start:start + per_rank]


def eval_indices(num_samples: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, valid) for rank's share of an evaluation set, padded to equal length.

    Every rank gets ``ceil(n / world)`` indices (FSDP needs every rank to run the same
    number of forwards); the padding repeats samples and is masked out by ``valid``.
    """
    per_rank = -(-num_samples // world_size)
    positions = torch.arange(rank * per_rank, (rank + 1) * per_rank)
    return positions % num_samples, positions < num_samples
