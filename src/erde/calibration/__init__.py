"""Choose exit thresholds on validation data, report what they give on test data.

MSDNet's budgeted protocol: thresholds are fitted on a held-out validation
split, never on the test set, for either a MAC budget or a maximum accuracy
drop (:mod:`erde.calibration.thresholds`: recorded logits in, an
:class:`~erde.inference.ExitPolicy` out); :mod:`erde.calibration.checkpoint`
opens a checkpoint with its data, records its logits and writes the
thresholds file. Thresholds with a statistical guarantee are
:mod:`erde.calibration.guaranteed` (and :mod:`erde.calibration.simulation`, which
checks that they hold); the budgeted evaluation's files are rendered by
:mod:`erde.report.budgeted`.
"""

from erde.calibration.checkpoint import (
    CalibrationInput,
    budgeted_evaluation,
    calibrate_checkpoint,
    check_budgeted_args,
    check_thresholds_output,
    open_checkpoint,
    record_logits,
    save_checkpoint_thresholds,
    val_and_test_logits,
)
from erde.calibration.thresholds import (
    DEFAULT_BUDGETS,
    Calibration,
    CalibrationWarning,
    Target,
    budgeted_curve,
    calibrate,
    candidate_thresholds,
    evaluate_thresholds,
    fit_temperature,
    fit_temperatures,
    outcome,
    resolution_note,
    search_thresholds,
    threshold_near_macs,
)

__all__ = [
    "DEFAULT_BUDGETS",
    "Calibration",
    "CalibrationInput",
    "CalibrationWarning",
    "Target",
    "budgeted_curve",
    "budgeted_evaluation",
    "calibrate",
    "calibrate_checkpoint",
    "candidate_thresholds",
    "check_budgeted_args",
    "check_thresholds_output",
    "evaluate_thresholds",
    "fit_temperature",
    "fit_temperatures",
    "open_checkpoint",
    "outcome",
    "record_logits",
    "resolution_note",
    "save_checkpoint_thresholds",
    "search_thresholds",
    "threshold_near_macs",
    "val_and_test_logits",
]
