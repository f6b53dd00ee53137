"""The results document as Markdown tables and plots, and the files of a results folder.

Publishing them into the docs (RESULTS.md's blocks, ``docs/results/``) is
:mod:`erde.reproduce.publish`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from erde import io
from erde.evaluation import split_reduction
from erde.pipeline import STUDENT_METHODS
from erde.report import (
    curve_style,
    figure_png,
    fmt_count,
    ladder_table,
    level_words,
    mac_unit,
    markdown_table,
    model_label,
    use_log_macs,
)
from erde.report.curves import render_curves_png
from erde.report.diagnostics import signed
from erde.reproduce.differences import against_baseline, render_difference_png
from erde.reproduce.stats import PAIRS, TABLE_LEVELS, reductions_at_tolerances
from erde.reproduce.tradeoff import whole_curve_of
from erde.reproduce.variants import MIN_VARIANTS, render_variants_png, variant_rows


def _pm(mean: float | None, std: float | None, n_seeds: int, digits: int = 2) -> str:
    """Fraction as "mean +- std" in percent; the value alone from one seed.

    A sample standard deviation of one run is undefined, so printing "± 0.00" would
    claim a spread that was never measured.
    """
    if mean is None:
        return "—"
    if n_seeds < 2:
        return f"{100 * mean:.{digits}f}"
    return f"{100 * mean:.{digits}f} ± {100 * (std or 0.0):.{digits}f}"


def _partial_lines(n_seeds: int, planned: int) -> list[str]:
    """A warning paragraph while fewer seeds than the command plans have finished."""
    if planned <= n_seeds:
        return []
    return [
        f"**Partial:** {n_seeds} of the {planned} seeds of this command have finished; "
        "the others are still training or were interrupted (the same command resumes them). "
        "This block is rewritten as each seed finishes: until then its statistics cover "
        f"only the {n_seeds} seed{'s' * (n_seeds != 1)} listed.",
        "",
    ]


def _tolerance_lines(
    models: Mapping[str, Mapping[str, Any]], ref: Mapping[str, Any], sub: str
) -> list[str]:
    """The MAC reduction each model reaches for 0.5 / 1 / 2 / 5 points of accuracy given up."""
    ladders = {
        # results written before the ladder was recorded: derive it from the same mean curves
        name: m.get("mac_reduction_by_tolerance") or reductions_at_tolerances(m, ref)
        for name, m in models.items()
    }
    levels = [r["tolerance"] for r in next(iter(ladders.values()))]
    return [
        f"{sub} MAC reduction for accuracy given up",
        "",
        f"Each model's cheapest threshold on its mean curve within {level_words(levels)} points of "
        f"the {model_label(ref['model'])}'s last exit ({100 * ref['accuracy_mean']:.2f} %): "
        f"reduction against the {model_label(ref['model'])}'s full {fmt_count(ref['macs'])} "
        "MACs (from the smaller network × from early exits), and the accuracy kept. "
        "—: no threshold stays that close.",
        "",
        *ladder_table(ladders),
        "",
    ]


def _spread_words(n_seeds: int) -> str:
    """How the tables' numbers were aggregated, in words."""
    return "mean ± std over seeds, sample std" if n_seeds > 1 else "one seed, so no spread"


def _pm_ratio(per_seed: Mapping[str, Any]) -> str:
    """The per-seed MAC reductions' spread as " ± std", empty when under two seeds reached it."""
    return f" ± {per_seed['std']:.2f}" if per_seed["reached"] > 1 else ""


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _points(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.2f}"


def _interval(low: float | None, high: float | None) -> str:
    """A 95 % interval in points, "—" where there is none (one seed, or an older file)."""
    return "—" if low is None or high is None else f"{100 * low:+.2f} to {100 * high:+.2f}"


def _with_interval(value: float | None, low: float | None, high: float | None) -> str:
    """``+0.12 (-0.30 to +0.54)`` in points; the value alone where there is no interval."""
    return _signed(value, low, high, 2, scale=100)


def _equal_macs(r: Mapping[str, Any]) -> str:
    """The paired difference at equal MACs with its interval; the mean-curve one in older files."""
    if r.get("equal_macs_diff_mean") is None:
        return _points(r["accuracy_diff_at_equal_macs"])
    return _with_interval(
        r["equal_macs_diff_mean"], r.get("equal_macs_ci95_low"), r.get("equal_macs_ci95_high")
    )


def _comparison_rows(comp: Mapping[str, Any], n_seeds: int) -> list[list[str]]:
    return [
        [
            f"{r['normalized_threshold']:g}",
            f"{r['threshold']:.4g}",
            _points(r["accuracy_diff_mean"])
            + (f" ± {100 * r['accuracy_diff_std']:.2f}" if n_seeds > 1 else ""),
            _interval(r.get("ci95_low"), r.get("ci95_high")),
            f"{r['seeds_ahead']}/{r['n_seeds']}",
            "—" if r["p_value"] is None else f"{r['p_value']:.2g}",
            "—" if r["macs_ratio"] is None else f"{r['macs_ratio']:.2f}",
            _equal_macs(r),
            model_label(r["winner"]) if r["winner"] != "tie" else "tie",
        ]
        for r in comp["per_threshold"]
    ]


def _pair_row(comp: Mapping[str, Any], results: Mapping[str, Any]) -> list[str]:
    """One row of the other pairs' table: wins, mean, last exit with its interval, equal MACs
    (and the whole curve, in blocks that have it)."""
    last = comp["per_threshold"][0]
    at_equal = [
        r["equal_macs_diff_mean"] if r.get("equal_macs_diff_mean") is not None
        else r["accuracy_diff_at_equal_macs"]
        for r in comp["per_threshold"]
    ]  # fmt: skip
    at_equal = [d for d in at_equal if d is not None]
    return [
        f"{model_label(comp['model'])} − {model_label(comp['other'])}",
        f"{comp['wins']} of {comp['thresholds']}",
        _points(comp["accuracy_diff_mean"]),
        _with_interval(last["accuracy_diff_mean"], last.get("ci95_low"), last.get("ci95_high")),
        _points(sum(at_equal) / len(at_equal)) if at_equal else "—",
    ] + ([_whole_cell(whole_curve_of(results, comp["model"], comp["other"]))]
         if results.get("whole_curve") else [])  # fmt: skip


def _whole_cell(whole: Mapping[str, Any] | None) -> str:
    """``+0.20 (-0.09 to +0.50), p = 0.14``: the whole-curve difference in a table cell."""
    if whole is None:
        return "—"
    p = "" if whole["p_value"] is None else f", p = {whole['p_value']:.2g}"
    return _with_interval(whole["diff_mean"], whole["ci95_low"], whole["ci95_high"]) + p


def _signed(
    value: float | None, low: float | None, high: float | None, digits: int, scale: float = 1.0
) -> str:
    """``+0.028 (+0.010 to +0.046)`` after scaling; the value alone without an interval, "—"
    without a value."""
    text = signed(value, digits, scale)
    if value is None or low is None or high is None:
        return text
    return f"{text} ({signed(low, digits, scale)} to {signed(high, digits, scale)})"


def _diagnostic_lines(diag: Mapping[str, Any] | None, sub: str) -> list[str]:
    """The tables of :mod:`erde.reproduce.diagnostics`: entropy, AUROC and the teacher's errors."""
    if not diag or not diag.get("models"):
        return []
    ref = model_label(diag["reference"])

    def cell(r: Mapping[str, Any], key: str, digits: int, scale: float = 1.0) -> str:
        low, high = r.get(f"{key}_ci95_low"), r.get(f"{key}_ci95_high")
        return _signed(r.get(f"{key}_mean"), low, high, digits, scale)

    entropy_rows, error_rows = [], []
    for name, per_exit in diag["models"].items():
        for r in per_exit:
            e, label = r["exit"], model_label(name)
            ref_auroc = diag["reference_auroc_mean"][e]
            entropy_rows.append([
                label, str(e), cell(r, "entropy_shift_teacher_wrong", 3),
                cell(r, "entropy_shift_teacher_right", 3), cell(r, "selectivity", 3),
                "—" if r["auroc_mean"] is None else f"{r['auroc_mean']:.4f}",
                "—" if ref_auroc is None else f"{ref_auroc:.4f}", cell(r, "auroc_diff", 4),
            ])  # fmt: skip
            if "teacher_error_share_mean" in r:  # blocks published since 2026-12-06, 12:00
                share = r["teacher_error_share_mean"]
                error_rows.append([
                    label, str(e), cell(r, "accuracy_teacher_wrong_diff", 2, 100),
                    "—" if share is None else f"{100 * share:.1f}",
                    cell(r, "teacher_error_share_diff", 2, 100),
                ])  # fmt: skip
    lines = [
        f"{sub} What the entropy term changes, against the {ref}",
        "",
        f"Per exit, paired by seed against the {ref} (95 % interval with two seeds or "
        "more). Entropy shift: the student's mean entropy (nats) minus the "
        f"{ref}'s, on the test images the teacher's same exit gets wrong, and on those it gets "
        "right. Selectivity: the first minus the second, above 0 where the student became "
        "more unsure where the teacher errs than elsewhere (ERDE's premise). AUROC: how well "
        "the exit's entropy ranks the student's right answers before its wrong ones (0.5 "
        "chance, 1 perfect), the quality of the exit decision at any threshold; a gain there "
        "can improve the accuracy-MACs trade-off, a uniform shift in entropy only moves along "
        "it.",
        "",
        *markdown_table(
            ["Student", "Exit", "Entropy shift, teacher wrong", "Entropy shift, teacher right",
             "Selectivity", "AUROC", f"AUROC ({ref})", "AUROC diff. (95 % interval)"],
            entropy_rows,
        ),
        "",
    ]  # fmt: skip
    if error_rows:
        lines += [
            f"On the test images the teacher's exit gets wrong: the student's accuracy minus the "
            f"{ref}'s (points), how often the student gives the teacher's very wrong answer (%), "
            f"and that share minus the {ref}'s (points). ERDE is meant not to learn the "
            "teacher's answers where they are wrong: a higher accuracy and a lower share there.",
            "",
            *markdown_table(
                ["Student", "Exit", "Accuracy diff. where the teacher errs",
                 "Gives the teacher's wrong answer (%)", "Share diff."],
                error_rows,
            ),
            "",
        ]  # fmt: skip
    return lines


def _comparison_sentence(comp: Mapping[str, Any], results: Mapping[str, Any]) -> str:
    a, b = model_label(comp["model"]), model_label(comp["other"])
    text = (
        f"{a} beat {b} at {comp['wins']} of {comp['thresholds']} thresholds "
        f"({'every one' if comp['beat_at_every_threshold'] else 'not every one'}); "
        f"difference in accuracy {_points(comp['accuracy_diff_mean'])} points on average "
        f"(from {_points(comp['accuracy_diff_min'])} to {_points(comp['accuracy_diff_max'])})."
    )
    whole = whole_curve_of(results, comp["model"], comp["other"])
    if whole is None:
        return text
    p = "—" if whole["p_value"] is None else f"{whole['p_value']:.2g}"
    return (
        f"{text} Over the whole curve, one paired test instead of one per threshold "
        f"(the accuracy difference at equal MACs, averaged over {whole['grid_points']} MAC "
        f"values from {fmt_count(whole['macs_low'])} to {fmt_count(whole['macs_high'])}, each "
        "seed's curve traced from its per-image records): "
        f"{_with_interval(whole['diff_mean'], whole['ci95_low'], whole['ci95_high'])} points, "
        f"p = {p}, ahead in {whole['seeds_ahead']} of {whole['n_seeds']} seeds"
        f"{_per_seed(whole.get('diff_per_seed'))}."
    )


def _per_seed(diffs: list[float] | None) -> str:
    """`` (per seed: -0.51, +0.12)``: each seed's own difference, in the order of the block's
    seeds, so a reader sees whether one seed carries the mean; empty with one seed."""
    if not diffs or len(diffs) < 2:
        return ""
    return " (per seed: " + ", ".join(_points(d) for d in diffs) + ")"


def _training_lines(times: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One sentence on what training cost on the machine named under the block, per model."""
    if not times:
        return []
    parts = [
        f"{model_label(k)} {t['epochs']} × {t['seconds_per_epoch']:.0f} s = {t['hours']:.2f} h"
        for k, t in times.items()
    ]
    return [
        "Training time on the machine below (median epoch × epochs, from each model's "
        "metrics.jsonl; the students of a seed train side by side in one loop, so each shows "
        f"that loop's time; mean over seeds): {'; '.join(parts)}.",
        "",
    ]


def _single_exit_lines(models: Mapping[str, Mapping[str, Any]], sub: str, n: int) -> list[str]:
    """Every exit on its own: MACs, accuracy and expected calibration error (ECE)."""
    with_ece = all(m.get("exit_ece_mean") for m in models.values())
    rows = []
    for name, m in models.items():
        for i, macs in enumerate(m["macs_per_exit"]):
            row = [model_label(name), str(i), fmt_count(macs),
                   _pm(m["exit_accuracy_mean"][i], m["exit_accuracy_std"][i], n)]  # fmt: skip
            if with_ece:
                row.append(_pm(m["exit_ece_mean"][i], m["exit_ece_std"][i], n))
            rows.append(row)
    note = (
        " ECE: expected calibration error of the exit's max softmax probability (15 equal-width "
        "bins), in %; the entropy rule trusts an exit's confidence, so a lower ECE means "
        "its thresholds mean what they say."
        if with_ece
        else ""
    )
    header = ["Model", "Exit", "MACs", "Accuracy (%)"] + (["ECE (%)"] if with_ece else [])
    return [
        f"{sub} Single exits",
        "",
        f"Every image answered at that exit ({_spread_words(n)}).{note}",
        "",
        *markdown_table(header, rows),
        "",
    ]


def arch_name(section: Mapping[str, Any] | None) -> str:
    """``resnet20``, or ``resnet20_x0.5`` for a width multiplier other than 1."""
    section = section or {}
    width = float(section.get("width", 1.0) or 1.0)
    arch = str(section.get("arch"))
    return arch if width == 1.0 else f"{arch}_x{width:g}"


def pair_words(results: Mapping[str, Any]) -> str:
    """``resnet56 → resnet20_x0.5`` (and ``, students kd, erde_g4`` where they are not ce,
    kd and erde): which block this is, in its heading, where blocks of one schedule differ."""
    config = results.get("config") or {}
    words = f"{arch_name(config.get('teacher'))} → {arch_name(config.get('student'))}"
    students = [m for m in results["models"] if m != "teacher"]
    if students != [f"student_{m}" for m in STUDENT_METHODS]:
        words += f", students {', '.join(m.removeprefix('student_') for m in students)}"
    return words


def render_markdown(
    results: Mapping[str, Any],
    *,
    plot_link: str = "tradeoff.png",
    curves_link: str = "training.png",
    difference_link: str = "difference.png",
    variants_link: str = "variants.png",
    level: int = 1,
) -> str:
    """The results as Markdown; ``level`` is the heading level of the title.

    The training curves (``curves_link``) are shown when the results hold any, the
    differences against KD (``difference_link``) when it is among the models, and the
    forest plot of the students' tests against KD (``variants_link``) when there are
    :data:`~erde.reproduce.variants.MIN_VARIANTS` such students or more.
    """
    h = "#" * level
    sub = "#" * (level + 1)
    data = results["dataset"]
    models = results["models"]
    n = results["n_seeds"]
    cfg = results.get("config") or {}
    loader = "" if data["loader"] == data["name"] else f", read with the {data['loader']} loader"
    archs = ", ".join(
        f"{model_label(k)} {m['arch']} ({m['num_exits']} exits)" for k, m in models.items()
    )
    planned = int(results.get("planned_seeds") or n)
    count = f"{n} of {planned} seeds" if planned > n else f"{n} seed{'s' * (n != 1)}"
    lines = [
        f"{h} {data['name']}: {results['schedule']} schedule, {pair_words(results)}, {count}",
        "",
        f"Command: `{results['command']}`" if results.get("command") else "",
        "",
        *_partial_lines(n, planned),
        f"Models: {archs}. Epochs: teacher {cfg.get('teacher_train', {}).get('epochs', '?')}, "
        f"students {cfg.get('student_train', {}).get('epochs', '?')}. Seeds: "
        f"{', '.join(str(s) for s in results['seeds'])}. Test set: {_count(data.get('test_images'))} "
        f"images{loader}, {data['num_classes']} classes. Teacher design: "
        f"{results.get('teacher_design', 'one teacher per seed (independent replicates)')}.",
        "",
        *_training_lines(results.get("training_time") or {}),
        f"Entropy exit rule at θ = h · log K. Accuracy in % ({_spread_words(n)}). "
        f"MACs: mean per test image, averaged over seeds. Created {results['created']}.",
        "",
        f"{sub} Accuracy (%) and mean MACs at fixed thresholds",
        "",
    ]
    header = ["h", "θ", *(model_label(k) for k in models)]
    rows = []
    for i, level_h in enumerate(TABLE_LEVELS):
        row = [f"{level_h:g}", f"{next(iter(models.values()))['thresholds'][i]['threshold']:.4g}"]
        for m in models.values():
            r = m["thresholds"][i]
            row.append(
                f"{_pm(r['accuracy_mean'], r['accuracy_std'], n)} · {fmt_count(r['macs_mean'])}"
            )
        rows.append(row)
    lines += markdown_table(header, rows) + [""]
    lines += _single_exit_lines(models, sub, n)

    ref = results["reference"]
    lines += [
        f"{sub} MAC reduction at equal accuracy",
        "",
        f"Cheapest threshold on the mean curve whose mean accuracy is at least the "
        f"{model_label(ref['model'])}'s last exit ({_pm(ref['accuracy_mean'], ref['accuracy_std'], n)}% at "
        f"{fmt_count(ref['macs'])} MACs) minus {100 * ref['tolerance']:.2g} points; reduction = "
        f"reference MACs / mean MACs = (reference MACs / the model's full MACs: from the smaller "
        f"network) × (full MACs / mean MACs: from early exits). Per seed: the same on each seed's "
        f"own curve.",
        "",
    ]
    rows = []
    for name, m in models.items():
        # results written before the split was recorded: derive it from the same fields
        red = split_reduction(m.get("mac_reduction"), m["macs_per_exit"][-1])
        per_seed = m["mac_reduction_per_seed"]
        rows.append(
            [
                model_label(name),
                str(m["arch"]),
                _pm(m["exit_accuracy_mean"][-1], m["exit_accuracy_std"][-1], n),
                fmt_count(m["macs_per_exit"][-1]),
                f"{red['threshold']:.4g}" if red else "—",
                f"{100 * red['accuracy']:.2f}" if red else "not reached",
                fmt_count(red["mean_macs"]) if red else "—",
                f"{red['reduction']:.2f}x" if red and red.get("reduction") else "—",
                f"{red['from_network']:.2f}x" if red and red.get("from_network") else "—",
                f"{red['from_exits']:.2f}x" if red and red.get("from_exits") else "—",
                (
                    f"{per_seed['mean']:.2f}x{_pm_ratio(per_seed)} ({per_seed['reached']}/{per_seed['n_seeds']})"
                    if per_seed["mean"] is not None
                    else f"not reached (0/{per_seed['n_seeds']})"
                ),
            ]
        )
    lines += markdown_table(
        ["Model", "Arch", "Last exit (%)", "Full MACs", "θ", "Acc. (%)", "Mean MACs",
         "Reduction", "Network", "Exits", "Per seed (reached)"],
        rows,
    )  # fmt: skip
    lines.append("")
    lines += _tolerance_lines(models, ref, sub)

    compare_header = [
        "h", "θ", f"Accuracy diff. (points{', mean ± std' if n > 1 else ''})", "95 % interval",
        "Seeds ahead", "p", "MACs ratio", "Diff. at equal MACs (95 % interval)", "Winner",
    ]  # fmt: skip
    for comp in results["comparisons"]:
        if (comp["model"], comp["other"]) != PAIRS[0]:
            continue
        lines += [
            f"{sub} {model_label(comp['model'])} vs {model_label(comp['other'])} at each threshold",
            "",
            _comparison_sentence(comp, results),
            "Accuracy diff.: paired by seed. p: two-sided paired t-test of the per-seed "
            "differences (— with one seed or identical differences). "
            "95 % interval: of the mean paired difference (Student's t). "
            "MACs ratio: mean MACs of the first over the second. "
            "Diff. at equal MACs: the first's accuracy minus the best the second reaches with "
            "the same MACs on its own curve, paired by seed (in blocks published before "
            "2026-12-06: on the mean curves, without an interval; — outside the curve's range).",
            "",
        ]
        lines += markdown_table(compare_header, _comparison_rows(comp, n)) + [""]
    if against_baseline(results):
        lines += [
            f"![paired differences against the {model_label(PAIRS[0][1])}]({difference_link})",
            "",
            f"Every student against the {model_label(PAIRS[0][1])}, paired by seed, at each "
            + (
                "threshold of the table: at the same threshold (left) and at equal MACs "
                "(middle); the bars are 95 % intervals (two seeds or more). A bar that crosses "
                "0 is a difference the seeds do not show. Right: the difference at equal MACs "
                "all along the curve, from the first exit's cost to the full network's (95 % "
                "band at each MAC value, drawn for three students or fewer), with the "
                "whole-curve test in the legend."
                if results.get("whole_curve")
                else "threshold of the table: at the same threshold (left) and at equal MACs "
                "(right); the bars are 95 % intervals (two seeds or more). A bar that crosses "
                "0 is a difference the seeds do not show."
            ),
            "",
        ]
    if len(variant_rows(results)) >= MIN_VARIANTS:
        lines += [
            f"![each student against the {model_label(PAIRS[0][1])}: the whole curve and the "
            f"last exit]({variants_link})",
            "",
            f"The same students, one row each: the difference against the "
            f"{model_label(PAIRS[0][1])} over the whole accuracy-MACs curve (filled; its value "
            "and 95 % interval next to the name) and at the last exit (open), each with its "
            "95 % interval over seeds. A bar that crosses 0 is a difference the seeds do not "
            "show.",
            "",
        ]
    others = [c for c in results["comparisons"] if (c["model"], c["other"]) != PAIRS[0]]
    if others:
        lines += [
            f"{sub} Other pairs",
            "",
            "Paired by seed, as above. Thresholds won: of the table's thresholds. At the last "
            "exit: h = 0, every image answered by the full network (95 % interval with two "
            "seeds or more). At equal MACs: the mean over the thresholds of the difference at "
            "equal MACs."
            + (
                " Whole curve: the one test of the whole trade-off described above (95 % "
                "interval, p)."
                if results.get("whole_curve")
                else ""
            ),
            "",
        ]
        lines += markdown_table(
            ["Pair", "Thresholds won", "Mean diff. (points)", "At the last exit (95 % interval)",
             "At equal MACs"] + (["Whole curve"] if results.get("whole_curve") else []),
            [_pair_row(c, results) for c in others],
        ) + [""]  # fmt: skip

    lines += _diagnostic_lines(results.get("entropy_diagnostics"), sub)
    lines += [f"{sub} Anchors: last exit against published accuracies", ""]
    rows = [
        [
            model_label(a["model"]),
            str(a["arch"]),
            _pm(a["accuracy_mean"], a["accuracy_std"], n),
            "—" if a["published_accuracy"] is None else f"{100 * a['published_accuracy']:.2f}",
            _points(a["gap"]),
            a["source"] or "no published number for this setting",
        ]
        for a in results["anchors"]
    ]
    lines += markdown_table(
        ["Model", "Arch", "Measured (%)", "Published (%)", "Gap (points)", "Source"], rows
    )
    lines += ["", f"Note: {results['anchor_note']}.", ""]
    if results["schedule"] != "full":
        lines += [
            f"The {results['schedule']} schedule trains far shorter than the published "
            "recipes: its anchors measure the budget, not the method.",
            "",
        ]
    lines += [f"{sub} Trade-off curves", "", f"![accuracy vs MACs]({plot_link})", ""]
    if results.get("training_curves"):
        lines += [
            f"{sub} Training curves",
            "",
            f"Validation accuracy per exit after each epoch ({_count(data.get('val_images'))} "
            "images held out of the training set; mean over seeds with a ±1 std band, a teacher "
            "shared by the seeds counted once).",
            "",
            f"![training curves]({curves_link})",
            "",
        ]
    env = results.get("environment") or {}
    lines += [
        f"Environment: erde {env.get('erde', '?')}, torch {env.get('torch', '?')}, "
        f"{env.get('cuda_device') or 'CPU'} ({env.get('cpu_count', '?')} CPUs{_cpu_text(env)}), "
        f"{env.get('platform', '?')}.",
        "",
    ]
    return "\n".join(lines)


def _cpu_text(env: Mapping[str, Any]) -> str:
    """ ", AMD EPYC, AVX512, bf16: avx512_bf16" from an environment record (older ones lack it)."""
    if "cpu_model" not in env:
        return ""
    flags = ", ".join(env.get("cpu_bf16_flags") or []) or "none"
    return f", {env['cpu_model']}, {env.get('cpu_capability', '?')}, bf16 hardware: {flags}"


def render_plot(results: Mapping[str, Any], dpi: int = 120) -> bytes:
    """Mean accuracy vs mean MACs per model, a +-1 std band, table points and single exits."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    models = results["models"]
    scale, unit = mac_unit(models)
    for index, (name, model) in enumerate(models.items()):
        label, colour, line, marker = curve_style(name, index)
        curve = sorted(model["curve"], key=lambda p: p["macs_mean"])
        xs = np.array([p["macs_mean"] for p in curve]) / scale
        ys = np.array([100 * p["accuracy_mean"] for p in curve])
        spread = np.array([100 * p["accuracy_std"] for p in curve])
        ax.fill_between(xs, ys - spread, ys + spread, color=colour, alpha=0.15, linewidth=0)
        ax.plot(xs, ys, linestyle=line, color=colour, linewidth=1.4, label=label)
        rows = model["thresholds"]
        ax.plot(
            [r["macs_mean"] / scale for r in rows],
            [100 * r["accuracy_mean"] for r in rows],
            linestyle="none", marker=marker, color=colour, markersize=4,
        )  # fmt: skip
        ax.errorbar(
            [m / scale for m in model["macs_per_exit"]],
            [100 * a for a in model["exit_accuracy_mean"]],
            yerr=[100 * s for s in model["exit_accuracy_std"]],
            fmt=marker, markersize=8, markerfacecolor="none", color=colour, capsize=3,
            linewidth=1, label=f"{label}: single exits",
        )  # fmt: skip
    ref = results["reference"]
    ax.axhline(
        100 * (ref["accuracy_mean"] - ref["tolerance"]), color="gray", linestyle="--", linewidth=1,
        label=f"{model_label(ref['model'])} last exit − {100 * ref['tolerance']:.2g} pts",
    )  # fmt: skip
    ax.set_xlabel(f"Mean MACs per image ({unit}MACs)" if unit else "Mean MACs per image")
    ax.set_ylabel("Accuracy (%)")
    use_log_macs(ax, [m for model in models.values() for m in model["macs_per_exit"]])
    n = results["n_seeds"]
    planned = int(results.get("planned_seeds") or n)
    seeds = f"{n} of {planned} seeds so far" if planned > n else f"{n} seeds"
    ax.set_title(
        f"{results['dataset']['name']}, {results['schedule']} schedule: "
        f"{f'mean ± std over {seeds}' if n > 1 else 'one seed'} ({results['rule']} rule)",
        fontsize=10,
    )
    return figure_png(fig, ax, dpi)


def json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, default=io.json_default).encode() + b"\n"


def write_rendered(files: Mapping[str, tuple[Path, bytes]]) -> dict[str, Path]:
    """Write ``{kind: (path, bytes)}`` atomically; all were rendered before the first write."""
    for path, data in files.values():
        io.atomic_write_bytes(path, data)
    return {kind: path for kind, (path, _) in files.items()}


def render_training_png(results: Mapping[str, Any]) -> bytes | None:
    """The training curves of the results' models, or None when they hold none."""
    curves = results.get("training_curves") or {}
    if not any(c.get("epoch") for c in curves.values()):
        return None
    name, schedule = results["dataset"]["name"], results["schedule"]
    return render_curves_png(curves, title=f"Training curves: {name}, {schedule} schedule")


def write_results(out_dir: str | Path, results: Mapping[str, Any]) -> dict[str, Path]:
    """results.json, results.md, tradeoff.png (and training.png, difference.png,
    variants.png) in ``out_dir``, atomically."""
    out = Path(out_dir)
    files = {
        "results": (out / "results.json", json_bytes(results)),
        "markdown": (out / "results.md", render_markdown(results).encode()),
        "plot": (out / "tradeoff.png", render_plot(results)),
    }
    training = render_training_png(results)
    if training is not None:
        files["training"] = (out / "training.png", training)
    difference = render_difference_png(results)
    if difference is not None:
        files["difference"] = (out / "difference.png", difference)
    variants = render_variants_png(results)
    if variants is not None:
        files["variants"] = (out / "variants.png", variants)
    return write_rendered(files)


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """A few lines for the terminal: the reduction per model and ERDE vs KD."""
    lines = []
    for name, m in results["models"].items():
        red = m.get("mac_reduction")
        text = (
            f"{red['reduction']:.2f}x fewer MACs" if red and red.get("reduction") else "not reached"
        )
        lines.append(
            f"{model_label(name):14s} last exit {_pm(m['exit_accuracy_mean'][-1], m['exit_accuracy_std'][-1], results['n_seeds'])}%"
            f"   at equal accuracy: {text}"
        )
    lines += [_comparison_sentence(c, results) for c in results["comparisons"][:1]]
    return lines
