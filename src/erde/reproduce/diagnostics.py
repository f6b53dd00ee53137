"""What the entropy term did to a block's students, paired over seeds against KD.

:mod:`erde.diagnostics` defines the numbers for one run (entropy shifts where the
teacher errs and where it is right, their difference, accuracy and the teacher's wrong
answers where it errs, the AUROC of each exit's entropy); here each is computed for
every seed of a results block from its per-image records and summarised by its mean
over seeds and, with two seeds or more, the 95 % interval of the paired mean
(Student's t) and the paired t-test's p.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from erde.diagnostics import REFERENCE, exit_auroc, exit_contrast
from erde.records import ExitRecords
from erde.reproduce.stats import paired_ci95, paired_p_value

SHIFTS = (
    "entropy_shift_teacher_wrong",
    "entropy_shift_teacher_right",
    "selectivity",
    "accuracy_teacher_wrong_diff",
    "teacher_error_share_diff",
    "auroc_diff",
)


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
                exit_contrast(held[entries[s][name]], held[entries[s][REFERENCE]],
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
        values = [exit_auroc(held[entries[s][REFERENCE]], labels, e) for s in seeds]
        reference_auroc.append(None if None in values else statistics.fmean(values))  # type: ignore[arg-type]
    return {"reference": REFERENCE, "reference_auroc_mean": reference_auroc, "models": models}


def block_diagnostics(
    results: Mapping[str, Any], labels: np.ndarray, held: Mapping[str, ExitRecords]
) -> dict[str, Any] | None:
    """:func:`entropy_diagnostics` of a results document and its loaded records."""
    seeds = [str(s) for s in results["seeds"]]
    return entropy_diagnostics(seeds, results["records"]["entries"], labels, held)
