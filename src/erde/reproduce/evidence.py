"""The per-image evidence of a results block: gathered from the seeds, checked, re-derived.

Each seed folder holds ``records.npz`` (every model's per-image records, see
:mod:`erde.records`). :func:`gather` packs the finished seeds into one file for
the block (a teacher shared by several seeds once) and returns the entry that
``results.json`` carries: its sha256, image and class counts, and which array
holds which seed's model. :func:`rederive` recomputes the block's tables (per
threshold and seed, the means and spreads, the training-free curve and every
paired comparison, the entropy diagnostics and the whole-curve comparisons) from that
file alone, and lists any number that differs.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from erde.io import file_sha256
from erde.records import (
    ExitRecords,
    RecordsError,
    load_records,
    save_records,
    sweep_records,
)
from erde.reproduce.diagnostics import block_diagnostics
from erde.reproduce.stats import compare_pair, comparison_pairs, mean_std
from erde.reproduce.tradeoff import block_tradeoff

RECORDS_SUFFIX = "-records.npz"  # docs/results/<block>-records.npz beside <block>.json


def gather(
    out: Path, seeds: Sequence[tuple[int, int]], names: Sequence[str], target: Path
) -> dict[str, Any]:
    """Pack the records of ``seeds`` ((student seed, teacher seed) pairs) into ``target``.

    Returns the ``records`` entry of results.json.
    """
    packed: dict[str, ExitRecords] = {}
    entries: dict[str, dict[str, str]] = {}
    labels = None
    for seed, teacher_seed in seeds:
        seed_labels, held = load_records(out / f"seed_{seed}" / "records.npz")
        if labels is None:
            labels = seed_labels
        elif not np.array_equal(labels, seed_labels):
            raise RecordsError(f"seed {seed} was evaluated on other test labels than the first")
        entries[str(seed)] = {}
        for name in names:
            owner = teacher_seed if name == "teacher" else seed
            key = f"seed_{owner}/{name}"
            if key not in packed:
                packed[key] = held[name]
            entries[str(seed)][name] = key
    assert labels is not None
    sha = save_records(target, packed, labels)
    classes = int(max(int(r.pred.max(initial=0)) for r in packed.values()) + 1)
    return {"sha256": sha, "images": int(len(labels)), "classes_seen": classes, "entries": entries}


def records_path(results_json: Path) -> Path:
    """Where a block's records live: ``<stem>-records.npz``, or ``records.npz`` in a run folder."""
    beside = results_json.with_name(results_json.stem + RECORDS_SUFFIX)
    return beside if beside.is_file() else results_json.with_name("records.npz")


def load_block_records(
    results: Mapping[str, Any], path: Path
) -> tuple[np.ndarray, dict[str, ExitRecords]]:
    """The block's records, refused unless they are the very file its JSON describes."""
    info = results.get("records")
    if not isinstance(info, Mapping):
        raise RecordsError("these results carry no per-image records (written before they existed)")
    if not path.is_file():
        raise RecordsError(f"records file not found: {path}")
    sha = file_sha256(path)
    if sha != info.get("sha256"):
        raise RecordsError(f"{path}: sha256 {sha[:12]}... is not the {str(info.get('sha256'))[:12]}... "
                           "its results name; the records and the JSON do not belong together")  # fmt: skip
    labels, held = load_records(path)
    images = results["dataset"].get("test_images")
    if len(labels) != info.get("images") or (images is not None and len(labels) != images):
        raise RecordsError(f"{path}: {len(labels)} images, the results say {info.get('images')}")
    classes = int(results["dataset"]["num_classes"])
    if int(labels.max(initial=0)) >= classes or any(
        int(r.pred.max(initial=0)) >= classes for r in held.values()
    ):
        raise RecordsError(f"{path}: a class index beyond the results' {classes} classes")
    for seed, models in info["entries"].items():
        for name, key in models.items():
            if key not in held:
                raise RecordsError(f"{path}: no records {key} for seed {seed}'s {name}")
    return labels, held


