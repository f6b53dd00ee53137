"""Thresholds chosen on validation for a budget or an accuracy drop; test only reported."""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
import torch

from erde import exits
from erde.calibration import (
    CalibrationWarning,
    calibrate,
    candidate_thresholds,
    evaluate_thresholds,
    fit_temperature,
    resolution_note,
    threshold_near_macs,
)
from erde.cli import main
from erde.errors import ConfigError
from erde.evaluation import simulate, sweep
from erde.inference import ExitPolicy, apply_temperatures
from erde.models import EarlyExitNet

MACS = [100.0, 250.0, 400.0]  # cumulative MACs of a 3-exit model


pytestmark = pytest.mark.usefixtures("one_thread")


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit logits (3, n, 10) that get sharper and more often right with depth, and labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    difficulty = torch.rand(n, generator=g)  # easy images are right (and sure) early
    logits = []
    for depth, skill in enumerate((0.45, 0.7, 0.9)):
        noise = torch.randn(n, 10, generator=g)
        right = difficulty < skill
        target = torch.where(right, labels, (labels + 1 + depth) % 10)
        strength = 1.0 + 4.0 * (1 - difficulty) * (1 + depth)
        logits.append(noise + strength.unsqueeze(1) * torch.nn.functional.one_hot(target, 10))
    return torch.stack(logits), labels


@pytest.fixture(scope="module")
def data() -> dict:
    val, test = synthetic(600, 0), synthetic(700, 1)
    return {"val": val, "test": test}


