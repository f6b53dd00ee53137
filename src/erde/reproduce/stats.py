"""Statistics over seeds: per-threshold mean and spread, paired tests, MAC reduction, anchors.

Pure functions of per-seed ``report.json`` dicts: nothing here trains or reads
files, so every number can be tested on hand-made reports.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from erde import io
from erde.errors import ConfigError
from erde.evaluation import (
    TOLERANCE_LEVELS,
    SweepPoint,
    default_thresholds,
    envelope_arrays,
    mac_reduction_at_equal_accuracy,
    reduction_ladder,
    split_reduction,
)
from erde.exits import rule_range
from erde.pipeline import STUDENT_METHODS
from erde.report import (
    model_label,
)

MODELS = ("teacher", *(f"student_{m}" for m in STUDENT_METHODS))
RULE = "entropy"
# Table rows: entropy threshold as a fraction h of its maximum log K. h = 0 sends every
# image to the last exit, h = 1 lets every non-uniform prediction leave at the first one.
TABLE_LEVELS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
# (model, other): "did model beat other at this threshold, and by how much?"
PAIRS = (
    ("student_erde", "student_kd"),
    ("student_erde", "student_ce"),
    ("student_kd", "student_ce"),
)
RESULTS_SCHEMA_VERSION = 1


def comparison_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """``PAIRS`` among ``names``, then every further student against KD (and against ERDE).

    A gamma sweep or a masked ERDE trained beside the default three is compared
    with what it must beat: classic KD, and the default ERDE it varies.
    """
    pairs = [(a, b) for a, b in PAIRS if a in names and b in names]
    extra = [n for n in names if n.startswith("student_") and n not in MODELS]
    for name in extra:
        pairs += [(name, other) for other in ("student_kd", "student_erde") if other in names]
    return pairs


_HE = "He et al. 2016 (arXiv 1512.03385), Table 6"
_CRD = "Tian et al. 2020 (CRD, arXiv 1910.10699), Table 1"
# Published top-1 accuracy of the plain (single-exit) network, by (dataset, arch).
PUBLISHED_PLAIN: dict[tuple[str, str], tuple[float, str]] = {
    ("cifar10", "resnet20"): (0.9125, f"{_HE}: 8.75% error"),
    ("cifar10", "resnet32"): (0.9249, f"{_HE}: 7.51% error"),
    ("cifar10", "resnet44"): (0.9283, f"{_HE}: 7.17% error"),
    ("cifar10", "resnet56"): (0.9303, f"{_HE}: 6.97% error"),
    ("cifar10", "resnet110"): (0.9339, f"{_HE}: 6.61 +- 0.16% error, mean of 5 runs"),
    ("cifar100", "resnet20"): (0.6906, _CRD),
    ("cifar100", "resnet32"): (0.7114, _CRD),
    ("cifar100", "resnet56"): (0.7234, _CRD),
    ("cifar100", "resnet110"): (0.7431, _CRD),
}
# Published accuracy of a plain student distilled with classic KD, by (dataset, teacher, student).
PUBLISHED_KD: dict[tuple[str, str, str], tuple[float, str]] = {
    ("cifar100", "resnet56", "resnet20"): (0.7066, _CRD),
    ("cifar100", "resnet110", "resnet20"): (0.7067, _CRD),
    ("cifar100", "resnet110", "resnet32"): (0.7308, _CRD),
}
ANCHOR_NOTE = (
    "published numbers are for single-exit networks trained with the authors' own schedule; "
    "here the last exit is the same network trained jointly with its early-exit heads"
)


def table_thresholds(num_classes: int) -> list[float]:
    """The fixed table grid as entropy thresholds: ``h * log K`` for each ``h``."""
    log_k = rule_range(RULE, num_classes)[1]
    return [level * log_k for level in TABLE_LEVELS]


def threshold_grid(num_classes: int, num_thresholds: int) -> list[float]:
    """The dense default grid (for the curves) plus the table grid, ascending."""
    dense = default_thresholds(RULE, num_classes, num_thresholds)
    return sorted(set(dense) | set(table_thresholds(num_classes)))


# --------------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_ci95(diffs: Sequence[float]) -> tuple[float | None, float | None]:
    """95 % confidence interval of the mean paired difference (Student's t, n - 1 dof).

    (None, None) with one seed: no spread, no interval.
    """
    from scipy.special import stdtrit

    n = len(diffs)
    if n < 2:
        return None, None
    mean, std = mean_std(diffs)
    half = float(stdtrit(n - 1, 0.975)) * std / math.sqrt(n)
    return mean - half, mean + half


def paired_p_value(diffs: Sequence[float]) -> float | None:
    """Two-sided paired t-test of the per-seed differences against 0.

    None when it is undefined (one seed, or every seed giving the same difference):
    with three seeds a consistent gap is still weak evidence, and the table says so.
    """
    from scipy.special import stdtr  # Student's t CDF (scipy.stats takes a second to import)

    if len(diffs) < 2:
        return None
    mean, std = mean_std(diffs)
    if std < 1e-12:  # equal differences up to float noise: t is not defined
        return None
    t_stat = mean / (std / math.sqrt(len(diffs)))
    return float(2 * stdtr(len(diffs) - 1, -abs(t_stat)))


def _mean_fractions(points: Sequence[Mapping[str, Any]]) -> list[float]:
    """Per-exit mean of the exit fractions of one threshold over seeds."""
    return [statistics.fmean(f) for f in zip(*(p["exit_fractions"] for p in points), strict=True)]


def _sweep_by_threshold(model: Mapping[str, Any]) -> dict[float, Mapping[str, Any]]:
    return {float(p["threshold"]): p for p in model["sweep"] if p["rule"] == RULE}


def _at(points: Mapping[float, Mapping[str, Any]], threshold: float, where: str) -> Mapping:
    """The sweep point at ``threshold`` (exact, or within float round-off)."""
    if threshold in points:
        return points[threshold]
    for t, p in points.items():
        if math.isclose(t, threshold, rel_tol=1e-9, abs_tol=1e-12):
            return p
    raise ConfigError(f"{where} has no {RULE} point at threshold {threshold:.6g}; re-evaluate it")


def _envelope(points: Sequence[tuple[float, float]], macs: float) -> float | None:
    """Best accuracy reachable with at most ``macs`` on (MACs, accuracy) ``points``.

    Linear between points; None outside their MAC range.
    """
    xs, ys = envelope_arrays(points)
    if len(xs) == 0 or macs < xs[0] - 1e-9 or macs > xs[-1] + 1e-9:
        return None
    return float(np.interp(macs, xs, ys))


def _envelope_accuracy(curve: Sequence[Mapping[str, Any]], macs: float) -> float | None:
    """Best mean accuracy reachable with at most ``macs`` on a model's mean ``curve``."""
    return _envelope([(p["macs_mean"], p["accuracy_mean"]) for p in curve], macs)


def equal_macs_diffs(
    row: Mapping[str, Any], curve: Sequence[Mapping[str, Any]]
) -> list[float] | None:
    """Per seed: a model's accuracy at a threshold minus the other's at the same MACs.

    ``row`` is the first model's threshold row, ``curve`` the other model's curve;
    seed ``s`` of the one is read against seed ``s`` of the other (the best accuracy
    its own curve reaches with at most those MACs), so the differences are paired
    like the accuracy differences at a threshold. None when the files predate the
    per-seed fields or a seed's MACs fall outside the other's curve.
    """
    if "macs_per_seed" not in row or not curve or "macs_per_seed" not in curve[0]:
        return None
    diffs = []
    for s, (acc, macs) in enumerate(
        zip(row["accuracy_per_seed"], row["macs_per_seed"], strict=True)
    ):
        ref = _envelope([(c["macs_per_seed"][s], c["accuracy_per_seed"][s]) for c in curve], macs)
        if ref is None:
            return None
        diffs.append(acc - ref)
    return diffs


def _paired(diffs: list[float] | None, prefix: str) -> dict[str, Any]:
    """Mean, std, p and 95 % interval of paired differences, as ``<prefix>_...`` fields."""
    if diffs is None:
        return {f"{prefix}_{k}": None for k in
                ("diff_mean", "diff_std", "p_value", "ci95_low", "ci95_high", "seeds_ahead")}  # fmt: skip
    mean, std = mean_std(diffs)
    low, high = paired_ci95(diffs)
    return {
        f"{prefix}_diff_mean": mean,
        f"{prefix}_diff_std": std,
        f"{prefix}_p_value": paired_p_value(diffs),
        f"{prefix}_ci95_low": low,
        f"{prefix}_ci95_high": high,
        f"{prefix}_seeds_ahead": sum(d > 0 for d in diffs),
    }


def _model_summary(
    name: str, per_seed: Sequence[Mapping[str, Any]], thresholds: Sequence[float], schedule: str
) -> dict[str, Any]:
    n = len(per_seed)
    first = per_seed[0]
    for other in per_seed[1:]:
        if other["macs_per_exit"] != first["macs_per_exit"]:
            raise ConfigError(f"{name}: seeds disagree on the model's MACs (different configs?)")
    sweeps = [_sweep_by_threshold(m) for m in per_seed]
    exit_stats = [mean_std(a) for a in zip(*(m["exit_accuracy"] for m in per_seed), strict=True)]
    has_ece = all(m.get("exit_ece") for m in per_seed)
    ece_stats = (
        [mean_std(e) for e in zip(*(m["exit_ece"] for m in per_seed), strict=True)]
        if has_ece
        else []
    )
    rows = []
    for level, threshold in zip(TABLE_LEVELS, thresholds, strict=True):
        points = [_at(s, threshold, f"{name} report") for s in sweeps]
        acc_mean, acc_std = mean_std([p["accuracy"] for p in points])
        macs_mean, macs_std = mean_std([p["mean_macs"] for p in points])
        rows.append(
            {
                "normalized_threshold": level,
                "threshold": threshold,
                "accuracy_mean": acc_mean,
                "accuracy_std": acc_std,
                "accuracy_per_seed": [p["accuracy"] for p in points],
                "macs_per_seed": [p["mean_macs"] for p in points],
                "macs_mean": macs_mean,
                "macs_std": macs_std,
                "exit_fractions_mean": _mean_fractions(points),
                "n_seeds": n,
                "schedule": schedule,
            }
        )
    common = sorted(set.intersection(*(set(s) for s in sweeps)))
    curve = []
    for threshold in common:
        points = [s[threshold] for s in sweeps]
        acc_mean, acc_std = mean_std([p["accuracy"] for p in points])
        curve.append(
            {
                "threshold": threshold,
                "accuracy_mean": acc_mean,
                "accuracy_std": acc_std,
                "macs_mean": statistics.fmean(p["mean_macs"] for p in points),
                "accuracy_per_seed": [p["accuracy"] for p in points],
                "macs_per_seed": [p["mean_macs"] for p in points],
                "exit_fractions_mean": _mean_fractions(points),
            }
        )
    reductions = [(m.get("mac_reduction") or {}).get("reduction") for m in per_seed]
    reached = [r for r in reductions if r is not None]
    return {
        "label": model_label(name),
        "arch": first.get("arch"),
        "num_exits": first["num_exits"],
        "macs_per_exit": first["macs_per_exit"],
        "params_per_exit": first.get("params_per_exit"),
        "exit_accuracy_mean": [m for m, _ in exit_stats],
        "exit_accuracy_std": [s for _, s in exit_stats],
        # expected calibration error per exit (None when a seed's report predates it)
        "exit_ece_mean": [m for m, _ in ece_stats] if has_ece else None,
        "exit_ece_std": [s for _, s in ece_stats] if has_ece else None,
        "thresholds": rows,
        "curve": curve,
        "mac_reduction_per_seed": {
            "reductions": reductions,
            "reached": len(reached),
            "n_seeds": n,
            "mean": mean_std(reached)[0] if reached else None,
            "std": mean_std(reached)[1] if reached else None,
        },
    }


def compare_pair(name: str, other: str, models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Paired (same seed) accuracy differences of ``name`` minus ``other`` at each table threshold."""
    rows = []
    for a, b in zip(models[name]["thresholds"], models[other]["thresholds"], strict=True):
        diffs = [x - y for x, y in zip(a["accuracy_per_seed"], b["accuracy_per_seed"], strict=True)]
        diff_mean, diff_std = mean_std(diffs)
        at_equal = _envelope_accuracy(models[other]["curve"], a["macs_mean"])
        winner = name if diff_mean > 1e-12 else other if diff_mean < -1e-12 else "tie"
        rows.append(
            {
                "normalized_threshold": a["normalized_threshold"],
                "threshold": a["threshold"],
                "accuracy_diff_mean": diff_mean,
                "accuracy_diff_std": diff_std,
                "p_value": paired_p_value(diffs),
                **dict(zip(("ci95_low", "ci95_high"), paired_ci95(diffs), strict=True)),
                "seeds_ahead": sum(d > 0 for d in diffs),
                "n_seeds": len(diffs),
                "winner": winner,
                "macs_ratio": a["macs_mean"] / b["macs_mean"] if b["macs_mean"] else None,
                "accuracy_diff_at_equal_macs": (
                    None if at_equal is None else a["accuracy_mean"] - at_equal
                ),
                **_paired(equal_macs_diffs(a, models[other]["curve"]), "equal_macs"),
            }
        )
    diffs = [r["accuracy_diff_mean"] for r in rows]
    return {
        "model": name,
        "other": other,
        "per_threshold": rows,
        "wins": sum(r["winner"] == name for r in rows),
        "losses": sum(r["winner"] == other for r in rows),
        "ties": sum(r["winner"] == "tie" for r in rows),
        "thresholds": len(rows),
        "beat_at_every_threshold": all(r["winner"] == name for r in rows),
        "accuracy_diff_mean": statistics.fmean(diffs),
        "accuracy_diff_min": min(diffs),
        "accuracy_diff_max": max(diffs),
    }


def _anchors(
    dataset: str, config: Mapping[str, Any], models: Mapping[str, Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Last-exit accuracy of teacher, CE and KD students next to published numbers."""
    teacher, student = config["teacher"], config["student"]
    wanted = {
        "teacher": PUBLISHED_PLAIN.get((dataset, teacher["arch"])),
        "student_ce": PUBLISHED_PLAIN.get((dataset, student["arch"])),
        "student_kd": PUBLISHED_KD.get((dataset, teacher["arch"], student["arch"])),
    }
    anchors = []
    for name, published in wanted.items():
        if name not in models:
            continue
        model_cfg = teacher if name == "teacher" else student
        model = models[name]
        entry = {
            "model": name,
            "arch": model["arch"],
            "accuracy_mean": model["exit_accuracy_mean"][-1],
            "accuracy_std": model["exit_accuracy_std"][-1],
            "published_accuracy": None,
            "source": None,
            "gap": None,
        }
        if published is not None and model_cfg.get("width", 1.0) == 1.0:
            entry.update(
                published_accuracy=published[0],
                source=published[1],
                gap=entry["accuracy_mean"] - published[0],
            )
        anchors.append(entry)
    return anchors


def mean_curve_points(model: Mapping[str, Any]) -> list[SweepPoint]:
    """A model's mean curve over seeds (``results["models"][name]["curve"]``) as sweep points."""
    return [
        SweepPoint(
            RULE, p["threshold"], p["accuracy_mean"], p["macs_mean"], p["exit_fractions_mean"]
        )
        for p in model["curve"]
    ]


def reductions_at_tolerances(
    model: Mapping[str, Any],
    reference: Mapping[str, Any],
    levels: Sequence[float] = TOLERANCE_LEVELS,
) -> list[dict[str, Any]]:
    """For each accuracy given up (fraction) below the reference's last exit, the cheapest
    threshold of ``model``'s mean curve that stays within it, split into network x exits.

    One dict per level, as :func:`erde.evaluation.mac_reduction_at_equal_accuracy` gives it
    (``reduction`` None where no threshold stays that close). ``reference`` is the results'
    ``reference`` entry (``accuracy_mean``, ``macs``).
    """
    return reduction_ladder(
        mean_curve_points(model), reference["accuracy_mean"], reference["macs"],
        float(model["macs_per_exit"][-1]), levels,
    )  # fmt: skip


def training_time(
    history: Sequence[Mapping[str, Any]], batch_size: int
) -> dict[str, float | int] | None:
    """What training one model cost here, from its metrics.jsonl records (one per epoch).

    ``seconds_per_epoch`` is the median over epochs of the time per step times the epoch's
    steps, and ``hours`` that times the epochs: a long run that was stopped and resumed times a
    resumed epoch only in part and repeats the steps since its last checkpoint, and epochs that
    shared the CPU with other work are slow, so the sum of the recorded times
    (``recorded_hours``) says less about what an epoch costs. Models trained side by side share
    their loop's time. Records without a time per step (older runs) count with their epoch time.

    >>> t = training_time([{"seconds": 30.0, "seconds_per_step": 0.1, "images": 25600},
    ...                    {"seconds": 9.0, "seconds_per_step": 0.3, "images": 25600},
    ...                    {"seconds": 21.0, "seconds_per_step": 0.105, "images": 25600}], 128)
    >>> t["epochs"], round(t["seconds_per_epoch"], 1), round(t["hours"] * 3600), t["recorded_hours"]
    (3, 21.0, 63, 0.016666666666666666)
    """
    per_epoch = []
    for record in history:
        steps = record.get("steps") or (record.get("images") or 0) / batch_size
        if record.get("seconds_per_step") and steps:
            per_epoch.append(float(record["seconds_per_step"]) * steps)
        elif record.get("seconds"):
            per_epoch.append(float(record["seconds"]))
    if not per_epoch:
        return None
    median = statistics.median(per_epoch)
    return {
        "epochs": len(history),
        "seconds_per_epoch": median,
        "hours": len(history) * median / 3600,
        "recorded_hours": sum(float(r.get("seconds") or 0) for r in history) / 3600,
    }


def _training_summary(
    training: Mapping[int, Mapping[str, Mapping[str, Any] | None]], names: Sequence[str]
) -> dict[str, dict[str, float | int]]:
    """Per model, the mean over seeds of :func:`training_time` (models with a record in every seed)."""
    out = {}
    for name in names:
        runs = [seed.get(name) for seed in training.values()]
        if not runs or any(r is None for r in runs):
            continue
        out[name] = {
            "epochs": max(int(r["epochs"]) for r in runs),
            "seconds_per_epoch": statistics.fmean(r["seconds_per_epoch"] for r in runs),
            "hours": statistics.fmean(r["hours"] for r in runs),
            "recorded_hours": statistics.fmean(r["recorded_hours"] for r in runs),
        }
    return out


def aggregate(
    reports: Mapping[int, Mapping[str, Any]],
    *,
    dataset: str,
    schedule: str,
    loader: str | None = None,
    command: str | None = None,
    seed_reports: Mapping[int, str] | None = None,
    teacher_seeds: int | None = None,
    design: str | None = None,
    training: Mapping[int, Mapping[str, Mapping[str, Any] | None]] | None = None,
    curves: Mapping[str, Mapping[str, Any]] | None = None,
    planned_seeds: int | None = None,
) -> dict[str, Any]:
    """Per-seed ``report.json`` dicts ``{seed: report}`` -> the results document.

    Every seed must hold the same models, evaluated on the table grid.
    ``teacher_seeds`` and ``design`` record how many teachers the student seeds
    learnt from (default: one per seed). ``training`` (``{seed: {model:
    training_time(...)}}``) records what training cost on this machine, and
    ``curves`` (``{model: erde.report.curves.mean_curve(...)}``) how validation
    accuracy per exit went over the epochs. ``planned_seeds`` is how many seeds
    the command asked for (default: those given), so that results written
    while later seeds still train say they are partial.
    """
    if not reports:
        raise ValueError("no seed reports to aggregate")
    seeds = sorted(reports)
    first = reports[seeds[0]]
    names = [n for n in MODELS if all(n in reports[s]["models"] for s in seeds)]
    names += [
        n
        for n in first["models"]
        if n not in names and all(n in reports[s]["models"] for s in seeds)
    ]
    num_classes = int(first["dataset"]["num_classes"])
    thresholds = table_thresholds(num_classes)
    models = {
        n: _model_summary(n, [reports[s]["models"][n] for s in seeds], thresholds, schedule)
        for n in names
    }
    ref_name = "teacher" if "teacher" in models else names[0]
    reference = {
        "model": ref_name,
        "accuracy_mean": models[ref_name]["exit_accuracy_mean"][-1],
        "accuracy_std": models[ref_name]["exit_accuracy_std"][-1],
        "macs": float(models[ref_name]["macs_per_exit"][-1]),
        "tolerance": float(first["reference"]["tolerance"]),
    }
    for model in models.values():
        model["mac_reduction"] = split_reduction(
            mac_reduction_at_equal_accuracy(
                mean_curve_points(model), reference["accuracy_mean"], reference["macs"],
                reference["tolerance"],
            ),
            float(model["macs_per_exit"][-1]),
        )  # fmt: skip
        model["mac_reduction_by_tolerance"] = reductions_at_tolerances(model, reference)
        for row in model["thresholds"]:
            row["macs_fraction_of_reference"] = row["macs_mean"] / reference["macs"]
    comparisons = [compare_pair(a, b, models) for a, b in comparison_pairs(list(models))]
    config = first.get("config") or {}
    data = first.get("dataset") or {}
    return {
        "schema": "erde-reproduce",
        "schema_version": RESULTS_SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "dataset": {
            "name": dataset,
            "loader": loader or data.get("name", dataset),
            "num_classes": num_classes,
            "test_images": data.get("test_images"),
            "train_images": data.get("train_images"),
            "val_images": data.get("val_images"),
        },
        "schedule": schedule,
        "seeds": seeds,
        "n_seeds": len(seeds),
        "planned_seeds": max(planned_seeds or 0, len(seeds)),
        "teacher_seeds": teacher_seeds if teacher_seeds is not None else len(seeds),
        "teacher_design": design or "one teacher per seed (independent replicates)",
        "rule": RULE,
        "units": {
            "accuracy": "fraction of test images in [0, 1]",
            "macs": "multiply-accumulates per test image, exit heads included",
            "std": "sample standard deviation over seeds (ddof=1); 0 with one seed",
            "p_value": "two-sided paired t-test of the per-seed accuracy differences; "
            "null with one seed or identical differences",
            "normalized_threshold": "entropy threshold / log(num_classes)",
        },
        "reference": reference,
        "models": models,
        "comparisons": comparisons,
        "anchors": _anchors(dataset, config, models),
        "anchor_note": ANCHOR_NOTE
        + (
            f"; the images were read with the {loader} loader from a copy, whose pixels may "
            "differ from the official release (e.g. a JPEG re-encoding)"
            if loader not in (None, dataset)
            else ""
        ),
        "training_time": _training_summary(training or {}, names),
        "training_curves": {n: dict(curves[n]) for n in names if curves and n in curves},
        "seed_reports": {str(s): p for s, p in (seed_reports or {}).items()},
        "config": config,
        "environment": first.get("environment") or io.environment_info(),
    }
