"""The report's files: report.json, report.md, tradeoff.png, reliability.png and sweep.csv."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from io import StringIO
from pathlib import Path
from typing import Any

from erde import io
from erde.report.markdown import render_markdown
from erde.report.plots import render_reliability_png, render_tradeoff_png


def write_report(out_dir: str | Path, report: Mapping[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md, tradeoff.png, sweep.csv (and reliability.png) into ``out_dir``.

    All are rendered in memory first, then each is written atomically, so a
    rendering error leaves the directory as it was. reliability.png needs every
    model's ``exit_reliability`` (reports from before it was measured have none).
    """
    out = Path(out_dir)
    contents = {
        "json": json.dumps(report, indent=2, default=io.json_default).encode() + b"\n",
        "markdown": render_markdown(report).encode(),
        "plot": render_tradeoff_png(report),
        "csv": render_sweep_csv(report).encode(),
    }
    paths = {
        "json": out / "report.json",
        "markdown": out / "report.md",
        "plot": out / "tradeoff.png",
        "csv": out / "sweep.csv",
    }
    if all(m.get("exit_reliability") for m in report["models"].values()):
        contents["reliability"] = render_reliability_png(report)
        paths["reliability"] = out / "reliability.png"
    for key, path in paths.items():
        io.atomic_write_bytes(path, contents[key])
    return paths


# --------------------------------------------------------------------------- csv

SWEEP_CSV_COLUMNS = (
    "model", "arch", "rule", "threshold", "accuracy", "mean_macs", "macs_fraction_of_reference",
)  # fmt: skip


def csv_text(value: Any) -> Any:
    """A text cell a spreadsheet will not run: one starting with = + - @ (or a tab or carriage
    return) is a formula there, so it gets a leading ``'``; other values are written as they are."""
    if isinstance(value, str) and value.startswith(("=", "+", "-", "@", "\t", "\r")):
        return "'" + value
    return value


def render_sweep_csv(report: Mapping[str, Any]) -> str:
    """Every sweep point of every model as one CSV row (for spreadsheets and pandas).

    Columns: SWEEP_CSV_COLUMNS, then ``exit_<i>_fraction`` for as many exits
    as the deepest model has (empty where a model has fewer). Thresholds are
    written in full precision; accuracy and fractions are in [0, 1].
    """
    ref_macs = float(report["reference"]["macs"]) or None
    exits = max(len(m["macs_per_exit"]) for m in report["models"].values())
    buffer = StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*SWEEP_CSV_COLUMNS, *(f"exit_{i}_fraction" for i in range(exits))])
    for name, model in report["models"].items():
        for p in model["sweep"]:
            fractions = list(p["exit_fractions"]) + [""] * (exits - len(p["exit_fractions"]))
            share = p["mean_macs"] / ref_macs if ref_macs else ""
            writer.writerow(
                [csv_text(name), csv_text(model.get("arch", "")), p["rule"], repr(float(p["threshold"])),
                 p["accuracy"], p["mean_macs"], share, *fractions]
            )  # fmt: skip
    return buffer.getvalue()
