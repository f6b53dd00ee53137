"""Training curves: validation accuracy per exit over the epochs, from metrics.jsonl, as a PNG.

A long run is judged by its curves before its numbers: has the teacher
converged, does an early exit lag the others, did a resume or a learning-rate
change leave a step? Every model folder holds ``metrics.jsonl``, one record
per finished epoch (see :mod:`erde.monitor` for its fields); this module reads
those records back (bounded: the file may come from anywhere), reduces them
to a curve, averages curves over seeds, and draws one panel per model.

A curve is a plain dict, so that it can be stored in a results JSON as is::

    {"epoch": [N], "val_exit_accuracy": [N][E], "train_loss": [N],
     "val_exit_accuracy_std": [N][E]  # only for a mean over seeds
     "runs": k}                       # how many runs were averaged
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from erde.errors import ErdeError
from erde.report.styles import STYLES, model_label

METRICS = "metrics.jsonl"
MAX_METRICS_BYTES = 32 * 2**20  # ~1 KB per epoch record: far beyond any real run
MAX_EPOCHS = 100_000


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    """The epoch records of ``folder/metrics.jsonl`` in epoch order ([] if there is none yet).

    Training rewrites the file from its checkpoint's history, so it has one
    line per finished epoch; should a line repeat an epoch, the later one wins.
    A file too large or not JSON lines raises :class:`ErdeError` naming it.
    """
    path = Path(folder) / METRICS
    try:
        with path.open("rb") as f:
            data = f.read(MAX_METRICS_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ErdeError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if len(data) > MAX_METRICS_BYTES:
        raise ErdeError(f"{path}: larger than {MAX_METRICS_BYTES // 2**20} MiB, not a metrics file")
    by_epoch: dict[int, dict[str, Any]] = {}
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: nesting crafted to exhaust the stack
            raise ErdeError(f"{path}: line {number} is not JSON") from None
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if not isinstance(epoch, int) or isinstance(epoch, bool) or not 0 < epoch <= MAX_EPOCHS:
            raise ErdeError(f"{path}: line {number} has no epoch number in [1, {MAX_EPOCHS}]")
        by_epoch[epoch] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def _numbers(values: Any) -> list[float] | None:
    """``values`` as finite floats, or None when it is not a list of numbers."""
    if not isinstance(values, list) or not values:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return None
    out = [float(v) for v in values]
    return out if all(math.isfinite(v) for v in out) else None


def curve_of(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The curve of one model: its epochs with a validation accuracy per exit.

    Epochs without a validation measurement (no validation split) are left
    out; so is any whose exit count differs from the first one's.

    >>> c = curve_of([{"epoch": 1, "train_loss": 2.0, "val_exit_accuracy": [0.4, 0.5]},
    ...               {"epoch": 2, "train_loss": 1.5, "val_exit_accuracy": [0.5, 0.7]}])
    >>> c["epoch"], c["val_exit_accuracy"][-1], c["train_loss"]
    ([1, 2], [0.5, 0.7], [2.0, 1.5])
    """
    epochs, accuracy, loss = [], [], []
    for record in records:
        acc = _numbers(record.get("val_exit_accuracy"))
        if acc is None or (accuracy and len(acc) != len(accuracy[0])):
            continue
        epochs.append(int(record["epoch"]))
        accuracy.append(acc)
        value = record.get("train_loss")
        ok = isinstance(value, (int, float)) and math.isfinite(value)
        loss.append(float(value) if ok else math.nan)
    return {"epoch": epochs, "val_exit_accuracy": accuracy, "train_loss": loss, "runs": 1}


