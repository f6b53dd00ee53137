"""Reproduce the paper's comparison over several seeds: train, evaluate, aggregate, publish.

For each seed, :func:`reproduce` trains the teacher and the ce/kd/erde students
(finished runs are reused, interrupted ones resumed) and evaluates the four of
them once on a fixed threshold grid: ``seed_<s>/`` is an ordinary run folder
with its own ``report.json``. The seeds are then aggregated into

- ``results.json``: per model and fixed threshold, accuracy mean and std over
  seeds, mean MACs, number of seeds and schedule; the MAC reduction at equal
  accuracy; which model beat which at each threshold, by how much and with
  what paired-t p-value; anchors
  (last-exit accuracy against published numbers);
- ``results.md``: the paper-style table and the same facts as tables;
- ``tradeoff.png``: mean accuracy against mean MACs with a +-1 std band.

Schedules: ``full`` is the data set's preset (``configs/<dataset>.yaml``);
``reduced`` lays ``configs/schedules/reduced.yaml`` over it (a budget for a
2-core CPU; the file gives the measurements it was sized from).

Thresholds are those of the entropy rule, written ``theta = h * log K`` so that
one grid of ``h`` (``TABLE_LEVELS``) reads the same for 10 and 100 classes.
Accuracies are fractions in [0, 1] in the JSON and percentages in the Markdown;
std is the sample standard deviation over seeds (0 with one seed).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import shlex
import statistics
import tarfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from erde import io
from erde.config import ExperimentConfig, load_config, load_yaml, preset_path
from erde.data.formats import CIFAR10
from erde.errors import ConfigError, DataError
from erde.evaluation import SweepPoint, default_thresholds, mac_reduction_at_equal_accuracy
from erde.exits import rule_range
from erde.pipeline import STUDENT_METHODS, evaluate_checkpoints
from erde.report import (
    curve_style,
    figure_png,
    fmt_count,
    mac_unit,
    markdown_table,
    model_label,
    use_log_macs,
)
from erde.training import Job, load_splits, train

SCHEDULES = ("full", "reduced")
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

Log = Callable[[str], None]


# --------------------------------------------------------------------------- configuration


def schedule_path(schedule: str) -> Path | None:
    """The overlay file of ``schedule`` (None for ``full``, which is the preset itself)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if schedule == "full":
        return None
    return Path(__file__).parent / "configs" / "schedules" / f"{schedule}.yaml"


def reproduce_config(
    dataset: str,
    schedule: str = "full",
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> ExperimentConfig:
    """Defaults < preset ``dataset`` < ``schedule`` overlay < ``config`` file < ``overrides``."""
    overlay = schedule_path(schedule)
    preset = preset_path(dataset)
    if not preset.is_file():
        known = sorted(p.stem for p in preset.parent.glob("*.yaml"))
        raise ConfigError(f"no preset for dataset {dataset!r}; presets: {', '.join(known)}")
    base = load_yaml(preset)
    if overlay is not None:
        base = load_config(overlay, base=base).to_dict()
    return load_config(config, list(overrides), base=base)


def reproduce_command(
    dataset: str,
    data_dir: str | Path | None,
    seeds: int,
    schedule: str,
    overrides: Sequence[str] = (),
) -> str:
    """The ``erde reproduce`` command line that produces these results (for the record)."""
    parts = ["erde", "reproduce", "--dataset", dataset]
    if data_dir is not None:
        parts += ["--data-dir", str(data_dir)]
    parts += ["--seeds", str(seeds), "--schedule", schedule]
    for text in overrides:
        parts += ["--set", text]
    return shlex.join(parts)


def _archive_is_imagefolder(path: Path, members: int = 64) -> bool:
    """Whether the first members of a tar archive sit under train/ or test/."""
    try:
        with tarfile.open(path, "r|*") as tar:
            for i, member in enumerate(tar):
                top = member.name.replace("\\", "/").lstrip("./").split("/", 1)[0]
                if top in ("train", "test"):
                    return True
                if top == CIFAR10.folder or i + 1 >= members:
                    return False
    except (tarfile.TarError, OSError, EOFError):
        return False  # the loader reports the unreadable archive
    return False


def detect_loader(dataset: str, data_dir: str | Path | None) -> str:
    """The loader that reads ``data_dir``: ``imagefolder`` for a CIFAR-10 ImageFolder copy.

    CIFAR-10 is accepted in two layouts: the official python release (folder or
    ``cifar-10-python.tar.gz``) and an ImageFolder copy (``train/<class>/*.jpg``,
    ``test/<class>/*.jpg``, unpacked or as a .tar.gz). The official layout wins
    when both are present; a folder with neither is a ``DataError`` naming both.
    Every other data set keeps its own loader.
    """
    if dataset != "cifar10" or data_dir is None:
        return dataset
    root = Path(data_dir).expanduser()
    if root.is_file():
        if root.name != CIFAR10.archive and root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "imagefolder" if _archive_is_imagefolder(root) else dataset
        return dataset
    official = (
        (root / CIFAR10.folder).is_dir()
        or (root / CIFAR10.archive).is_file()
        or (root / CIFAR10.train_files[0]).is_file()
    )
    if official:
        return dataset
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "imagefolder"
    raise DataError(
        f"CIFAR-10 not found in {root}: expected the official release ({CIFAR10.folder}/ or "
        f"{CIFAR10.archive}; --download fetches it) or an ImageFolder copy "
        "(train/<class>/*.jpg and test/<class>/*.jpg, as a folder or a .tar.gz given as --data-dir)"
    )


# --------------------------------------------------------------------------- one seed


def table_thresholds(num_classes: int) -> list[float]:
    """The fixed table grid as entropy thresholds: ``h * log K`` for each ``h``."""
    log_k = rule_range(RULE, num_classes)[1]
    return [level * log_k for level in TABLE_LEVELS]


def threshold_grid(num_classes: int, num_thresholds: int) -> list[float]:
    """The dense default grid (for the curves) plus the table grid, ascending."""
    dense = default_thresholds(RULE, num_classes, num_thresholds)
    return sorted(set(dense) | set(table_thresholds(num_classes)))


def _training_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a config that change what training produces."""
    view = copy.deepcopy(dict(config))
    for key in ("device", "evaluation"):
        view.pop(key, None)
    data = dict(view.get("data") or {})
    for key in ("data_dir", "eval_batch_size"):
        data.pop(key, None)
    view["data"] = data
    return view


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_reusable(seed_dir: Path, cfg: ExperimentConfig) -> None:
    """Refuse to reuse runs in ``seed_dir`` that were trained with another config.

    Training resumes or reuses whatever checkpoint it finds, so a folder left by
    another schedule or architecture would silently enter the statistics.
    """
    want = _flatten(_training_view(cfg.to_dict()))
    for name in MODELS:
        saved = seed_dir / name / "config.yaml"
        if not saved.is_file():
            continue
        have = _flatten(_training_view(load_yaml(saved)))
        differing = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if differing:
            shown = ", ".join(
                f"{k} ({have.get(k)!r} there, {want.get(k)!r} now)" for k in differing[:4]
            )
            raise ConfigError(
                f"{saved.parent} was trained with another config: {shown}"
                f"{' ...' if len(differing) > 4 else ''}; use another --out or delete that folder"
            )


def _report_is_current(report: Path, checkpoints: Sequence[Path], grid: Sequence[float]) -> bool:
    """A seed report newer than its checkpoints, covering every model and threshold."""
    if not report.is_file():
        return False
    written = report.stat().st_mtime_ns
    if any(Path(c).stat().st_mtime_ns > written for c in checkpoints):
        return False
    try:
        models = json.loads(report.read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if set(models) != set(MODELS):
        return False
    wanted = set(grid)
    return all(
        wanted <= {p["threshold"] for p in m.get("sweep", []) if p.get("rule") == RULE}
        for m in models.values()
    )


def run_seed(cfg: ExperimentConfig, seed_dir: str | Path, *, progress: bool = True) -> Path:
    """Teacher + ce/kd/erde students for ``cfg.seed`` (reused when finished), then their report.

    The evaluation runs once per model on :func:`threshold_grid` and is skipped
    when ``seed_dir/report.json`` is already newer than all four checkpoints.
    """
    seed_dir = Path(seed_dir)
    check_reusable(seed_dir, cfg)
    splits = load_splits(cfg)
    common = {"resume": True, "progress": progress, "splits": splits}
    teacher = train(cfg, Job("teacher"), seed_dir / "teacher", **common)
    checkpoints = [teacher]
    for method in STUDENT_METHODS:
        checkpoints.append(
            train(
                cfg, Job("student", method), seed_dir / f"student_{method}",
                teacher_checkpoint=teacher, **common,
            )
        )  # fmt: skip
    grid = threshold_grid(splits.num_classes, cfg.evaluation.num_thresholds)
    report = seed_dir / "report.json"
    if not _report_is_current(report, checkpoints, grid):
        eval_cfg = dataclasses.replace(
            cfg, evaluation=dataclasses.replace(cfg.evaluation, rules=[RULE])
        )
        evaluate_checkpoints(
            checkpoints, seed_dir, cfg=eval_cfg, splits=splits, thresholds=grid, progress=progress
        )
    return report


# --------------------------------------------------------------------------- aggregation


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_p_value(diffs: Sequence[float]) -> float | None:
    """Two-sided paired t-test of the per-seed differences against 0.

    None when it is undefined (one seed, or every seed giving the same difference):
    with three seeds a consistent gap is still weak evidence, and the table says so.
    """
    from scipy.stats import t as student_t

    if len(diffs) < 2:
        return None
    mean, std = mean_std(diffs)
    if std < 1e-12:  # equal differences up to float noise: t is not defined
        return None
    t_stat = mean / (std / math.sqrt(len(diffs)))
    return float(2 * student_t.sf(abs(t_stat), len(diffs) - 1))


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


def _envelope_accuracy(curve: Sequence[Mapping[str, Any]], macs: float) -> float | None:
    """Best mean accuracy reachable with at most ``macs`` on ``curve`` (linear between points).

    None outside the curve's MAC range.
    """
    pts = sorted((p["macs_mean"], p["accuracy_mean"]) for p in curve)
    xs = np.array([x for x, _ in pts])
    ys = np.maximum.accumulate(np.array([y for _, y in pts]))
    if len(xs) == 0 or macs < xs[0] - 1e-9 or macs > xs[-1] + 1e-9:
        return None
    return float(np.interp(macs, xs, ys))


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


def _compare(name: str, other: str, models: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
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
                "seeds_ahead": sum(d > 0 for d in diffs),
                "n_seeds": len(diffs),
                "winner": winner,
                "macs_ratio": a["macs_mean"] / b["macs_mean"] if b["macs_mean"] else None,
                "accuracy_diff_at_equal_macs": (
                    None if at_equal is None else a["accuracy_mean"] - at_equal
                ),
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


def aggregate(
    reports: Mapping[int, Mapping[str, Any]],
    *,
    dataset: str,
    schedule: str,
    loader: str | None = None,
    command: str | None = None,
    seed_reports: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Per-seed ``report.json`` dicts ``{seed: report}`` -> the results document.

    Every seed must hold the same models, evaluated on the table grid.
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
        points = [
            SweepPoint(
                RULE, p["threshold"], p["accuracy_mean"], p["macs_mean"], p["exit_fractions_mean"]
            )
            for p in model["curve"]
        ]
        model["mac_reduction"] = mac_reduction_at_equal_accuracy(
            points, reference["accuracy_mean"], reference["macs"], reference["tolerance"]
        )
        for row in model["thresholds"]:
            row["macs_fraction_of_reference"] = row["macs_mean"] / reference["macs"]
    comparisons = [_compare(a, b, models) for a, b in PAIRS if a in models and b in models]
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
        "seed_reports": {str(s): p for s, p in (seed_reports or {}).items()},
        "config": config,
        "environment": first.get("environment") or io.environment_info(),
    }


# --------------------------------------------------------------------------- rendering


def _pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    """Fraction as "mean +- std" in percent."""
    if mean is None:
        return "—"
    return f"{100 * mean:.{digits}f} ± {100 * (std or 0.0):.{digits}f}"


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _points(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:+.2f}"


def _comparison_rows(comp: Mapping[str, Any]) -> list[list[str]]:
    return [
        [
            f"{r['normalized_threshold']:g}",
            f"{r['threshold']:.4g}",
            f"{_points(r['accuracy_diff_mean'])} ± {100 * r['accuracy_diff_std']:.2f}",
            f"{r['seeds_ahead']}/{r['n_seeds']}",
            "—" if r["p_value"] is None else f"{r['p_value']:.2g}",
            "—" if r["macs_ratio"] is None else f"{r['macs_ratio']:.2f}",
            _points(r["accuracy_diff_at_equal_macs"]),
            model_label(r["winner"]) if r["winner"] != "tie" else "tie",
        ]
        for r in comp["per_threshold"]
    ]


def _comparison_sentence(comp: Mapping[str, Any]) -> str:
    a, b = model_label(comp["model"]), model_label(comp["other"])
    return (
        f"{a} beat {b} at {comp['wins']} of {comp['thresholds']} thresholds "
        f"({'every one' if comp['beat_at_every_threshold'] else 'not every one'}); "
        f"difference in accuracy {_points(comp['accuracy_diff_mean'])} points on average "
        f"(from {_points(comp['accuracy_diff_min'])} to {_points(comp['accuracy_diff_max'])})."
    )


def render_markdown(
    results: Mapping[str, Any], *, plot_link: str = "tradeoff.png", level: int = 1
) -> str:
    """The results as Markdown; ``level`` is the heading level of the title."""
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
    lines = [
        f"{h} {data['name']}: {results['schedule']} schedule, {n} seed{'s' * (n != 1)}",
        "",
        f"Command: `{results['command']}`" if results.get("command") else "",
        "",
        f"Models: {archs}. Epochs: teacher {cfg.get('teacher_train', {}).get('epochs', '?')}, "
        f"students {cfg.get('student_train', {}).get('epochs', '?')}. Seeds: "
        f"{', '.join(str(s) for s in results['seeds'])}. Test set: {_count(data.get('test_images'))} "
        f"images{loader}, {data['num_classes']} classes.",
        "",
        f"Entropy exit rule at θ = h · log K. Accuracy: mean ± std over seeds (sample std), in %. "
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
                f"{_pm(r['accuracy_mean'], r['accuracy_std'])} · {fmt_count(r['macs_mean'])}"
            )
        rows.append(row)
    lines += markdown_table(header, rows) + [""]

    ref = results["reference"]
    lines += [
        f"{sub} MAC reduction at equal accuracy",
        "",
        f"Cheapest threshold on the mean curve whose mean accuracy is at least the "
        f"{model_label(ref['model'])}'s last exit ({_pm(ref['accuracy_mean'], ref['accuracy_std'])}% at "
        f"{fmt_count(ref['macs'])} MACs) minus {100 * ref['tolerance']:.2g} points; reduction = "
        f"reference MACs / mean MACs. Per seed: the same on each seed's own curve.",
        "",
    ]
    rows = []
    for name, m in models.items():
        red = m.get("mac_reduction")
        per_seed = m["mac_reduction_per_seed"]
        rows.append(
            [
                model_label(name),
                str(m["arch"]),
                _pm(m["exit_accuracy_mean"][-1], m["exit_accuracy_std"][-1]),
                fmt_count(m["macs_per_exit"][-1]),
                f"{red['threshold']:.4g}" if red else "—",
                f"{100 * red['accuracy']:.2f}" if red else "not reached",
                fmt_count(red["mean_macs"]) if red else "—",
                f"{red['reduction']:.2f}x" if red and red.get("reduction") else "—",
                (
                    f"{per_seed['mean']:.2f}x ± {per_seed['std']:.2f} ({per_seed['reached']}/{per_seed['n_seeds']})"
                    if per_seed["mean"] is not None
                    else f"not reached (0/{per_seed['n_seeds']})"
                ),
            ]
        )
    lines += markdown_table(
        ["Model", "Arch", "Last exit (%)", "Full MACs", "θ", "Acc. (%)", "Mean MACs",
         "Reduction", "Per seed (reached)"],
        rows,
    )  # fmt: skip
    lines.append("")

    compare_header = [
        "h", "θ", "Accuracy diff. (points, mean ± std)", "Seeds ahead", "p", "MACs ratio",
        "Diff. at equal MACs", "Winner",
    ]  # fmt: skip
    for comp in results["comparisons"]:
        if (comp["model"], comp["other"]) != PAIRS[0]:
            continue
        lines += [
            f"{sub} {model_label(comp['model'])} vs {model_label(comp['other'])} at each threshold",
            "",
            _comparison_sentence(comp),
            "Accuracy diff.: paired by seed. p: two-sided paired t-test of the per-seed "
            "differences (— with one seed or identical differences). "
            "MACs ratio: mean MACs of the first over the second. "
            "Diff. at equal MACs: against the best accuracy the second reaches with the same "
            "mean MACs on its mean curve (— outside its range).",
            "",
        ]
        lines += markdown_table(compare_header, _comparison_rows(comp)) + [""]
    others = [c for c in results["comparisons"] if (c["model"], c["other"]) != PAIRS[0]]
    if others:
        lines += [f"{sub} Other pairs", ""]
        lines += [f"- {_comparison_sentence(c)}" for c in others] + [""]

    lines += [f"{sub} Anchors: last exit against published accuracies", ""]
    rows = [
        [
            model_label(a["model"]),
            str(a["arch"]),
            _pm(a["accuracy_mean"], a["accuracy_std"]),
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
    env = results.get("environment") or {}
    lines += [
        f"Environment: erde {env.get('erde', '?')}, torch {env.get('torch', '?')}, "
        f"{env.get('cuda_device') or 'CPU'} ({env.get('cpu_count', '?')} CPUs), "
        f"{env.get('platform', '?')}.",
        "",
    ]
    return "\n".join(lines)


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
    ax.set_title(
        f"{results['dataset']['name']}, {results['schedule']} schedule: mean ± std over "
        f"{n} seed{'s' * (n != 1)} ({results['rule']} rule)",
        fontsize=10,
    )
    return figure_png(fig, ax, dpi)


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, indent=2, default=io.json_default).encode() + b"\n"


def _write_rendered(files: Mapping[str, tuple[Path, bytes]]) -> dict[str, Path]:
    """Write ``{kind: (path, bytes)}`` atomically; all were rendered before the first write."""
    for path, data in files.values():
        io.atomic_write_bytes(path, data)
    return {kind: path for kind, (path, _) in files.items()}


def write_results(out_dir: str | Path, results: Mapping[str, Any]) -> dict[str, Path]:
    """results.json, results.md and tradeoff.png in ``out_dir``, each written atomically."""
    out = Path(out_dir)
    return _write_rendered(
        {
            "results": (out / "results.json", _json_bytes(results)),
            "markdown": (out / "results.md", render_markdown(results).encode()),
            "plot": (out / "tradeoff.png", render_plot(results)),
        }
    )


# --------------------------------------------------------------------------- publishing


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- erde-results:{name}:begin -->", f"<!-- erde-results:{name}:end -->"


def replace_block(text: str, name: str, block: str) -> str:
    """Put ``block`` between the data set's markers in ``text`` (appended with markers if absent)."""
    begin, end = _markers(name)
    i, j = text.find(begin), text.find(end)
    if i >= 0 and j > i:
        return f"{text[: i + len(begin)]}\n{block.strip()}\n{text[j:]}"
    return f"{text.rstrip()}\n\n## {name}\n\n{begin}\n{block.strip()}\n{end}\n"


def publish(results: Mapping[str, Any], docs_dir: str | Path) -> dict[str, Path]:
    """Copy the results into the docs: ``results/<name>.json``, ``.png`` and RESULTS.md's block."""
    docs = Path(docs_dir)
    name = results["dataset"]["name"]
    doc = docs / "RESULTS.md"
    text = doc.read_text() if doc.is_file() else "# Results\n"
    block = render_markdown(results, plot_link=f"results/{name}.png", level=3)
    return _write_rendered(
        {
            "docs_results": (docs / "results" / f"{name}.json", _json_bytes(results)),
            "docs_plot": (docs / "results" / f"{name}.png", render_plot(results)),
            "docs_markdown": (doc, replace_block(text, name, block).encode()),
        }
    )


# --------------------------------------------------------------------------- the command


def reproduce(
    dataset: str,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    seeds: int = 3,
    schedule: str = "full",
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    download: bool = False,
    docs_dir: str | Path | None = None,
    progress: bool = True,
    log: Log | None = None,
) -> dict[str, Path]:
    """Train and evaluate every seed (reusing finished runs), then aggregate and write.

    Seeds are ``seed, seed + 1, ...`` from the config's ``seed`` (default 0).
    The results are rewritten after every seed, so an interrupted run still
    leaves the statistics of the seeds it finished.
    """
    log = log or (lambda _message: None)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    cfg = reproduce_config(dataset, schedule, config=config, overrides=overrides)
    if data_dir is not None:
        cfg.data.data_dir = str(data_dir)
    if download:
        from erde.download import download_dataset

        if cfg.data.data_dir is None:
            raise ConfigError("--download needs --data-dir (where to put the files)")
        download_dataset(dataset, cfg.data.data_dir, progress=progress)
    loader = detect_loader(dataset, cfg.data.data_dir)
    if loader != cfg.data.name:
        log(f"{cfg.data.data_dir}: {dataset} in {loader} layout, read with the {loader} loader")
        cfg.data.name = loader
    out = Path(out_dir)
    command = reproduce_command(dataset, cfg.data.data_dir, seeds, schedule, overrides)
    reports: dict[int, dict[str, Any]] = {}
    relative: dict[int, str] = {}
    paths: dict[str, Path] = {}
    for i, seed in enumerate(range(cfg.seed, cfg.seed + seeds)):
        seed_dir = out / f"seed_{seed}"
        log(f"seed {seed} ({i + 1}/{seeds}) -> {seed_dir}")
        report = run_seed(dataclasses.replace(cfg, seed=seed), seed_dir, progress=progress)
        reports[seed] = json.loads(report.read_text())
        relative[seed] = str(report.relative_to(out))
        results = aggregate(
            reports, dataset=dataset, schedule=schedule, loader=loader, command=command,
            seed_reports=relative,
        )  # fmt: skip
        paths = write_results(out, results)
    if docs_dir is not None:
        paths.update(publish(results, docs_dir))
    return paths


def summary_lines(results: Mapping[str, Any]) -> list[str]:
    """A few lines for the terminal: the reduction per model and ERDE vs KD."""
    lines = []
    for name, m in results["models"].items():
        red = m.get("mac_reduction")
        text = (
            f"{red['reduction']:.2f}x fewer MACs" if red and red.get("reduction") else "not reached"
        )
        lines.append(
            f"{model_label(name):14s} last exit {_pm(m['exit_accuracy_mean'][-1], m['exit_accuracy_std'][-1])}%"
            f"   at equal accuracy: {text}"
        )
    lines += [_comparison_sentence(c) for c in results["comparisons"][:1]]
    return lines


__all__ = [
    "MODELS",
    "PAIRS",
    "PUBLISHED_KD",
    "PUBLISHED_PLAIN",
    "SCHEDULES",
    "TABLE_LEVELS",
    "aggregate",
    "check_reusable",
    "detect_loader",
    "mean_std",
    "paired_p_value",
    "publish",
    "render_markdown",
    "render_plot",
    "replace_block",
    "reproduce",
    "reproduce_command",
    "reproduce_config",
    "run_seed",
    "schedule_path",
    "summary_lines",
    "table_thresholds",
    "threshold_grid",
    "write_results",
]
