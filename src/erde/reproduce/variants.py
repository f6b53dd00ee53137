"""An ablation's summary picture: one row per student, its two tests against KD.

A block with many students (a γ sweep, a temperature, the mask) draws them all on the
difference figure (:mod:`erde.reproduce.differences`), eleven thresholds each: the answer
to "which variant beats KD, and by how much" is there but has to be read off 80 bars.
This figure is that answer alone, as a forest plot: per student, the difference against
KD over the whole accuracy-MACs curve (the one test of the trade-off,
:mod:`erde.reproduce.tradeoff`) and at the last exit (h = 0: every image answered by the
full network), each with its 95 % interval over seeds. Drawn for blocks with
:data:`MIN_VARIANTS` or more students compared with KD and a whole-curve test.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from erde.report import model_label
from erde.report.plots import png_bytes
from erde.reproduce.differences import OFF_SCALE, against_baseline
from erde.reproduce.stats import PAIRS
from erde.reproduce.tradeoff import whole_curve_of

MIN_VARIANTS = 3  # fewer students against KD: the difference figure's legend says it all
TESTS = ("over the whole curve (at equal MACs)", "at the last exit (h = 0)")


def variant_rows(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per student compared with KD, in the block's order: ``model``, and for each of
    :data:`TESTS` a ``(mean, low, high)`` difference in accuracy (fractions; low and high
    None without an interval). Students without a whole-curve test are left out."""
    rows = []
    for comp in against_baseline(results):
        whole = whole_curve_of(results, comp["model"], comp["other"])
        last = [p for p in comp["per_threshold"] if p["normalized_threshold"] == 0.0]
        if whole is None or whole.get("diff_mean") is None or not last:
            continue
        rows.append(
            {
                "model": comp["model"],
                TESTS[0]: (whole["diff_mean"], whole["ci95_low"], whole["ci95_high"]),
                TESTS[1]: (last[0]["accuracy_diff_mean"], last[0]["ci95_low"], last[0]["ci95_high"]),
            }
        )  # fmt: skip
    return rows


def _interval(value: tuple[float, float | None, float | None]) -> str:
    mean, low, high = value
    spread = f" ({100 * low:+.2f} to {100 * high:+.2f})" if low is not None else ""
    return f"{100 * mean:+.2f}{spread}".replace("-", "−")


def variants_figure(results: Mapping[str, Any], dpi: int = 120) -> Any | None:
    """The forest plot of :func:`variant_rows` (points on the x axis, one student per row,
    the whole-curve test filled, the last exit open), or ``None`` for a block with fewer
    than :data:`MIN_VARIANTS` such students. A student whose mean is more than
    :data:`~erde.reproduce.differences.OFF_SCALE` from KD is named under the axes with its
    numbers instead of stretching the scale for the others."""
    rows = variant_rows(results)
    if len(rows) < MIN_VARIANTS:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    off = [r for r in rows if any(abs(r[t][0]) > OFF_SCALE for t in TESTS)]
    drawn = [r for r in rows if r not in off]
    fig = Figure(figsize=(9.0, 1.9 + 0.42 * max(len(drawn), 1)), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for t, (test, marker, face, shift) in enumerate(
        zip(TESTS, ("o", "s"), ("C0", "white"), (-0.13, 0.13), strict=True)
    ):
        ys, xs, errors = [], [], [[], []]
        for i, row in enumerate(drawn):
            mean, low, high = row[test]
            ys.append(i + shift)
            xs.append(100 * mean)
            errors[0].append(100 * (mean - low) if low is not None else 0.0)
            errors[1].append(100 * (high - mean) if high is not None else 0.0)
        ax.errorbar(
            xs, ys, xerr=errors, fmt=marker, color="C0" if t == 0 else "C1",
            markerfacecolor=face, markersize=6, capsize=3, linewidth=1.2, label=test,
        )  # fmt: skip
    ax.axvline(0.0, color="gray", linewidth=1)
    ax.set_yticks(
        range(len(drawn)),
        [f"{model_label(r['model'])}   {_interval(r[TESTS[0]])}" for r in drawn],
        fontsize=8,
    )
    ax.set_ylim(len(drawn) - 0.5, -0.5)  # the block's order, top to bottom
    baseline = model_label(PAIRS[0][1])
    ax.set_xlabel(f"accuracy difference against the {baseline} (points)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    n = results["n_seeds"]
    spread = f"mean and 95 % interval over {n} seeds" if n > 1 else "one seed, no interval"
    fig.suptitle(
        f"{results['dataset']['name']}, {results['schedule']} schedule: each student minus the "
        f"{baseline} ({spread})",
        fontsize=9,
    )
    if off:
        notes = "; ".join(
            f"{model_label(r['model'])}: {_interval(r[TESTS[0]])} over the curve, "
            f"{_interval(r[TESTS[1]])} at the last exit"
            for r in off
        )
        fig.text(0.01, 0.01, f"Not drawn (off the scale): {notes}", fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06 if off else 0, 1, 1))
    return fig


def render_variants_png(results: Mapping[str, Any], dpi: int = 120) -> bytes | None:
    """:func:`variants_figure` as PNG bytes, or ``None`` where it draws nothing."""
    fig = variants_figure(results, dpi)
    return None if fig is None else png_bytes(fig, dpi)


__all__ = ["MIN_VARIANTS", "TESTS", "render_variants_png", "variant_rows", "variants_figure"]
