"""The whole-curve comparison: curves traced from per-image records exactly as the routing
does, and one paired test of the whole accuracy-MACs trade-off per pair of students."""

from __future__ import annotations

import numpy as np
import pytest

from erde.diagnostics import GRID_POINTS
from erde.records import ExitRecords, dense_curve, routed_curve, sweep_records
from erde.reproduce.stats import paired_ci95, paired_p_value
from erde.reproduce.tradeoff import curve_difference


def _records(num_exits: int, n: int = 1500, seed: int = 0) -> tuple[ExitRecords, np.ndarray]:
    rng = np.random.default_rng(seed)
    entropy = (rng.random((num_exits, n)) * np.log(10)).astype(np.float32)
    if num_exits > 1:
        entropy[1, :40] = entropy[0, :40]  # ties between exits
    pred = rng.integers(0, 10, (num_exits, n)).astype(np.uint8)
    labels = rng.integers(0, 10, n)
    pred[-1, : n // 2] = labels[: n // 2]  # the last exit right more often
    max_prob = np.ones((num_exits, n), dtype=np.float16)
    return ExitRecords(pred=pred, entropy=entropy, max_prob=max_prob), labels


@pytest.mark.parametrize("num_exits", [1, 2, 3, 5])
def test_the_curve_at_all_thresholds_at_once_is_the_routing_loop_exactly(num_exits: int) -> None:
    records, labels = _records(num_exits)
    macs = [float(10 ** (k + 6)) for k in range(num_exits)]
    early = records.entropy[:-1].ravel()
    thresholds = (
        [0.0, 3.0, *np.quantile(early, np.linspace(0, 1, 97)).tolist()]
        if early.size
        else [0.0, 1.0]
    )
    thresholds += [float(v) for v in early[:25]]  # exactly on an entropy: strict "<" matters
    mean_macs, accuracy = routed_curve(records, labels, macs, thresholds)
    loop = sweep_records(records, labels, macs, thresholds)
    assert accuracy.tolist() == [p.accuracy for p in loop]
    assert mean_macs.tolist() == pytest.approx([p.mean_macs for p in loop], rel=1e-12)


def test_a_dense_curve_spans_first_exit_to_full_network_and_never_falls() -> None:
    records, labels = _records(3)
    macs = [1e6, 2e6, 4e6]
    xs, ys = dense_curve(records, labels, macs)
    assert xs[0] == pytest.approx(1e6) and xs[-1] == pytest.approx(4e6)
    assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) >= 0)
    assert len(xs) > 500  # a point for about every thousandth of the images' exits
    full = sweep_records(records, labels, macs, [0.0])[0].accuracy
    assert ys[-1] >= full  # the best within full MACs is at least the last exit's


def test_equal_curves_differ_by_nothing_and_a_lifted_curve_by_its_lift() -> None:
    xs = np.array([1.0, 2.0, 4.0])
    ys = np.array([0.5, 0.7, 0.8])
    lifts = [0.01, 0.02, 0.04]
    same = curve_difference([(xs, ys)] * 3, [(xs, ys)] * 3)
    assert same is not None and same["diff_per_seed"] == [0.0, 0.0, 0.0]
    assert same["p_value"] is None and same["seeds_ahead"] == 0
    lifted = curve_difference([(xs, ys + d) for d in lifts], [(xs, ys)] * 3)
    assert lifted["diff_per_seed"] == pytest.approx(lifts)
    assert lifted["diff_mean"] == pytest.approx(np.mean(lifts))
    low, high = paired_ci95(lifted["diff_per_seed"])
    assert (lifted["ci95_low"], lifted["ci95_high"]) == (low, high)
    assert lifted["p_value"] == paired_p_value(lifted["diff_per_seed"])
    assert lifted["seeds_ahead"] == 3 and lifted["n_seeds"] == 3
    # along the MAC axis: the lift at every MAC value, with the same interval
    assert lifted["profile_diff_mean"] == pytest.approx([np.mean(lifts)] * GRID_POINTS)
    assert lifted["profile_ci95_low"] == pytest.approx([low] * GRID_POINTS)
    assert lifted["profile_ci95_high"] == pytest.approx([high] * GRID_POINTS)
    assert (lifted["macs_low"], lifted["macs_high"], lifted["grid_points"]) == (
        1.0,
        4.0,
        GRID_POINTS,
    )


def test_the_difference_is_an_average_over_macs_not_over_points() -> None:
    """A rising line against a flat one at its mid height: the areas cancel, whatever the
    number of points either curve has."""
    rising = (np.array([1.0, 3.0]), np.array([0.5, 0.9]))
    flat = (np.linspace(1.0, 3.0, 7), np.full(7, 0.7))
    found = curve_difference([rising], [flat])
    assert found["diff_mean"] == pytest.approx(0.0, abs=1e-12)
    # only the MACs both reach: here 2..3, where the rising curve is above 0.7 on average
    found = curve_difference([rising], [(np.array([2.0, 3.0]), np.array([0.7, 0.7]))])
    assert (found["macs_low"], found["macs_high"]) == (2.0, 3.0)
    assert found["diff_mean"] == pytest.approx(0.1)


def test_curves_without_a_common_mac_range_are_not_compared() -> None:
    a = (np.array([1.0, 2.0]), np.array([0.5, 0.6]))
    b = (np.array([3.0, 4.0]), np.array([0.7, 0.8]))
    assert curve_difference([a], [b]) is None
