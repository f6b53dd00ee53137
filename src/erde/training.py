"""One training loop for the early-exit teacher and the ce/kd/erde students.

The loop is written out in plain PyTorch: batches come from uint8 tensors on the
training device, augmentation is batched there, the teacher (for students) runs
once per batch under ``inference_mode``, and every epoch ends with an atomic
checkpoint that ``--resume`` continues from exactly (model, optimizer, schedule,
RNG states, position in the epoch). Under ``torchrun`` the same code runs with
DistributedDataParallel; only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
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
from erde.config import ExperimentConfig, ModelConfig, TrainConfig, save_config
from erde.data import DataSplits, ImageSet, iterate_batches, load_data, prepare_batch
from erde.errors import CheckpointError, ConfigError, ErdeError
from erde.losses import exit_mapping, student_loss, teacher_loss
from erde.models import build_model


class TrainingError(ErdeError):
    """Training cannot go on (non-finite loss, out of memory)."""


@dataclass
class Job:
    """What one call of :func:`train` trains: the teacher or one student method."""

    role: str  # teacher | student
    method: str | None = None  # ce | kd | erde for students

    @property
    def name(self) -> str:
        return "teacher" if self.role == "teacher" else f"student_{self.method}"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def load_splits(cfg: ExperimentConfig) -> DataSplits:
    d = cfg.data
    return load_data(
        d.name,
        d.data_dir,
        val_fraction=d.val_fraction,
        seed=cfg.seed,
        image_size=d.image_size,
        max_train=d.max_train,
    )


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; no weight decay on BN and bias parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": t.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.momentum, 0.999))


def build_scheduler(
    optimizer: torch.optim.Optimizer, t: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up then cosine decay to zero (or constant)."""
    total = max(1, t.epochs * steps_per_epoch)
    warmup = int(t.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
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
    """The same shuffled order on every rank, then this rank's equal-sized shard."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    per_rank = n // ctx.world_size
    return order[ctx.rank * per_rank : (ctx.rank + 1) * per_rank] if ctx.enabled else order


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, data: ImageSet, splits: DataSplits, device: torch.device, batch_size: int
) -> list[float]:
    """Accuracy of every exit on ``data`` (fractions in [0, 1])."""
    if len(data) == 0:
        return []
    was_training = model.training
    model.eval()
    correct: torch.Tensor | None = None
    for images, labels in iterate_batches(data, batch_size, shuffle=False, device=device):
        logits = model(prepare_batch(images, splits, train=False))
        hits = torch.stack([(z.argmax(-1) == labels).sum() for z in logits])
        correct = hits if correct is None else correct + hits
    model.train(was_training)
    return (correct.float() / len(data)).tolist()


def _autocast(device: torch.device, amp: bool | None):
    enabled = device.type == "cuda" if amp is None else amp
    if not enabled:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def _checkpoint_state(
    job: Job,
    cfg: ExperimentConfig,
    mcfg: ModelConfig,
    splits: DataSplits,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: dict[str, Any],
    aug_gen: torch.Generator,
    extra: dict[str, Any],
) -> dict[str, Any]:
    rng = {"torch": torch.get_rng_state(), "augment": aug_gen.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "name": job.name,
        "role": job.role,
        "method": job.method,
        "model_config": dataclasses.asdict(mcfg),
        "num_classes": splits.num_classes,
        "image_shape": list(splits.image_shape),
        "dataset": splits.name,
        "class_names": list(splits.class_names),
        "mean": list(splits.mean),
        "std": list(splits.std),
        "config": cfg.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng,
        **position,
        **extra,
    }


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
) -> Path:
    """Train ``job`` with ``cfg`` into ``out_dir``; returns the checkpoint path.

    Everything that can be wrong with the inputs (data, teacher, config) is
    checked before the first file is written, so a bad call never replaces a
    good checkpoint.
    """
    out_dir = Path(out_dir)
    ctx, device = D.setup(cfg.device)
    is_teacher = job.role == "teacher"
    mcfg = cfg.teacher if is_teacher else cfg.student
    tcfg = cfg.teacher_train if is_teacher else cfg.student_train
    section = "teacher_train" if is_teacher else "student_train"

    splits = splits or load_splits(cfg)
    teacher = None
    if not is_teacher and job.method != "ce":
        if teacher_checkpoint is None:
            raise ConfigError(f"method {job.method!r} needs a teacher checkpoint (--teacher)")
        teacher = _load_teacher(teacher_checkpoint, splits, device)
    previous = _existing(out_dir, resume, force)
    if previous is not None:
        check_compatible(previous, splits.num_classes, splits.image_shape, "checkpoint to resume")
        if previous.get("name") != job.name:
            raise CheckpointError(
                f"{previous['path']} holds {previous.get('name')}, not {job.name}"
            )

    seed_everything(cfg.seed)
    try:
        model = build_model(num_classes=splits.num_classes, **dataclasses.asdict(mcfg))
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{'teacher' if is_teacher else 'student'}: {exc}") from None
    weights = exit_weights(tcfg, model.num_exits, section)
    mapping: list[int] = []
    if teacher is not None:
        mapping = cfg.distill.exit_mapping or exit_mapping(model.num_exits, teacher.num_exits)
        if len(mapping) != model.num_exits or not all(0 <= m < teacher.num_exits for m in mapping):
            raise ConfigError(
                f"distill.exit_mapping must give one teacher exit in [0, {teacher.num_exits - 1}] "
                f"for each of the student's {model.num_exits} exits, got {mapping}"
            )

    model.to(device)
    memory_format = torch.channels_last if tcfg.channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    optimizer = build_optimizer(model, tcfg)
    n_train = len(splits.train) // ctx.world_size
    steps_per_epoch = n_train // splits_batch(cfg, n_train)
    if tcfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tcfg.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ConfigError(
            f"training set of {len(splits.train)} images is smaller than one batch per process"
        )
    scheduler = build_scheduler(optimizer, tcfg, steps_per_epoch)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + ctx.rank)

    position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "finished": False}
    running = None
    if previous is not None:
        model.load_state_dict(previous["model"])
        optimizer.load_state_dict(previous["optimizer"])
        scheduler.load_state_dict(previous["scheduler"])
        torch.set_rng_state(previous["rng"]["torch"])
        aug_gen.set_state(previous["rng"]["augment"])
        if "cuda" in previous["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(previous["rng"]["cuda"])
        position = {k: previous[k] for k in position}
        running = previous.get("running")
        if position["finished"]:
            if ctx.is_main:
                print(f"{job.name}: already finished in {out_dir}, reusing it")
            return out_dir / "checkpoint.pt"

    train_model = model
    if ctx.enabled:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    forward = torch.compile(train_model) if tcfg.compile else train_model

    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    metrics_path = out_dir / "metrics.jsonl"

    def checkpoint(finished: bool = False) -> None:
        if not ctx.is_main:
            return
        state = _checkpoint_state(
            job, cfg, mcfg, splits, model, optimizer, scheduler,
            {**position, "finished": finished}, aug_gen,
            {"running": running, "exit_weights": weights, "exit_mapping": mapping,
             "teacher_checkpoint": str(teacher_checkpoint) if teacher_checkpoint else None},
        )  # fmt: skip
        save_checkpoint(state, out_dir / "checkpoint.pt")

    batch_size = splits_batch(cfg, n_train)
    total_steps = tcfg.epochs * steps_per_epoch
    bar = tqdm(
        total=total_steps, initial=position["global_step"], desc=job.name,
        disable=not (progress and ctx.is_main), dynamic_ncols=True, leave=True,
    )  # fmt: skip
    model.train()
    try:
        while position["epoch"] < tcfg.epochs:
            epoch = position["epoch"]
            start = time.perf_counter()
            idx = epoch_indices(len(splits.train), cfg.seed, epoch, ctx)
            idx = idx[position["step_in_epoch"] * batch_size : steps_per_epoch * batch_size]
            if running is None:
                running = {"loss_sum": 0.0, "n": 0, "correct": [0] * model.num_exits, "terms": {}}
            batches = iterate_batches(
                splits.train, batch_size, shuffle=False, drop_last=True, device=device, indices=idx
            )
            for images, labels in batches:
                x = prepare_batch(images, splits, train=True, generator=aug_gen)
                x = x.contiguous(memory_format=memory_format)
                with _autocast(device, tcfg.amp):
                    exit_logits = forward(x)
                    if teacher is None and is_teacher:
                        terms = teacher_loss(exit_logits, labels, weights)
                    else:
                        teacher_logits = None
                        if teacher is not None:
                            with torch.inference_mode():
                                teacher_logits = teacher(x)
                            teacher_logits = [z.clone() for z in teacher_logits]
                        d = cfg.distill
                        terms = student_loss(
                            job.method, exit_logits, teacher_logits, labels, weights, mapping,
                            alpha=d.alpha, beta=d.beta, gamma=d.gamma, tau=d.temperature,
                        )  # fmt: skip
                loss = terms["total"]
                bad = D.all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1), ctx)
                if bad.item() > 0:
                    raise TrainingError(
                        f"{job.name}: loss became {loss.item()} at epoch {epoch + 1}, step "
                        f"{position['global_step'] + 1}; the last good checkpoint is kept in {out_dir}. "
                        "Try a lower learning rate."
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()

                with torch.no_grad():
                    hits = [int((z.argmax(-1) == labels).sum()) for z in exit_logits]
                running["n"] += len(labels)
                running["loss_sum"] += float(loss.detach()) * len(labels)
                running["correct"] = [a + b for a, b in zip(running["correct"], hits, strict=True)]
                for k, v in terms.items():
                    if k != "total":
                        running["terms"][k] = running["terms"].get(k, 0.0) + float(v) * len(labels)
                position["step_in_epoch"] += 1
                position["global_step"] += 1
                bar.update(1)
                bar.set_postfix(
                    epoch=f"{epoch + 1}/{tcfg.epochs}",
                    loss=f"{running['loss_sum'] / running['n']:.3f}",
                    acc=f"{running['correct'][-1] / running['n']:.3f}",
                )
                if on_step is not None:
                    on_step(position["global_step"])
                every = tcfg.checkpoint_every_steps
                if (
                    every
                    and position["global_step"] % every == 0
                    and position["step_in_epoch"] < steps_per_epoch
                ):
                    checkpoint()

            record = _epoch_record(job, epoch, running, ctx, time.perf_counter() - start)
            record["lr"] = scheduler.get_last_lr()[0]
            record["val_exit_accuracy"] = evaluate_accuracy(
                model, splits.val, splits, device, cfg.data.eval_batch_size
            )
            position["epoch"] += 1
            position["step_in_epoch"] = 0
            running = None
            if ctx.is_main:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            checkpoint(finished=position["epoch"] >= tcfg.epochs)
    except torch.OutOfMemoryError:
        raise TrainingError(
            f"{job.name}: out of memory on {device} with batch size {batch_size}; "
            "try a smaller data.batch_size"
        ) from None
    finally:
        bar.close()
    D.barrier(ctx)
    return out_dir / "checkpoint.pt"


def splits_batch(cfg: ExperimentConfig, n_train: int) -> int:
    """Per-process batch size, shrunk for training sets smaller than one batch."""
    return max(1, min(cfg.data.batch_size, n_train))


def _epoch_record(job: Job, epoch: int, running: dict, ctx: D.DistContext, seconds: float) -> dict:
    """Epoch metrics summed over ranks: mean loss and terms, train accuracy per exit."""
    keys = sorted(running["terms"])
    flat = torch.tensor(
        [
            running["n"],
            running["loss_sum"],
            *running["correct"],
            *(running["terms"][k] for k in keys),
        ],
        dtype=torch.float64,
    )
    flat = D.all_reduce_sum(flat, ctx).tolist()
    n, loss_sum = flat[0], flat[1]
    num_exits = len(running["correct"])
    correct = flat[2 : 2 + num_exits]
    terms = flat[2 + num_exits :]
    return {
        "model": job.name,
        "epoch": epoch + 1,
        "train_loss": loss_sum / max(n, 1),
        "train_exit_accuracy": [c / max(n, 1) for c in correct],
        "terms": {k: v / max(n, 1) for k, v in zip(keys, terms, strict=True)},
        "images": int(n),
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else None,
    }
