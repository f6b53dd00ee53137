"""report.md: which model for which budget first, then exits and sweeps, from the report's JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from erde import exits, io
from erde.report.build import rule_of, untrained_text
from erde.report.diagnostics import diagnostics_table
from erde.report.styles import fmt_count, model_label, pct

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
                pct(model["exit_accuracy"][-1]),
                fmt_count(model["macs_per_exit"][-1]),
                next(texts) if red else "—",
                pct(red["accuracy"]) if red else missing,
                fmt_count(red["mean_macs"]) if red else "—",
                f"{red['reduction']:.2f}x" if red and red["reduction"] else "—",
                pct(red["saved_fraction"], 1) if red else "—",
            ]
        )
    header = ["Model", "Params", "Last-exit acc.", "Full MACs", "θ", "Accuracy", "Mean MACs"]
    lines = [
        "## MAC reduction at equal accuracy",
        "",
        f"Cheapest {ref.get('rule', 'entropy')} threshold whose accuracy is at least the reference ({md_inline(ref['model'])}, last exit: "
        f"{pct(ref['accuracy'])} at {fmt_count(ref['macs'])} MACs) minus "
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
        f"{pct(ref['accuracy'])}): reduction against its full {fmt_count(ref['macs'])} MACs "
        "(from the smaller network × from early exits), and the accuracy kept. "
        "—: no threshold stays that close.",
        "",
        *ladder_table(ladders),
        "",
    ]


def _diagnostics_section(report: Mapping[str, Any]) -> list[str]:
    """What the entropy term changed, against the KD student (:mod:`erde.report.diagnostics`)."""
    table = diagnostics_table(report, lambda name: md_inline(model_label(name)))
    if table is None:
        return []
    return [
        f"## {table.title}", "", table.explanation, "",
        *markdown_table(list(table.header), table.rows), "",
        *(line for sentence in table.whole_curve for line in (sentence, "")),
    ]  # fmt: skip


def _exit_section(name: str, model: Mapping[str, Any]) -> list[str]:
    """One model's per-exit table: parameters, MACs, accuracy (and ECE) of each exit."""
    params = model.get("params_per_exit") or [None] * len(model["macs_per_exit"])
    ece = model.get("exit_ece")  # reports written before it was measured have none
    exit_rows = [
        [str(i), fmt_count(p), fmt_count(m), pct(a)] + ([pct(ece[i])] if ece else [])
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
                pct(p["accuracy"]),
                fmt_count(p["mean_macs"]),
                pct(p["mean_macs"] / ref_macs, 1) if ref_macs else "—",
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
            pct(c["accuracy"]),
            fmt_count(c["mean_macs"]),
            f"{c['reduction']:.2f}x fewer ({pct(c['saved_fraction'], 1)} saved)",
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
        f"{pct(ref['accuracy'])} at {fmt_count(ref['macs'])} MACs per image) on this report's "
        "test images, with its mean MACs per image and the saving. For deployment, "
        "`erde calibrate` fits thresholds on validation images instead.",
        "",
        *markdown_table(header, rows),
        "",
    ]


def render_markdown(report: Mapping[str, Any], rule: str | None = None) -> str:
    """Human-readable report: which model for which budget, the reductions, per-exit tables,
    environment and config, and last the long threshold sweeps (also in sweep.csv)."""
    rule = rule_of(report, rule)
    dataset = report.get("dataset") or {}
    lines = ["# ERDE evaluation report", "", f"Created {report.get('created', '?')}."]
    if dataset:
        shape = "x".join(str(s) for s in dataset.get("image_shape", []))
        lines.append(
            f"Dataset: {md_inline(dataset.get('name', '?'))} ({dataset.get('num_classes', '?')} classes, "
            f"{dataset.get('test_images', '?')} test images{', ' + shape if shape else ''})."
        )
    lines += ["", *_budget_section(report), *_summary_section(report), *_ladder_section(report)]
    lines += _diagnostics_section(report)
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
