"""One training loop for the early-exit teacher and the ce/kd/erde students.

The loop is plain PyTorch, written for speed and for crashes:

- the uint8 training set sits on the training device; each batch is sliced,
  augmented and normalised there in a few batched ops (no DataLoader); the
  epoch's shuffled order and crop/flip draws reach the device in one copy per
  epoch, so building a batch never makes the host wait for a GPU;
- channels_last, mixed precision (bf16 by default on CUDA and on CPUs with bf16
  hardware, fp16 + GradScaler on GPUs without bf16) and ``torch.compile`` are config switches;
- a student's teacher runs once per batch for all its exits, under
  ``torch.inference_mode()``; students trained side by side (:func:`train_students`)
  share the batch and that one teacher forward;
- running loss and accuracy are summed on the device; the host reads them
  every ``SYNC_EVERY`` steps (progress bar, non-finite loss check) and at the
  end of the epoch, never once per step;
- checkpoints are written atomically every epoch (and every
  ``checkpoint_every_steps``); ``resume=True`` continues from the exact batch
  it stopped at, with the same augmentation draws, so an interrupted run ends
  with the same weights as an uninterrupted one;
- under ``torchrun`` the model is wrapped in DistributedDataParallel, each
  process trains on its shard of every epoch, metrics are summed over
  processes and only rank 0 writes files (see docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from erde import distributed as D
from erde.checkpoints import (
    check_compatible,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from erde.config import (
    DistillConfig,
    ExperimentConfig,
    ModelConfig,
    StudentSpec,
    TrainConfig,
    explicit_split_seed,
    parse_student,
    save_config,
    spec_distill,
)
from erde.data import DataSplits, ImageSet, iterate_batches, load_data, prepare_batch, to_device
from erde.data.augment import AugmentDraws, draw_augment
from erde.errors import CheckpointError, ConfigError, ErdeError
from erde.hardware import NHWC_MIN_STRIDED_1X1_INPUTS, cpu_has_bf16, nhwc_unsafe_convs
from erde.io import atomic_write_text, file_sha256
from erde.losses import METHODS, exit_mapping, exit_mapping_by_cost, student_loss, teacher_loss
from erde.models import build_model, measure_exit_costs
from erde.models.custom import config_modules, trusted_modules
from erde.monitor import recent_seconds_per_step
from erde.outputs import check_out_folder
from erde.recipe import (
    WHITEN_IMAGES,
    Lookahead,
    alternating_flips,
    init_from_data,
    parameter_groups,
)

SYNC_EVERY = 20  # optimizer steps between host reads of the running metrics
DATA_ON_GPU_FRACTION = 0.25  # keep the training set on the GPU if it takes at most this share

LossFn = Callable[[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor], dict]
EpochCallback = Callable[[Path, dict[str, Any]], None]  # (out_dir, epoch metrics record)


class TrainingError(ErdeError):
    """Training cannot go on (non-finite loss, out of memory)."""


@dataclass
class Job:
    """What one call of :func:`train` trains: the teacher or one student.

    A student is a method (``Job("student", "kd")``) or a spec with a name and its
    own loss settings (:meth:`student`, e.g. ERDE at gamma 2 as ``student_erde_g2``).
    """

    role: str  # teacher | student
    method: str | None = None  # ce | kd | erde for students
    spec: StudentSpec | None = None  # a named student with its own settings

    @classmethod
    def student(cls, spec: StudentSpec | str) -> Job:
        """The job of a spec, or of ``NAME[=METHOD][:key=value]...`` text (just ``kd`` works)."""
        spec = parse_student(spec) if isinstance(spec, str) else spec
        return cls("student", spec.method, spec)

    @property
    def name(self) -> str:
        if self.role == "teacher":
            return "teacher"
        return f"student_{self.spec.name if self.spec is not None else self.method}"

    def config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """``cfg`` as this model trains with it: a student's ``distill`` is its own.

        This is the config saved next to the student's checkpoint, so each one
        says which method and which gamma, beta, ... it was trained with.
        """
        if self.role == "teacher":
            return cfg
        spec = self.spec or StudentSpec(str(self.method), str(self.method))
        return dataclasses.replace(cfg, distill=spec_distill(cfg.distill, spec))


def needs_teacher(job: Job) -> bool:
    """Whether ``job`` is a student whose registered method learns from the teacher's logits."""
    return job.role == "student" and METHODS[str(job.method)].needs_teacher


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def load_splits(cfg: ExperimentConfig) -> DataSplits:
    """The data set of ``cfg``, its augmentation adjusted by ``data.crop_padding``."""
    d = cfg.data
    splits = load_data(
        d.name,
        d.data_dir,
        val_fraction=d.val_fraction,
        seed=cfg.seed if d.split_seed is None else d.split_seed,
        image_size=d.image_size,
        max_train=d.max_train,
    )
    if d.crop_padding is not None:
        splits.augment = dataclasses.replace(splits.augment, crop_padding=d.crop_padding)
    return splits


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; no weight decay on BN and bias parameters.

    Frozen parameters (a whitened stem) are left out; BN biases get their own
    learning rate with ``norm_bias_lr_scale`` (:func:`erde.recipe.parameter_groups`).
    """
    groups = parameter_groups(model, t.lr, t.weight_decay, t.norm_bias_lr_scale)
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.momentum, 0.999))


def build_scheduler(
    optimizer: torch.optim.Optimizer, t: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up, then cosine or linear decay to zero (or constant).

    ``linear`` is the one-cycle shape of fast CIFAR recipes (warm up, then anneal
    straight to zero); ``cosine`` spends longer near the peak.
    """
    total = max(1, t.epochs * steps_per_epoch)
    warmup = int(t.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if t.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def exit_weights(t: TrainConfig, num_exits: int, section: str) -> list[float]:
    if t.exit_weights is None:
        return [1.0] * num_exits
    if len(t.exit_weights) != num_exits:
        raise ConfigError(
            f"{section}.exit_weights has {len(t.exit_weights)} values but the model has {num_exits} exits"
        )
    return list(t.exit_weights)


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


def splits_batch(cfg: ExperimentConfig, n_train: int) -> int:
    """Per-process batch size, shrunk for training sets smaller than one batch."""
    return max(1, min(cfg.data.batch_size, n_train))


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


def amp_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """Autocast dtype, or None for full fp32.

    ``amp=None`` (the default) means bf16 where the hardware computes in it: CUDA,
    and CPUs with AVX-512 BF16 or AMX (read from the CPU's flags at run time);
    fp32 on other CPUs, where bf16 is emulated and slower than fp32. fp16 on GPUs
    without bf16.
    """
    enabled = (device.type == "cuda" or cpu_has_bf16()) if amp is None else amp
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """'bf16', 'fp16' or 'fp32': the arithmetic a step runs in (``amp_dtype``'s answer)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


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


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module,
    data: ImageSet,
    splits: DataSplits,
    device: torch.device,
    batch_size: int,
    ctx: D.DistContext | None = None,
) -> list[float]:
    """Accuracy of every exit on ``data`` (fractions in [0, 1]).

    Under torchrun each rank scores every world_size-th image and the counts
    are summed, so the answer is the same as in one process.
    """
    ctx = ctx or D.DistContext()
    if len(data) == 0:
        return []
    was_training = model.training
    model.eval()
    shard = torch.arange(ctx.rank, len(data), ctx.world_size)
    correct = torch.zeros(model.num_exits, dtype=torch.float64, device=device)
    for images, labels in iterate_batches(data, batch_size, device=device, indices=shard):
        logits = model(prepare_batch(images, splits, train=False))
        correct += torch.stack([(z.argmax(-1) == labels).sum() for z in logits])
    model.train(was_training)
    return (D.all_reduce_sum(correct, ctx) / len(data)).tolist()


def make_loss(
    job: Job,
    weights: list[float],
    mapping: list[int],
    d: DistillConfig,
    label_smoothing: float = 0.0,
) -> LossFn:
    """(student exit logits, teacher exit logits or None, labels) -> dict of loss terms."""
    if job.role == "teacher":
        return lambda exit_logits, _teacher, labels: teacher_loss(
            exit_logits, labels, weights, label_smoothing=label_smoothing
        )

    def loss(exit_logits, teacher_logits, labels):
        return student_loss(
            job.method, exit_logits, teacher_logits, labels, weights, mapping,
            alpha=d.alpha, beta=d.beta, gamma=d.gamma, tau=d.temperature,
            label_smoothing=label_smoothing, uncertain_above=d.uncertain_above,
        )  # fmt: skip

    return loss


def teacher_exit_logits(teacher: Callable, x: torch.Tensor) -> list[torch.Tensor]:
    """Every teacher exit from one forward pass, with no autograd bookkeeping at all.

    The clones turn inference tensors into ordinary ones that the student's
    loss may save for its backward pass ((B, K) each: negligible).
    """
    with torch.inference_mode():
        logits = teacher(x)
    return [z.clone() for z in logits]


class EpochSums:
    """Loss, per-exit hits and loss terms summed over an epoch, on the training device.

    Adding a step queues a few tensor ops and never waits for the device; the
    host reads the sums every ``SYNC_EVERY`` steps and at the end of the epoch.
    """

    def __init__(self, device: torch.device, state: dict[str, Any] | None = None) -> None:
        self.device = device
        self.names: list[str] = []
        self.values: torch.Tensor | None = None  # float64 (len(names),)
        self.images = 0  # images this process trained on this epoch
        if state is not None:
            self.names = list(state["names"])
            self.values = state["values"].to(device)
            self.images = int(state["images"])

    def add(
        self,
        loss: torch.Tensor,
        terms: dict[str, torch.Tensor],
        exit_logits: list[torch.Tensor],
        labels: torch.Tensor,
    ) -> None:
        b = labels.shape[0]
        keys = sorted(k for k in terms if k != "total")
        if self.values is None:
            hits_names = [f"correct_{i}" for i in range(len(exit_logits))]
            self.names = ["loss", *hits_names, *keys]
            self.values = torch.zeros(len(self.names), dtype=torch.float64, device=self.device)
        with torch.no_grad():
            hits = torch.stack([(z.argmax(-1) == labels).sum() for z in exit_logits])  # (E,)
            means = torch.stack([loss.detach(), *(terms[k].detach() for k in keys)]).float()
            self.values += torch.cat([means[:1] * b, hits, means[1:] * b])
        self.images += b

    def local_means(self) -> dict[str, float]:
        """This process's running means (reads the device: call only every few steps)."""
        if self.values is None:
            return {}
        n = max(self.images, 1)
        return {k: v / n for k, v in zip(self.names, self.values.tolist(), strict=True)}

    def reduced(self, ctx: D.DistContext) -> dict[str, Any]:
        """The sums over every process, as a checkpointable state (a collective call)."""
        values = self.values if self.values is not None else torch.zeros(0, device=self.device)
        flat = torch.cat([values.double(), values.new_tensor([self.images], dtype=torch.float64)])
        flat = D.all_reduce_sum(flat, ctx).cpu()
        return {"names": self.names, "values": flat[:-1], "images": int(flat[-1])}


class NonFiniteWatch:
    """The first step whose loss was nan or inf, tracked on the device without waiting."""

    NONE = 2**62

    def __init__(self, device: torch.device) -> None:
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        finite = torch.isfinite(loss.detach())
        self.first = torch.where(finite, self.first, self.first.clamp(max=step))

    def first_bad_step(self, ctx: D.DistContext) -> int | None:
        """Earliest bad step on any rank (a collective call), or None."""
        step = int(D.all_reduce_min(self.first, ctx).item())
        return None if step == self.NONE else step


def _load_teacher(path: str | Path, splits: DataSplits, device: torch.device) -> nn.Module:
    ckpt = load_checkpoint(path)
    if ckpt.get("role") != "teacher":
        raise CheckpointError(f"{ckpt['path']} is a {ckpt.get('role')} checkpoint, not a teacher")
    check_compatible(ckpt, splits.num_classes, splits.image_shape, "teacher checkpoint")
    teacher = model_from_checkpoint(ckpt).to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def build_job_model(mcfg: ModelConfig, splits: DataSplits, role: str) -> nn.Module:
    """The early-exit model ``mcfg`` describes, for the data's classes and image size.

    The image size is where ``exit_at_macs`` is measured and a user's network is
    probed; checkpoints record it, so a loaded model gets the same exits.
    """
    try:
        return build_model(
            num_classes=splits.num_classes,
            input_shape=splits.image_shape,
            **dataclasses.asdict(mcfg),
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{role}: {exc}") from None


def default_exit_mapping(
    distill: DistillConfig, student: nn.Module, teacher: nn.Module, image_shape: tuple
) -> list[int]:
    """Teacher exit per student exit by relative depth (exit index) or relative cost (MACs)."""
    if distill.exit_mapping_by == "cost":
        return exit_mapping_by_cost(
            measure_exit_costs(student, image_shape).macs_per_exit,
            measure_exit_costs(teacher, image_shape).macs_per_exit,
        )
    return exit_mapping(student.num_exits, teacher.num_exits)


def _existing(out_dir: Path, resume: bool, force: bool) -> dict[str, Any] | None:
    """Checkpoint to resume from, after refusing to silently overwrite finished work."""
    path = out_dir / "checkpoint.pt"
    if not path.exists():
        return None
    if resume:
        return load_checkpoint(path)
    if force:
        return None
    raise ConfigError(
        f"{path} already exists; pass --resume to continue it or --force to start over"
    )


def _check_resumable(
    previous: dict[str, Any], job: Job, mcfg: ModelConfig, splits: DataSplits, steps: int
) -> None:
    check_compatible(previous, splits.num_classes, splits.image_shape, "checkpoint to resume")
    if previous.get("name") != job.name:
        raise CheckpointError(f"{previous['path']} holds {previous.get('name')}, not {job.name}")
    wanted = dataclasses.asdict(mcfg)
    changed = [k for k in wanted if previous["model_config"].get(k) != wanted[k]]
    if changed:
        k = changed[0]
        raise CheckpointError(
            f"{previous['path']} holds a model with {k}={previous['model_config'].get(k)!r} but "
            f"the config asks for {k}={wanted[k]!r}; resume with the config it was trained with"
        )
    saved = previous.get("steps_per_epoch", steps)
    if saved != steps and not previous.get("finished"):
        raise CheckpointError(
            f"{previous['path']} was written with {saved} steps per epoch "
            f"({previous.get('world_size', 1)} process(es), batch size {previous.get('batch_size')}); "
            f"this run has {steps}: resume with the same number of processes and data.batch_size"
        )


# Settings that do not change what a model learns: a resumed run may differ in them.
# switches that change speed, not the method (results move by float round-off at most)
PERFORMANCE_ONLY = ("checkpoint_every_steps", "compile", "channels_last")
_NOT_COMPARED = (
    "device",
    "data.data_dir",
    "data.eval_batch_size",
    "distill.method",
    "distill.students",  # the list of a side-by-side run; each student compares its own settings
    *(f"{t}.{k}" for t in ("teacher_train", "student_train")
      for k in PERFORMANCE_ONLY),
)  # fmt: skip


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def settings_that_shape(job: Job) -> tuple[str, ...]:
    """Config sections (and keys) a model of ``job`` depends on."""
    if job.role == "teacher":
        return ("data", "teacher", "teacher_train", "seed")
    return ("data", "student", "student_train", "distill", "seed")


def config_differences(saved: dict[str, Any], wanted: dict[str, Any], job: Job) -> list[str]:
    """``key: saved -> wanted`` for every setting of ``job`` that differs."""
    old, new = _flatten(explicit_split_seed(saved)), _flatten(explicit_split_seed(wanted))
    sections = settings_that_shape(job)
    keys = [
        k
        for k in new
        if k.split(".")[0] in sections and k not in _NOT_COMPARED and old.get(k, new[k]) != new[k]
    ]
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in keys]


def check_same_settings(previous: dict[str, Any], cfg: ExperimentConfig, job: Job) -> None:
    """Refuse to reuse or continue a model trained with other settings than those asked for.

    Otherwise the report and config.yaml written next would claim settings the
    model was never trained with.
    """
    diffs = config_differences(previous["config"], cfg.to_dict(), job)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ConfigError(
            f"{previous['path']} was trained with other settings than asked for ({shown}); "
            "resume with the same configuration, or pass --allow-config-change to use it anyway"
        )


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Global RNG states (dropout). Every rank draws the same stream, so rank 0's is everyone's."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _remove_stale_temp_files(out_dir: Path) -> None:
    """Half-written checkpoints a killed process left behind (never the checkpoint itself)."""
    for stale in out_dir.glob(".checkpoint.pt.*.tmp"):
        stale.unlink(missing_ok=True)


def train(
    cfg: ExperimentConfig,
    job: Job,
    out_dir: str | Path,
    *,
    teacher_checkpoint: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    splits: DataSplits | None = None,
    on_step: Callable[[int], None] | None = None,
    allow_config_change: bool = False,
    on_epoch: EpochCallback | None = None,
) -> Path:
    """Train ``job`` with ``cfg`` into ``out_dir``; returns the checkpoint path.

    Everything that can be wrong with the inputs (data, teacher, config) is
    checked before the first file is written, so a bad call never replaces a
    good checkpoint. ``on_step(global_step)`` is called after every optimizer
    step. Under torchrun, ``data.batch_size`` is per process. With ``resume``,
    a checkpoint trained with other settings is refused (the differing keys
    listed) unless ``allow_config_change``.
    """
    (path,) = train_together(
        cfg, [job], [out_dir], teacher_checkpoint=teacher_checkpoint, resume=resume,
        force=force, progress=progress, splits=splits, on_step=on_step, on_epoch=on_epoch,
        allow_config_change=allow_config_change,
    )  # fmt: skip
    return path


def train_students(
    cfg: ExperimentConfig,
    methods: Sequence[str | StudentSpec],
    out_dirs: Sequence[str | Path],
    *,
    teacher_checkpoint: str | Path | None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    splits: DataSplits | None = None,
    on_step: Callable[[int], None] | None = None,
    allow_config_change: bool = False,
    on_epoch: EpochCallback | None = None,
) -> list[Path]:
    """Train one student per method side by side: same batches, one teacher forward per batch.

    The students then differ only by their loss (a paired comparison), and the
    teacher runs once per batch for all of them instead of once per student.
    ``methods`` are method names or :class:`~erde.config.StudentSpec`s (any number,
    e.g. ERDE at several gammas beside KD).
    Each student ends with exactly the weights that :func:`train` would give it
    alone with the same config (each keeps its own dropout random stream), and
    keeps its own checkpoint in its own folder.
    """
    jobs = [Job.student(m) for m in methods]
    return train_together(
        cfg, jobs, out_dirs, teacher_checkpoint=teacher_checkpoint, resume=resume, force=force,
        progress=progress, splits=splits, on_step=on_step, on_epoch=on_epoch,
        allow_config_change=allow_config_change,
    )  # fmt: skip


def _check_jobs(jobs: Sequence[Job], out_dirs: Sequence[Path]) -> None:
    if not jobs:
        raise ConfigError("nothing to train: no job given")
    if len(jobs) != len(out_dirs):
        raise ConfigError(f"{len(jobs)} jobs but {len(out_dirs)} output folders")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ConfigError(f"each model may be trained once per call, got {names}")
    if len({d.resolve() for d in out_dirs}) != len(out_dirs):
        raise ConfigError("each model needs its own output folder")
    if any(j.role == "teacher" for j in jobs) and len(jobs) > 1:
        raise ConfigError("the teacher trains alone: its students need it finished")
    bad = [j.method for j in jobs if j.role == "student" and j.method not in METHODS]
    if bad:
        raise ConfigError(f"unknown student method(s) {bad}; valid: {', '.join(METHODS)}")


def train_together(
    cfg: ExperimentConfig,
    jobs: Sequence[Job],
    out_dirs: Sequence[str | Path],
    *,
    teacher_checkpoint: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    splits: DataSplits | None = None,
    on_step: Callable[[int], None] | None = None,
    allow_config_change: bool = False,
    on_epoch: EpochCallback | None = None,
) -> list[Path]:
    """Train ``jobs`` (the teacher, or any students) in one loop over the same batches.

    Every input and every output folder is checked before the first file is
    written. Finished models in ``out_dirs`` are reused with ``resume``; models
    resumed at different steps (a kill between two checkpoint writes) each
    continue from their own step, so every one ends as if never interrupted.
    ``on_epoch(out_dir, record)`` is called on rank 0 after each epoch of each
    model with its metrics record (the line written to metrics.jsonl).
    Returns the checkpoint paths in the order of ``jobs``.
    """
    out_dirs = [Path(d) for d in out_dirs]
    _check_jobs(jobs, out_dirs)
    if teacher_checkpoint is not None:
        for out_dir in out_dirs:  # a student written over its own teacher would destroy it
            check_out_folder(out_dir, [teacher_checkpoint])
    ctx, device = D.setup(cfg.device)
    is_teacher = jobs[0].role == "teacher"
    mcfg = cfg.teacher if is_teacher else cfg.student
    tcfg = cfg.teacher_train if is_teacher else cfg.student_train
    section = "teacher_train" if is_teacher else "student_train"

    splits = splits or load_splits(cfg)
    teacher = None
    if any(needs_teacher(j) for j in jobs):
        if teacher_checkpoint is None:
            method = next(j.method for j in jobs if needs_teacher(j))
            raise ConfigError(f"method {method!r} needs a teacher checkpoint (--teacher)")
        with trusted_modules(config_modules(cfg)):  # the user's config names them
            teacher = _load_teacher(teacher_checkpoint, splits, device)
    teacher_sha = teacher_sha256(teacher_checkpoint) if teacher is not None else None
    n_train = len(splits.train) // ctx.world_size
    batch_size = splits_batch(cfg, n_train)
    steps_per_epoch = n_train // batch_size
    if tcfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tcfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"training set of {len(splits.train)} images is smaller than one batch per process"
        )
    previous = [_existing(d, resume, force) for d in out_dirs]
    for prev, job in zip(previous, jobs, strict=True):
        if prev is not None:
            _check_resumable(prev, job, mcfg, splits, steps_per_epoch)
            if needs_teacher(job):
                _check_same_teacher(prev, teacher_checkpoint, teacher_sha)
            if not allow_config_change:
                check_same_settings(prev, job.config(cfg), job)

    env = _Shared(
        cfg=cfg, tcfg=tcfg, ctx=ctx, device=device, splits=splits, teacher=teacher,
        batch_size=batch_size, steps_per_epoch=steps_per_epoch, on_step=on_step,
        on_epoch=on_epoch,
    )  # fmt: skip
    runs: list[_Run] = []
    for job, out_dir, prev in zip(jobs, out_dirs, previous, strict=True):
        if prev is not None and prev.get("finished"):
            if ctx.is_main:
                print(f"{job.name}: already finished in {out_dir}, reusing it")
            continue
        seed_everything(cfg.seed)  # every model starts from the seed, as when trained alone
        model = build_job_model(mcfg, splits, "teacher" if is_teacher else "student")
        if tcfg.whiten_init:  # before the optimizer: the whitened weights are frozen
            whiten_from = prepare_batch(splits.train.images[:WHITEN_IMAGES], splits, train=False)
            init_from_data(model, whiten_from, mcfg.arch)
        weights = exit_weights(tcfg, model.num_exits, section)
        mapping = _mapping(cfg, model, teacher, splits) if needs_teacher(job) else []
        run = _Run(
            env=env, job=job, out_dir=out_dir, model=model,
            loss_fn=make_loss(job, weights, mapping, job.config(cfg).distill, tcfg.label_smoothing),
            extra={"exit_weights": weights, "exit_mapping": mapping,
                   "teacher_checkpoint": str(teacher_checkpoint) if needs_teacher(job) else None,
                   "teacher_sha256": teacher_sha if needs_teacher(job) else None},
        )  # fmt: skip
        if prev is not None:
            _restore(run, prev)
        runs.append(run)
    if ctx.is_main:
        for run in runs:
            run.out_dir.mkdir(parents=True, exist_ok=True)
            _remove_stale_temp_files(run.out_dir)
            save_config(run.cfg, run.out_dir / "config.yaml")
            print(start_line(run.job, mcfg, tcfg, run.model.num_exits, len(splits.train), device,
                             run.out_dir, run.position, steps_per_epoch,
                             env.setting(run.needs_teacher, run.memory_format)),
                  flush=True)  # fmt: skip
    if ctx.is_main and runs:  # one warning for models trained side by side on the same batches
        capped = bool(tcfg.max_steps_per_epoch) and tcfg.max_steps_per_epoch < n_train // batch_size
        names = ", ".join(run.job.name for run in runs)
        warning = few_steps_warning(names, n_train, batch_size, steps_per_epoch, capped)
        if warning:
            print(warning, flush=True)
    if runs:
        _drive(env, runs, progress)
    D.barrier(ctx)
    return [d / "checkpoint.pt" for d in out_dirs]


