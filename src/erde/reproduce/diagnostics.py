"""What the entropy term does to a student, read from a results block's per-image records.

ERDE's premise is selective: where the teacher's exit is wrong, the student should stay
unsure; elsewhere it copies the teacher. Whether that holds on test images, and whether
it makes the student's entropy a better exit signal, is what decides if the loss can
improve the accuracy-MACs trade-off or only moves along it (more entropy everywhere
means fewer images leave early at a threshold, at more MACs). Per student and exit,
against the KD student of the same seed (paired by seed, like the block's comparisons):

- ``entropy_shift_teacher_wrong`` / ``entropy_shift_teacher_right``: the student's mean
  entropy (nats) minus KD's, on the test images the teacher's same exit gets wrong /
  right. ``selectivity``: the first minus the second, the direct test of the premise
  (above 0: the student became more unsure where the teacher errs than elsewhere).
- ``accuracy_teacher_wrong_diff``: the student's accuracy minus KD's on the images the
  teacher's exit gets wrong, and ``teacher_error_share_diff``: the share of those images
  on which the student gives the teacher's very wrong answer, minus KD's. KD learns the
  teacher's answers everywhere; ERDE is meant not to learn them where they are wrong, which
  shows as a higher accuracy and a lower share there. ``teacher_error_share``: the
  student's own share (a CE student, which never sees the teacher, gives it too: such
  images are hard for every model).
- ``auroc``: how well the exit's entropy ranks the student's own right answers before
  its wrong ones (0.5: no better than chance; 1: every right answer less uncertain
  than every wrong one): the quality of the exit decision itself, independent of the
  threshold. ``auroc_diff``: the student's minus KD's.

Each quantity carries the mean over seeds and, with two seeds or more, the 95 % interval
of the paired mean (Student's t) and the paired t-test's p.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from erde.records import ExitRecords
from erde.reproduce.stats import paired_ci95, paired_p_value

REFERENCE = "student_kd"
SHIFTS = (
    "entropy_shift_teacher_wrong",
    "entropy_shift_teacher_right",
    "selectivity",
    "accuracy_teacher_wrong_diff",
    "teacher_error_share_diff",
    "auroc_diff",
)


def auroc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """P(a positive scores above a negative), ties counted half (Mann-Whitney U / n1 n0).

    ``score`` (N,) float, ``positive`` (N,) bool. None when one side is empty.
    """
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score), dtype=np.float64)
    ranks[order] = np.arange(1, len(score) + 1)
    _, tie, count = np.unique(score, return_inverse=True, return_counts=True)
    ranks = (np.bincount(tie, weights=ranks) / count)[tie]  # mean rank within ties
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _exit_auroc(records: ExitRecords, labels: np.ndarray, e: int) -> float | None:
    """Exit ``e``'s entropy as a detector of the model's right answers (low entropy = right)."""
    right = records.pred[e].astype(np.int64) == labels
    return auroc(-records.entropy[e].astype(np.float64), right)


def _mean_on(values: np.ndarray, where: np.ndarray) -> float | None:
    return float(values[where].astype(np.float64).mean()) if where.any() else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _seed_exit(
    student: ExitRecords, kd: ExitRecords, teacher: ExitRecords, labels: np.ndarray, e: int
) -> dict[str, float | None]:
    """One seed's numbers at exit ``e`` (the teacher's exit ``e`` defines right and wrong)."""
    teacher_pred = teacher.pred[e].astype(np.int64)
    wrong = teacher_pred != labels

    def on(model: ExitRecords, where: np.ndarray) -> dict[str, float | None]:
        pred = model.pred[e].astype(np.int64)
        return {
            "entropy": _mean_on(model.entropy[e], where),
            "accuracy": _mean_on((pred == labels).astype(np.float64), where),
            "teacher_answer": _mean_on((pred == teacher_pred).astype(np.float64), where),
        }

    mine_wrong, kd_wrong = on(student, wrong), on(kd, wrong)
    mine_right, kd_right = on(student, ~wrong), on(kd, ~wrong)
    shift_wrong = _minus(mine_wrong["entropy"], kd_wrong["entropy"])
    shift_right = _minus(mine_right["entropy"], kd_right["entropy"])
    mine_auroc = _exit_auroc(student, labels, e)
    return {
        "entropy_shift_teacher_wrong": shift_wrong,
        "entropy_shift_teacher_right": shift_right,
        "selectivity": _minus(shift_wrong, shift_right),
        "accuracy_teacher_wrong_diff": _minus(mine_wrong["accuracy"], kd_wrong["accuracy"]),
        "teacher_error_share": mine_wrong["teacher_answer"],
        "teacher_error_share_diff": _minus(
            mine_wrong["teacher_answer"], kd_wrong["teacher_answer"]
        ),
        "auroc": mine_auroc,
        "auroc_diff": _minus(mine_auroc, _exit_auroc(kd, labels, e)),
    }


def _summary(values: Sequence[float | None], prefix: str) -> dict[str, Any]:
    """Mean, 95 % interval and p over seeds (None where a seed had no value)."""
    if any(v is None for v in values) or not values:
        return {f"{prefix}_mean": None, f"{prefix}_ci95_low": None, f"{prefix}_ci95_high": None,
                f"{prefix}_p_value": None}  # fmt: skip
    diffs = [float(v) for v in values if v is not None]
    low, high = paired_ci95(diffs)
    return {f"{prefix}_mean": statistics.fmean(diffs), f"{prefix}_ci95_low": low,
            f"{prefix}_ci95_high": high, f"{prefix}_p_value": paired_p_value(diffs)}  # fmt: skip


def entropy_diagnostics(
    seeds: Sequence[str],
    entries: Mapping[str, Mapping[str, str]],
    labels: np.ndarray,
    held: Mapping[str, ExitRecords],
) -> dict[str, Any] | None:
    """Per student (all but the teacher and KD) and exit, the numbers above against KD.

    ``entries`` is the block's ``records.entries`` ({seed: {model: key in held}}). None
    when the block has no KD student or no teacher, or the teacher's exits differ in
    number from the students' (no exit to pair with).
    """
    first = entries[seeds[0]]
    if REFERENCE not in first or "teacher" not in first:
        return None
    exits = held[first[REFERENCE]].num_exits
    if held[first["teacher"]].num_exits != exits:
        return None
    models: dict[str, list[dict[str, Any]]] = {}
    for name in first:
        if name in ("teacher", REFERENCE) or held[first[name]].num_exits != exits:
            continue
        per_exit = []
        for e in range(exits):
            per_seed = [
                _seed_exit(held[entries[s][name]], held[entries[s][REFERENCE]],
                           held[entries[s]["teacher"]], labels, e)
                for s in seeds
            ]  # fmt: skip
            row: dict[str, Any] = {"exit": e}
            for key in SHIFTS:
                row.update(_summary([p[key] for p in per_seed], key))
            for key in ("auroc", "teacher_error_share"):
                values = [p[key] for p in per_seed]
                row[f"{key}_mean"] = None if None in values else statistics.fmean(values)  # type: ignore[arg-type]
            per_exit.append(row)
        models[name] = per_exit
    reference_auroc = []
    for e in range(exits):
        values = [_exit_auroc(held[entries[s][REFERENCE]], labels, e) for s in seeds]
        reference_auroc.append(None if None in values else statistics.fmean(values))  # type: ignore[arg-type]
    return {"reference": REFERENCE, "reference_auroc_mean": reference_auroc, "models": models}


def block_diagnostics(
    results: Mapping[str, Any], labels: np.ndarray, held: Mapping[str, ExitRecords]
) -> dict[str, Any] | None:
    """:func:`entropy_diagnostics` of a results document and its loaded records."""
    seeds = [str(s) for s in results["seeds"]]
    return entropy_diagnostics(seeds, results["records"]["entries"], labels, held)
