"""The whole accuracy-MACs trade-off of two models, compared at equal MACs in one paired test.

A results table looks at eleven thresholds of one curve: correlated looks, so "ahead at
11 of 11 thresholds" is weaker than it sounds, and a test per threshold has to be
corrected for eleven. Here each seed's curve is traced densely from its per-image
records (a threshold at every 0.1 % quantile of the model's early-exit entropies, so
each step of the curve moves about a thousandth of the images), both models' best
accuracy within ``m`` MACs is read at evenly spaced ``m`` over the MACs every seed of
both reaches, and the differences are averaged: per seed, the area between the two
curves divided by the MAC range (:func:`erde.records.dense_curve`,
:func:`erde.diagnostics.equal_macs_gaps`, which a single run's report uses too). One
number per seed, paired by seed like the tables, with a t interval and p-value: one test
of the whole trade-off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from erde.diagnostics import equal_macs_gaps
from erde.records import ExitRecords, dense_curve
from erde.reproduce.stats import comparison_pairs, mean_std, paired_ci95, paired_p_value


def curve_difference(
    mine: Sequence[tuple[np.ndarray, np.ndarray]], theirs: Sequence[tuple[np.ndarray, np.ndarray]]
) -> dict[str, Any] | None:
    """Per seed, the mean over a MAC grid of ``mine`` minus ``theirs`` (curves of
    :func:`erde.records.dense_curve`, one per seed, paired by position); their mean, spread, 95 %
    interval, p and the MAC range. None when the curves share no MAC range."""
    found = equal_macs_gaps(mine, theirs)
    if found is None:
        return None
    grid, along = found  # (G,), (seeds, G)
    low, high = float(grid[0]), float(grid[-1])
    diffs = [float(v) for v in along.mean(axis=1)]
    intervals = [paired_ci95([float(v) for v in column]) for column in along.T]
    mean, std = mean_std(diffs)
    ci_low, ci_high = paired_ci95(diffs)
    return {
        "diff_mean": mean,
        "diff_std": std,
        "p_value": paired_p_value(diffs),
        "ci95_low": ci_low,
        "ci95_high": ci_high,
        "seeds_ahead": sum(d > 0 for d in diffs),
        "n_seeds": len(diffs),
        "diff_per_seed": diffs,
        "macs_low": low,
        "macs_high": high,
        "grid_points": len(grid),
        # the difference along the MAC axis, at each grid value: mean and 95 % interval
        "profile_diff_mean": [float(v) for v in along.mean(axis=0)],
        "profile_ci95_low": [lo for lo, _ in intervals],
        "profile_ci95_high": [hi for _, hi in intervals],
    }


def whole_curve_of(results: Mapping[str, Any], model: str, other: str) -> Mapping | None:
    """The whole-curve comparison of ``model`` against ``other`` in a results document
    (None in blocks published before it, or where the curves share no MAC range)."""
    for entry in results.get("whole_curve") or []:
        if (entry["model"], entry["other"]) == (model, other) and entry["diff_mean"] is not None:
            return entry
    return None


def block_tradeoff(
    results: Mapping[str, Any], labels: np.ndarray, held: Mapping[str, ExitRecords]
) -> list[dict[str, Any]]:
    """Every comparison pair of a results document, over the whole curve, from its records.

    Same pairs, in the same order, as ``results["comparisons"]``.
    """
    entries = results["records"]["entries"]
    seeds = [str(s) for s in results["seeds"]]
    curves = {
        name: [dense_curve(held[entries[s][name]], labels, model["macs_per_exit"]) for s in seeds]
        for name, model in results["models"].items()
    }
    out = []
    for name, other in comparison_pairs(list(results["models"])):
        found = curve_difference(curves[name], curves[other])
        out.append({"model": name, "other": other, **(found or {"diff_mean": None})})
    return out
