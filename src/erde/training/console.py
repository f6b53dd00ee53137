"""What the loop says: the start line of each model, the few-steps warning, progress-bar fields."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from erde.config import ModelConfig, TrainConfig
from erde.training.jobs import Job
from erde.training.model_run import ModelRun

# An epoch of fewer optimiser steps than this rarely trains anything within the usual
# epoch counts: 3 classes x 60 images at batch 128 took 1 step per epoch and the teacher
# ended at chance.
MIN_STEPS_PER_EPOCH = 10


MIN_SUGGESTED_BATCH = 8


def few_steps_warning(
    name: str, n_train: int, batch_size: int, steps_per_epoch: int, capped: bool = False
) -> str | None:
    """A warning line when an epoch has under ``MIN_STEPS_PER_EPOCH`` steps, with a batch size
    that gives enough (a power of two); None when there are enough, or when
    ``max_steps_per_epoch`` (``capped``) asked for few on purpose.

    ``n_train`` is the images one process trains on per epoch.
    """
    if capped or steps_per_epoch >= MIN_STEPS_PER_EPOCH:
        return None
    suggested = 2 ** int(math.log2(max(1, n_train // MIN_STEPS_PER_EPOCH)))
    suggested = max(MIN_SUGGESTED_BATCH, suggested)  # batch norm needs a few images per batch
    steps = n_train // suggested
    plural = "s" if steps_per_epoch != 1 else ""
    advice = (
        f"try --set data.batch_size={suggested} ({steps} steps per epoch)"
        if suggested < batch_size
        else "add training images"
    )
    return (
        f"warning: {name}: {steps_per_epoch} optimiser step{plural} per epoch ({n_train} "
        f"training images at batch size {batch_size}): too few for the model to learn much; "
        f"{advice}"
    )


def start_line(
    job: Job, mcfg: ModelConfig, tcfg: TrainConfig, num_exits: int, images: int,
    device: torch.device, out_dir: Path, position: dict[str, int] | None = None,
    steps_per_epoch: int = 0, setting: str = "",
) -> str:  # fmt: skip
    """What is about to be trained where, printed before the first step (seen even without bars).

    ``setting`` says how the steps compute ("bf16, NHWC": the precision follows the
    CPU's flags by default, so the line is where a user learns which one ran). A
    resumed run says where it continues (``position`` of its checkpoint).
    """
    n = torch.get_num_threads()
    threads = f", {n} CPU thread{'s' if n != 1 else ''}" if device.type == "cpu" else ""
    resumed = ""
    if position and position["global_step"]:
        resumed = (
            f", resuming at epoch {position['epoch'] + 1} step "
            f"{position['step_in_epoch']}/{steps_per_epoch}"
        )
    return (
        f"{job.name}: training {mcfg.arch} x{mcfg.width:g} ({num_exits} exits) for {tcfg.epochs} "
        f"epoch{'s' * (tcfg.epochs != 1)} on {images} images, on {device}{threads}{f' ({setting})' if setting else ''}, "
        f"into {out_dir}{resumed}"
    )


def progress_fields(epochs: int, runs: list[ModelRun]) -> dict[str, str]:
    """Progress-bar fields: epoch, then running last-exit train accuracy (and loss when alone)."""
    out = {"epoch": f"{runs[0].position['epoch'] + 1}/{epochs}"}
    for run in runs:
        m = run.sums.local_means()
        if not m:
            continue
        acc = f"{m[f'correct_{run.model.num_exits - 1}']:.3f}"
        if len(runs) == 1:
            out.update(loss=f"{m['loss']:.3f}", acc=acc)
        else:
            out[run.job.name.removeprefix("student_")] = acc
    return out
