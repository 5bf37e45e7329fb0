"""Distributed setup under torchrun: rank, device, collectives, DDP or FSDP2 wrapping, full state dicts.

Without torchrun everything here degrades to one process: the collectives return their input.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from .errors import TrainError


class Dist:
    """Rank, world size and device of this process (one process without torchrun)."""

    def __init__(self, device_choice: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
        if cuda and not torch.cuda.is_available():
            raise TrainError("--device cuda was requested but CUDA is not available")
        if cuda:
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.enabled = self.world_size > 1
        if self.enabled and not dist.is_initialized():
            backend = "nccl" if cuda else "gloo"
            kwargs = {"device_id": self.device} if cuda else {}
            dist.init_process_group(backend=backend, **kwargs)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.world_size
        return value

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gather(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def wrap(module: torch.nn.Module, dist_: Dist, *, fsdp: bool, compile: bool, amp_dtype, say):
    """(the module that owns the parameters, the callable that trains): FSDP2 per block and
    root with ``--fsdp``, else DDP under torchrun; then ``torch.compile`` if asked."""
    if fsdp:
        if not dist_.enabled:
            say("note: --fsdp with a single process: training unsharded")
        else:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32)
            for block in module.blocks:
                fully_shard(block, mp_policy=policy)
            fully_shard(module, mp_policy=policy)
    model = module
    if dist_.enabled and not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(module, device_ids=[dist_.device.index] if dist_.device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return module, model


def no_sync(model, module, dist_: Dist, *, fsdp: bool, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch."""
    if not dist_.enabled:
        return contextlib.nullcontext()
    if fsdp:
        module.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    ddp = model._orig_mod if hasattr(model, "_orig_mod") else model
    return contextlib.nullcontext() if last else ddp.no_sync()


def full_weights(module, *, sharded: bool) -> dict:
    """The full (unsharded) state_dict on CPU; a collective when sharded."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def full_optimizer_state(module, optimizer, *, sharded: bool) -> dict:
    """The full optimizer state on CPU; a collective when sharded."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(module, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return to_cpu(optimizer.state_dict())


def load_optimizer_state(module, optimizer, state: dict, *, sharded: bool) -> None:
    """The inverse of ``full_optimizer_state``: each rank keeps its shard."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state)


def to_cpu(obj):
    """A copy of nested tensors, dicts, lists and tuples with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj
