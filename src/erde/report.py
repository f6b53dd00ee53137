"""Turn per-model evaluations into the comparison report: JSON, Markdown and a plot.

The JSON is the source of truth (schema_version 1); the Markdown and the
accuracy-vs-MACs plot are rendered from it, so all three always agree.
"""

from __future__ import annotations

import copy
import csv
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from io import BytesIO, StringIO
from pathlib import Path
from typing import Any

from erde import exits, io
from erde.evaluation import (
    SweepPoint,
    mac_reduction_at_equal_accuracy,
    reduction_ladder,
    reference_point,
)
from erde.plotting import mac_unit, use_log_macs

SCHEMA_VERSION = 1

# label, colour, line style, marker: fixed for the four models the paper compares
STYLES: dict[str, tuple[str, str, str, str]] = {
    "teacher": ("Teacher", "black", "-", "o"),
    "student_ce": ("CE student", "tab:blue", "--", "s"),
    "student_kd": ("KD student", "tab:orange", "-.", "^"),
    "student_erde": ("ERDE student", "tab:red", "-", "D"),
}
_EXTRA_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
_EXTRA_MARKERS = ("v", "P", "X", "*", "<", ">")


# --------------------------------------------------------------------------- building


def dataset_summary(
    name: str,
    num_classes: int,
    image_shape: Sequence[int],
    test_images: int,
    val_images: int | None = None,
    train_images: int | None = None,
) -> dict[str, Any]:
    """The ``dataset`` block of the report, with the key names the schema fixes."""
    return {
        "name": name,
        "num_classes": int(num_classes),
        "image_shape": [int(s) for s in image_shape],
        "test_images": int(test_images),
        "val_images": None if val_images is None else int(val_images),
        "train_images": None if train_images is None else int(train_images),
    }


def _check_model(name: str, model: Mapping[str, Any]) -> None:
    """A model entry must be a :func:`erde.evaluation.model_report` dict."""
    missing = [k for k in ("exit_accuracy", "macs_per_exit", "sweep") if k not in model]
    if missing:
        raise ValueError(f"model {name!r} lacks {', '.join(missing)}; use evaluation.model_report")


def _reference(models: Mapping[str, Mapping[str, Any]], wanted: str, tolerance: float) -> dict:
    """Reference operating point: last exit of ``wanted``, else of the first model (noted)."""
    name = wanted if wanted in models else next(iter(models))
    accuracy, macs = reference_point(models[name])
    ref: dict[str, Any] = {
        "model": name,
        "accuracy": accuracy,
        "macs": macs,
        "tolerance": tolerance,
    }
    if name != wanted:
        ref["note"] = f"reference model {wanted!r} absent; using the last exit of {name!r}"
    return ref


# A reference within this many points of chance (1 / classes) counts as not trained: its
# "equal accuracy" is what guessing reaches, and any model beats it with no computation.
UNTRAINED_MARGIN = 0.05


def chance_accuracy(
    models: Mapping[str, Mapping[str, Any]], name: str, dataset: Mapping[str, Any] | None
) -> float | None:
    """1 / classes of the data set (or of the model ``name``), None when neither says."""
    classes = (dataset or {}).get("num_classes") or models[name].get("num_classes")
    return 1.0 / classes if classes and classes > 1 else None


def reference_untrained(ref: Mapping[str, Any]) -> bool:
    """Whether the reference is at or near chance, so no reduction may be claimed against it."""
    chance = ref.get("chance_accuracy")
    return chance is not None and ref["accuracy"] <= chance + UNTRAINED_MARGIN


def untrained_text(ref: Mapping[str, Any]) -> str:
    """One sentence: the reference is not trained, so no MAC reduction is claimed."""
    return (
        f"the reference ({model_label(ref['model'])}, last exit {_pct(ref['accuracy'])}) is "
        f"not trained: within {100 * UNTRAINED_MARGIN:g} points of chance "
        f"({_pct(ref['chance_accuracy'])}), so no MAC reduction is claimed against it; "
        "train it longer or with more optimiser steps per epoch (a smaller data.batch_size)"
    )


