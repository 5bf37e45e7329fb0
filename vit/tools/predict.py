"""``fastvit predict``: top-k classes for image files with a pretrained classifier.

The checkpoint brings its preprocessing (``vit.tools.preprocess.for_checkpoint``) and its class
names (a Hugging Face config's ``id2label``, or ``id2label`` in our safetensors metadata;
else the class indices). Files are read and classified in batches; a file that cannot
be read is reported and the others go on. With ``--keep-aspect`` each image keeps its aspect
ratio (at most ``--max-patches`` patches) and a batch goes through the model as a list
(``vit.packing``: packed, no padding).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vit import weights

from .device import resolve_device
from .preprocess import ImageLoadError, Preprocess, for_checkpoint, keep_aspect, load_image, require_pillow


@dataclass
class Prediction:
    path: str
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (class, label, probability)
    error: str | None = None


def load_labels(path, num_classes: int) -> list[str]:
    """Class names stored with the checkpoint, else the class indices as strings."""
    path = Path(path)
    id2label = None
    if path.is_dir():
        config = path / "config.json"
        if config.is_file():
            id2label = json.loads(config.read_text()).get("id2label")
    elif path.suffix == ".safetensors":
        raw = weights.load_metadata(path).get("id2label")
        id2label = json.loads(raw) if raw else None
    labels = [str(i) for i in range(num_classes)]
    for key, name in (id2label or {}).items():
        index = int(key)
        if 0 <= index < num_classes:
            labels[index] = str(name)
    return labels


def load_classifier(pretrained, *, fast: bool = False, model_name: str | None = None,
                    device=None):
    """(model in eval mode on ``device``, its Preprocess, its class names) for a checkpoint.

    ``pretrained``: a HF snapshot directory or a safetensors file carrying our config;
    with ``model_name`` (a preset) any timm / HF / our weights file.
    """
    from vit.factory import create_model, from_pretrained

    path = Path(pretrained)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    model = (create_model(model_name, fast=fast, pretrained=path) if model_name
             else from_pretrained(path, fast=fast))
    if model.config.num_classes == 0:
        raise ValueError(f"the checkpoint at {path} has no classification head (num_classes=0)")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()
    recipe = for_checkpoint(path, model.config.img_hw, model.config.in_chans)
    return model, recipe, load_labels(path, model.config.num_classes)


def default_max_patches(model) -> int:
    """``--keep-aspect``'s default budget: the patches of the model's own image size."""
    rows, cols = model.config.grid_size
    return rows * cols


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def predict(paths: Iterable, model: torch.nn.Module, preprocess: Preprocess, labels: list[str], *,
            batch_size: int = 16, topk: int = 5) -> Iterator[Prediction]:
    """One Prediction per path, in order; unreadable files carry ``error`` instead. A recipe with
    ``max_patches`` (``preprocess.keep_aspect``) gives images of their own sizes: each batch
    goes through the model as a list."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(topk, bool) or not isinstance(topk, int) or topk <= 0:
        raise ValueError(f"topk must be a positive integer, got {topk!r}")
    device = next(model.parameters()).device
    expected = model.config.img_hw
    packed = preprocess.max_patches is not None
    k = min(topk, len(labels))
    for chunk in _chunks([str(p) for p in paths], batch_size):
        results = [Prediction(p) for p in chunk]
        tensors, ok = [], []
        for result in results:
            try:
                tensor = preprocess(load_image(result.path))
            except ImageLoadError as exc:
                result.error = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
                result.error = f"cannot preprocess: {type(exc).__name__}: {exc}"
                continue
            if tensor.shape[0] != model.config.in_chans:
                result.error = (f"preprocessing gave {tensor.shape[0]} channel(s), the model expects "
                                f"in_chans={model.config.in_chans}")
                continue
            if tuple(tensor.shape[-2:]) != expected and not (model.config.dynamic_img_size or packed):
                result.error = (f"preprocessing gave a {tensor.shape[-2]}x{tensor.shape[-1]} image, "
                                f"the model expects {expected[0]}x{expected[1]}")
                continue
            tensors.append(tensor)
            ok.append(result)
        if tensors:
            with torch.inference_mode():
                images = [t.to(device) for t in tensors] if packed else torch.stack(tensors).to(device)
                probs = model(images).float().softmax(dim=-1)
            values, indices = probs.topk(k, dim=-1)
            for result, vals, idxs in zip(ok, values.tolist(), indices.tolist()):
                result.top = [(i, labels[i], v) for i, v in zip(idxs, vals)]
        yield from results


def format_prediction(prediction: Prediction) -> str:
    lines = [prediction.path]
    for rank, (index, label, prob) in enumerate(prediction.top, 1):
        name = label if label == str(index) else f"{label} ({index})"
        lines.append(f"  {rank}. {prob * 100:6.2f}%  {name}")
    return "\n".join(lines)


def main(args, stdout, stderr) -> int:
    """The ``fastvit predict`` command (arguments parsed by vit.tools.cli)."""
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    try:
        require_pillow("fastvit predict")
    except ImportError as exc:
        print(f"error: {exc}", file=stderr)
        return 2
    try:
        model, preprocess, labels = load_classifier(args.pretrained, fast=args.fast,
                                                    model_name=args.model, device=device)
    except (OSError, ValueError, TypeError, RuntimeError, KeyError) as exc:
        print(f"error: cannot load {args.pretrained}: {exc}", file=stderr)
        return 2
    if args.keep_aspect:
        preprocess = keep_aspect(preprocess, model.config.patch_size, args.max_patches or default_max_patches(model))
    failures = 0
    for prediction in predict(args.images, model, preprocess, labels, batch_size=args.batch_size,
                              topk=args.topk):
        if prediction.error:
            failures += 1
            print(f"error: {prediction.path}: {prediction.error}", file=stderr)
            continue
        print(format_prediction(prediction), file=stdout)
    if failures:
        print(f"{failures} of {len(args.images)} file(s) could not be classified", file=stderr)
    return 1 if failures else 0
