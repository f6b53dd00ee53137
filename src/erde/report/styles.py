"""How each model is named and drawn, and how a percentage is written: shared by the
Markdown, the plots, the training curves and the HTML page."""

from __future__ import annotations

# label, colour, line style, marker: fixed for the four models the paper compares
STYLES: dict[str, tuple[str, str, str, str]] = {
    "teacher": ("Teacher", "black", "-", "o"),
    "student_ce": ("CE student", "tab:blue", "--", "s"),
    "student_kd": ("KD student", "tab:orange", "-.", "^"),
    "student_erde": ("ERDE student", "tab:red", "-", "D"),
}
_EXTRA_COLOURS = ("tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan")
_EXTRA_MARKERS = ("v", "P", "X", "*", "<", ">")


def model_label(name: str) -> str:
    """Display name of a model (the four paper models get their plot labels)."""
    return STYLES[name][0] if name in STYLES else name


def curve_style(name: str, index: int) -> tuple[str, str, str, str]:
    """Fixed style for the paper's models, a cycling one for anything else."""
    if name in STYLES:
        return STYLES[name]
    k = index % len(_EXTRA_COLOURS)
    return name, _EXTRA_COLOURS[k], ":", _EXTRA_MARKERS[k]


def fmt_count(value: float | None) -> str:
    """Human-readable count: 40.81M, 272.5K, 1.23G."""
    if value is None:
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"


def pct(value: float | None, digits: int = 2) -> str:
    """Fraction in [0, 1] shown as a percentage."""
    return "—" if value is None else f"{100 * value:.{digits}f}%"