def _report_rule(models: Mapping[str, Mapping[str, Any]], wanted: str) -> str:
    """``wanted`` if any model was swept with it, else the first rule that was (e.g. max_softmax only)."""
    present = [p["rule"] for model in models.values() for p in model["sweep"]]
    return wanted if wanted in present or not present else present[0]


def _sweep_points(model: Mapping[str, Any], rule: str) -> list[SweepPoint]:
    """The model's sweep points for one rule."""
    return [SweepPoint.from_dict(p) for p in model["sweep"] if p["rule"] == rule]


def build_report(
    models: Mapping[str, Mapping[str, Any]],
    *,
    reference: str = "teacher",
    config: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    tolerance: float = 0.005,
    rule: str = "entropy",
) -> dict[str, Any]:
    """Assemble the full report from ``{name: evaluation.model_report(...)}``.

    Any subset of models works. Each model gains ``mac_reduction``: the
    cheapest ``rule`` threshold within ``tolerance`` of the reference's
    last-exit accuracy (None if no threshold gets there), and
    ``mac_reduction_by_tolerance``: the same for 0.5, 1, 2 and 5 points, split
    into network x exits (:func:`erde.evaluation.reduction_ladder`). When no model was
    swept with ``rule``, the first rule found in the sweeps is used instead;
    the rule used is recorded as ``reference.rule``. A reference within
    ``UNTRAINED_MARGIN`` of chance is recorded as ``reference.untrained`` (with
    ``reference.chance_accuracy``) and no model gets a reduction against it.
    Inputs are not mutated.
    """
    if not models:
        raise ValueError("no models to report")
    for name, model in models.items():
        _check_model(name, model)
    rule = _report_rule(models, rule)
    ref = _reference(models, reference, tolerance)
    ref["rule"] = rule
    ref["chance_accuracy"] = chance_accuracy(models, ref["model"], dataset)
    ref["untrained"] = reference_untrained(ref)
    entries = {}
    for name, model in models.items():
        entry = copy.deepcopy(dict(model))
        if ref["untrained"]:  # a reduction "at equal accuracy" with chance means nothing
            entry["mac_reduction"], entry["mac_reduction_by_tolerance"] = None, []
            entries[name] = entry
            continue
        points = _sweep_points(model, rule)
        entry["mac_reduction"] = mac_reduction_at_equal_accuracy(
            points, ref["accuracy"], ref["macs"], tolerance
        )
        entry["mac_reduction_by_tolerance"] = reduction_ladder(
            points, ref["accuracy"], ref["macs"], float(model["macs_per_exit"][-1])
        )
        entries[name] = entry
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": io.environment_info(),
        "config": copy.deepcopy(dict(config)) if config is not None else None,
        "dataset": copy.deepcopy(dict(dataset)) if dataset is not None else None,
        "reference": ref,
        "models": entries,
    }


# --------------------------------------------------------------------------- writing


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


# --------------------------------------------------------------------------- markdown


def fmt_count(value: float | None) -> str:
    """Human-readable count: 40.81M, 272.5K, 1.23G."""
    if value is None:
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


THRESHOLD_DIGITS = 4  # significant digits of a threshold in Markdown; sweep.csv has them all