def _model_tables(
    model: Mapping[str, Any], per_seed: Sequence[ExitRecords], labels: np.ndarray
) -> dict[str, Any]:
    """A model's threshold rows, curve and exit accuracies, recomputed from its seeds' records."""
    macs = model["macs_per_exit"]

    def points(thresholds: Sequence[float]) -> list[list[Any]]:  # [seed][threshold]
        return [sweep_records(r, labels, macs, thresholds) for r in per_seed]

    table = points([row["threshold"] for row in model["thresholds"]])
    rows = []
    for i, row in enumerate(model["thresholds"]):
        at = [seed[i] for seed in table]
        acc_mean, acc_std = mean_std([p.accuracy for p in at])
        macs_mean, macs_std = mean_std([p.mean_macs for p in at])
        rows.append({**row, "accuracy_mean": acc_mean, "accuracy_std": acc_std,
                     "accuracy_per_seed": [p.accuracy for p in at],
                     "macs_per_seed": [p.mean_macs for p in at], "macs_mean": macs_mean,
                     "macs_std": macs_std, "exit_fractions_mean": _fractions(at)})  # fmt: skip
    curve_points = points([c["threshold"] for c in model.get("curve", [])])
    curve = []
    for i, c in enumerate(model.get("curve", [])):
        at = [seed[i] for seed in curve_points]
        acc_mean, acc_std = mean_std([p.accuracy for p in at])
        curve.append({**c, "accuracy_mean": acc_mean, "accuracy_std": acc_std,
                      "macs_mean": _fmean([p.mean_macs for p in at]),
                      "accuracy_per_seed": [p.accuracy for p in at],
                      "macs_per_seed": [p.mean_macs for p in at],
                      "exit_fractions_mean": _fractions(at)})  # fmt: skip
    exit_acc = [
        mean_std([float((r.pred[e].astype(np.int64) == labels).mean()) for r in per_seed])
        for e in range(per_seed[0].num_exits)
    ]
    return {**model, "thresholds": rows, "curve": curve,
            "exit_accuracy_mean": [m for m, _ in exit_acc],
            "exit_accuracy_std": [s for _, s in exit_acc]}  # fmt: skip


def _fmean(values: Sequence[float]) -> float:
    return statistics.fmean(values)


def _fractions(points: Sequence[Any]) -> list[float]:
    return [_fmean(f) for f in zip(*(p.exit_fractions for p in points), strict=True)]


def rederive(results: Mapping[str, Any], labels: np.ndarray,
             held: Mapping[str, ExitRecords]) -> dict[str, Any]:  # fmt: skip
    """The block's models and comparisons, recomputed from its records."""
    entries = results["records"]["entries"]
    seeds = [str(s) for s in results["seeds"]]
    models = {
        name: _model_tables(model, [held[entries[s][name]] for s in seeds], labels)
        for name, model in results["models"].items()
    }
    comparisons = [compare_pair(a, b, models) for a, b in comparison_pairs(list(models))]
    return {"models": models, "comparisons": comparisons,
            "entropy_diagnostics": block_diagnostics(results, labels, held),
            "whole_curve": block_tradeoff(results, labels, held)}  # fmt: skip


_CHECKED_ROW = ("accuracy_mean", "accuracy_std", "accuracy_per_seed", "macs_mean", "macs_std",
                "exit_fractions_mean")  # fmt: skip
_CHECKED_CURVE = ("accuracy_mean", "accuracy_std", "macs_mean")
# written since 2026-12-06: checked where a file has them (older blocks were published without)
_NEW_ROW, _NEW_CURVE = ("macs_per_seed",), ("accuracy_per_seed", "macs_per_seed")
_CHECKED_COMPARISON = ("accuracy_diff_mean", "accuracy_diff_std", "p_value", "seeds_ahead",
                       "winner", "macs_ratio", "accuracy_diff_at_equal_macs", "ci95_low",
                       "ci95_high", "equal_macs_diff_mean", "equal_macs_diff_std",
                       "equal_macs_p_value", "equal_macs_ci95_low", "equal_macs_ci95_high",
                       "equal_macs_seeds_ahead")  # fmt: skip


