"""The one place that renders: evaluation reports, training curves, budgeted evaluations.

- :mod:`erde.report.build`: the report's JSON (the source of truth);
- :mod:`erde.report.markdown`, :mod:`erde.report.plots`, :mod:`erde.report.files`:
  report.md, tradeoff.png and reliability.png, and writing them with sweep.csv;
- :mod:`erde.report.html`: the self-contained report.html page;
- :mod:`erde.report.curves`: training curves from metrics.jsonl;
- :mod:`erde.report.budgeted`: the budgeted evaluation's files;
- :mod:`erde.report.styles`: model names, colours and number formats shared by all.
"""

from erde.report.build import (
    SCHEMA_VERSION,
    build_report,
    chance_accuracy,
    dataset_summary,
    reference_untrained,
    rule_of,
    untrained_text,
)
from erde.report.files import render_sweep_csv, write_report
from erde.report.markdown import (
    fmt_thresholds,
    ladder_table,
    level_range,
    level_words,
    markdown_table,
    merge_same_choices,
    render_markdown,
    rule_ends,
)
from erde.report.plots import (
    figure_png,
    mac_unit,
    plot_tradeoff,
    reliability_figure,
    render_reliability_png,
    render_tradeoff_png,
    use_log_macs,
)
from erde.report.styles import STYLES, curve_style, fmt_count, model_label, pct

__all__ = [
    "SCHEMA_VERSION",
    "STYLES",
    "build_report",
    "chance_accuracy",
    "curve_style",
    "dataset_summary",
    "figure_png",
    "fmt_count",
    "fmt_thresholds",
    "ladder_table",
    "level_range",
    "level_words",
    "mac_unit",
    "markdown_table",
    "merge_same_choices",
    "model_label",
    "pct",
    "plot_tradeoff",
    "reference_untrained",
    "reliability_figure",
    "render_markdown",
    "render_reliability_png",
    "render_sweep_csv",
    "render_tradeoff_png",
    "rule_ends",
    "rule_of",
    "untrained_text",
    "use_log_macs",
    "write_report",
]