def teacher_sha256(teacher_checkpoint: str | Path) -> str:
    """The sha256 of the teacher's checkpoint file: which teacher a student learnt from."""
    path = Path(teacher_checkpoint)
    return file_sha256(path / "checkpoint.pt" if path.is_dir() else path)


def _check_same_teacher(
    previous: dict[str, Any], teacher_checkpoint: str | Path | None, sha: str | None
) -> None:
    """Refuse to reuse or continue a student distilled from a teacher that has since changed.

    Students written before the field existed carry no ``teacher_sha256``: accepted unchecked.
    """
    saved = previous.get("teacher_sha256")
    if saved is None or sha is None or saved == sha:
        return
    raise CheckpointError(
        f"{previous['path']} was distilled from another teacher: {teacher_checkpoint} has "
        f"changed since (sha256 {str(saved)[:12]}... then, {sha[:12]}... now); pass --force "
        f"to train it again from this teacher, or remove {Path(previous['path']).parent}"
    )


def _restore(run: _Run, previous: dict[str, Any]) -> None:
    """Continue from ``previous``; a checkpoint whose training state is damaged is one error."""
    try:
        run.restore(previous)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:200]
        raise CheckpointError(
            f"{previous['path']} cannot be resumed: its training state is damaged ({what}); "
            "pass --force to start over"
        ) from None


def _mapping(
    cfg: ExperimentConfig, model: nn.Module, teacher: nn.Module | None, splits: DataSplits
) -> list[int]:
    """Teacher exit for each student exit, checked against both models."""
    assert teacher is not None
    mapping = cfg.distill.exit_mapping or default_exit_mapping(
        cfg.distill, model, teacher, splits.image_shape
    )
    if len(mapping) != model.num_exits or not all(0 <= m < teacher.num_exits for m in mapping):
        raise ConfigError(
            f"distill.exit_mapping must give one teacher exit in [0, {teacher.num_exits - 1}] "
            f"for each of the student's {model.num_exits} exits, got {mapping}"
        )
    return mapping


def memory_format_name(memory_format: torch.memory_format) -> str:
    """``NHWC`` for channels_last, else ``NCHW``: as start lines and metrics.jsonl say it."""
    return "NHWC" if memory_format == torch.channels_last else "NCHW"


def _memory_format(env: _Shared, model: nn.Module, job: Job) -> torch.memory_format:
    """The loop's memory format, except NCHW for a model PyTorch cannot train in NHWC on a CPU."""
    if env.memory_format != torch.channels_last or env.device.type != "cpu":
        return env.memory_format
    unsafe = nhwc_unsafe_convs(model)
    if not unsafe:
        return env.memory_format
    if env.ctx.is_main:
        print(
            f"{job.name}: trained in NCHW, not channels_last: PyTorch's CPU backward of a strided "
            f"1x1 convolution with under {NHWC_MIN_STRIDED_1X1_INPUTS} input channels corrupts "
            f"memory in channels_last ({', '.join(unsafe[:3])}{' ...' if len(unsafe) > 3 else ''})",
            flush=True,
        )
    return torch.contiguous_format


