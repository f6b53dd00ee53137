"""The training loop: the teacher, or any set of students side by side, over the same batches.

Read this module top to bottom. The path of one batch:

1. :func:`run_loop` picks the global step every due model is at and asks
   :meth:`TrainingContext.batch <erde.training.context.TrainingContext.batch>`
   for its images (sliced from the uint8 set on the device, cropped, flipped and
   normalised there; a pure function of seed, rank and step);
2. :meth:`TrainingContext.teacher_logits` runs the teacher once for every
   student that learns from it (``torch.inference_mode``);
3. each due :class:`~erde.training.model_run.ModelRun` takes an optimiser step
   (:meth:`ModelRun.step`: forward under autocast, the job's loss from
   :func:`erde.training.jobs.make_loss`, i.e. :func:`erde.losses.student_loss`
   or :func:`erde.losses.teacher_loss`, backward, optimiser, schedule, look-ahead);
4. :meth:`ModelRun.after_step` reads the device every ``SYNC_EVERY`` steps
   (non-finite check, step timing), writes mid-epoch checkpoints, and at the
   end of an epoch validates, appends to metrics.jsonl and saves the checkpoint.

The loop is plain PyTorch, written for speed and for crashes:

- the uint8 training set sits on the training device; each batch is sliced,
  augmented and normalised there in a few batched ops (no DataLoader); the
  epoch's shuffled order and crop/flip draws reach the device in one copy per
  epoch, so building a batch never makes the host wait for a GPU;
- channels_last, mixed precision (bf16 by default on CUDA and on CPUs with bf16
  hardware, fp16 + GradScaler on GPUs without bf16) and ``torch.compile`` are config switches;
- students trained side by side (:func:`train_students`) share the batch and
  the one teacher forward, and each ends with the weights it would get alone;
- running loss and accuracy are summed on the device; the host reads them
  every ``SYNC_EVERY`` steps and at the end of the epoch, never once per step;
- checkpoints are written atomically every epoch (and every
  ``checkpoint_every_steps``); ``resume=True`` continues from the exact batch
  it stopped at, with the same augmentation draws, so an interrupted run ends
  with the same weights as an uninterrupted one;
- under ``torchrun`` the model is wrapped in DistributedDataParallel, each
  process trains on its shard of every epoch, metrics are summed over
  processes and only rank 0 writes files (see docs/DISTRIBUTED.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from erde import distributed as D
from erde.config import ExperimentConfig, StudentSpec, save_config
from erde.data import DataSplits, load_splits, prepare_batch
from erde.errors import ConfigError, TrainingError
from erde.models.custom import config_modules, trusted_modules
from erde.outputs import check_out_folder
from erde.recipe import WHITEN_IMAGES, init_from_data
from erde.training.console import few_steps_warning, progress_fields, start_line
from erde.training.context import EpochCallback, TrainingContext
from erde.training.jobs import (
    Job,
    build_job_model,
    check_jobs,
    exit_mapping_for,
    load_teacher,
    make_loss,
    needs_teacher,
)
from erde.training.model_run import ModelRun
from erde.training.optim import exit_weights, seed_everything
from erde.training.resume import (
    check_resumable,
    check_same_settings,
    check_same_teacher,
    existing_checkpoint,
    remove_stale_temp_files,
    teacher_sha256,
)


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
    check_jobs(jobs, out_dirs)
    if teacher_checkpoint is not None:
        for out_dir in out_dirs:  # a student written over its own teacher would destroy it
            check_out_folder(out_dir, [teacher_checkpoint])
    ctx, device = D.setup(cfg.device)
    is_teacher = jobs[0].role == "teacher"
    mcfg = cfg.teacher if is_teacher else cfg.student
    tcfg = cfg.teacher_train if is_teacher else cfg.student_train

    splits = splits or load_splits(cfg)
    teacher = None
    if any(needs_teacher(j) for j in jobs):
        if teacher_checkpoint is None:
            method = next(j.method for j in jobs if needs_teacher(j))
            raise ConfigError(f"method {method!r} needs a teacher checkpoint (--teacher)")
        with trusted_modules(config_modules(cfg)):  # the user's config names them
            teacher = load_teacher(teacher_checkpoint, splits, device)
    teacher_sha = teacher_sha256(teacher_checkpoint) if teacher is not None else None
    n_train = len(splits.train) // ctx.world_size
    batch_size = per_process_batch_size(cfg, n_train)
    steps_per_epoch = n_train // batch_size
    if tcfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tcfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"training set of {len(splits.train)} images is smaller than one batch per process"
        )
    previous = [existing_checkpoint(d, resume, force) for d in out_dirs]
    for prev, job in zip(previous, jobs, strict=True):
        if prev is not None:
            check_resumable(prev, job, mcfg, splits, steps_per_epoch)
            if needs_teacher(job):
                check_same_teacher(prev, teacher_checkpoint, teacher_sha)
            if not allow_config_change:
                check_same_settings(prev, job.config(cfg), job)

    shared = TrainingContext(
        cfg=cfg, tcfg=tcfg, ctx=ctx, device=device, splits=splits, teacher=teacher,
        batch_size=batch_size, steps_per_epoch=steps_per_epoch, on_step=on_step,
        on_epoch=on_epoch,
    )  # fmt: skip
    teacher_info = {"teacher_checkpoint": str(teacher_checkpoint), "teacher_sha256": teacher_sha}
    runs: list[ModelRun] = []
    for job, out_dir, prev in zip(jobs, out_dirs, previous, strict=True):
        if prev is not None and prev.get("finished"):
            if ctx.is_main:
                print(f"{job.name}: already finished in {out_dir}, reusing it")
            continue
        runs.append(build_run(shared, job, out_dir, prev, teacher_info))
    if ctx.is_main:
        announce(shared, runs, n_train)
    if runs:
        run_loop(shared, runs, progress)
    D.barrier(ctx)
    return [d / "checkpoint.pt" for d in out_dirs]


def per_process_batch_size(cfg: ExperimentConfig, n_train: int) -> int:
    """Per-process batch size, shrunk for training sets smaller than one batch."""
    return max(1, min(cfg.data.batch_size, n_train))


def build_run(
    shared: TrainingContext, job: Job, out_dir: Path, previous: dict | None, teacher_info: dict
) -> ModelRun:
    """A fresh model for ``job`` (from the seed, as when trained alone), resumed from ``previous``."""
    cfg, tcfg, splits = shared.cfg, shared.tcfg, shared.splits
    is_teacher = job.role == "teacher"
    mcfg = cfg.teacher if is_teacher else cfg.student
    seed_everything(cfg.seed)  # every model starts from the seed, as when trained alone
    model = build_job_model(mcfg, splits, job.role)
    if tcfg.whiten_init:  # before the optimizer: the whitened weights are frozen
        whiten_from = prepare_batch(splits.train.images[:WHITEN_IMAGES], splits, train=False)
        init_from_data(model, whiten_from, mcfg.arch)
    section = "teacher_train" if is_teacher else "student_train"
    weights = exit_weights(tcfg, model.num_exits, section)
    learns = needs_teacher(job)
    mapping = exit_mapping_for(cfg, model, shared.teacher, splits) if learns else []
    extra = {"exit_weights": weights, "exit_mapping": mapping}
    extra |= {k: (v if learns else None) for k, v in teacher_info.items()}
    run = ModelRun(
        shared=shared, job=job, out_dir=out_dir, model=model, extra=extra,
        loss_fn=make_loss(job, weights, mapping, job.config(cfg).distill, tcfg.label_smoothing),
    )  # fmt: skip
    if previous is not None:
        run.restore(previous)
    return run


def announce(shared: TrainingContext, runs: list[ModelRun], n_train: int) -> None:
    """Before the first step (rank 0): folders, config.yaml, one start line per model, and
    one few-steps warning for the models trained side by side on the same batches."""
    cfg, tcfg, splits = shared.cfg, shared.tcfg, shared.splits
    mcfg = cfg.teacher if runs and runs[0].job.role == "teacher" else cfg.student
    for run in runs:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(run.out_dir)
        save_config(run.cfg, run.out_dir / "config.yaml")
        print(start_line(run.job, mcfg, tcfg, run.model.num_exits, len(splits.train),
                         shared.device, run.out_dir, run.position, shared.steps_per_epoch,
                         shared.setting(run.needs_teacher, run.memory_format)),
              flush=True)  # fmt: skip
    if runs:
        full = n_train // shared.batch_size
        capped = bool(tcfg.max_steps_per_epoch) and tcfg.max_steps_per_epoch < full
        names = ", ".join(run.job.name for run in runs)
        warning = few_steps_warning(
            names, n_train, shared.batch_size, shared.steps_per_epoch, capped
        )
        if warning:
            print(warning, flush=True)


def run_loop(shared: TrainingContext, runs: list[ModelRun], progress: bool) -> None:
    """The loop: one batch per global step, shared by every model still due at that step."""
    names = "+".join(r.job.name.removeprefix("student_") for r in runs)
    start = min(r.position["global_step"] for r in runs)
    bar = tqdm(
        total=shared.total_steps, initial=start, desc=runs[0].job.name if len(runs) == 1 else
        f"students {names}", disable=not (progress and shared.ctx.is_main), dynamic_ncols=True,
    )  # fmt: skip
    for run in runs:
        run.model.train()
    try:
        while True:
            active = [r for r in runs if r.position["epoch"] < shared.tcfg.epochs]
            if not active:
                break
            step = min(r.position["global_step"] for r in active)
            due = [r for r in active if r.position["global_step"] == step]
            x, labels = shared.batch(step)
            needed = any(r.needs_teacher for r in due)
            teacher_logits = shared.teacher_logits(x) if needed else None
            for run in due:
                run.step(x, labels, teacher_logits)
            bar.update(1)
            if shared.on_step is not None:
                shared.on_step(step + 1)
            synced = [run.after_step() for run in due]
            if any(synced) and not bar.disable:
                bar.set_postfix(progress_fields(shared.tcfg.epochs, due))
    except torch.OutOfMemoryError:
        raise TrainingError(
            f"{names}: out of memory on {shared.device} with batch size {shared.batch_size}; try "
            f"a smaller data.batch_size (e.g. --set data.batch_size={max(1, shared.batch_size // 2)})"
        ) from None
    finally:
        bar.close()
