"""Exit rules: score values, threshold validation and the first exit each sample leaves at."""

from __future__ import annotations

import math

import pytest
import torch

from erde import exits
from erde.errors import ErdeError
from erde.exits import (
    ThresholdError,
    check_thresholds,
    entropy,
    first_exit,
    max_softmax,
    may_exit,
    rule_range,
    rule_score,
)


def test_entropy_values() -> None:
    assert entropy(torch.zeros(10)).item() == pytest.approx(math.log(10), abs=1e-6)
    assert entropy(torch.tensor([50.0, 0.0, 0.0])).item() == pytest.approx(0.0, abs=1e-6)
    # softmax([ln 3, 0]) = [3/4, 1/4]
    value = entropy(torch.tensor([math.log(3.0), 0.0])).item()
    assert value == pytest.approx(0.75 * math.log(4 / 3) + 0.25 * math.log(4), abs=1e-6)


def test_entropy_and_max_softmax_keep_leading_dims() -> None:
    logits = torch.randn(3, 5, 7)
    assert entropy(logits).shape == (3, 5)
    assert max_softmax(logits).shape == (3, 5)
    assert entropy(logits.half()).dtype == torch.float32  # scores are computed in float32


def test_max_softmax_values() -> None:
    assert max_softmax(torch.zeros(4)).item() == pytest.approx(0.25)
    assert max_softmax(torch.tensor([math.log(3.0), 0.0])).item() == pytest.approx(0.75)
    assert max_softmax(torch.tensor([0.0, math.log(2.0), 0.0])).item() == pytest.approx(0.5)


def test_rule_score_dispatches_and_rejects_unknown_rules() -> None:
    z = torch.tensor([[1.0, 2.0, 0.5]])
    assert torch.equal(rule_score(z, "entropy"), entropy(z))
    assert torch.equal(rule_score(z, "max_softmax"), max_softmax(z))
    with pytest.raises(ValueError, match="valid rules: entropy, max_softmax"):
        rule_score(z, "margin")


def test_rule_range() -> None:
    assert rule_range("entropy", 10) == (0.0, pytest.approx(math.log(10)))
    assert rule_range("max_softmax", 100) == (0.0, 1.0)


# --------------------------------------------------------------------------- check_thresholds


@pytest.mark.parametrize("bad", [5.0, -0.1, math.log(10) + 1e-6, float("nan"), float("inf")])
def test_check_thresholds_rejects_entropy_outside_zero_to_log_k(bad: float) -> None:
    with pytest.raises(ThresholdError, match=r"entropy rule's range \[0, 2\.303\]"):
        check_thresholds(bad, "entropy", 10, 3)


@pytest.mark.parametrize("bad", [1.5, -0.1, 1.0 + 1e-9, float("nan")])
def test_check_thresholds_rejects_max_softmax_outside_unit_interval(bad: float) -> None:
    with pytest.raises(ThresholdError, match=r"max_softmax rule's range \[0, 1\]"):
        check_thresholds(bad, "max_softmax", 10, 3)


def test_threshold_errors_are_user_errors() -> None:
    with pytest.raises(ErdeError):
        check_thresholds(9.0, "entropy", 10, 3)
    with pytest.raises(ValueError):  # still a ValueError for library callers
        check_thresholds(9.0, "entropy", 10, 3)


def test_check_thresholds_accepts_range_ends_and_expands_one_value() -> None:
    assert check_thresholds(0.0, "entropy", 10, 3) == [0.0, 0.0]
    assert check_thresholds(math.log(10), "entropy", 10, 4) == [math.log(10)] * 3
    assert check_thresholds(1.0, "max_softmax", 10, 2) == [1.0]
    assert check_thresholds(0.5, "max_softmax", 10, 1) == []  # one exit: nothing to decide


def test_check_thresholds_per_exit_values() -> None:
    assert check_thresholds([0.1, 0.2], "entropy", 10, 3) == [0.1, 0.2]
    # one value in a list is shared, as the message "expected 1 or 2" promises
    assert check_thresholds([0.1], "entropy", 10, 3) == [0.1, 0.1]
    # a value for the last exit is accepted and dropped (the last exit always answers)
    assert check_thresholds([0.1, 0.2, 0.3], "entropy", 10, 3) == [0.1, 0.2]
    with pytest.raises(ThresholdError, match="expected 1 or 2 thresholds"):
        check_thresholds([0.1, 0.2, 0.3, 0.4], "entropy", 10, 3)
    with pytest.raises(ThresholdError, match=r"range \[0, 1\]"):
        check_thresholds([0.5, 1.2], "max_softmax", 10, 3)


def test_check_thresholds_checks_range_even_for_a_single_exit_model() -> None:
    with pytest.raises(ThresholdError, match="range"):
        check_thresholds(7.0, "entropy", 10, 1)
    with pytest.raises(ThresholdError, match="range"):
        check_thresholds([0.5, 3.0], "entropy", 10, 2)  # out-of-range last-exit value


