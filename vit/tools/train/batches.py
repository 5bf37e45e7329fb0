"""The data of a run: train/eval splits and the batch each rank takes at each step.

Every step's global batch is a function of (seed, step) alone, so a resumed run sees the
same batches as an uninterrupted one and the loss curve does not depend on the number of ranks.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vit.tools import data as vdata

from .dist import Dist
from .errors import TrainError


class Data:
    """Train/eval splits plus the per-rank batches of every step."""

    def __init__(self, args, cfg_in_chans: int, img_hw, dist_: Dist):
        self.args, self.dist = args, dist_
        self.device = dist_.device
        source = args.data
        try:
            self._read(args, source, cfg_in_chans, img_hw)
        except ImportError as exc:
            raise TrainError(str(exc)) from exc
        except ValueError as exc:  # DataError and the image spec checks (e.g. in_chans=2)
            raise TrainError(f"--data {source}: {exc}") from exc
        self.num_classes = self.train.num_classes
        if ("num_classes" in getattr(args, "explicit", ()) and source != "synthetic"
                and args.num_classes != self.num_classes):
            raise TrainError(f"--num-classes {args.num_classes} does not match --data {source}, which has "
                             f"{self.num_classes} classes (--num-classes is for --data synthetic)")
        try:
            self.per_epoch = vdata.batches_per_epoch(len(self.train), args.batch_size)
        except vdata.DataError as exc:
            raise TrainError(str(exc)) from exc

    def _read(self, args, source: str, cfg_in_chans: int, img_hw) -> None:
        self.class_names = None
        # the normalization of a run (--mean/--std or the --init checkpoint's); None: ImageNet's
        norm = dict(mean=getattr(args, "mean", None), std=getattr(args, "std", None))
        if source == "digits":
            train, test = vdata.load_digits(cfg_in_chans, img_hw, **norm)
            self.train, self.test = train.to(self.device), test.to(self.device)
            self.class_names = [str(i) for i in range(10)]
        elif source == "synthetic":
            self.train = vdata.synthetic(cfg_in_chans, img_hw, args.num_classes, args.synthetic_size,
                                         seed=args.seed).to(self.device)
            self.test = vdata.synthetic(cfg_in_chans, img_hw, args.num_classes,
                                        max(1, args.synthetic_size // 4), seed=args.seed + 1).to(self.device)
        else:
            if not Path(source).exists():
                raise TrainError(f"--data {source!r} is neither 'digits', 'synthetic' nor an existing directory")
            if not Path(source).is_dir():
                raise TrainError(f"--data {source!r} is a file, not a directory "
                                 "(expected root/<class>/<image>)")
            self.train, self.test = vdata.load_image_folder(source, cfg_in_chans, img_hw, seed=args.seed,
                                                            val_fraction=args.val_fraction, **norm)
            self.class_names = list(self.train.classes)

    def _load(self, dataset, index_lists, epoch: int = -1):
        """Yield (images, labels) on the device for each list of indices.

        The DataLoader gets its own generator (seeded by seed, epoch, rank): without one it
        draws its workers' base seed from the global RNG, so the dropout stream would depend
        on when loaders were created and a resumed run would diverge."""
        if isinstance(dataset, vdata.TensorData):
            for idx in index_lists:
                idx = torch.as_tensor(idx, device=self.device)
                yield dataset.images[idx], dataset.labels[idx]
            return
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=[list(map(int, i)) for i in index_lists],
                                             num_workers=self.args.workers,
                                             pin_memory=self.device.type == "cuda",
                                             generator=torch.Generator().manual_seed(
                                                 vdata.mix_seed(self.args.seed, epoch, self.dist.rank)))
        for images, labels in loader:
            yield (images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))

    def train_batches(self, start_step: int):
        """This rank's batch for every step from ``start_step`` on (forever): ``vdata.batch_indices``."""
        args, rank, world = self.args, self.dist.rank, self.dist.world_size
        step = start_step
        while True:
            epoch, position = divmod(step, self.per_epoch)
            indices = [vdata.batch_indices(len(self.train), args.batch_size, args.seed, s, rank, world)
                       for s in range(step, (epoch + 1) * self.per_epoch)]
            if isinstance(self.train, vdata.ImageFolder):
                self.train.epoch = epoch  # read by the workers started below
            yield from self._load(self.train, indices, epoch)
            step = (epoch + 1) * self.per_epoch

    def eval_batches(self):
        """(images, labels, valid) chunks of this rank's equal-length share of the eval set."""
        idx, valid = vdata.eval_indices(len(self.test), self.dist.rank, self.dist.world_size)
        size = self.args.eval_batch_size
        chunks = [idx[i:i + size] for i in range(0, len(idx), size)]
        for i, (images, labels) in enumerate(self._load(self.test, chunks)):
            yield images, labels, valid[i * size:(i + 1) * size].to(self.device)
