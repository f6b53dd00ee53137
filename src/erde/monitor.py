"""Per-epoch callbacks for :func:`erde.training.train`: a console line and TensorBoard files.

Both read the metrics record an epoch ends with (the line written to
metrics.jsonl), so they show exactly what metrics.jsonl holds:

    {"model", "epoch", "train_loss", "train_exit_accuracy": [E], "val_exit_accuracy": [E],
     "terms": {"ce_0", ..., "kl_0", "entropy_0", "teacher_correct_0", ...}, "lr",
     "images", "seconds", "images_per_second", "epochs", "seconds_per_step",
     "steady_seconds_per_step", "eta_seconds"}

TensorBoard is optional (``pip install "erde[tb]"``) and imported only when asked for.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from erde.errors import ErdeError

# what erde.training calls after each epoch of each model on rank 0:
# (the model's output folder, its epoch metrics record)
EpochCallback = Callable[[Path, dict[str, Any]], None]

TENSORBOARD_DIR = "tensorboard"  # event files: <model folder>/tensorboard, beside metrics.jsonl

# loss term -> TensorBoard tag prefix; per-exit terms are named "<term>_<exit>" by erde.losses
TERM_TAGS = {
    "ce": "loss/ce",
    "kl": "erde/kl_teacher_correct",
    "entropy": "erde/entropy_teacher_wrong",
    "teacher_correct": "erde/teacher_correct_share",
    "teacher_trusted": "erde/teacher_trusted_share",
}
KD_TERM_TAGS = {"kl": "loss/kl"}  # kd students: KL on every image, no mask


def _pct(values: Sequence[float]) -> str:
    return "/".join(f"{100 * v:.1f}" for v in values)


def epoch_line(record: Mapping[str, Any], epochs: int | None = None) -> str:
    """One line per epoch for logs without progress bars.

    >>> epoch_line({"model": "teacher", "epoch": 3, "train_loss": 0.41234,
    ...             "train_exit_accuracy": [0.9, 0.95], "val_exit_accuracy": [0.88, 0.97],
    ...             "seconds": 1.25}, epochs=40)
    'teacher: epoch 3/40  loss 0.412  train acc 90.0/95.0 %  val acc 88.0/97.0 %  1.2 s'

    A record written by training also holds ``epochs`` and ``eta_seconds`` (the
    time per step of this process times the steps left), shown as an estimate:

    >>> epoch_line({"model": "teacher", "epoch": 5, "epochs": 40, "train_loss": 1.0,
    ...             "train_exit_accuracy": [0.5], "seconds": 400.0, "eta_seconds": 14000})
    'teacher: epoch 5/40  loss 1.000  train acc 50.0 %  400.0 s  about 3.9 h left'
    """
    epochs = epochs or record.get("epochs")
    total = f"/{epochs}" if epochs else ""
    val = record.get("val_exit_accuracy") or []
    eta = record.get("eta_seconds")
    return (
        f"{record['model']}: epoch {record['epoch']}{total}  loss {record['train_loss']:.3f}  "
        f"train acc {_pct(record['train_exit_accuracy'])} %"
        + (f"  val acc {_pct(val)} %" if val else "")
        + f"  {record['seconds']:.1f} s"
        + (f"  about {duration(eta)} left" if eta else "")
    )


RECENT_EPOCHS = 10  # epochs behind a time estimate: a few disturbed ones do not move the median


def recent_seconds_per_step(
    records: Sequence[Mapping[str, Any]], window: int = RECENT_EPOCHS
) -> float | None:
    """Median seconds per step over the last ``window`` timed epoch records, or None.

    Each epoch counts with its steady time per step (the median over blocks of
    steps, which a stall in the epoch does not move; see
    ``erde.training.meters.BlockTimer``), else its wall time per step. An epoch that
    shared the CPU with other work, or was stopped for a while, would put an
    estimate made from its wall time alone hours off; the median of the recent
    epochs is not moved by one of them.

    >>> recent_seconds_per_step([{"seconds_per_step": 1.0}, {"seconds_per_step": 9.0},
    ...                          {"seconds_per_step": 1.2}, {"epoch": 4}])
    1.2
    >>> recent_seconds_per_step([{"seconds_per_step": 9.0, "steady_seconds_per_step": 1.1}])
    1.1
    """
    values = [
        float(r.get("steady_seconds_per_step") or r["seconds_per_step"])
        for r in records
        if r.get("steady_seconds_per_step") or r.get("seconds_per_step")
    ]
    return statistics.median(values[-window:]) if values else None


def duration(seconds: float) -> str:
    """A rough human duration for an estimate: ``45 s``, ``12 min``, ``3.4 h``.

    >>> duration(45.2), duration(725), duration(12345)
    ('45 s', '12 min', '3.4 h')
    """
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """TensorBoard tag -> value for one epoch record.

    Per-exit values get one tag per exit (``.../exit_<i>``) so TensorBoard
    draws the exits of a model on one chart. ERDE students add the three
    quantities of the method: the KL term on the images the teacher's exit gets
    right, the entropy term on those it gets wrong, and the share of images the
    teacher's exit gets right.
    """
    out: dict[str, float] = {"loss/total": float(record["train_loss"])}
    for i, acc in enumerate(record.get("train_exit_accuracy") or []):
        out[f"accuracy/train/exit_{i}"] = float(acc)
    for i, acc in enumerate(record.get("val_exit_accuracy") or []):
        out[f"accuracy/val/exit_{i}"] = float(acc)
    terms = record.get("terms") or {}
    kd = str(record.get("model", "")).endswith("_kd")
    for name, value in terms.items():
        term, _, exit_index = name.rpartition("_")
        if not exit_index.isdigit():
            out[f"terms/{name}"] = float(value)
            continue
        prefix = (KD_TERM_TAGS.get(term) if kd else None) or TERM_TAGS.get(term, f"loss/{term}")
        out[f"{prefix}/exit_{exit_index}"] = float(value)
    if record.get("lr") is not None:
        out["schedule/lr"] = float(record["lr"])
    if record.get("images_per_second"):
        out["speed/images_per_second"] = float(record["images_per_second"])
    return out


def _summary_writer_class() -> Any:
    """torch's SummaryWriter, or one clear error when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ErdeError(
            'TensorBoard logging needs the tensorboard package: pip install "erde[tb]"'
        ) from None
    return SummaryWriter


class TensorBoardLogger:
    """An ``on_epoch`` callback writing event files to ``<model folder>/tensorboard``.

    One writer per model folder, so ``erde run`` gives one TensorBoard run per
    model (``tensorboard --logdir runs/digits`` shows all four). The global
    step is the epoch. Creating the logger checks that tensorboard is
    installed, so a missing package fails before any training starts.
    """

    def __init__(self) -> None:
        self._writer_class = _summary_writer_class()
        self._writers: dict[Path, Any] = {}

    def __call__(self, out_dir: Path, record: Mapping[str, Any]) -> None:
        out_dir = Path(out_dir)
        writer = self._writers.get(out_dir)
        if writer is None:
            writer = self._writers[out_dir] = self._writer_class(str(out_dir / TENSORBOARD_DIR))
        for tag, value in scalars(record).items():
            writer.add_scalar(tag, value, global_step=int(record["epoch"]))
        writer.flush()

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def combine(*callbacks: EpochCallback | None) -> EpochCallback | None:
    """One callback calling each given one in turn (None when none is given)."""
    active = [c for c in callbacks if c is not None]
    if not active:
        return None

    def call(out_dir: Path, record: dict[str, Any]) -> None:
        for callback in active:
            callback(out_dir, record)

    return call