def fmt_threshold(value: float, ends: Sequence[float] = (0.0, 1.0)) -> str:
    """A threshold to ``THRESHOLD_DIGITS`` significant digits, more only where fewer would
    put it onto or across an end of its range (``ends``: 0 and 1 for max-softmax, 0 and
    log K for entropy): ``0.99999`` must not read "1", since at 1 no image leaves early
    and at 0.99999 many do.

    A threshold on an end reads as that end: "ln 10" for the entropy rule's top (log K).

    >>> fmt_threshold(0.0001007491358374871), fmt_threshold(0.99999), fmt_threshold(1.0)
    ('0.0001007', '0.99999', '1')
    >>> fmt_threshold(math.log(10), (0.0, math.log(10)))
    'ln 10'
    """
    for end in ends:
        if end not in (0.0, 1.0) and math.isclose(value, end, rel_tol=1e-12):
            return f"ln {round(math.exp(end))}"  # entropy's log K
    for digits in range(THRESHOLD_DIGITS, 18):
        text = f"{value:.{digits}g}"
        if all(_side(float(text), end) == _side(value, end) for end in ends):
            return text
    return repr(float(value))


def fmt_thresholds(values: Sequence[float], ends: Sequence[float] = (0.0, 1.0)) -> list[str]:
    """:func:`fmt_threshold` of each value (thresholds closer than 4 digits tell apart read
    alike; their exact values are in sweep.csv).

    >>> fmt_thresholds([0.5, 0.99999, 1.0])
    ['0.5', '0.99999', '1']
    """
    return [fmt_threshold(v, ends) for v in values]


def _side(value: float, end: float) -> int:
    """-1, 0 or 1: below, on or above ``end``."""
    return (value > end) - (value < end)


def rule_ends(rule: str, num_classes: int | None) -> tuple[float, ...]:
    """The ends of a rule's threshold range that a rounded threshold must not be mistaken for."""
    if num_classes and num_classes > 1:
        return exits.rule_range(rule, num_classes)
    return (0.0,)


def _pct(value: float | None, digits: int = 2) -> str:
    """Fraction in [0, 1] shown as a percentage."""
    return "—" if value is None else f"{100 * value:.{digits}f}%"


def md_inline(text: Any) -> str:
    """Text from a user (a model or data set name) on one Markdown line: no line breaks, and no
    backtick that would end the code span around it."""
    return " ".join(str(text).splitlines()).replace("`", "'")


