"""The budgeted evaluation's files: budgeted.json, budgeted.md and budgeted.png.

The numbers come from :func:`erde.calibration.budgeted_evaluation` (thresholds
fitted on validation for each MAC budget, reported on test); this module only
checks where they go and renders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from erde import io
from erde.calibration import DEFAULT_BUDGETS, budgeted_evaluation, check_budgeted_args
from erde.outputs import check_out_folder
from erde.report.plots import mac_unit, use_log_macs


def evaluate_budgeted(
    checkpoints: Sequence[str | Path],
    out_dir: str | Path,
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    rule: str = "entropy",
    per_exit: bool = False,
    temperature: bool = False,
    cfg: Any = None,
    device: str | None = None,
    progress: bool = True,
    names: Sequence[str] | None = None,
    splits: Any = None,
) -> dict[str, Path]:
    """``erde evaluate --budgeted`` (``erde.evaluate_budgeted``): each model at each MAC budget.

    For every checkpoint and every ``budgets`` entry (mean MACs as a fraction
    of the full network), thresholds are calibrated on the validation split
    as :func:`erde.calibrate` would, and the test accuracy at them is
    reported: the deployable comparison, where a threshold sweep picks
    nothing. Writes budgeted.json, budgeted.md and budgeted.png to
    ``out_dir`` and returns their paths (``json``, ``markdown``, ``plot``).
    The data set is the first checkpoint's own unless ``cfg`` or ``splits``
    (:func:`erde.splits_from_tensors`, :func:`erde.load_data`) say otherwise.

    ``names`` labels the models (default: each checkpoint's own). The arguments
    and the output folder are checked before any model is loaded.
    """
    check_budgeted_args(checkpoints, budgets, names)
    check_out_folder(out_dir, checkpoints)
    report = budgeted_evaluation(
        checkpoints, budgets=budgets, rule=rule, per_exit=per_exit, temperature=temperature,
        cfg=cfg, device=device, progress=progress, names=names, splits=splits,
    )  # fmt: skip
    out = Path(out_dir)
    paths = {
        "json": out / "budgeted.json",
        "markdown": out / "budgeted.md",
        "plot": out / "budgeted.png",
    }
    io.atomic_write_json(paths["json"], report)
    io.atomic_write_text(paths["markdown"], render_budgeted_markdown(report))
    io.atomic_write_bytes(paths["plot"], render_budgeted_png(report))
    return paths


def render_budgeted_markdown(report: dict[str, Any]) -> str:
    """One table per model: budget, what validation gave, what test gave."""
    d = report["dataset"]
    lines = [
        "# Budgeted evaluation",
        "",
        f"Rule {report['rule']}; thresholds fitted on {d['val_images']} validation images of "
        f"{d['name']}, reported on its {d['test_images']} test images. MACs are fractions of the "
        "cost of going through every exit.",
        "",
    ]
    for name, m in report["models"].items():
        lines += [
            f"## {name}",
            "",
            "| budget | val acc (%) | val MACs | test acc (%) | test MACs | thresholds |",
            "|---|---|---|---|---|---|",
        ]
        for p in m["curve"]:
            flag = "" if p["feasible"] else " (unreachable)"
            thr = ", ".join(f"{t:.4g}" for t in p["thresholds"])
            lines.append(
                f"| {p['budget']:.2f}{flag} | {100 * p['val_accuracy']:.2f} | {p['val_macs_fraction']:.3f} "
                f"| {100 * p['test_accuracy']:.2f} | {p['test_macs_fraction']:.3f} | {thr} |"
            )
        lines.append("")
    return "\n".join(lines)


def draw_budgeted(ax: Any, report: dict[str, Any]) -> None:
    """Test accuracy against mean test MACs per image, one curve per model.

    The x axis is MACs, not each model's fraction of its own full cost: a
    fraction puts a 10M-MAC teacher at 0.3 left of a 0.8M-MAC student at 0.5.
    """
    models = report["models"]
    scale, unit = mac_unit(models)
    for name, m in models.items():
        curve = sorted(m["curve"], key=lambda p: p["test_mean_macs"])
        ax.plot(
            [p["test_mean_macs"] / scale for p in curve],
            [100 * p["test_accuracy"] for p in curve],
            marker="o",
            label=name,
        )
    use_log_macs(ax, [p["test_mean_macs"] for m in models.values() for p in m["curve"]])
    ax.set_xlabel(f"Mean test MACs per image ({unit}MACs)" if unit else "Mean test MACs per image")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title(f"Budgeted evaluation ({report['rule']}, thresholds fitted on validation)")
    ax.grid(True, alpha=0.3)
    ax.legend()


def render_budgeted_png(report: dict[str, Any], dpi: int = 120) -> bytes:
    """:func:`draw_budgeted` as PNG bytes (no pyplot, no global backend change)."""
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    draw_budgeted(fig.add_subplot(), report)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()