@dataclass
class _Shared:
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
        (NCHW where :func:`_memory_format` overrode channels_last), teacher forward."""
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


def _drive(env: _Shared, runs: list[_Run], progress: bool) -> None:
    """The loop: one batch per global step, shared by every model still due at that step."""
    names = "+".join(r.job.name.removeprefix("student_") for r in runs)
    start = min(r.position["global_step"] for r in runs)
    bar = tqdm(
        total=env.total_steps, initial=start, desc=runs[0].job.name if len(runs) == 1 else
        f"students {names}", disable=not (progress and env.ctx.is_main), dynamic_ncols=True,
    )  # fmt: skip
    for run in runs:
        run.model.train()
    try:
        while True:
            active = [r for r in runs if r.position["epoch"] < env.tcfg.epochs]
            if not active:
                break
            step = min(r.position["global_step"] for r in active)
            due = [r for r in active if r.position["global_step"] == step]
            x, labels = env.batch(step)
            teacher_logits = env.teacher_logits(x) if any(r.needs_teacher for r in due) else None
            for run in due:
                run.step(x, labels, teacher_logits)
            bar.update(1)
            if env.on_step is not None:
                env.on_step(step + 1)
            for run in due:
                run.after_step()
            if (step + 1) % SYNC_EVERY == 0 and not bar.disable:
                bar.set_postfix(_postfix(env, due))
    except torch.OutOfMemoryError:
        raise TrainingError(
            f"{names}: out of memory on {env.device} with batch size {env.batch_size}; try a "
            f"smaller data.batch_size (e.g. --set data.batch_size={max(1, env.batch_size // 2)})"
        ) from None
    finally:
        bar.close()


def _postfix(env: _Shared, runs: list[_Run]) -> dict[str, str]:
    """Progress-bar fields: epoch, then running last-exit train accuracy (and loss when alone)."""
    out = {"epoch": f"{runs[0].position['epoch'] + 1}/{env.tcfg.epochs}"}
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


class _Run:
    """The state of one model being trained and the few things done with it.

    ``model`` is the bare module (what is saved); ``forward`` is what batches go
    through: the same module wrapped in DistributedDataParallel and/or compiled.
    ``rng`` is the model's own global-RNG stream (dropout), swapped in around
    its steps, so models trained side by side draw what they would draw alone.
    """

    def __init__(
        self,
        *,
        env: _Shared,
        job: Job,
        out_dir: Path,
        model: nn.Module,
        loss_fn: LossFn,
        extra: dict[str, Any],
    ) -> None:
        self.env, self.job, self.out_dir, self.loss_fn, self.extra = (
            env,
            job,
            out_dir,
            loss_fn,
            extra,
        )
        self.cfg, self.tcfg, self.ctx, self.device = (
            job.config(env.cfg),
            env.tcfg,
            env.ctx,
            env.device,
        )
        self.needs_teacher = needs_teacher(job)
        self.rng = _rng_state(env.device)  # taken right after the model was built from the seed
        self.memory_format = _memory_format(env, model, job)
        self.model = model.to(env.device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(self.model, self.tcfg)
        self.scheduler = build_scheduler(self.optimizer, self.tcfg, env.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=env.amp_dtype == torch.float16)
        self.lookahead = Lookahead(self.model, env.total_steps) if self.tcfg.lookahead else None
        forward: nn.Module = self.model
        if self.ctx.enabled:
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            forward = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.forward = torch.compile(forward) if self.tcfg.compile else forward
        self.position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
        self.checkpointed = False  # whether out_dir holds a checkpoint of this run to resume
        self.sums = EpochSums(env.device)
        self.watch = NonFiniteWatch(env.device)
        self.history: list[dict[str, Any]] = []  # one metrics record per finished epoch
        self.epoch_start = time.perf_counter()
        self.epoch_start_step = self.position["global_step"]
        self.blocks = BlockTimer(self.position["global_step"])

    # --- checkpoints ----------------------------------------------------------------------

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue exactly where ``ckpt`` stopped: weights, optimizer, schedule, RNG, position."""
        self.model.load_state_dict(ckpt["model"])
        self.checkpointed = True
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.lookahead is not None:
            self.lookahead.load_state_dict(ckpt["lookahead"])
        self.rng = ckpt["rng"]
        self.position = {k: int(ckpt[k]) for k in self.position}
        self.epoch_start_step = self.position["global_step"]  # steps timed start here
        self.epoch_start = time.perf_counter()
        self.blocks = BlockTimer(self.position["global_step"])
        self.history = list(ckpt.get("history", []))
        running = ckpt.get("running")
        # the saved sums cover every rank: rank 0 carries them on, the others start from zero
        if running and self.ctx.is_main:
            self.sums = EpochSums(self.device, running)

    def save(self, finished: bool = False) -> None:
        """Write the checkpoint (rank 0; mid-epoch, the running sums are reduced on every rank first)."""
        running = self.sums.reduced(self.ctx) if self.position["step_in_epoch"] else None
        self.checkpointed = True
        if not self.ctx.is_main:
            return
        splits = self.env.splits
        mcfg = self.cfg.teacher if self.job.role == "teacher" else self.cfg.student
        state = {
            "name": self.job.name,
            "role": self.job.role,
            "method": self.job.method,
            "model_config": dataclasses.asdict(mcfg),
            "num_classes": splits.num_classes,
            "image_shape": list(splits.image_shape),
            "dataset": splits.name,
            "class_names": list(splits.class_names),
            "mean": list(splits.mean),
            "std": list(splits.std),
            "config": self.cfg.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "rng": self.rng,
            **self.position,
            "finished": finished,
            "running": running,
            "history": self.history,
            "steps_per_epoch": self.env.steps_per_epoch,
            # this epoch's steady time per step so far: `erde status` estimates the time left
            # from it before the first epoch's record exists (None before the first block)
            "steady_seconds_per_step": self.blocks.steady(),
            "batch_size": self.env.batch_size,
            "world_size": self.ctx.world_size,
            **self.extra,
        }
        save_checkpoint(state, self.out_dir / "checkpoint.pt")

    def write_metrics(self) -> None:
        """metrics.jsonl, rewritten from the checkpoint's history: a crash never duplicates a line."""
        if self.ctx.is_main:
            lines = "".join(json.dumps(record) + "\n" for record in self.history)
            atomic_write_text(self.out_dir / "metrics.jsonl", lines)

    # --- the loop -------------------------------------------------------------------------

    def step(
        self, x: torch.Tensor, labels: torch.Tensor, teacher_logits: list[torch.Tensor] | None
    ) -> None:
        """One optimizer step on one prepared batch; queues work, never waits for it."""
        p = self.position
        x = x.contiguous(memory_format=self.memory_format)  # a copy only for a model kept NCHW
        _set_rng_state(self.rng, self.device)
        with autocast(self.device, self.env.amp_dtype):
            exit_logits = self.forward(x)
            terms = self.loss_fn(exit_logits, teacher_logits, labels)
        self.rng = _rng_state(self.device)
        loss = terms["total"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        p["step_in_epoch"] += 1
        p["global_step"] += 1
        if self.lookahead is not None:
            self.lookahead.after_step(self.model, p["global_step"])
        self.watch.update(loss, p["global_step"])
        self.sums.add(loss, terms, exit_logits, labels)

    def after_step(self) -> None:
        """Mid-epoch checkpoints and finite checks, then the end of the epoch when it comes."""
        p = self.position
        every = self.tcfg.checkpoint_every_steps
        if p["step_in_epoch"] >= self.env.steps_per_epoch:
            self.check_finite()
            self.end_epoch()
        elif every and p["global_step"] % every == 0:
            self.check_finite()
            self.save()
            self.blocks.mark(p["global_step"])
        elif p["global_step"] % SYNC_EVERY == 0:
            self.check_finite()
            self.blocks.mark(p["global_step"])

    def check_finite(self) -> None:
        """Stop on a nan/inf loss before anything is saved from the weights it spoilt."""
        bad = self.watch.first_bad_step(self.ctx)
        if bad is not None:
            epoch = (bad - 1) // self.env.steps_per_epoch + 1
            kept = (
                f"the last good checkpoint is kept in {self.out_dir}"
                if self.checkpointed
                else "no checkpoint was written yet (nothing to resume)"
            )
            raise TrainingError(
                f"{self.job.name}: the loss became nan or inf at step {bad} (epoch {epoch}); "
                f"stopped, and {kept}. Try a lower learning rate, or turn mixed precision off "
                "(teacher_train/student_train.amp=false)."
            )

    def end_epoch(self) -> None:
        """Metrics over all ranks, validation accuracy, then checkpoint and metrics.jsonl.

        ``seconds`` is the wall time of the epoch for this model; models trained
        side by side share it (their epochs run interleaved).
        """
        totals = self.sums.reduced(self.ctx)  # waits for the device: the time below is true
        seconds = time.perf_counter() - self.epoch_start
        D.broadcast_buffers(self.model, self.ctx)
        # steps timed in this process (a resumed epoch ran only its last part here)
        timed = self.position["global_step"] - self.epoch_start_step
        steps = self.env.steps_per_epoch
        record = _epoch_record(self.job, self.position["epoch"], totals, seconds, steps, timed)
        record["steady_seconds_per_step"] = self.blocks.steady()
        record["precision"] = precision_name(self.env.amp_dtype)
        record["memory_format"] = memory_format_name(self.memory_format)
        record["lr"] = self.scheduler.get_last_lr()[0]
        record["epochs"] = self.tcfg.epochs
        left = self.env.total_steps - self.position["global_step"]
        per_step = recent_seconds_per_step(
            [*self.history, record]
        )  # one slow epoch moves it little
        record["eta_seconds"] = per_step * left if per_step is not None else None
        record["val_exit_accuracy"] = evaluate_accuracy(
            self.model, self.env.val_set, self.env.splits, self.device,
            self.cfg.data.eval_batch_size, self.ctx,
        )  # fmt: skip
        self.history.append(record)
        self.position["epoch"] += 1
        self.position["step_in_epoch"] = 0
        self.sums = EpochSums(self.device)
        self.save(finished=self.position["epoch"] >= self.tcfg.epochs)
        self.write_metrics()
        if self.env.on_epoch is not None and self.ctx.is_main:
            self.env.on_epoch(self.out_dir, record)
        self.epoch_start = time.perf_counter()
        self.epoch_start_step = self.position["global_step"]
        self.blocks = BlockTimer(self.position["global_step"])  # validation is not a step


class BlockTimer:
    """Seconds per step of an epoch, measured over blocks of steps that end in a host sync.

    The wall time of a whole epoch counts every stall in it: a process stopped
    for an hour, a laptop asleep, another job on the same cores. Timed between
    the loop's host syncs (every ``SYNC_EVERY`` steps, when the device has
    finished the block's work, on CPU and GPU alike), the median block says
    what a step costs when the run goes on, whatever happened to a few blocks.
    """

    def __init__(self, step: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.start, self.step = clock(), step
        self.per_step: list[float] = []  # one value per finished block

    def mark(self, step: int) -> None:
        """A block ends at ``step`` (just after a host sync)."""
        now = self.clock()
        if step > self.step:
            self.per_step.append((now - self.start) / (step - self.step))
        self.start, self.step = now, step

    def steady(self) -> float | None:
        """Median seconds per step over the finished blocks (None before the first)."""
        return statistics.median(self.per_step) if self.per_step else None


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


def _epoch_record(
    job: Job, epoch: int, totals: dict[str, Any], seconds: float, steps: int, timed: int
) -> dict:
    """Epoch metrics over all ranks: mean loss and terms, train accuracy per exit.

    ``seconds`` timed the last ``timed`` of the epoch's ``steps`` (all of them unless the
    epoch was resumed), so the speed figures count the images of those steps only.
    """
    n = max(totals["images"], 1)
    means = {k: v / n for k, v in zip(totals["names"], totals["values"].tolist(), strict=True)}
    correct = sorted((k for k in means if k.startswith("correct_")), key=lambda k: int(k[8:]))
    return {
        "model": job.name,
        "epoch": epoch + 1,
        "train_loss": means.get("loss", float("nan")),
        "train_exit_accuracy": [means[k] for k in correct],
        "terms": {k: v for k, v in means.items() if k != "loss" and k not in correct},
        "images": totals["images"],
        "seconds": seconds,
        "steps": steps,
        "seconds_per_step": seconds / timed if timed > 0 else None,
        "images_per_second": totals["images"] / steps * timed / seconds
        if timed > 0 and seconds > 0
        else None,
    }
