"""The block's central picture: each student's paired accuracy difference against KD.

The trade-off plot (``tradeoff.png``) draws whole curves, on which a difference of half a point
is a line's width; the question a block answers is whether that difference is there at all.
This figure draws, per threshold of the results table, the mean paired difference against the
baseline (KD) with its 95 % interval, at the same threshold (left) and at equal MACs (middle):
an interval that crosses zero is a difference the seeds do not show. Blocks with the
whole-curve comparison (:mod:`erde.reproduce.tradeoff`) add a third panel: the difference at
equal MACs all along the MAC axis, with its 95 % band, and the one-test number in the legend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from erde.report import curve_style, model_label
from erde.report.plots import png_bytes
from erde.reproduce.stats import PAIRS
from erde.reproduce.tradeoff import whole_curve_of

OFF_SCALE = 0.05  # a student this far from the baseline anywhere (5 points) is named, not drawn
MAX_BANDS = 3  # more students than this: their bands along the MAC axis would hide each other
_PANELS = (
    ("accuracy_diff_mean", "ci95_low", "ci95_high", "at the same threshold"),
    ("equal_macs_diff_mean", "equal_macs_ci95_low", "equal_macs_ci95_high", "at equal MACs"),
)


def against_baseline(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The comparisons of ``results`` against the baseline of the headline pair (KD)."""
    baseline = PAIRS[0][1]
    return [c for c in results.get("comparisons") or [] if c["other"] == baseline]


def _value(point: Mapping[str, Any], key: str) -> float | None:
    """A per-threshold value; blocks published before the paired equal-MACs difference have
    only the difference on the mean curves (``accuracy_diff_at_equal_macs``)."""
    value = point.get(key)
    if value is None and key == "equal_macs_diff_mean":
        value = point.get("accuracy_diff_at_equal_macs")
    return value


def _split(
    comparisons: Sequence[Mapping[str, Any]],
) -> tuple[list[Mapping[str, Any]], list[str]]:
    """Comparisons to draw, and a note for each one too far off to share the axis."""
    drawn, notes = [], []
    for comp in comparisons:
        diffs = [
            v for p in comp["per_threshold"] for key, *_ in _PANELS
            if (v := _value(p, key)) is not None
        ]  # fmt: skip
        worst = max(diffs, key=abs, default=0.0)
        if abs(worst) > OFF_SCALE:
            notes.append(f"{model_label(comp['model'])} ({100 * worst:+.1f} points at worst)")
        else:
            drawn.append(comp)
    return drawn, notes


def render_difference_png(results: Mapping[str, Any], dpi: int = 120) -> bytes | None:
    """:func:`difference_figure` as PNG bytes (``None`` without a comparison against KD)."""
    fig = difference_figure(results, dpi)
    return None if fig is None else png_bytes(fig, dpi)


