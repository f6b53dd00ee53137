"""What the entropy term changed in one run: a student's exits against the KD student's.

ERDE's premise is selective: where the teacher's exit is wrong, the student should stay
unsure and not learn the teacher's answer; elsewhere it copies the teacher. Whether that
holds on test images, and whether it makes the student's entropy a better exit signal,
decides if the loss can improve the accuracy-MACs trade-off or only moves along it (more
entropy everywhere means fewer images leave early at a threshold, at more MACs).

Per exit ``e`` (with ``teacher_wrong_images``, how many images the teacher's exit gets
wrong: the figures below that concern them move in steps of 1 / that count), from the
per-image records (:mod:`erde.records`) of the student, the KD
student of the same run and the teacher (whose exit ``e`` says which images are "wrong"):

- ``entropy_shift_teacher_wrong`` / ``entropy_shift_teacher_right``: the student's mean
  entropy (nats) minus KD's, on the test images the teacher's exit gets wrong / right;
  ``selectivity``: the first minus the second (above 0: more unsure where the teacher
  errs than elsewhere, the premise).
- ``accuracy_teacher_wrong_diff``: the student's accuracy minus KD's on those images;
  ``teacher_error_share``: the share of them on which the student gives the teacher's
  very wrong answer, and ``teacher_error_share_diff`` that share minus KD's. A CE student,
  which never sees the teacher, gives it too: such images are hard for every model.
- ``auroc``: how well the exit's entropy ranks the student's right answers before its
  wrong ones (0.5 chance, 1 perfect), the quality of the exit decision at every
  threshold; ``auroc_diff``: the student's minus KD's.

:func:`run_diagnostics` gives these for every student of one run (``erde run``,
``erde evaluate``: the report's "What the entropy term changed");
:mod:`erde.reproduce.diagnostics` pairs them over seeds with intervals.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from erde.records import ExitRecords, dense_curve

REFERENCE = "student_kd"
GRID_POINTS = 101  # MAC values at which two curves are compared (equal_macs_gaps)
TEACHER = "teacher"


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


def exit_auroc(records: ExitRecords, labels: np.ndarray, e: int) -> float | None:
    """Exit ``e``'s entropy as a detector of the model's right answers (low entropy = right)."""
    right = records.pred[e].astype(np.int64) == labels
    return auroc(-records.entropy[e].astype(np.float64), right)


def _mean_on(values: np.ndarray, where: np.ndarray) -> float | None:
    return float(values[where].astype(np.float64).mean()) if where.any() else None


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def exit_contrast(
    student: ExitRecords, kd: ExitRecords, teacher: ExitRecords, labels: np.ndarray, e: int
) -> dict[str, float | None]:
    """The numbers above at exit ``e`` of one run (the teacher's exit ``e`` says right or wrong)."""
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
    mine_auroc = exit_auroc(student, labels, e)
    return {
        "teacher_wrong_images": int(wrong.sum()),
        "entropy_shift_teacher_wrong": shift_wrong,
        "entropy_shift_teacher_right": shift_right,
        "selectivity": _minus(shift_wrong, shift_right),
        "accuracy_teacher_wrong_diff": _minus(mine_wrong["accuracy"], kd_wrong["accuracy"]),
        "teacher_error_share": mine_wrong["teacher_answer"],
        "teacher_error_share_diff": _minus(
            mine_wrong["teacher_answer"], kd_wrong["teacher_answer"]
        ),
        "auroc": mine_auroc,
        "auroc_diff": _minus(mine_auroc, exit_auroc(kd, labels, e)),
    }


def equal_macs_gaps(
    mine: Sequence[tuple[np.ndarray, np.ndarray]], theirs: Sequence[tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray] | None:
    """One model's accuracy minus another's at equal MACs, all along the MAC axis.

    ``mine``, ``theirs``: a curve per seed (:func:`erde.records.dense_curve`: MACs
    ascending and the best accuracy within them), paired by position. Returns the MAC
    grid (G,) of :data:`GRID_POINTS` values evenly spaced over the MACs every curve
    reaches, and the differences (seeds, G), read on each curve by linear interpolation;
    their mean over the grid is the area between the curves over the MAC range, one
    number per seed for the whole trade-off. None when the curves share no MAC range.
    """
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
    )
    return grid, along


def run_diagnostics(
    held: Mapping[str, ExitRecords],
    labels: np.ndarray,
    macs: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any] | None:
    """Per student (all but the teacher and KD) and exit, :func:`exit_contrast` in one run.

    ``held``: records by model name. None without a teacher or a KD student, or where
    their exits differ in number (no exit to pair with). With ``macs`` (each model's
    MACs per exit), also ``whole_curve``: per student, its accuracy minus KD's at equal
    MACs averaged over the MACs both reach (:func:`equal_macs_gaps`), one run's number
    for the whole trade-off.
    """
    if TEACHER not in held or REFERENCE not in held:
        return None
    exits = held[REFERENCE].num_exits
    if held[TEACHER].num_exits != exits:
        return None
    models = {
        name: [
            {"exit": e, **exit_contrast(rec, held[REFERENCE], held[TEACHER], labels, e)}
            for e in range(exits)
        ]
        for name, rec in held.items()
        if name not in (TEACHER, REFERENCE) and rec.num_exits == exits
    }
    reference_auroc = [exit_auroc(held[REFERENCE], labels, e) for e in range(exits)]
    out = {"reference": REFERENCE, "reference_auroc": reference_auroc, "models": models}
    if macs is not None:
        out["whole_curve"] = _whole_curve(held, labels, macs, list(models))
    return out


def _whole_curve(
    held: Mapping[str, ExitRecords],
    labels: np.ndarray,
    macs: Mapping[str, Sequence[float]],
    names: Sequence[str],
) -> dict[str, dict[str, float] | None]:
    """Per student: ``{"diff", "macs_low", "macs_high"}`` against KD over the whole curve."""
    reference = dense_curve(held[REFERENCE], labels, macs[REFERENCE])
    out: dict[str, dict[str, float] | None] = {}
    for name in names:
        found = equal_macs_gaps([dense_curve(held[name], labels, macs[name])], [reference])
        if found is None:
            out[name] = None
            continue
        grid, along = found
        out[name] = {
            "diff": float(along.mean()),
            "macs_low": float(grid[0]),
            "macs_high": float(grid[-1]),
        }
    return out
