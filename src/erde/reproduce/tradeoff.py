"""The whole accuracy-MACs trade-off of two models, compared at equal MACs in one paired test.

A results table looks at eleven thresholds of one curve: correlated looks, so "ahead at
11 of 11 thresholds" is weaker than it sounds, and a test per threshold has to be
corrected for eleven. Here each seed's curve is traced densely from its per-image
records (a threshold at every 0.1 % quantile of the model's early-exit entropies, so
each step of the curve moves about a thousandth of the images), both models' best
accuracy within ``m`` MACs is read at evenly spaced ``m`` over the MACs every seed of
both reaches, and the differences are averaged: per seed, the area between the two
curves divided by the MAC range. One number per seed, paired by seed like the tables,
with a t interval and p-value: one test of the whole trade-off.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from erde.records import ExitRecords
from erde.reproduce.stats import (
    comparison_pairs,
    envelope_arrays,
    mean_std,
    paired_ci95,
    paired_p_value,
)

QUANTILES = 1000  # thresholds per curve, besides "none leaves" and "all leave at the first exit"
GRID_POINTS = 101  # MAC values at which two curves are compared


def routed_curve(
    records: ExitRecords, labels: np.ndarray, macs_per_exit: Sequence[float], thresholds: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(mean MACs, accuracy) at each of ``thresholds`` (T,), both (T,): the entropy rule's
    sweep of :func:`erde.records.sweep_records`, all thresholds at once.

    An image leaves at the first exit ``k`` whose entropy is below ``t``, that is, at
    or before ``k`` exactly when the smallest entropy among exits ``0..k`` is below
    ``t``; so sorting those prefix minima once per exit gives every threshold's counts
    by binary search. Compared in float32, like the routing itself, so every point
    equals the one the loop computes (tested).
    """
    entropy = records.entropy.astype(np.float32)  # (E, N)
    num_exits, n = entropy.shape
    correct = (records.pred.astype(np.int64) == labels.astype(np.int64)[None]).astype(np.float64)
    t = np.asarray(thresholds, dtype=np.float32)
    prefix_min = np.minimum.accumulate(entropy[:-1], axis=0)  # (E-1, N)

    def below(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """For each threshold: the sum of ``weights`` over the images whose value is below it."""
        order = np.argsort(values, kind="stable")
        summed = np.concatenate([[0.0], np.cumsum(weights[order])])
        return summed[np.searchsorted(values[order], t, side="left")]

    ones = np.ones(n)
    gone = [below(prefix_min[k], ones) for k in range(num_exits - 1)] + [np.full(len(t), n)]
    hits = correct[-1].sum() - np.zeros(len(t))
    mean_macs = np.zeros(len(t))
    for k in range(num_exits):
        before = gone[k - 1] if k else 0.0
        mean_macs += (gone[k] - before) * float(macs_per_exit[k]) / n
        if k < num_exits - 1:  # leaving at k: counted by exit k's answer, not the next's
            hits += below(prefix_min[k], correct[k]) - below(prefix_min[k], correct[k + 1])
    return mean_macs, hits / n


def dense_curve(
    records: ExitRecords, labels: np.ndarray, macs_per_exit: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """One model's curve of one seed: (MACs ascending, best accuracy within them), (P,) each.

    Thresholds at the :data:`QUANTILES` quantiles of its early exits' entropies
    (``records.entropy[:-1]``, (E-1, N)), plus 0 (every image at the last exit) and one
    above every entropy (every image at the first exit), routed as the evaluation
    routes them (:func:`routed_curve`).
    """
    early = records.entropy[:-1].astype(np.float64).ravel()
    levels = np.quantile(early, np.linspace(0.0, 1.0, QUANTILES)) if early.size else []
    top = float(early.max()) + 1.0 if early.size else 1.0
    thresholds = sorted({0.0, *(float(v) for v in levels), top})
    macs, accuracy = routed_curve(records, labels, macs_per_exit, thresholds)
    xs, ys = envelope_arrays(list(zip(macs.tolist(), accuracy.tolist(), strict=True)))
    keep = np.append(xs[1:] != xs[:-1], True)  # one point per MACs value: the best
    return xs[keep], ys[keep]


def curve_difference(
    mine: Sequence[tuple[np.ndarray, np.ndarray]], theirs: Sequence[tuple[np.ndarray, np.ndarray]]
) -> dict[str, Any] | None:
    """Per seed, the mean over a MAC grid of ``mine`` minus ``theirs`` (curves of
    :func:`dense_curve`, one per seed, paired by position); their mean, spread, 95 %
    interval, p and the MAC range. None when the curves share no MAC range."""
    curves = [*mine, *theirs]
    low = max(float(xs[0]) for xs, _ in curves)
    high = min(float(xs[-1]) for xs, _ in curves)
    if not high > low:
        return None
    grid = np.linspace(low, high, GRID_POINTS)
    along = np.array(
        [
            np.interp(grid, xa, ya) - np.interp(grid, xb, yb)
            for (xa, ya), (xb, yb) in zip(mine, theirs, strict=True)
        ]
    )  # (seeds, GRID_POINTS)
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
        "grid_points": GRID_POINTS,
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