def _md_cell(text: Any) -> str:
    """One table cell: on one line, its pipes escaped so they do not start a new cell."""
    return " ".join(str(text).splitlines()).replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """A GitHub-flavoured Markdown table (cells kept on one line, pipes escaped)."""
    lines = [
        "| " + " | ".join(_md_cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    return lines + ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]


def model_label(name: str) -> str:
    """Display name of a model (the four paper models get their plot labels)."""
    return STYLES[name][0] if name in STYLES else name


def _summary_section(report: Mapping[str, Any]) -> list[str]:
    """MAC reduction at equal accuracy, one row per model."""
    ref = report["reference"]
    num_classes = (report.get("dataset") or {}).get("num_classes")
    reductions = [m.get("mac_reduction") for m in report["models"].values()]
    chosen = [r["threshold"] for r in reductions if r]
    texts = iter(fmt_thresholds(chosen, rule_ends(ref.get("rule", "entropy"), num_classes)))
    rows = []
    missing = "not claimed" if ref.get("untrained") else "not reached"
    for name, model in report["models"].items():
        red = model.get("mac_reduction")
        rows.append(
            [
                f"{md_inline(model_label(name))} (`{md_inline(name)}`)",
                fmt_count(model["params_per_exit"][-1]) if model.get("params_per_exit") else "—",
                _pct(model["exit_accuracy"][-1]),
                fmt_count(model["macs_per_exit"][-1]),
                next(texts) if red else "—",
                _pct(red["accuracy"]) if red else missing,
                fmt_count(red["mean_macs"]) if red else "—",
                f"{red['reduction']:.2f}x" if red and red["reduction"] else "—",
                _pct(red["saved_fraction"], 1) if red else "—",
            ]
        )
    header = ["Model", "Params", "Last-exit acc.", "Full MACs", "θ", "Accuracy", "Mean MACs"]
    lines = [
        "## MAC reduction at equal accuracy",
        "",
        f"Cheapest {ref.get('rule', 'entropy')} threshold whose accuracy is at least the reference ({md_inline(ref['model'])}, last exit: "
        f"{_pct(ref['accuracy'])} at {fmt_count(ref['macs'])} MACs) minus "
        f"{100 * ref['tolerance']:.2g} points. Reduction = reference MACs / mean MACs.",
        "",
    ]
    if ref.get("note"):
        lines += [f"Note: {ref['note']}.", ""]
    if ref.get("untrained"):
        lines += [f"**No MAC reduction: {untrained_text(ref)}.**", ""]
    return lines + markdown_table([*header, "Reduction", "Saved"], rows) + [""]


def ladder_table(ladders: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[str]:
    """One row per model, one column per level of accuracy given up (same levels for all).

    A cell reads "4.04x (3.08 × 1.31), 85.12 %": the reduction against the reference's
    full MACs (from the smaller network × from early exits), and the accuracy kept.
    """
    levels = [r["tolerance"] for r in next(iter(ladders.values()))]
    rows = [
        [
            model_label(name),
            *(
                f"{r['reduction']:.2f}x ({r['from_network']:.2f} × {r['from_exits']:.2f}), "
                f"{100 * r['accuracy']:.2f} %"
                if r.get("reduction") and r.get("from_network")
                else "—"
                for r in ladder
            ),
        ]
        for name, ladder in ladders.items()
    ]
    header = ["Model", *(f"within {100 * t:g} point{'s' * (t != 0.01)}" for t in levels)]
    return markdown_table(header, rows)


def level_words(levels: Sequence[float]) -> str:
    """``[0.005, 0.01, 0.02]`` -> "0.5, 1 and 2" (points)."""
    texts = [f"{100 * t:g}" for t in levels]
    return texts[0] if len(texts) == 1 else f"{', '.join(texts[:-1])} and {texts[-1]}"


def _ladder_section(report: Mapping[str, Any]) -> list[str]:
    """The reduction each model reaches for 0.5 / 1 / 2 / 5 points given up (newer reports)."""
    ladders = {n: m["mac_reduction_by_tolerance"] for n, m in report["models"].items()
               if m.get("mac_reduction_by_tolerance")}  # fmt: skip
    if not ladders:
        return []  # reports written before the ladder was recorded
    ref = report["reference"]
    levels = [r["tolerance"] for r in next(iter(ladders.values()))]
    return [
        "## MAC reduction for accuracy given up",
        "",
        f"Each model's cheapest {ref.get('rule', 'entropy')} threshold within "
        f"{level_words(levels)} points of the reference ({md_inline(model_label(ref['model']))}, "
        "last exit "
        f"{_pct(ref['accuracy'])}): reduction against its full {fmt_count(ref['macs'])} MACs "
        "(from the smaller network × from early exits), and the accuracy kept. "
        "—: no threshold stays that close.",
        "",
        *ladder_table(ladders),
        "",
    ]


def _exit_section(name: str, model: Mapping[str, Any]) -> list[str]:
    """One model's per-exit table: parameters, MACs, accuracy (and ECE) of each exit."""
    params = model.get("params_per_exit") or [None] * len(model["macs_per_exit"])
    ece = model.get("exit_ece")  # reports written before it was measured have none
    exit_rows = [
        [str(i), fmt_count(p), fmt_count(m), _pct(a)] + ([_pct(ece[i])] if ece else [])
        for i, (p, m, a) in enumerate(
            zip(params, model["macs_per_exit"], model["exit_accuracy"], strict=True)
        )
    ]
    header = ["Exit", "Params", "MACs", "Accuracy"] + (["ECE"] if ece else [])
    return [
        f"### {md_inline(model_label(name))} (`{md_inline(name)}`)", "",
        *markdown_table(header, exit_rows), "",
    ]  # fmt: skip


def _sweep_section(name: str, model: Mapping[str, Any], ref_macs: float, rule: str) -> list[str]:
    """One sweep table per rule (``rule`` first) for one model."""
    lines = [f"### {md_inline(model_label(name))} (`{md_inline(name)}`): threshold sweeps", ""]
    rules = dict.fromkeys([rule, *(p["rule"] for p in model["sweep"])])  # ordered, unique
    for sweep_rule in rules:
        points = [p for p in model["sweep"] if p["rule"] == sweep_rule]
        ends = rule_ends(sweep_rule, model.get("num_classes"))
        thresholds = fmt_thresholds([p["threshold"] for p in points], ends)
        sweep_rows = [
            [
                theta,
                _pct(p["accuracy"]),
                fmt_count(p["mean_macs"]),
                _pct(p["mean_macs"] / ref_macs, 1) if ref_macs else "—",
                " / ".join(f"{f:.2f}" for f in p["exit_fractions"]),
            ]
            for theta, p in zip(thresholds, points, strict=True)
        ]
        if sweep_rows:
            lines += [f"{sweep_rule} sweep (exit fractions: exit 0 / exit 1 / ...):", ""]
            header = ["θ", "Accuracy", "Mean MACs", "% of ref. MACs", "Exit fractions"]
            lines += markdown_table(header, sweep_rows) + [""]
    return lines


def budget_choices(report: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """For each level of accuracy given up, the model (name, ladder entry) with the fewest
    mean MACs that stays that close to the reference; levels no model reaches are left out."""
    ladders = {n: m.get("mac_reduction_by_tolerance") or [] for n, m in report["models"].items()}
    levels = max(ladders.values(), key=len)
    choices = []
    for i in range(len(levels)):
        reached = [
            (n, lad[i]) for n, lad in ladders.items() if i < len(lad) and lad[i].get("reduction")
        ]
        if reached:
            choices.append(min(reached, key=lambda c: (c[1]["mean_macs"], -c[1]["accuracy"])))
    return choices


def merge_same_choices(
    choices: Sequence[tuple[str, dict[str, Any]]],
) -> list[tuple[str, dict[str, Any], list[float]]]:
    """Consecutive levels that chose the same model and threshold, as one row with all its
    levels: a table of four identical rows says less than one row "0.5 to 5 points"."""
    merged: list[tuple[str, dict[str, Any], list[float]]] = []
    for name, c in choices:
        if merged and merged[-1][0] == name and merged[-1][1]["threshold"] == c["threshold"]:
            merged[-1][2].append(c["tolerance"])
        else:
            merged.append((name, c, [c["tolerance"]]))
    return merged


def level_range(levels: Sequence[float]) -> str:
    """``[0.005]`` -> "0.5 points", ``[0.01]`` -> "1 point", ``[0.005, 0.02]`` -> "0.5 to 2 points"."""
    low, high = f"{100 * levels[0]:g}", f"{100 * levels[-1]:g}"
    plural = "s" * (levels[-1] != 0.01)
    return f"{low} point{plural}" if len(levels) == 1 else f"{low} to {high} point{plural}"


def _budget_section(report: Mapping[str, Any]) -> list[str]:
    """Which model and threshold to deploy for a few accuracy drops: the report in one table."""
    ref = report["reference"]
    lines = ["## Which model for which budget", ""]
    if ref.get("untrained"):
        return [
            *lines,
            f"No recommendation: the reference ({md_inline(model_label(ref['model']))}) is not trained "
            "(next section).",
            "",
        ]
    choices = budget_choices(report)
    if not choices:
        return []  # reports written before the ladder was recorded, or nothing reached
    num_classes = (report.get("dataset") or {}).get("num_classes")
    ends = rule_ends(ref.get("rule", "entropy"), num_classes)
    rows = [
        [
            level_range(levels),
            f"{md_inline(model_label(name))} (`{md_inline(name)}`)",
            fmt_threshold(c["threshold"], ends),
            _pct(c["accuracy"]),
            fmt_count(c["mean_macs"]),
            f"{c['reduction']:.2f}x fewer ({_pct(c['saved_fraction'], 1)} saved)",
        ]
        for name, c, levels in merge_same_choices(choices)
    ]
    header = [
        "Accuracy given up",
        "Model",
        "θ",
        "Accuracy",
        "Mean MACs",
        f"vs {model_label(ref['model'])}",
    ]
    return [
        *lines,
        f"The cheapest model and {ref.get('rule', 'entropy')} threshold θ that stay within each "
        f"accuracy drop of the reference ({md_inline(model_label(ref['model']))}, last exit "
        f"{_pct(ref['accuracy'])} at {fmt_count(ref['macs'])} MACs per image) on this report's "
        "test images, with its mean MACs per image and the saving. For deployment, "
        "`erde calibrate` fits thresholds on validation images instead.",
        "",
        *markdown_table(header, rows),
        "",
    ]


def _rule_of(report: Mapping[str, Any], rule: str | None) -> str:
    """The rule to show: the one asked for, else the one the report's summary used."""
    return rule or (report.get("reference") or {}).get("rule") or "entropy"


def render_markdown(report: Mapping[str, Any], rule: str | None = None) -> str:
    """Human-readable report: which model for which budget, the reductions, per-exit tables,
    environment and config, and last the long threshold sweeps (also in sweep.csv)."""
    rule = _rule_of(report, rule)
    dataset = report.get("dataset") or {}
    lines = ["# ERDE evaluation report", "", f"Created {report.get('created', '?')}."]
    if dataset:
        shape = "x".join(str(s) for s in dataset.get("image_shape", []))
        lines.append(
            f"Dataset: {md_inline(dataset.get('name', '?'))} ({dataset.get('num_classes', '?')} classes, "
            f"{dataset.get('test_images', '?')} test images{', ' + shape if shape else ''})."
        )
    lines += ["", *_budget_section(report), *_summary_section(report), *_ladder_section(report)]
    lines += ["## Models", ""]
    for name, model in report["models"].items():
        lines += _exit_section(name, model)
    env_rows = [[str(k), str(v)] for k, v in (report.get("environment") or {}).items()]
    lines += [
        "## Environment",
        "",
        *markdown_table(["Key", "Value"], env_rows),
        "",
        "## Config",
        "",
    ]
    config = json.dumps(report.get("config"), indent=2, default=io.json_default)
    lines += ["```json", config, "```", ""]
    lines += [
        "## Threshold sweeps",
        "",
        "Every threshold tried, per model (thresholds to 4 significant digits; exact values in "
        "sweep.csv).",
        "",
    ]
    for name, model in report["models"].items():
        lines += _sweep_section(name, model, report["reference"]["macs"], rule)
    return "\n".join(lines)


# --------------------------------------------------------------------------- plot


def curve_style(name: str, index: int) -> tuple[str, str, str, str]:
    """Fixed style for the paper's models, a cycling one for anything else."""
    if name in STYLES:
        return STYLES[name]
    k = index % len(_EXTRA_COLOURS)
    return name, _EXTRA_COLOURS[k], ":", _EXTRA_MARKERS[k]


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
    rule = _rule_of(report, rule)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw(ax, report, rule)
    name = (report.get("dataset") or {}).get("name")
    ax.set_title(f"Accuracy vs MACs{' on ' + name if name else ''} ({rule} rule)")
    return figure_png(fig, ax, dpi)


def figure_png(fig: Any, ax: Any, dpi: int) -> bytes:
    """Grid, legend and layout shared by every trade-off plot, rendered to PNG bytes."""
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def render_reliability_png(report: Mapping[str, Any], dpi: int = 110) -> bytes:
    """:func:`reliability_figure` as PNG bytes."""
    buffer = BytesIO()
    reliability_figure(report, dpi).savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


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
