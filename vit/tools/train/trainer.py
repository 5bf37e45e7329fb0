"""The trainer: builds the model, optimizer and schedule of a run (fresh or resumed), then
steps through ``--steps`` optimizer steps with evaluation, metrics and state saves."""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from vit import weights as weights_io
from vit._io import atomic_write_text
from vit.config import ViTConfig
from vit.tools import data as vdata

from ..progress import Progress
from . import dist as distributed
from . import finetune, pretrained
from .args import normal, resolve_config, resolve_model_class
from .batches import Data
from .errors import TrainError
from .metrics import Metrics, closing_line, evaluate, opening_line, summarize
from .schedule import WarmupCosine, param_groups
from .state import WEIGHTS_FILE, restore_state, save_state, weights_metadata


class Trainer:
    def __init__(self, args, dist_: distributed.Dist, resume: tuple[Path, dict, dict] | None):
        self.args, self.dist = args, dist_
        self.device = dist_.device
        self.out = Path(args.out)
        self.say = print if dist_.main else (lambda *a, **k: None)
        self.sharded = args.fsdp and dist_.enabled
        if args.batch_size % dist_.world_size:
            raise TrainError(f"--batch-size {args.batch_size} (global) is not divisible by the "
                             f"{dist_.world_size} processes")
        per_rank = args.batch_size // dist_.world_size
        if per_rank % args.accum_steps:
            raise TrainError(f"the per-process batch {per_rank} (= {args.batch_size} / {dist_.world_size}) is "
                             f"not divisible by --accum-steps {args.accum_steps}")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
        if self.amp_dtype is torch.float16 and self.device.type == "cpu":
            self.say("note: fp16 autocast on CPU is slow and mostly for testing; prefer --amp bf16")

        self.data, self.cfg = self._data_and_config(args, dist_, resume)
        cls, self.fast = resolve_model_class(args.fast)

        torch.manual_seed(args.seed)  # identical initial weights on every rank
        module = cls(self.cfg)
        self.start_step, state = 0, None
        if resume is not None:
            directory, state, weights = resume
            saved_cfg, cfg = normal(state["model_config"]), normal(self.cfg.to_dict())
            if saved_cfg != cfg:
                diff = [f"{k}: {saved_cfg.get(k)!r} -> {v!r}" for k, v in cfg.items() if saved_cfg.get(k) != v]
                raise TrainError(f"checkpoint mismatch: {directory} holds a model with a different "
                                 f"config ({'; '.join(diff)})")
            self._load_weights(module, weights, directory / WEIGHTS_FILE)
            if state.get("num_train_samples") != len(self.data.train):
                raise TrainError(f"checkpoint mismatch: it was trained on {state.get('num_train_samples')} images, "
                                 f"the dataset now has {len(self.data.train)}")
            self.start_step = int(state["step"])
        elif self.init is not None:
            self.init_notes.insert(0, str(pretrained.load(module, self.init)))
        if args.freeze_backbone:
            try:
                finetune.freeze_backbone(module)
            except ValueError as exc:
                raise TrainError(str(exc)) from exc
        if args.grad_checkpointing:
            if not hasattr(module, "set_grad_checkpointing"):
                raise TrainError(f"{cls.__module__}.{cls.__name__} has no set_grad_checkpointing()")
            module.set_grad_checkpointing(True)
        module.to(self.device)
        self.module, self.model = distributed.wrap(module, dist_, fsdp=args.fsdp, compile=args.compile,
                                                   amp_dtype=self.amp_dtype, say=self.say)
        if args.layer_decay is None and args.head_lr_scale is None:
            groups = param_groups(self.module, args.weight_decay)  # the plain recipe
        else:  # each group carries the lr_scale the schedule applies
            groups = finetune.param_groups(self.module, args.weight_decay, depth=self.cfg.depth,
                                           layer_decay=args.layer_decay, head_lr_scale=args.head_lr_scale or 1.0)
        self.optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
        warmup = args.warmup_steps if args.warmup_steps is not None else round(0.05 * args.steps)
        self.schedule = WarmupCosine(args.lr, args.min_lr, warmup, args.steps)
        self.scaler = None
        if self.amp_dtype is torch.float16:
            if self.sharded:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                # Each rank holds a shard of the gradients: found-inf must be agreed on by all.
                self.scaler = ShardedGradScaler(self.device.type)
            else:
                self.scaler = torch.amp.GradScaler(self.device.type)
        self.skipped_steps, self.bad_in_row, self.best_acc, self.last_eval = 0, 0, None, None
        self.elapsed_before = 0.0
        if state is not None:
            restore_state(self, state, directory)
        else:
            # Dropout / stochastic depth streams differ per rank, as separate GPUs would.
            torch.manual_seed(vdata.mix_seed(args.seed, 1 + dist_.rank))

    def _data_and_config(self, args, dist_, resume) -> tuple[Data, ViTConfig]:
        """The data (first: it decides the number of classes) and the model config.

        A fresh ``--init`` run takes the model and the normalization from the checkpoint when it
        carries them (typed options win) and the fine-tuning drop path; a resumed ``--init`` run
        takes its saved config (the --init file is not read again). Sets ``init``,
        ``init_notes`` (printed after the opening line) and ``model_name``.
        """
        self.init, self.init_notes, self.model_name, saved = None, [], args.model, None
        if resume is not None and args.init:
            saved = ViTConfig.from_dict(resume[1]["model_config"])
            self.model_name = f"(saved config; --init {args.init})"
        elif resume is None and args.init:
            self.init = pretrained.inspect(args.init)
        from_checkpoint = self.init.config if self.init is not None else None
        shape = saved or resolve_config(args, num_classes=1, checkpoint=from_checkpoint)
        if resume is None:  # on resume, --mean/--std come back with the other saved options
            self.init_notes.append(pretrained.resolve_normalization(args, shape.in_chans, self.init))
        data = Data(args, shape.in_chans, shape.img_hw, dist_)
        if saved is not None:
            if saved.num_classes != data.num_classes:
                raise TrainError(f"checkpoint mismatch: the model has {saved.num_classes} classes, "
                                 f"--data {args.data} has {data.num_classes}")
            return data, saved
        cfg = resolve_config(args, data.num_classes, checkpoint=from_checkpoint)
        if self.init is not None:
            cfg, note = pretrained.finetune_config(args, cfg)
            self.init_notes.append(note)
            if from_checkpoint is not None and "model" not in args.explicit:
                self.model_name = f"(config of {args.init})"
        return data, cfg

    def _load_weights(self, module, weights: dict, source) -> None:
        try:
            weights_io.check_state_dict(module, weights)
        except ValueError as exc:
            raise TrainError(f"checkpoint mismatch in {source}: {exc}") from exc
        module.load_state_dict(weights, strict=True)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, bool]:
        """One optimizer step over ``accum_steps`` micro-batches: (loss, grad norm, skipped)."""
        args = self.args
        total = torch.zeros((), device=self.device)
        micro = images.shape[0] // args.accum_steps
        for i in range(args.accum_steps):
            x, y = images[i * micro:(i + 1) * micro], labels[i * micro:(i + 1) * micro]
            with distributed.no_sync(self.model, self.module, self.dist, fsdp=args.fsdp,
                                     last=i == args.accum_steps - 1):
                with self.autocast():
                    logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=args.label_smoothing) / args.accum_steps
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
        loss_value = self.dist.mean(total).item()
        grad_norm, skipped = float("nan"), True
        if math.isfinite(loss_value):
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(),
                                                  args.clip_grad if args.clip_grad > 0 else float("inf"))
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)  # skips the update when a gradient overflowed
                self.scaler.update()
                skipped = self.scaler.get_scale() < scale
            elif math.isfinite(grad_norm):
                self.optimizer.step()
                skipped = False
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, skipped

    def run(self) -> dict:
        args = self.args
        metrics = Metrics(self.out / "metrics.jsonl", self.dist.main, self.start_step)
        bar = Progress(args.steps, stream=sys.stdout, mode=args.progress if self.dist.main else "none",
                       quiet_mode="lines", initial=self.start_step, unit="step")
        params = sum(p.numel() for p in self.module.parameters())
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.say(opening_line(self, params))
            notes = "; ".join(note for note in self.init_notes if note)
            if notes:
                self.say(f"{'init' if self.init is not None else 'note'}: {notes}")
        self.module.train()
        batches = self.data.train_batches(self.start_step)
        start = time.perf_counter()
        window_start, window_images, first_step_s = start, 0, None
        loss = float("nan")
        for step in range(self.start_step, args.steps):
            images, labels = next(batches)
            lr = self.schedule.apply(self.optimizer, step)
            loss, grad_norm, skipped = self.train_step(images, labels)
            if first_step_s is None:
                first_step_s = time.perf_counter() - start
                window_start, window_images = time.perf_counter(), 0
            else:
                window_images += args.batch_size
            done = step + 1
            self._count_bad_steps(skipped, done, loss, grad_norm, metrics)
            if done % args.log_every == 0 or done == args.steps:
                now = time.perf_counter()
                rate = window_images / (now - window_start) if window_images else float("nan")
                record = {"step": done, "epoch": step // self.data.per_epoch, "loss": loss, "lr": lr,
                          "grad_norm": grad_norm, "img_per_s": rate, "skipped_steps": self.skipped_steps}
                if self.scaler is not None:
                    record["loss_scale"] = self.scaler.get_scale()
                metrics.write(record)
                window_start, window_images = now, 0
            if args.eval_every and done % args.eval_every == 0 and done != args.steps:
                self._eval_and_log(done, metrics)
            bar.update(at=done, status=f"loss {loss:.4f} lr {lr:.2e}"
                       + (f" acc {self.last_eval * 100:.1f}%" if self.last_eval is not None else ""))
            if args.ckpt_every and done % args.ckpt_every == 0 and done != args.steps:
                save_state(self, done, self.elapsed_before + time.perf_counter() - start)
        bar.close()
        wall = time.perf_counter() - start
        result = self._eval_and_log(args.steps, metrics)
        save_state(self, args.steps, self.elapsed_before + wall)
        weights = distributed.full_weights(self.module, sharded=self.sharded)
        summary = summarize(self, params=params, wall=wall, first_step_s=first_step_s, loss=loss, result=result,
                            weights_path=self.out / WEIGHTS_FILE)
        if self.dist.main:
            weights_io.save(weights, self.out / WEIGHTS_FILE, config=self.cfg,
                            metadata=weights_metadata(args.steps, self.data.class_names))
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            self.say(closing_line(summary))
        return summary

    def _count_bad_steps(self, skipped: bool, done: int, loss: float, grad_norm: float, metrics: Metrics) -> None:
        """Non-finite steps are skipped; ``--max-bad-steps`` of them in a row end the run."""
        if not skipped:
            self.bad_in_row = 0
            return
        self.skipped_steps += 1
        self.bad_in_row += 1
        if self.bad_in_row >= self.args.max_bad_steps:
            metrics.write({"step": done, "loss": loss, "grad_norm": grad_norm, "skipped": True})
            latest = self.out / "checkpoints" / "latest"
            kept = f"the last checkpoint ({latest.read_text().strip()}) is kept" if latest.exists() \
                else "no checkpoint had been written yet"
            raise TrainError(f"stopping at step {done}: the loss or gradients were non-finite for "
                             f"{self.bad_in_row} consecutive steps (--max-bad-steps {self.args.max_bad_steps}); "
                             f"{kept}. Try a lower --lr, --clip-grad, or --amp bf16 instead of fp16")

    def _eval_and_log(self, step: int, metrics: Metrics) -> dict:
        result = evaluate(self.module, self.data, self.dist, self.autocast)
        self.last_eval = result["eval_acc"]
        self.best_acc = max(self.best_acc or 0.0, result["eval_acc"])
        metrics.write({"step": step, **result})
        return result
