"""The report's figures: accuracy against MACs, and reliability diagrams per exit."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from erde import io
from erde.report.build import rule_of
from erde.report.styles import curve_style, model_label

LOG_TICKS = (1.0, 2.0, 5.0)  # labelled ticks per decade on a log MAC axis: 1, 2, 5, 10, 20 ...


def mac_unit(models: Mapping[str, Mapping[str, Any]]) -> tuple[float, str]:
    """Scale and unit for the MAC axis from the largest MAC count shown."""
    largest = max(max(m["macs_per_exit"]) for m in models.values())
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if largest >= scale:
            return scale, unit
    return 1.0, ""


def _plain_number(value: float, _position: Any = None) -> str:
    """Tick text without exponents: 0.5, 2, 10, 200."""
    return f"{value:g}"


def use_log_macs(ax: Any, macs: Sequence[float]) -> None:
    """Log MAC axis when models differ by 10x or more, so small students do not collapse.

    Ticks at 1, 2 and 5 of every decade, written as plain numbers: with
    matplotlib's default a 0.3-10 M axis is labelled only at 10^0 and 10^1 and
    no student's cost can be read off it.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [m for m in macs if m > 0]
    if positive and max(positive) >= 10 * min(positive):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=LOG_TICKS))
        ax.xaxis.set_major_formatter(FuncFormatter(_plain_number))
        ax.xaxis.set_minor_formatter(NullFormatter())


def _draw(ax: Any, report: Mapping[str, Any], rule: str) -> None:
    """Curves (one per model), per-exit hollow markers and the reference line."""
    models = report["models"]
    scale, unit = mac_unit(models)
    for index, (name, model) in enumerate(models.items()):
        label, colour, line, marker = curve_style(name, index)
        points = sorted(
            (p for p in model["sweep"] if p["rule"] == rule), key=lambda p: p["mean_macs"]
        )
        xs = [p["mean_macs"] / scale for p in points]
        ys = [100 * p["accuracy"] for p in points]
        ax.plot(xs, ys, linestyle=line, marker=marker, color=colour, markersize=4, label=label)
        ax.scatter(
            [m / scale for m in model["macs_per_exit"]],
            [100 * a for a in model["exit_accuracy"]],
            s=70,
            marker=marker,
            facecolors="none",
            edgecolors=colour,
            linewidths=1.3,
            label=f"{label}: single exits",
        )
    ref = report["reference"]
    ax.axhline(
        100 * (ref["accuracy"] - ref["tolerance"]),
        color="gray",
        linestyle="--",
        linewidth=1,
        label=f"{model_label(ref['model'])} last exit − {100 * ref['tolerance']:.2g} pts",
    )
    ax.set_xlabel(f"Mean MACs per image ({unit}MACs)" if unit else "Mean MACs per image")
    ax.set_ylabel("Accuracy (%)")
    use_log_macs(ax, [m for model in models.values() for m in model["macs_per_exit"]])


def render_tradeoff_png(
    report: Mapping[str, Any], rule: str | None = None, dpi: int = 120
) -> bytes:
    """The accuracy-vs-MACs plot as PNG bytes (no pyplot, no global backend change)."""
    rule = rule_of(report, rule)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw(ax, report, rule)
    name = (report.get("dataset") or {}).get("name")
    ax.set_title(f"Accuracy vs MACs{' on ' + name if name else ''} ({rule} rule)")
    return figure_png(fig, ax, dpi)


def png_bytes(fig: Any, dpi: int) -> bytes:
    """A matplotlib Figure rendered to PNG bytes (every figure erde writes goes through here)."""
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def figure_png(fig: Any, ax: Any, dpi: int) -> bytes:
    """Grid, legend and layout shared by every trade-off plot, rendered to PNG bytes."""
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return png_bytes(fig, dpi)


def render_reliability_png(report: Mapping[str, Any], dpi: int = 110) -> bytes:
    """:func:`reliability_figure` as PNG bytes."""
    return png_bytes(reliability_figure(report, dpi), dpi)


def reliability_figure(report: Mapping[str, Any], dpi: int = 110) -> Any:
    """Reliability diagrams, one panel per model: each exit's accuracy against its confidence.

    Per exit, the images binned by max softmax probability (``exit_reliability``);
    points on the diagonal are calibrated, below it over-confident, which is
    where the entropy rule lets wrong answers leave early.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = report["models"]
    cols = min(len(models), 2)
    rows = math.ceil(len(models) / cols)
    fig = Figure(figsize=(5.0 * cols, 4.2 * rows), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    colours = colormaps["viridis"]
    for ax, (name, model) in zip(axes.flat, models.items(), strict=False):  # spare: hidden
        exits = model["exit_reliability"]
        ax.plot([0, 100], [0, 100], color="gray", linestyle="--", linewidth=1)
        for e, r in enumerate(exits):
            colour = colours(0.85 * e / max(len(exits) - 1, 1))
            _draw_reliability_exit(ax, r, e, colour, last=e == len(exits) - 1)
        ece = model.get("exit_ece")
        extra = f": ECE {' / '.join(f'{100 * v:.1f}' for v in ece)} %" if ece else ""
        ax.set_title(f"{model_label(name)}{extra}", fontsize=9, color=curve_style(name, 0)[1])
        ax.set(xlim=(0, 100), ylim=(0, 100), xlabel="Confidence: max softmax probability (%)",
               ylabel="Accuracy (%)")  # fmt: skip
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    for ax in list(axes.flat)[len(models) :]:
        ax.set_visible(False)
    fig.suptitle(
        "Reliability per exit (below the diagonal: over-confident). Faded: bins of under "
        f"{MIN_BIN_IMAGES} images, too few to judge; numbers: images per bin of the last exit",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


MIN_BIN_IMAGES = 10  # a reliability bin of fewer images says little: drawn faded, off the line


def reliability_bins(r: Mapping[str, Any]) -> tuple[list[tuple], list[tuple]]:
    """(well filled, sparse) bins of one exit as (confidence, accuracy, count), empty bins left out."""
    filled = [
        (c, a, k)
        for c, a, k in zip(r["confidence"], r["accuracy"], r["count"], strict=True)
        if c is not None and k
    ]
    return [b for b in filled if b[2] >= MIN_BIN_IMAGES], [
        b for b in filled if b[2] < MIN_BIN_IMAGES
    ]


def _draw_reliability_exit(ax: Any, r: Mapping[str, Any], e: int, colour: Any, last: bool) -> None:
    """One exit's curve through its well-filled bins, its sparse bins as faded markers, and
    (last exit) each bin's image count beside its marker."""
    kept, sparse = reliability_bins(r)
    ax.plot([100 * c for c, _, _ in kept], [100 * a for _, a, _ in kept], marker="o",
            markersize=3, color=colour, linewidth=2.0 if last else 1.2, label=f"exit {e}")  # fmt: skip
    if sparse:
        ax.scatter([100 * c for c, _, _ in sparse], [100 * a for _, a, _ in sparse], s=12,
                   color=colour, alpha=0.25)  # fmt: skip
    if last:
        for c, a, k in kept + sparse:
            ax.annotate(str(k), (100 * c, 100 * a), textcoords="offset points", xytext=(3, -8),
                        fontsize=6, color="0.2" if k >= MIN_BIN_IMAGES else "0.6")  # fmt: skip


def plot_tradeoff(report: Mapping[str, Any], path: str | Path, rule: str | None = None) -> None:
    """Write the accuracy-vs-MACs plot to ``path`` atomically (rendered in memory first)."""
    io.atomic_write_bytes(path, render_tradeoff_png(report, rule))
