"""torch.distributed set-up for `torchrun`: one process per device, rank 0 writes files.

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op,
so the same training code runs in one process or many. torchrun sets RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT for every process, on one
node or several; the process group is NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0  # global rank of this process
    local_rank: int = 0  # rank within its node: the GPU index it uses
    world_size: int = 1  # number of processes in the job

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device: str) -> tuple[DistContext, torch.device]:
    """Join the process group torchrun describes (NCCL on GPUs, gloo on CPU) and pick the device.

    Safe to call more than once (the pipeline trains several models in one
    process); the group is joined once and left when the process exits.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), resolve_device(device)
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world)
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        atexit.register(cleanup, ctx)
    return ctx, dev


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; explicit names are checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from erde.errors import ConfigError

    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} requested but MPS is not available")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return dev


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a tensor over ranks (identity in one process)."""
    if ctx.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_min(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Element-wise minimum over ranks (identity in one process)."""
    if ctx.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values


def broadcast_buffers(module: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DistributedDataParallel keeps parameters equal, but each rank updates its
    running statistics on its own batches after the last broadcast; this makes
    the whole state identical before it is evaluated or saved.
    """
    if ctx.enabled:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