# --------------------------------------------------------------------------- may_exit, first_exit


def test_may_exit_comparisons_are_strict_for_entropy_and_inclusive_for_max_softmax() -> None:
    score = torch.tensor([0.0, 0.3, 0.5])
    assert may_exit(score, 0.3, "entropy").tolist() == [True, False, False]
    assert may_exit(score, 0.0, "entropy").tolist() == [False, False, False]
    assert may_exit(score, 0.3, "max_softmax").tolist() == [False, True, True]


SURE, FLAT = 30.0, 0.0


def _hand_logits() -> torch.Tensor:
    """3 exits, 4 samples, 3 classes; each cell is 'sure of class c' or flat."""

    def sure(c: int) -> list[float]:
        row = [0.0, 0.0, 0.0]
        row[c] = SURE
        return row

    mid = [1.0, 0.0, 0.0]  # entropy ~0.95 nats, top probability ~0.58
    flat = [FLAT] * 3
    return torch.tensor(
        [
            # sample 0, sample 1, sample 2, sample 3
            [sure(0), flat, mid, flat],  # exit 0
            [sure(1), sure(2), flat, mid],  # exit 1
            [sure(2), sure(1), sure(0), flat],  # exit 2
        ]
    )


def test_first_exit_on_hand_made_logits_entropy() -> None:
    logits = _hand_logits()
    assert first_exit(logits, [0.01, 0.01], "entropy").tolist() == [0, 1, 2, 2]
    assert first_exit(logits, [1.0, 1.0], "entropy").tolist() == [0, 1, 0, 1]
    assert first_exit(logits, [0.01, 1.0], "entropy").tolist() == [0, 1, 2, 1]
    assert first_exit(logits, [0.0, 0.0], "entropy").tolist() == [2, 2, 2, 2]


def test_first_exit_on_hand_made_logits_max_softmax() -> None:
    logits = _hand_logits()
    assert first_exit(logits, [0.99, 0.99], "max_softmax").tolist() == [0, 1, 2, 2]
    assert first_exit(logits, [0.5, 0.5], "max_softmax").tolist() == [0, 1, 0, 1]
    assert first_exit(logits, [0.0, 0.0], "max_softmax").tolist() == [0, 0, 0, 0]


def test_first_exit_single_exit_model_answers_at_exit_zero() -> None:
    logits = torch.randn(1, 5, 4)
    assert first_exit(logits, [], "entropy").tolist() == [0] * 5


def test_a_rule_registered_in_one_place_routes_sweeps_and_reports_end_to_end(tiny_run) -> None:
    """One score function and one registration: routing, the sweep and the report use it."""
    import json

    from erde.checkpoints import load_checkpoint, model_from_checkpoint
    from erde.config import config_from_dict
    from erde.data import load_splits
    from erde.evaluation import collect_exit_logits, simulate
    from erde.inference import EarlyExitRouter, ExitPolicy
    from erde.models import measure_exit_costs
    from erde.pipeline import evaluate_checkpoints

    @exits.register_rule("margin", leaves_below=False, top=lambda k: 1.0)
    def margin(logits: torch.Tensor) -> torch.Tensor:  # top-1 minus top-2 probability
        top2 = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]

    try:
        ckpt = load_checkpoint(tiny_run["teacher"])
        cfg = config_from_dict(ckpt["config"])
        cfg.evaluation.rules = ["entropy", "margin"]
        splits = load_splits(cfg)
        model = model_from_checkpoint(ckpt).eval()
        from erde.data import prepare_batch

        x = prepare_batch(splits.test.images, splits, train=False)
        logits, labels = collect_exit_logits(model, [(x, splits.test.labels)])
        macs = measure_exit_costs(model, splits.image_shape).macs_per_exit
        policy = ExitPolicy.create(0.5, "margin", splits.num_classes, model.num_exits)
        routed = EarlyExitRouter(model, policy)(x)
        assert torch.equal(
            routed.exit_index, simulate(logits, labels, macs, 0.5, "margin").exit_index
        )
        out = tiny_run["out"].parent / "margin_report"
        paths = evaluate_checkpoints(
            [tiny_run["teacher"]], out, cfg=cfg, splits=splits, progress=False
        )
        sweep = json.loads(paths["json"].read_text())["models"]["teacher"]["sweep"]
        assert {p["rule"] for p in sweep} == {"entropy", "margin"}
    finally:
        exits.EXIT_RULES.pop("margin", None)
        if "margin" in exits.RULES:
            exits.RULES.remove("margin")
    with pytest.raises(exits.ThresholdError, match="unknown exit rule 'margin'"):
        exits.rule_score(torch.zeros(1, 3), "margin")
