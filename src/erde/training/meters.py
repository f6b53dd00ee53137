"""What the loop measures while it trains: epoch sums, non-finite losses, step times, accuracy.

Everything here accumulates on the training device and is read by the host
only every ``SYNC_EVERY`` steps (:mod:`erde.training.model_run`) or at the end
of an epoch, so measuring never makes the host wait for a GPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from erde import distributed as D
from erde.data import DataSplits, ImageSet, iterate_batches, prepare_batch
from erde.training.jobs import Job


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


COLLAPSE_MARGIN = 0.03  # an exit within this of chance is "at chance"
LEARNED_MARGIN = 0.1  # ... after having been at least this far above it


def collapsed_exits(
    history: list[dict[str, Any]], record: dict[str, Any], num_classes: int
) -> list[int]:
    """Exits whose training accuracy fell back to chance after having learned something.

    An exit is collapsed in ``record`` (this epoch's metrics) when its train
    accuracy is within ``COLLAPSE_MARGIN`` of chance (1 / ``num_classes``) while an
    earlier epoch of ``history`` had it at least ``LEARNED_MARGIN`` above. The loss
    stays finite when this happens (a distillation term can dominate at a high
    learning rate and the last layer settles on one class), so nothing else stops
    the run or says so.
    """
    chance = 1.0 / max(num_classes, 1)
    now = record.get("train_exit_accuracy") or []
    out = []
    for k, acc in enumerate(now):
        best = max(
            (
                r["train_exit_accuracy"][k]
                for r in history
                if len(r.get("train_exit_accuracy") or []) > k
            ),
            default=0.0,
        )
        if acc <= chance + COLLAPSE_MARGIN and best >= chance + LEARNED_MARGIN:
            out.append(k)
    return out


def collapse_warning(
    name: str, record: dict[str, Any], history: list[dict[str, Any]], exits: list[int]
) -> str:
    """One warning line for exits that have just collapsed (:func:`collapsed_exits`)."""
    acc = record["train_exit_accuracy"]
    best = [max(r["train_exit_accuracy"][k] for r in history) for k in exits]
    which = ", ".join(
        f"exit {k} ({100 * acc[k]:.1f} %, {100 * b:.1f} % at best before)"
        for k, b in zip(exits, best, strict=True)
    )
    return (
        f"warning: {name}: {which} fell to chance train accuracy in epoch {record['epoch']}; "
        "the run goes on, but such an exit rarely recovers. A lower learning rate, or when "
        "distilling a lower distill.beta or distill.temperature, usually keeps it learning"
    )


class BlockTimer:
    """Seconds per step of an epoch, measured over blocks of steps that end in a host sync.

    The wall time of a whole epoch counts every stall in it: a process stopped
    for an hour, a laptop asleep, another job on the same cores. Timed between
    the loop's host syncs (every ``SYNC_EVERY`` steps, when the device has
    finished the block's work, on CPU and GPU alike), the median block says
    what a step costs when the run goes on, whatever happened to a few blocks.
    """

    def __init__(self, step: int, clock: Callable[[], float] | None = None) -> None:
        self.clock = clock if clock is not None else time.perf_counter  # looked up per timer
        self.start, self.step = self.clock(), step
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


def epoch_record(
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
