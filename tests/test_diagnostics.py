"""What the entropy term does, read from per-image records: entropy shifts and AUROC against KD."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from erde.diagnostics import auroc
from erde.records import ExitRecords
from erde.reproduce.diagnostics import entropy_diagnostics
from erde.reproduce.render import _diagnostic_lines


def _pairwise_auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """The definition itself: over every (positive, negative) pair, 1 if ranked right, 1/2 if tied."""
    pos, neg = score[positive], score[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_is_the_share_of_right_ordered_pairs_with_ties_counted_half() -> None:
    rng = np.random.default_rng(0)
    score = rng.integers(0, 6, 80).astype(np.float64)  # many ties
    positive = rng.random(80) < 0.4
    assert auroc(score, positive) == pytest.approx(_pairwise_auroc(score, positive), abs=1e-12)
    assert auroc(np.arange(4.0), np.array([False, False, True, True])) == 1.0
    assert auroc(np.arange(4.0), np.array([True, True, False, False])) == 0.0
    assert auroc(np.arange(3.0), np.ones(3, dtype=bool)) is None  # no wrong answer to rank


N, EXITS = 400, 2


def _records(pred: np.ndarray, entropy: np.ndarray) -> ExitRecords:
    return ExitRecords(
        pred.astype(np.uint8), entropy.astype(np.float32), np.zeros_like(entropy, np.float16)
    )


@pytest.fixture()
def block() -> tuple[list[str], dict, np.ndarray, dict[str, ExitRecords]]:
    """Two seeds. The teacher is wrong on the first quarter of the images at both exits; KD
    gives the teacher's wrong answers there, ERDE the right one on the first half of them
    and a wrong answer of its own on the rest. ERDE's entropy is KD's plus 0.5 nats on
    that quarter (plus 0.1 in seed 1); KD's entropy is pure noise."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, N)
    hard = np.arange(N) < N // 4
    teacher_pred = np.where(hard, (labels + 1) % 10, labels)
    erde_pred = np.where(np.arange(N) < N // 8, labels, np.where(hard, (labels + 2) % 10, labels))
    held, entries = {}, {}
    for s, extra in ((0, 0.0), (1, 0.1)):
        kd_entropy = rng.random((EXITS, N))
        erde_entropy = kd_entropy + np.where(hard, 0.5 + extra, 0.0)
        held["seed_0/teacher"] = _records(np.stack([teacher_pred] * EXITS), rng.random((EXITS, N)))
        held[f"seed_{s}/student_kd"] = _records(np.stack([teacher_pred] * EXITS), kd_entropy)
        held[f"seed_{s}/student_erde"] = _records(np.stack([erde_pred] * EXITS), erde_entropy)
        entries[str(s)] = {"teacher": "seed_0/teacher", "student_kd": f"seed_{s}/student_kd",
                           "student_erde": f"seed_{s}/student_erde"}  # fmt: skip
    return ["0", "1"], entries, labels, held


def test_a_shift_only_where_the_teacher_is_wrong_is_measured_there_with_an_interval(block) -> None:
    seeds, entries, labels, held = block
    diag = entropy_diagnostics(seeds, entries, labels, held)
    assert diag is not None and diag["reference"] == "student_kd"
    assert list(diag["models"]) == ["student_erde"]
    for e, row in enumerate(diag["models"]["student_erde"]):
        assert row["exit"] == e
        assert row["entropy_shift_teacher_wrong_mean"] == pytest.approx(0.55, abs=1e-6)
        assert row["entropy_shift_teacher_right_mean"] == pytest.approx(0.0, abs=1e-6)
        assert row["selectivity_mean"] == pytest.approx(0.55, abs=1e-6)
        assert row["selectivity_p_value"] < 0.1  # 0.5 and 0.6 nats: consistent, if only two seeds
        low, high = (
            row["entropy_shift_teacher_wrong_ci95_low"],
            row["entropy_shift_teacher_wrong_ci95_high"],
        )
        assert low < 0.5 < 0.6 < high  # two seeds (0.5 and 0.6): a wide t interval around 0.55
        assert row["auroc_diff_mean"] > 0.2  # the shift lands on (mostly) the wrong answers
        assert row["accuracy_teacher_wrong_diff_mean"] == pytest.approx(0.5)  # KD: 0, ERDE: half
        assert row["teacher_error_share_mean"] == 0.0  # ERDE never gives the teacher's answer
        assert row["teacher_error_share_diff_mean"] == pytest.approx(-1.0)  # KD always does
        kd = diag["reference_auroc_mean"][e]
        assert row["auroc_mean"] == pytest.approx(kd + row["auroc_diff_mean"])
        assert abs(kd - 0.5) < 0.1  # KD's entropy is noise: chance


def test_no_kd_student_or_mismatched_exits_give_no_diagnostics(block) -> None:
    seeds, entries, labels, held = block
    without_kd = {s: {k: v for k, v in e.items() if k != "student_kd"} for s, e in entries.items()}
    assert entropy_diagnostics(seeds, without_kd, labels, held) is None
    held = dict(held)
    t = held["seed_0/teacher"]
    held["seed_0/teacher"] = ExitRecords(t.pred[:1], t.entropy[:1], t.max_prob[:1])
    assert entropy_diagnostics(seeds, entries, labels, held) is None


def test_the_table_shows_each_students_exits_with_intervals(block) -> None:
    diag = entropy_diagnostics(*block)
    text = "\n".join(_diagnostic_lines(diag, "####"))
    assert "#### What the entropy term changes, against the KD student" in text
    assert "| ERDE student | 0 | +0.550 (" in text and "| ERDE student | 1 |" in text
    assert _diagnostic_lines(None, "####") == []


def test_the_teacher_errors_table_gives_accuracy_and_the_copied_share_in_points(block) -> None:
    text = "\n".join(_diagnostic_lines(entropy_diagnostics(*block), "####"))
    assert (
        "| ERDE student | 0 | +50.00 (+50.00 to +50.00) | 0.0 | -100.00 (-100.00 to -100.00) |"
        in text
    )


def test_a_run_reports_what_the_entropy_term_changed_from_its_own_records(tiny_run) -> None:
    """erde run: report.json carries the diagnostics of its students, report.md their table,
    and they are what the run's test predictions give (recomputed here from the checkpoints)."""
    import json

    import torch

    from erde.checkpoints import load_checkpoint, model_from_checkpoint
    from erde.config import config_from_dict
    from erde.data import iterate_batches, load_splits, prepare_batch
    from erde.diagnostics import run_diagnostics
    from erde.evaluation import collect_exit_logits
    from erde.records import exit_records

    report = json.loads(tiny_run["report"].read_text())
    diag = report["entropy_diagnostics"]
    assert diag["reference"] == "student_kd" and set(diag["models"]) == {
        "student_ce",
        "student_erde",
    }

    cfg = config_from_dict(load_checkpoint(tiny_run["teacher"])["config"])
    splits = load_splits(cfg)
    held, labels = {}, None
    for name in ("teacher", "student_ce", "student_kd", "student_erde"):
        model = model_from_checkpoint(load_checkpoint(tiny_run[name]))
        batches = ((prepare_batch(x, splits, train=False), y)
                   for x, y in iterate_batches(splits.test, 64, shuffle=False, device=torch.device("cpu")))  # fmt: skip
        logits, labels = collect_exit_logits(
            model, batches, device=torch.device("cpu"), progress=False
        )
        held[name] = exit_records(logits)
    macs = {name: report["models"][name]["macs_per_exit"] for name in held}
    again = run_diagnostics(held, labels.numpy(), macs)
    assert again is not None and again["reference_auroc"] == pytest.approx(diag["reference_auroc"])
    for name, rows in diag["models"].items():
        for published, recomputed in zip(rows, again["models"][name], strict=True):
            assert published == pytest.approx(recomputed, abs=1e-6)
    # the whole curve against KD, one number per student, from the same records
    assert set(diag["whole_curve"]) == {"student_ce", "student_erde"}
    for name, whole in diag["whole_curve"].items():
        assert whole == pytest.approx(again["whole_curve"][name], abs=1e-6)
        assert whole["macs_low"] < whole["macs_high"] == pytest.approx(macs["student_kd"][-1])
    text = (tiny_run["out"] / "report.md").read_text()
    assert "## What the entropy term changed, against the KD student" in text
    assert "| ERDE student | 0 |" in text
    diff = 100 * diag["whole_curve"]["student_erde"]["diff"]
    assert f"ERDE student minus KD student over the whole accuracy-MACs curve: {diff:+.2f}" in text
