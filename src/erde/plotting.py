"""MAC axes shared by every accuracy-vs-MACs plot (report, reproduce, budgeted evaluation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

LOG_TICKS = (1.0, 2.0, 5.0)  # labelled ticks per decade on a log MAC axis: 1, 2, 5, 10, 20 ...


def mac_unit(models: Mapping[str, Mapping[str, Any]]) -> tuple[float, str]:
    """Scale and unit for the MAC axis from the largest MAC count shown."""
    largest = max(max(m["macs_per_exit"]) for m in models.values())
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if largest >= scale:
            return scale, unit
    return 1.0, ""


def _plain_number(value: float, _position: Any = None) -> str:
    """Tick text without exponents: 0.5, 2, 10, 200."""
    return f"{value:g}"


def use_log_macs(ax: Any, macs: Sequence[float]) -> None:
    """Log MAC axis when models differ by 10x or more, so small students do not collapse.

    Ticks at 1, 2 and 5 of every decade, written as plain numbers: with
    matplotlib's default a 0.3-10 M axis is labelled only at 10^0 and 10^1 and
    no student's cost can be read off it.
    """
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [m for m in macs if m > 0]
    if positive and max(positive) >= 10 * min(positive):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10.0, subs=LOG_TICKS))
        ax.xaxis.set_major_formatter(FuncFormatter(_plain_number))
        ax.xaxis.set_minor_formatter(NullFormatter())
