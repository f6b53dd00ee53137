"""What every model of one training loop shares: data on the device, each step's batch, the teacher.

:meth:`TrainingContext.batch` makes the batch of a global step as a pure
function of (seed, rank, step), so models trained together or alone, resumed
or not, see the same pixels; :meth:`TrainingContext.teacher_logits` runs the
teacher once per batch for every student that needs it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from erde import distributed as D
from erde.config import ExperimentConfig, TrainConfig
from erde.data import DataSplits, ImageSet, prepare_batch, to_device
from erde.data.augment import AugmentDraws, draw_augment
from erde.monitor import EpochCallback
from erde.recipe import alternating_flips
from erde.training.precision import amp_dtype, autocast, memory_format_name, precision_name

DATA_ON_GPU_FRACTION = 0.25  # keep the training set on the GPU if it takes at most this share


def epoch_indices(n: int, seed: int, epoch: int, ctx: D.DistContext) -> torch.Tensor:
    """The same shuffled order on every rank, then this rank's equal-sized shard.

    This is the distributed sampler: ranks never share an image within an
    epoch, and the order depends only on (seed, epoch), so a resumed run
    replays it.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    per_rank = n // ctx.world_size
    return order[ctx.rank * per_rank : (ctx.rank + 1) * per_rank] if ctx.enabled else order


def augment_seed(seed: int, rank: int, step: int) -> int:
    """Seed of one step's crops and flips on one rank.

    A pure function of (seed, rank, step) instead of a generator carried from
    step to step, so a run resumed from rank 0's checkpoint draws the same
    augmentations on every rank as the run that was interrupted.
    """
    return ((seed * 1_000_003 + rank) * 1_000_000_007 + step) % 2**63


def keep_on_device(data: ImageSet, device: torch.device) -> ImageSet:
    """The uint8 set on the training device, so batches never cross the host bus.

    A set too large for the GPU (over ``DATA_ON_GPU_FRACTION`` of its memory)
    stays in host memory and batches are copied over one by one.
    """
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        if data.images.numel() > DATA_ON_GPU_FRACTION * total:
            return data
    return to_device(data, device)


def teacher_exit_logits(teacher: Callable, x: torch.Tensor) -> list[torch.Tensor]:
    """Every teacher exit from one forward pass, with no autograd bookkeeping at all.

    The clones turn inference tensors into ordinary ones that the student's
    loss may save for its backward pass ((B, K) each: negligible).
    """
    with torch.inference_mode():
        logits = teacher(x)
    return [z.clone() for z in logits]


@dataclass
class TrainingContext:
    """What every model of one training loop shares: data, batches, teacher, precision."""

    cfg: ExperimentConfig
    tcfg: TrainConfig
    ctx: D.DistContext
    device: torch.device
    splits: DataSplits
    teacher: nn.Module | None
    batch_size: int
    steps_per_epoch: int
    on_step: Callable[[int], None] | None
    on_epoch: EpochCallback | None

    def __post_init__(self) -> None:
        self.memory_format = (
            torch.channels_last if self.tcfg.channels_last else torch.contiguous_format
        )
        self.amp_dtype = amp_dtype(self.device, self.tcfg.amp)
        teacher_amp = self.cfg.distill.teacher_amp
        self.teacher_dtype = (
            self.amp_dtype if teacher_amp is None else amp_dtype(self.device, teacher_amp)
        )
        self.train_set = keep_on_device(self.splits.train, self.device)
        self.val_set = keep_on_device(self.splits.val, self.device)
        self.aug_gen = torch.Generator()
        self._epoch: tuple[int, torch.Tensor, AugmentDraws] | None = None
        if self.teacher is not None:
            teacher = self.teacher.to(memory_format=self.memory_format)
            self.teacher = torch.compile(teacher) if self.tcfg.compile else teacher

    @property
    def total_steps(self) -> int:
        return self.tcfg.epochs * self.steps_per_epoch

    def batch(self, global_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Augmented, normalised batch (B, C, H, W) and labels (B,) of one global step.

        A pure function of (seed, rank, step): every model trained on that step,
        together or alone, resumed or not, sees the same pixels.
        """
        epoch, k = divmod(global_step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            order = epoch_indices(len(self.train_set), self.cfg.seed, epoch, self.ctx)
            draws = self.epoch_draws(epoch, order)
            self._epoch = (epoch, order.to(self.train_set.images.device), draws)
        idx = self._epoch[1][k * self.batch_size : (k + 1) * self.batch_size]
        images = self.train_set.images[idx].to(self.device, non_blocking=True)
        labels = self.train_set.labels[idx].to(self.device, non_blocking=True)
        draws = AugmentDraws(
            *(None if t is None else t[k, ..., : len(idx)] for t in self._epoch[2])
        )
        x = prepare_batch(images, self.splits, train=True, draws=draws)
        return x.contiguous(memory_format=self.memory_format), labels

    def epoch_draws(self, epoch: int, order: torch.Tensor) -> AugmentDraws:
        """Every step's crop and flip draws of one epoch, (steps, 2, B) and (steps, B), on the device.

        Each step's draws come from its own seed (:func:`augment_seed`), exactly as if drawn
        step by step; made once per epoch so that one host-to-GPU copy serves the epoch (a
        blocking copy per step would make the host wait for the GPU's queue every step).
        With ``data.alternating_flip`` the flips follow the images of ``order`` (this
        epoch's shuffled indices) instead: each image mirrored every other epoch.
        """
        first = epoch * self.steps_per_epoch
        steps = []
        for step in range(first, first + self.steps_per_epoch):
            self.aug_gen.manual_seed(augment_seed(self.cfg.seed, self.ctx.rank, step))
            steps.append(draw_augment(self.batch_size, self.splits.augment, self.aug_gen))
        offsets, flips = (
            None if parts[0] is None else torch.stack(parts) for parts in zip(*steps, strict=True)
        )
        if flips is not None and self.cfg.data.alternating_flip:
            used = order[: self.steps_per_epoch * self.batch_size]
            flips = alternating_flips(self.first_flips[used], epoch).view(self.steps_per_epoch, -1)
        return AugmentDraws(offsets, flips).to(self.device)

    @functools.cached_property
    def first_flips(self) -> torch.Tensor:
        """(N,) bool: the training images mirrored in epoch 0 under ``alternating_flip``."""
        g = torch.Generator().manual_seed(self.cfg.seed * 7_919 + 17)
        return torch.rand(len(self.train_set), generator=g) < 0.5

    def setting(self, needs_teacher: bool, memory_format: torch.memory_format) -> str:
        """How one model's steps compute, for its start line: precision, its memory format
        (NCHW where :func:`memory_format_for` overrode channels_last), teacher forward."""
        text = f"{precision_name(self.amp_dtype)}, {memory_format_name(memory_format)}"
        if needs_teacher and self.teacher_dtype != self.amp_dtype:
            text += f", teacher forward in {precision_name(self.teacher_dtype)}"
        return text

    def teacher_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every teacher exit for one batch, in ``distill.teacher_amp``'s precision.

        A bf16 teacher is faster where the hardware has bf16; whether it leaves
        the teacher's answers (and so ERDE's right/wrong split) unchanged is
        measured by ``benchmarks/precision.py``.
        """
        assert self.teacher is not None
        with autocast(self.device, self.teacher_dtype):
            return teacher_exit_logits(self.teacher, x)