def difference_figure(results: Mapping[str, Any], dpi: int = 120) -> Any | None:
    """Every student's paired difference against KD per threshold (points, mean and 95 %
    interval over seeds; the interval needs two seeds): a matplotlib Figure with two axes
    (same threshold, equal MACs), or ``None`` when the block has no comparison against KD."""
    comparisons = against_baseline(results)
    if not comparisons:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    drawn, notes = _split(comparisons)
    profiles = [whole_curve_of(results, c["model"], c["other"]) for c in drawn]
    along = any(w is not None and "profile_diff_mean" in w for w in profiles)
    fig = Figure(figsize=(15.0 if along else 10.0, 4.6), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if along else 2, sharey=True)
    if along:
        _draw_along_macs(axes[2], drawn, profiles)
    for ax, (key, low, high, title) in zip(axes, _PANELS, strict=False):
        for k, comp in enumerate(drawn):
            label, colour, _, marker = curve_style(comp["model"], k)
            shift = (k - (len(drawn) - 1) / 2) * 0.8 / max(len(drawn), 1)
            xs, ys, errors = [], [[], []], []
            for i, p in enumerate(comp["per_threshold"]):
                value = _value(p, key)
                if value is None:
                    continue
                xs.append(i + shift)
                errors.append(p.get(low) is not None and p.get(high) is not None)
                ys[0].append(100 * value)
                ys[1].append(
                    (100 * (value - p[low]), 100 * (p[high] - value)) if errors[-1] else (0, 0)
                )
            yerr = list(zip(*ys[1], strict=True)) if any(errors) else None
            ax.errorbar(
                xs, ys[0], yerr=yerr, fmt=marker, color=colour, markersize=5, capsize=2,
                linewidth=1, label=f"{label} − {model_label(comp['other'])}",
            )  # fmt: skip
        ax.axhline(0.0, color="gray", linewidth=1)
        levels = [p["normalized_threshold"] for p in comparisons[0]["per_threshold"]]
        ax.set_xticks(range(len(levels)), [f"{h:g}" for h in levels], fontsize=8)
        ax.set_xlabel("threshold h (θ = h · log K; 0: every image at the last exit)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy difference (points)")
    axes[0].legend(fontsize=7, loc="best")
    n = results["n_seeds"]
    spread = f"mean and 95 % interval over {n} seeds" if n > 1 else "one seed, no interval"
    student = (results.get("config") or {}).get("student") or {}
    width = float(student.get("width") or 1.0)
    arch = (
        f", {student['arch']}{f' x{width:g}' if width != 1.0 else ''} students" if student else ""
    )
    fig.suptitle(
        f"{results['dataset']['name']}, {results['schedule']} schedule{arch}: paired difference "
        f"against the {model_label(PAIRS[0][1])} ({spread})",
        fontsize=10,
    )
    if notes:
        fig.text(0.01, 0.01, "Not drawn (off the scale): " + "; ".join(notes), fontsize=7)
    fig.tight_layout(rect=(0, 0.04 if notes else 0, 1, 1))
    return fig


def _draw_along_macs(
    ax: Any, drawn: Sequence[Mapping[str, Any]], profiles: Sequence[Mapping[str, Any] | None]
) -> None:
    """Each student minus KD at equal MACs along the MAC axis: mean line, 95 % band (two
    seeds or more, :data:`MAX_BANDS` students or fewer), the whole-curve mean and interval
    in the legend."""
    import numpy as np

    for k, (comp, whole) in enumerate(zip(drawn, profiles, strict=True)):
        if whole is None or "profile_diff_mean" not in whole:
            continue
        label, colour, linestyle, _ = curve_style(comp["model"], k)
        macs = np.linspace(whole["macs_low"], whole["macs_high"], whole["grid_points"]) / 1e6
        mean = 100 * np.array(whole["profile_diff_mean"])
        interval = (
            f" ({100 * whole['ci95_low']:+.2f} to {100 * whole['ci95_high']:+.2f})"
            if whole["ci95_low"] is not None
            else ""
        )
        ax.plot(
            macs, mean, color=colour, linestyle=linestyle, linewidth=1.3,
            label=f"{label} − {model_label(comp['other'])}: {100 * whole['diff_mean']:+.2f}"
            f"{interval} over the curve",
        )  # fmt: skip
        lows, highs = whole["profile_ci95_low"], whole["profile_ci95_high"]
        if len(drawn) <= MAX_BANDS and all(v is not None for v in (*lows, *highs)):
            ax.fill_between(
                macs, 100 * np.array(lows), 100 * np.array(highs), color=colour, alpha=0.15,
                linewidth=0,
            )  # fmt: skip
    ax.axhline(0.0, color="gray", linewidth=1)
    ax.set_xlabel("mean MACs per image (M): first exit's cost → full network's")
    ax.set_title("at equal MACs, along the whole curve", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


__all__ = ["OFF_SCALE", "against_baseline", "difference_figure", "render_difference_png"]
