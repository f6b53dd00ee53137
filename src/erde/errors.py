"""Errors a user can fix; the CLI prints their message alone and exits non-zero."""


class ErdeError(Exception):
    """Base class for user-facing errors (bad data, config, checkpoint or arguments)."""


class DataError(ErdeError):
    """A data set is missing, truncated or malformed."""


class ConfigError(ErdeError):
    """A config has unknown keys, wrong types or out-of-range values."""


class CheckpointError(ErdeError):
    """A checkpoint is corrupted, foreign, or does not match the data/model."""


class OutputError(ErdeError):
    """An output path that cannot or must not be written (read-only, a file, also an input)."""


class DiskFullError(OutputError):
    """A write ran out of disk space; the previous version of the file is kept."""


class CalibrationError(ErdeError):
    """No thresholds meet a guaranteed target with the calibration images at hand."""


class ReportError(ErdeError):
    """A report file is unreadable, too large, or of a schema this erde does not render."""


def require_list(value: object, name: str) -> None:
    """Refuse one string where a list is expected: it would be read letter by letter
    ("checkpoint not found: r" for ``evaluate("runs/t", ...)``)."""
    if isinstance(value, (str, bytes)):
        shown = repr(value if len(value) <= 60 else value[:57] + "...")
        raise ConfigError(f"{name} must be a list, got one string {shown}; write [{shown}]")


class TrainingError(ErdeError):
    """Training cannot go on (non-finite loss, out of memory)."""
