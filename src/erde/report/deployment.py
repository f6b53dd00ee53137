"""The deployment table (``erde export --bench``) as Markdown: rows, then serving advice."""

from __future__ import annotations

from typing import Any

from erde.report.markdown import markdown_table
from erde.report.styles import fmt_count


def render_table(result: dict[str, Any]) -> list[str]:
    """The rows as a Markdown table, then a note for each batch size at which the student's
    full network is faster than its early exit."""
    sizes = result["setup"]["batch_sizes"]
    header = ["Row", "Test acc. (%)", "Mean MACs"]
    for bs in sizes:
        header += [f"img/s @{bs}", f"speedup @{bs}"]
    header.append("MAC-ideal speedup")
    body = []
    for r in result["rows"]:
        cells = [r["row"], f"{100 * r['accuracy']:.2f}", fmt_count(r["mean_macs"])]
        for bs in sizes:
            cells += [f"{r[f'ips_{bs}']:.0f}", f"{r[f'speedup_{bs}']:.2f}x"]
        cells.append(f"{r['mac_ideal_speedup']:.2f}x")
        body.append(cells)
    notes = [f"Note: {a}." for a in result.get("advice", [])]  # older results have none
    return markdown_table(header, body) + ([""] + notes if notes else [])