def mean_curve(curves: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Mean and sample std over runs (seeds) of the epochs every run reached.

    Runs with different exit counts are not averaged (None).
    """
    curves = [c for c in curves if c["epoch"]]
    if not curves:
        return None
    exits = {len(c["val_exit_accuracy"][0]) for c in curves}
    if len(exits) != 1:
        return None
    common = sorted(set.intersection(*(set(c["epoch"]) for c in curves)))
    pairs = [(c, {e: i for i, e in enumerate(c["epoch"])}) for c in curves]
    accuracy, spread, loss = [], [], []
    for epoch in common:
        per_run = [c["val_exit_accuracy"][row[epoch]] for c, row in pairs]
        columns = list(zip(*per_run, strict=True))
        accuracy.append([statistics.fmean(col) for col in columns])
        spread.append([statistics.stdev(col) if len(col) > 1 else 0.0 for col in columns])
        loss.append(statistics.fmean(c["train_loss"][row[epoch]] for c, row in pairs))
    return {
        "epoch": common,
        "val_exit_accuracy": accuracy,
        "val_exit_accuracy_std": spread,
        "train_loss": loss,
        "runs": len(curves),
    }


def _panel(ax: Any, name: str, curve: Mapping[str, Any], colours: Any) -> None:
    """One model: a line per exit (the last one thick), a ±1 std band over seeds."""
    from matplotlib.ticker import MaxNLocator

    epochs = curve["epoch"]
    accuracy = curve["val_exit_accuracy"]
    spread = curve.get("val_exit_accuracy_std")
    exits = len(accuracy[0])
    for k in range(exits):
        ys = [100 * row[k] for row in accuracy]
        colour = colours(k / max(exits - 1, 1))
        last = k == exits - 1
        marker = "o" if len(epochs) < 25 else None
        width = 2.0 if last else 1.2
        ax.plot(epochs, ys, color=colour, lw=width, marker=marker, ms=3, label=f"exit {k}")
        if spread and curve.get("runs", 1) > 1:
            sd = [100 * row[k] for row in spread]
            low = [y - s for y, s in zip(ys, sd, strict=True)]
            high = [y + s for y, s in zip(ys, sd, strict=True)]
            ax.fill_between(epochs, low, high, color=colour, alpha=0.15, linewidth=0)
    final = 100 * accuracy[-1][-1]
    seeds = f", mean of {curve['runs']} seeds" if curve.get("runs", 1) > 1 else ""
    colour = STYLES.get(Path(name).name, ("", "black"))[1]
    title = f"{model_label(name)}: last exit {final:.1f} % at epoch {epochs[-1]}{seeds}"
    ax.set_title(title, fontsize=9, color=colour)
    ax.set_xlabel("Epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)  # a one-epoch run gets one tick, not 0.945
    ax.set_ylabel("Validation accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def curves_figure(
    curves: Mapping[str, Mapping[str, Any] | None], title: str | None = None, dpi: int = 110
) -> Any:
    """One panel per model (``{name: curve}``): validation accuracy per exit over the epochs.

    Models without a measured epoch are left out; with none at all,
    :class:`ErdeError` (there is nothing to draw yet). Returns a matplotlib
    ``Figure`` on an Agg canvas (no pyplot, no global backend change).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    shown = {name: c for name, c in curves.items() if c and c["epoch"]}
    if not shown:
        raise ErdeError("no finished epoch with a validation accuracy to plot yet")
    cols = min(len(shown), 2)
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(5.2 * cols, 3.6 * rows + (0.4 if title else 0)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    colours = colormaps["viridis"]
    for ax, (name, curve) in zip(axes.flat, shown.items(), strict=False):  # spare panels hidden
        _panel(ax, name, curve, lambda t: colours(0.85 * t))
    for ax in list(axes.flat)[len(shown) :]:
        ax.set_visible(False)
    for ax in axes[:, 1:].flat:  # the shared accuracy axis is labelled once per row
        ax.set_ylabel("")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def render_curves_png(
    curves: Mapping[str, Mapping[str, Any] | None], title: str | None = None, dpi: int = 110
) -> bytes:
    """:func:`curves_figure` as PNG bytes."""
    from io import BytesIO

    buffer = BytesIO()
    curves_figure(curves, title, dpi).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def folder_curves(folders: Mapping[str, str | Path]) -> dict[str, dict[str, Any]]:
    """``{name: curve}`` of model folders (``{name: folder}``), read with :func:`read_metrics`.

    For reports, where the curves are an extra: a folder whose metrics are
    missing or unreadable gets an empty curve instead of stopping the report.
    """
    out = {}
    for name, folder in folders.items():
        try:
            out[name] = curve_of(read_metrics(folder))
        except ErdeError:
            out[name] = curve_of([])
    return out


__all__ = [
    "curve_of",
    "curves_figure",
    "folder_curves",
    "mean_curve",
    "read_metrics",
    "render_curves_png",
]
