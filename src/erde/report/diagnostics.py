"""The "what the entropy term changed" table of one run, shared by report.md and report.html.

The numbers come from :func:`erde.diagnostics.run_diagnostics` (stored in report.json as
``entropy_diagnostics``); this module only words and formats them, so that the Markdown and the
HTML page show the same cells.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from erde.report.styles import fmt_count, model_label

HEADER = (
    "Student", "Exit", "Teacher wrong on", "Entropy shift, teacher wrong",
    "Entropy shift, teacher right", "Selectivity", "AUROC", "AUROC diff.",
    "Accuracy diff. where the teacher errs", "Gives the teacher's wrong answer (%)",
    "Share diff.",
)  # fmt: skip


class DiagnosticsTable(NamedTuple):
    """Title, explanation, header, formatted rows (one per student and exit) and one
    sentence per student on the whole accuracy-MACs curve against KD (where measured)."""

    title: str
    explanation: str
    header: tuple[str, ...]
    rows: list[list[str]]
    whole_curve: list[str] = []


def signed(value: float | None, digits: int, scale: float = 1.0) -> str:
    """``+0.031``-style cell; "—" where the value is undefined (no image of that kind)."""
    return "—" if value is None else f"{scale * value:+.{digits}f}"


def diagnostics_table(
    report: Mapping[str, Any], label: Callable[[str], str] = model_label
) -> DiagnosticsTable | None:
    """The table of ``report["entropy_diagnostics"]``; ``None`` where the run has none (no
    teacher, or no KD student to compare with). ``label`` turns a model name into its cell
    (report.md escapes it for Markdown)."""
    diag = report.get("entropy_diagnostics")
    if not diag or not diag.get("models"):
        return None
    ref = model_label(diag["reference"])
    rows = []
    for name, per_exit in diag["models"].items():
        for r in per_exit:
            share = r["teacher_error_share"]
            rows.append([
                label(name), str(r["exit"]), str(r.get("teacher_wrong_images", "?")),
                signed(r["entropy_shift_teacher_wrong"], 3),
                signed(r["entropy_shift_teacher_right"], 3), signed(r["selectivity"], 3),
                "—" if r["auroc"] is None else f"{r['auroc']:.4f}",
                signed(r["auroc_diff"], 4),
                signed(r["accuracy_teacher_wrong_diff"], 2, 100),
                "—" if share is None else f"{100 * share:.1f}",
                signed(r["teacher_error_share_diff"], 2, 100),
            ])  # fmt: skip
    explanation = (
        f"Per exit, against the {ref} of this run, on the test images. Entropy shift: the "
        f"student's mean entropy (nats) minus the {ref}'s, where the teacher's same exit is "
        "wrong and where it is right; selectivity: the first minus the second (above 0: more "
        "unsure where the teacher errs, ERDE's premise). AUROC: how well the exit's entropy "
        "ranks the student's right answers before its wrong ones (0.5 chance, 1 perfect); a "
        "gain there can improve the accuracy-MACs trade-off, a uniform rise in entropy only "
        "moves a threshold along it. Where the teacher errs: the student's accuracy minus "
        f"the {ref}'s (points), how often it gives the teacher's very wrong answer (%) and that "
        f"share minus the {ref}'s (points); they move in steps of one image in the count of "
        "images the teacher errs on. One run: these differences need seeds (`erde reproduce`) "
        "before they mean anything."
    )
    return DiagnosticsTable(
        f"What the entropy term changed, against the {ref}", explanation, HEADER, rows,
        whole_curve_sentences(diag, label),
    )  # fmt: skip


def whole_curve_sentences(diag: Mapping[str, Any], label: Callable[[str], str]) -> list[str]:
    """One sentence per student: its accuracy minus KD's at equal MACs over the whole curve."""
    ref = model_label(diag["reference"])
    out = []
    for name, whole in (diag.get("whole_curve") or {}).items():
        if whole is None:
            continue
        out.append(
            f"{label(name)} minus {ref} over the whole accuracy-MACs curve: "
            f"{signed(whole['diff'], 2, 100)} points at equal MACs, averaged from "
            f"{fmt_count(whole['macs_low'])} to {fmt_count(whole['macs_high'])} MACs (one run: "
            "the seeds of `erde reproduce` give it an interval)."
        )
    return out


__all__ = ["HEADER", "DiagnosticsTable", "diagnostics_table", "signed"]
