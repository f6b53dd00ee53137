"""One model being trained: its step, its end of epoch, its checkpoint.

:class:`ModelRun` holds the model, optimiser, schedule, precision scaler,
look-ahead weights, its own dropout RNG stream and its position (epoch, step).
The loop (:mod:`erde.training.loop`) calls :meth:`ModelRun.step` with each
batch and :meth:`ModelRun.after_step` after it; everything else happens from
there: host reads every ``SYNC_EVERY`` steps, mid-epoch checkpoints, and at the
end of an epoch validation, metrics.jsonl and the checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from erde import distributed as D
from erde.checkpoints import save_checkpoint
from erde.errors import CheckpointError, TrainingError
from erde.io import atomic_write_text
from erde.monitor import recent_seconds_per_step
from erde.recipe import Lookahead
from erde.training.context import TrainingContext
from erde.training.jobs import Job, LossFn, needs_teacher
from erde.training.meters import (
    BlockTimer,
    EpochSums,
    NonFiniteWatch,
    collapse_warning,
    collapsed_exits,
    epoch_record,
    evaluate_accuracy,
)
from erde.training.optim import build_optimizer, build_scheduler
from erde.training.precision import autocast, memory_format_for, memory_format_name, precision_name
from erde.training.resume import rng_state, set_rng_state

SYNC_EVERY = 20  # optimizer steps between host reads of the running metrics


class ModelRun:
    """The state of one model being trained and the few things done with it.

    ``model`` is the bare module (what is saved); ``forward`` is what batches go
    through: the same module wrapped in DistributedDataParallel and/or compiled.
    ``rng`` is the model's own global-RNG stream (dropout), swapped in around
    its steps, so models trained side by side draw what they would draw alone.
    """

    def __init__(
        self,
        *,
        shared: TrainingContext,
        job: Job,
        out_dir: Path,
        model: nn.Module,
        loss_fn: LossFn,
        extra: dict[str, Any],
    ) -> None:
        self.shared, self.job, self.out_dir, self.loss_fn, self.extra = (
            shared, job, out_dir, loss_fn, extra
        )  # fmt: skip
        self.cfg = job.config(shared.cfg)  # a student's own distill settings
        self.tcfg, self.ctx, self.device = shared.tcfg, shared.ctx, shared.device
        self.needs_teacher = needs_teacher(job)
        self.rng = rng_state(shared.device)  # taken right after the model was built from the seed
        self.memory_format = memory_format_for(
            shared.memory_format, shared.device, model, job.name, say=shared.ctx.is_main
        )
        self.model = model.to(shared.device, memory_format=self.memory_format)
        self.optimizer = build_optimizer(self.model, self.tcfg)
        self.scheduler = build_scheduler(self.optimizer, self.tcfg, shared.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(
            shared.device.type, enabled=shared.amp_dtype == torch.float16
        )
        self.lookahead = Lookahead(self.model, shared.total_steps) if self.tcfg.lookahead else None
        forward: nn.Module = self.model
        if self.ctx.enabled:
            device_ids = [shared.device.index] if shared.device.type == "cuda" else None
            forward = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.forward = torch.compile(forward) if self.tcfg.compile else forward
        self.position = {"epoch": 0, "step_in_epoch": 0, "global_step": 0}
        self.checkpointed = False  # whether out_dir holds a checkpoint of this run to resume
        self.sums = EpochSums(shared.device)
        self.watch = NonFiniteWatch(shared.device)
        self.history: list[dict[str, Any]] = []  # one metrics record per finished epoch
        self.epoch_start = time.perf_counter()
        self.epoch_start_step = self.position["global_step"]
        self.blocks = BlockTimer(self.position["global_step"])

    # --- checkpoints ----------------------------------------------------------------------

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Continue exactly where ``ckpt`` stopped; a damaged training state is one clear error."""
        try:
            self.load_state(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc).splitlines()[0][:200]
            raise CheckpointError(
                f"{ckpt['path']} cannot be resumed: its training state is damaged ({what}); "
                "pass --force to start over"
            ) from None

    def load_state(self, ckpt: dict[str, Any]) -> None:
        """Weights, optimizer, schedule, scaler, look-ahead, RNG and position from ``ckpt``."""
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
        splits = self.shared.splits
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
            "steps_per_epoch": self.shared.steps_per_epoch,
            # this epoch's steady time per step so far: `erde status` estimates the time left
            # from it before the first epoch's record exists (None before the first block)
            "steady_seconds_per_step": self.blocks.steady(),
            "batch_size": self.shared.batch_size,
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
        set_rng_state(self.rng, self.device)
        with autocast(self.device, self.shared.amp_dtype):
            exit_logits = self.forward(x)
            terms = self.loss_fn(exit_logits, teacher_logits, labels)
        self.rng = rng_state(self.device)
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

    def after_step(self) -> bool:
        """Mid-epoch checkpoints and finite checks, then the end of the epoch when it comes.

        Returns whether the host read the device this step (its running sums are current).
        """
        p = self.position
        every = self.tcfg.checkpoint_every_steps
        if p["step_in_epoch"] >= self.shared.steps_per_epoch:
            self.check_finite()
            self.end_epoch()
        elif every and p["global_step"] % every == 0:
            self.check_finite()
            self.save()
            self.blocks.mark(p["global_step"])
        elif p["global_step"] % SYNC_EVERY == 0:
            self.check_finite()
            self.blocks.mark(p["global_step"])
        else:
            return False
        return True

    def check_finite(self) -> None:
        """Stop on a nan/inf loss before anything is saved from the weights it spoilt."""
        bad = self.watch.first_bad_step(self.ctx)
        if bad is not None:
            epoch = (bad - 1) // self.shared.steps_per_epoch + 1
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
        steps = self.shared.steps_per_epoch
        record = epoch_record(self.job, self.position["epoch"], totals, seconds, steps, timed)
        record["steady_seconds_per_step"] = self.blocks.steady()
        record["precision"] = precision_name(self.shared.amp_dtype)
        record["memory_format"] = memory_format_name(self.memory_format)
        record["lr"] = self.scheduler.get_last_lr()[0]
        record["epochs"] = self.tcfg.epochs
        left = self.shared.total_steps - self.position["global_step"]
        per_step = recent_seconds_per_step(
            [*self.history, record]
        )  # one slow epoch moves it little
        record["eta_seconds"] = per_step * left if per_step is not None else None
        record["val_exit_accuracy"] = evaluate_accuracy(
            self.model, self.shared.val_set, self.shared.splits, self.device,
            self.cfg.data.eval_batch_size, self.ctx,
        )  # fmt: skip
        record["collapsed_exits"] = collapsed_exits(
            self.history, record, self.shared.splits.num_classes
        )
        before = (self.history[-1].get("collapsed_exits") or []) if self.history else []
        fresh = [k for k in record["collapsed_exits"] if k not in before]
        warning = collapse_warning(self.job.name, record, self.history, fresh) if fresh else None
        self.history.append(record)
        self.position["epoch"] += 1
        self.position["step_in_epoch"] = 0
        self.sums = EpochSums(self.device)
        self.save(finished=self.position["epoch"] >= self.tcfg.epochs)
        self.write_metrics()
        if self.shared.on_epoch is not None and self.ctx.is_main:
            self.shared.on_epoch(self.out_dir, record)
        if warning and self.ctx.is_main:  # after the epoch's own line
            print(warning, flush=True)
        self.epoch_start = time.perf_counter()
        self.epoch_start_step = self.position["global_step"]
        self.blocks = BlockTimer(self.position["global_step"])  # validation is not a step
