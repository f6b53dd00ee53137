"""Threshold sweeps on synthetic exit logits whose answers are known by construction."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from erde.evaluation import (
    SweepPoint,
    collect_exit_logits,
    default_thresholds,
    exit_accuracy,
    exit_calibration_error,
    mac_reduction_at_equal_accuracy,
    model_report,
    simulate,
    sweep,
)
from erde.exits import ThresholdError, first_exit

K = 4
MACS = [10, 30, 100]
GAPS = {"sure": 20.0, "mid": 2.0, "flat": 0.01}  # logit of the predicted class, others 0

# (confidence, correct?) per exit (rows) and sample (columns); label of sample n is n % K
TABLE = [
    # s0            s1              s2              s3              s4              s5
    [("sure", 1), ("mid", 1), ("flat", 0), ("sure", 0), ("flat", 1), ("mid", 0)],  # exit 0
    [("sure", 1), ("sure", 0), ("mid", 0), ("mid", 1), ("flat", 0), ("flat", 1)],  # exit 1
    [("sure", 1), ("sure", 1), ("mid", 1), ("flat", 0), ("sure", 1), ("sure", 1)],  # exit 2
]


def _gap_entropy(gap: float) -> float:
    """Entropy of softmax with one logit ``gap`` above K-1 zeros, by formula."""
    p = math.exp(gap) / (math.exp(gap) + K - 1)
    q = 1 / (math.exp(gap) + K - 1)
    return -(p * math.log(p) + (K - 1) * q * math.log(q))


def _gap_max_softmax(gap: float) -> float:
    return math.exp(gap) / (math.exp(gap) + K - 1)


def _synthetic() -> tuple[torch.Tensor, torch.Tensor]:
    n = len(TABLE[0])
    labels = torch.arange(n) % K
    logits = torch.zeros(len(TABLE), n, K)
    for e, row in enumerate(TABLE):
        for i, (level, correct) in enumerate(row):
            predicted = labels[i] if correct else (labels[i] + 1) % K
            logits[e, i, predicted] = GAPS[level]
    return logits, labels


# thresholds between the three confidence levels, and the exit each sample then takes
ENTROPY_ONLY_SURE = 1e-3  # below H(mid)
ENTROPY_SURE_AND_MID = (_gap_entropy(GAPS["mid"]) + _gap_entropy(GAPS["flat"])) / 2
SOFTMAX_ONLY_SURE = 0.99  # above p_max(mid)
SOFTMAX_SURE_AND_MID = (_gap_max_softmax(GAPS["mid"]) + _gap_max_softmax(GAPS["flat"])) / 2
EXPECTED_EXITS = {
    "only_sure": [0, 1, 2, 0, 2, 2],
    "sure_and_mid": [0, 0, 1, 0, 2, 0],
    "nobody_early": [2, 2, 2, 2, 2, 2],
    "everybody_at_0": [0, 0, 0, 0, 0, 0],
}
CASES = [
    ("entropy", ENTROPY_ONLY_SURE, "only_sure"),
    ("entropy", ENTROPY_SURE_AND_MID, "sure_and_mid"),
    ("entropy", 0.0, "nobody_early"),
    ("max_softmax", SOFTMAX_ONLY_SURE, "only_sure"),
    ("max_softmax", SOFTMAX_SURE_AND_MID, "sure_and_mid"),
    ("max_softmax", 0.0, "everybody_at_0"),
]


def _expected(chosen: list[int]) -> tuple[float, float, list[float]]:
    """Accuracy, mean MACs and exit fractions worked out from the table alone."""
    n = len(chosen)
    hits = sum(TABLE[e][i][1] for i, e in enumerate(chosen))
    fractions = [chosen.count(e) / n for e in range(len(TABLE))]
    return hits / n, sum(MACS[e] for e in chosen) / n, fractions


def test_expected_exits_spelled_out() -> None:
    # the worked answers written as numbers, so the helper above is checked too
    assert _expected(EXPECTED_EXITS["only_sure"]) == (4 / 6, 350 / 6, [2 / 6, 1 / 6, 3 / 6])
    assert _expected(EXPECTED_EXITS["sure_and_mid"]) == (3 / 6, 170 / 6, [4 / 6, 1 / 6, 1 / 6])
    assert _expected(EXPECTED_EXITS["nobody_early"]) == (5 / 6, 100.0, [0.0, 0.0, 1.0])
    assert _expected(EXPECTED_EXITS["everybody_at_0"]) == (3 / 6, 10.0, [1.0, 0.0, 0.0])


@pytest.mark.parametrize(("rule", "threshold", "case"), CASES)
def test_sweep_on_synthetic_logits(rule: str, threshold: float, case: str) -> None:
    logits, labels = _synthetic()
    (point,) = sweep(logits, labels, MACS, [threshold], rule)
    accuracy, mean_macs, fractions = _expected(EXPECTED_EXITS[case])
    assert point.rule == rule and point.threshold == threshold
    assert point.accuracy == pytest.approx(accuracy, abs=1e-12)
    assert point.mean_macs == pytest.approx(mean_macs, abs=1e-9)
    assert point.exit_fractions == pytest.approx(fractions, abs=1e-12)
    sim = simulate(logits, labels, MACS, threshold, rule)
    assert sim.exit_index.tolist() == EXPECTED_EXITS[case]


def test_entropy_threshold_zero_sends_everyone_to_the_last_exit() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50, 10) * 10
    labels = torch.randint(0, 10, (50,))
    (point,) = sweep(logits, labels, [1, 2, 3, 4], [0.0], "entropy")
    assert point.exit_fractions == [0.0, 0.0, 0.0, 1.0]
    assert point.mean_macs == 4.0
    assert point.accuracy == pytest.approx(exit_accuracy(logits, labels)[-1])


@pytest.mark.parametrize("rule", ["entropy", "max_softmax"])
def test_simulate_equals_sweep_at_every_grid_point(rule: str) -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 200, 10) * torch.tensor([1.0, 3.0, 6.0]).view(3, 1, 1)
    labels = torch.randint(0, 10, (200,))
    macs = [5, 17, 40]
    points = sweep(logits, labels, macs, None, rule)
    assert len(points) == len(default_thresholds(rule, 10))
    assert len({tuple(p.exit_fractions) for p in points}) > 3  # the grid really moves samples
    for point in points:
        sim = simulate(logits, labels, macs, point.threshold, rule)
        assert sim.accuracy == point.accuracy
        assert sim.mean_macs == point.mean_macs
        assert sim.exit_fractions == point.exit_fractions
        chosen = first_exit(logits, [point.threshold] * 2, rule)
        assert torch.equal(sim.exit_index, chosen)


def test_simulate_with_per_exit_thresholds() -> None:
    logits, labels = _synthetic()
    # exit 0 lets only sure samples leave, exit 1 lets sure and mid ones leave
    sim = simulate(logits, labels, MACS, [ENTROPY_ONLY_SURE, ENTROPY_SURE_AND_MID], "entropy")
    chosen = [0, 1, 1, 0, 2, 2]
    assert sim.exit_index.tolist() == chosen
    accuracy, mean_macs, fractions = _expected(chosen)
    assert sim.accuracy == pytest.approx(accuracy)
    assert sim.mean_macs == pytest.approx(mean_macs)
    assert sim.exit_fractions == pytest.approx(fractions)
    assert sim.thresholds == [ENTROPY_ONLY_SURE, ENTROPY_SURE_AND_MID]
    assert "exit_index" not in sim.to_dict()
    sim = simulate(logits, labels, MACS, [SOFTMAX_SURE_AND_MID, SOFTMAX_ONLY_SURE], "max_softmax")
    assert sim.exit_index.tolist() == [0, 0, 2, 0, 2, 0]


def test_sweep_rejects_out_of_range_thresholds_before_any_work() -> None:
    logits, labels = _synthetic()
    with pytest.raises(ThresholdError, match="range"):
        sweep(logits, labels, MACS, [0.1, math.log(K) + 0.5], "entropy")
    with pytest.raises(ThresholdError, match="range"):
        sweep(logits, labels, MACS, [-0.2], "max_softmax")
    with pytest.raises(ThresholdError, match="no thresholds"):
        sweep(logits, labels, MACS, [], "entropy")


def test_sweep_checks_shapes() -> None:
    logits, labels = _synthetic()
    with pytest.raises(ValueError, match="MAC counts"):
        sweep(logits, labels, MACS[:2], [0.1])
    with pytest.raises(ValueError, match="labels"):
        sweep(logits, labels[:3], MACS, [0.1])
    with pytest.raises(ValueError, match=r"\(E, N, K\)"):
        sweep(logits[0], labels, MACS, [0.1])


# --------------------------------------------------------------------------- MAC reduction


def _point(accuracy: float, macs: float, threshold: float = 0.1) -> SweepPoint:
    return SweepPoint("entropy", threshold, accuracy, macs, [1.0])


def test_mac_reduction_picks_the_cheapest_qualifying_point() -> None:
    points = [
        _point(0.80, 10, 0.9),  # cheapest, but too inaccurate
        _point(0.895, 40, 0.3),  # exactly at the tolerance floor: qualifies
        _point(0.897, 40, 0.2),  # same MACs, more accurate: preferred
        _point(0.91, 60, 0.1),
        _point(0.92, 100, 0.0),
    ]
    best = mac_reduction_at_equal_accuracy(points, 0.90, 100.0, tolerance=0.005)
    assert best is not None
    assert best["threshold"] == 0.2 and best["mean_macs"] == 40
    assert best["reduction"] == pytest.approx(2.5)
    assert best["saved_fraction"] == pytest.approx(0.6)
    assert best["reference_accuracy"] == 0.90 and best["tolerance"] == 0.005


def test_mac_reduction_none_when_nothing_qualifies() -> None:
    points = [_point(0.80, 10), _point(0.85, 50)]
    assert mac_reduction_at_equal_accuracy(points, 0.90, 100.0, tolerance=0.005) is None
    assert mac_reduction_at_equal_accuracy([], 0.90, 100.0) is None


def logit(p: float) -> float:
    """Two-class logit whose softmax is (p, 1 - p) against a logit of 0."""
    return math.log(p / (1 - p))


def test_calibration_error_per_exit_matches_a_hand_count() -> None:
    """ECE = sum over confidence bins of (share of images) x |accuracy - mean confidence|."""
    p_hi, p_lo = 0.9, 0.6  # two confidence levels, in bins 13 and 9 of 15
    z = torch.tensor([[logit(p_hi), 0.0]] * 4 + [[logit(p_lo), 0.0]] * 2)  # (6, 2)
    labels = torch.tensor([0, 0, 0, 1, 0, 1])  # at 0.9: 3 of 4 right; at 0.6: 1 of 2 right
    sure = torch.zeros(6, 2)
    sure[:, 0] = 50.0  # exit 1: 100 % sure of class 0 everywhere
    exits = torch.stack([z, sure])
    expected_0 = 4 / 6 * abs(0.75 - p_hi) + 2 / 6 * abs(0.5 - p_lo)
    expected_1 = abs(4 / 6 - 1.0)  # one bin: 4 of 6 right at confidence 1
    assert exit_calibration_error(exits, labels) == pytest.approx(
        [expected_0, expected_1], abs=1e-6
    )
    perfect = torch.tensor([[[logit(0.75), 0.0]] * 4])  # 75 % sure, 3 of 4 right
    assert exit_calibration_error(perfect, torch.tensor([0, 0, 0, 1]))[0] == pytest.approx(
        0, abs=1e-6
    )


def test_model_report_holds_each_exits_calibration_error() -> None:
    logits, labels = _synthetic()
    report = model_report("m", logits, labels, MACS, [1] * len(MACS))
    assert report["exit_ece"] == exit_calibration_error(logits, labels)
    assert len(report["exit_ece"]) == logits.shape[0]


def test_mac_reduction_on_a_real_sweep_reaches_the_last_exit_accuracy() -> None:
    logits, labels = _synthetic()
    points = sweep(logits, labels, MACS, [0.0, ENTROPY_ONLY_SURE, ENTROPY_SURE_AND_MID])
    reference = exit_accuracy(logits, labels)[-1]  # 5/6
    best = mac_reduction_at_equal_accuracy(points, reference, MACS[-1])
    assert best is not None and best["threshold"] == 0.0  # only theta = 0 keeps 5/6
    looser = mac_reduction_at_equal_accuracy(points, reference, MACS[-1], tolerance=0.2)
    assert looser["threshold"] == ENTROPY_ONLY_SURE  # 4/6 within 0.2 of 5/6, 350/6 MACs
    assert looser["reduction"] == pytest.approx(100 / (350 / 6))


# --------------------------------------------------------------------------- grids and reports


@pytest.mark.parametrize(("rule", "high"), [("entropy", math.log(10)), ("max_softmax", 1.0)])
def test_default_thresholds_cover_the_rule_range_ascending(rule: str, high: float) -> None:
    for n in (2, 9, 41):
        grid = default_thresholds(rule, 10, n)
        assert len(grid) == n
        assert grid[0] == 0.0 and grid[-1] == pytest.approx(high)
        assert all(a < b for a, b in zip(grid, grid[1:], strict=False))
    with pytest.raises(ValueError, match="at least 2"):
        default_thresholds(rule, 10, 1)


def test_default_entropy_grid_packs_points_near_zero() -> None:
    grid = default_thresholds("entropy", 10, 41)
    assert sum(t < 0.1 * math.log(10) for t in grid) > len(grid) // 2


def test_exit_accuracy_per_exit() -> None:
    logits, labels = _synthetic()
    expected = [sum(c for _, c in row) / len(row) for row in TABLE]
    assert exit_accuracy(logits, labels) == pytest.approx(expected)


def test_model_report_holds_sweeps_for_every_rule() -> None:
    logits, labels = _synthetic()
    grids = {"entropy": [0.0, ENTROPY_ONLY_SURE], "max_softmax": [SOFTMAX_ONLY_SURE]}
    report = model_report("m", logits, labels, MACS, [1, 2, 3], thresholds=grids, extra={"x": 1})
    assert report["num_exits"] == 3 and report["num_classes"] == K and report["num_samples"] == 6
    assert report["macs_per_exit"] == MACS and report["x"] == 1
    assert [(p["rule"], p["threshold"]) for p in report["sweep"]] == [
        ("entropy", 0.0),
        ("entropy", ENTROPY_ONLY_SURE),
        ("max_softmax", SOFTMAX_ONLY_SURE),
    ]
    assert report["sweep"][1]["exit_fractions"] == pytest.approx([2 / 6, 1 / 6, 3 / 6])
    with pytest.raises(ValueError, match="parameter counts"):
        model_report("m", logits, labels, MACS, [1, 2])


class _TwoExits(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.a(x), self.drop(self.a(x)) * 2]


def test_collect_exit_logits_runs_in_eval_mode_and_restores_modes() -> None:
    torch.manual_seed(2)
    model = _TwoExits().train()
    model.a.eval()  # a mixed state must come back as it was
    data = [
        (torch.randn(4, 3), torch.tensor([0, 1, 0, 1])),
        (torch.randn(2, 3), torch.tensor([1, 1])),
    ]
    logits, labels = collect_exit_logits(model, data)
    assert logits.shape == (2, 6, 2) and labels.tolist() == [0, 1, 0, 1, 1, 1]
    assert torch.allclose(logits[1], 2 * logits[0])  # dropout was off
    assert model.training and not model.a.training and model.drop.training
    with pytest.raises(ValueError, match="no batches"):
        collect_exit_logits(model, [])