def _all_settings(logits, labels, rule: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brute force: every shared-threshold outcome, each scored with the reference simulate."""
    candidates = candidate_thresholds(exits.rule_score(logits[:-1], rule), rule, 10, 10**6)
    points = sweep(logits, labels, MACS, candidates.tolist(), rule)
    accuracy = torch.tensor([p.accuracy for p in points], dtype=torch.float64)
    macs = torch.tensor([p.mean_macs for p in points], dtype=torch.float64)
    return candidates, accuracy, macs


@pytest.mark.parametrize("rule", exits.RULES)
def test_budget_is_met_on_validation_by_the_most_accurate_setting(data, rule) -> None:
    val_logits, val_labels = data["val"]
    result = calibrate(val_logits, val_labels, MACS, budget=0.6, rule=rule,
                       test_logits=data["test"][0], test_labels=data["test"][1])  # fmt: skip
    assert result.feasible and result.warning is None
    assert result.validation["mean_macs"] <= 0.6 * MACS[-1]
    _, accuracy, macs = _all_settings(val_logits, val_labels, rule)
    assert result.validation["accuracy"] == accuracy[macs <= 0.6 * MACS[-1]].max().item()
    reference = simulate(*data["test"], MACS, list(result.policy.thresholds), rule)
    assert result.test["accuracy"] == reference.accuracy  # reported, with the val-fitted policy
    assert result.test["macs_fraction"] == pytest.approx(reference.mean_macs / MACS[-1])


def test_the_test_split_never_influences_the_choice(data) -> None:
    val_logits, val_labels = data["val"]
    a = calibrate(val_logits, val_labels, MACS, budget=0.5, test_logits=data["test"][0],
                  test_labels=data["test"][1])  # fmt: skip
    b = calibrate(val_logits, val_labels, MACS, budget=0.5, test_logits=-data["test"][0],
                  test_labels=data["test"][1])  # fmt: skip
    assert a.policy == b.policy and a.test != b.test


def test_accuracy_drop_target_gives_the_cheapest_setting_within_it(data) -> None:
    val_logits, val_labels = data["val"]
    result = calibrate(val_logits, val_labels, MACS, max_drop=0.02)
    last = (val_logits[-1].argmax(-1) == val_labels).double().mean().item()
    assert result.feasible and result.validation["accuracy"] >= last - 0.02
    _, accuracy, macs = _all_settings(val_logits, val_labels, "entropy")
    assert result.validation["mean_macs"] == macs[accuracy >= last - 0.02].min().item()
    assert result.validation["mean_macs"] < MACS[-1]  # it does save something here


def test_unreachable_targets_warn_and_give_the_nearest_feasible_setting(data) -> None:
    val_logits, val_labels = data["val"]
    with pytest.warns(CalibrationWarning, match="not reachable"):
        cheap = calibrate(val_logits, val_labels, MACS, budget=0.1)  # exit 0 alone costs 0.25
    assert not cheap.feasible and "cheapest" in cheap.warning
    _, accuracy, macs = _all_settings(val_logits, val_labels, "entropy")
    assert cheap.validation["mean_macs"] == macs.min().item()
    sure_but_wrong = val_logits.clone()  # image 0: max-softmax exactly 1 and wrong at exit 0,
    sure_but_wrong[:, 0] = 0.0  # right at the last exit, so even threshold 1 loses it
    sure_but_wrong[0, 0, (val_labels[0] + 1) % 10] = 1e4
    sure_but_wrong[-1, 0, val_labels[0]] = 1e4
    with pytest.warns(CalibrationWarning, match="most accurate"):
        strict = calibrate(sure_but_wrong, val_labels, MACS, max_drop=0.0, rule="max_softmax")
    assert not strict.feasible
    _, accuracy, _ = _all_settings(sure_but_wrong, val_labels, "max_softmax")
    assert strict.validation["accuracy"] == accuracy.max().item()


def test_per_exit_thresholds_are_never_worse_than_a_shared_one(data) -> None:
    val_logits, val_labels = data["val"]
    shared = calibrate(val_logits, val_labels, MACS, budget=0.55)
    per_exit = calibrate(val_logits, val_labels, MACS, budget=0.55, per_exit=True)
    assert per_exit.validation["mean_macs"] <= 0.55 * MACS[-1]
    assert per_exit.validation["accuracy"] >= shared.validation["accuracy"]


def test_vectorised_candidates_agree_with_the_reference_simulation(data) -> None:
    val_logits, val_labels = data["val"]
    scores = exits.rule_score(val_logits[:-1], "entropy")
    settings = torch.rand(50, 2, generator=torch.Generator().manual_seed(3)) * 2.3
    accuracy, macs = evaluate_thresholds(
        scores, val_logits.argmax(-1) == val_labels, torch.tensor(MACS, dtype=torch.float64),
        settings, "entropy",
    )  # fmt: skip
    for i, (a, b) in enumerate(settings.tolist()):
        sim = simulate(val_logits, val_labels, MACS, [a, b], "entropy")
        assert (accuracy[i].item(), macs[i].item()) == (sim.accuracy, pytest.approx(sim.mean_macs))


def test_candidates_reach_every_outcome_a_dense_grid_reaches(data) -> None:
    val_logits, val_labels = data["val"]
    scores = exits.rule_score(val_logits[:-1], "max_softmax")
    candidates = candidate_thresholds(scores, "max_softmax", 10)
    assert candidates.min() >= 0 and candidates.max() <= 1
    grid = torch.linspace(0, 1, 5001)
    macs = torch.tensor(MACS, dtype=torch.float64)
    correct = val_logits.argmax(-1) == val_labels

    def outcomes(values):
        a, m = evaluate_thresholds(
            scores, correct, macs, values.unsqueeze(1).expand(-1, 2), "max_softmax"
        )
        return set(zip(a.tolist(), m.tolist(), strict=True))

    assert outcomes(grid) <= outcomes(candidates)


def test_temperature_scaling_recovers_a_known_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 10, generator=g) * 2
    labels = torch.multinomial(logits.softmax(-1), 1, generator=g).squeeze(1)  # calibrated at T=1
    assert fit_temperature(logits, labels) == pytest.approx(1.0, rel=0.1)
    assert fit_temperature(logits * 3, labels) == pytest.approx(3.0, rel=0.1)


def test_temperatures_fitted_on_validation_drive_the_policy(data) -> None:
    val_logits, val_labels = data["val"]
    result = calibrate(val_logits, val_labels, MACS, budget=0.6, temperature=True)
    assert result.policy.temperatures is not None and len(result.policy.temperatures) == 3
    scaled = apply_temperatures(val_logits, result.policy)
    reference = simulate(scaled, val_labels, MACS, list(result.policy.thresholds))
    assert result.validation["accuracy"] == reference.accuracy
    assert torch.equal(torch.tensor(result.validation["exit_fractions"]),
                       torch.tensor(reference.exit_fractions))  # fmt: skip


def test_threshold_near_macs_is_the_closest_operating_point(data) -> None:
    val_logits, val_labels = data["val"]
    policy = threshold_near_macs(val_logits, val_labels, MACS, 0.5)
    _, _, macs = _all_settings(val_logits, val_labels, "entropy")
    got = simulate(val_logits, val_labels, MACS, policy.thresholds[0]).mean_macs
    assert abs(got - 200.0) == (macs - 200.0).abs().min().item()


def test_bad_targets_are_refused(data) -> None:
    val_logits, val_labels = data["val"]
    for kwargs in ({}, {"budget": 0.5, "max_drop": 0.1}, {"budget": -1.0}, {"max_drop": 2.0}):
        with pytest.raises(ConfigError, match="target|budget|drop"):
            calibrate(val_logits, val_labels, MACS, **kwargs)


def test_calibration_records_each_split_once(tiny_run, tmp_path, monkeypatch, capsys) -> None:
    ckpt = tmp_path / "teacher" / "checkpoint.pt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_run["teacher"], ckpt)
    calls = []
    forward = EarlyExitNet.forward
    monkeypatch.setattr(
        EarlyExitNet, "forward", lambda self, x: calls.append(len(x)) or forward(self, x)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning here would be a silent problem in the CLI
        assert main(["calibrate", str(ckpt), "--budget", "0.7", "--no-progress"]) == 0
    out = capsys.readouterr().out
    written = json.loads((ckpt.parent / "checkpoint.thresholds.json").read_text())
    calib = written["calibration"]
    assert sum(calls) == calib["validation"]["num_images"] + calib["test"]["num_images"]
    assert calib["validation"]["mean_macs"] <= 0.7 * calib["full_macs"]
    assert written["model"]["name"] == "teacher" and len(written["thresholds"]) == 2
    assert "validation" in out and "test" in out and "thresholds:" in out
    # predict picks the file up by itself
    assert main(["predict", str(ckpt), str(tmp_path / "missing.png")]) == 1


def test_calibrate_cli_warns_on_an_unreachable_budget(tiny_run, tmp_path, capsys) -> None:
    out = tmp_path / "t.json"
    assert main(["calibrate", str(tiny_run["teacher"]), "--budget", "0.01", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    assert "warning" in capsys.readouterr().err
    assert json.loads(out.read_text())["calibration"]["feasible"] is False


def test_budgeted_evaluation_fits_on_validation_and_reports_test(
    tiny_run, tmp_path, capsys
) -> None:
    args = ["evaluate", str(tiny_run["teacher"]), str(tiny_run["student_erde"]), "--budgeted",
            "--budgets", "0.5,0.8,1.0", "--out", str(tmp_path), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    report = json.loads((tmp_path / "budgeted.json").read_text())
    assert (tmp_path / "budgeted.png").stat().st_size > 0
    assert "Budgeted evaluation" in capsys.readouterr().out
    for name in ("teacher", "student_erde"):
        curve = report["models"][name]["curve"]
        assert [p["budget"] for p in curve] == [0.5, 0.8, 1.0]
        for p in curve:
            if p["feasible"]:
                assert p["val_macs_fraction"] <= p["budget"] + 1e-9
            policy = ExitPolicy.create(p["thresholds"], p["rule"], 10, 3)
            assert list(policy.thresholds) == p["thresholds"]


def test_a_perfect_validation_split_is_noted_with_its_resolution(data) -> None:
    logits, labels = data["val"]
    assert resolution_note(calibrate(logits, labels, MACS, max_drop=0.01)) is None
    perfect = logits.clone()
    perfect[-1] = 10.0 * torch.nn.functional.one_hot(labels, 10)  # last exit always right
    note = resolution_note(calibrate(perfect, labels, MACS, max_drop=0.01))
    assert note.startswith("the last exit answers all 600 validation images correctly")
    assert "steps of 0.17 points" in note and "data.val_fraction" in note