def verify_block(results_json: Path) -> tuple[int, list[str]]:
    """(numbers checked, differences) of a results JSON against its records file."""
    from erde.io import read_json
    from erde.report.html import MAX_REPORT_BYTES

    results = read_json(results_json, max_bytes=MAX_REPORT_BYTES, error=RecordsError,
                        what="a results file")  # fmt: skip
    try:
        labels, held = load_block_records(results, records_path(results_json))
        counter: list[int] = [0]
        diffs = differences(results, rederive(results, labels, held), counter)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:
        raise RecordsError(
            f"{results_json}: not a results file of erde reproduce with records "
            f"({type(exc).__name__}: {str(exc)[:80]})"
        ) from None
    return counter[0], diffs


def differences(
    results: Mapping[str, Any], derived: Mapping[str, Any], counter: list[int] | None = None
) -> list[str]:
    """Every number of the results' tables that the records do not give back."""
    out: list[str] = []
    counter = counter if counter is not None else [0]

    def _diff(where: str, published: Any, again: Any) -> None:
        _compare_values(out, counter, where, published, again)

    for name, model in results["models"].items():
        mine = derived["models"][name]
        for key in ("exit_accuracy_mean", "exit_accuracy_std"):
            _diff(f"{name}.{key}", model[key], mine[key])
        for row, again in zip(model["thresholds"], mine["thresholds"], strict=True):
            for key in (*_CHECKED_ROW, *(k for k in _NEW_ROW if k in row)):
                _diff(f"{name} at h={row['normalized_threshold']}: {key}", row[key], again[key])
        for c, again in zip(model.get("curve", []), mine["curve"], strict=True):
            for key in (*_CHECKED_CURVE, *(k for k in _NEW_CURVE if k in c)):
                _diff(f"{name} curve at {c['threshold']:.4g}: {key}", c[key], again[key])
    if len(results["comparisons"]) != len(derived["comparisons"]):
        out.append(f"comparisons: {len(results['comparisons'])} published, "
                   f"{len(derived['comparisons'])} re-derived")  # fmt: skip
    for comp, again in zip(results["comparisons"], derived["comparisons"], strict=False):
        where = f"{comp['model']} - {comp['other']}"
        for row, row2 in zip(comp["per_threshold"], again["per_threshold"], strict=True):
            for key in _CHECKED_COMPARISON:
                if key in row:
                    _diff(
                        f"{where} at h={row['normalized_threshold']}: {key}",
                        row[key],
                        row2.get(key),
                    )
    for key in ("entropy_diagnostics", "whole_curve"):  # in blocks published since 2026-12-06
        if key in results:
            _diff(key, results[key], derived[key])
    return out


def _compare_values(
    out: list[str], counter: list[int], where: str, published: Any, again: Any
) -> None:
    if isinstance(published, list) and isinstance(again, list) and len(published) == len(again):
        for i, (a, b) in enumerate(zip(published, again, strict=True)):
            _compare_values(out, counter, f"{where}[{i}]", a, b)
        return
    if (
        isinstance(published, Mapping)
        and isinstance(again, Mapping)
        and published.keys() == again.keys()
    ):
        for key in published:
            _compare_values(out, counter, f"{where}.{key}", published[key], again[key])
        return
    counter[0] += 1
    if isinstance(published, (int, float)) and isinstance(again, (int, float)) \
            and not isinstance(published, bool):  # fmt: skip
        if math.isclose(float(published), float(again), rel_tol=1e-12, abs_tol=1e-15) or (
            math.isnan(float(published)) and math.isnan(float(again))
        ):
            return
    elif published == again:
        return
    out.append(f"{where}: published {published!r}, re-derived {again!r}")
