"""Reproduce the paper's comparison over several seeds: train, evaluate, aggregate, publish.

For each seed, :func:`reproduce` trains the teacher and the ce/kd/erde students
(finished runs are reused, interrupted ones resumed) and evaluates the four of
them once on a fixed threshold grid: ``seed_<s>/`` is an ordinary run folder
with its own ``report.json``. The seeds are then aggregated into

- ``results.json``: per model and fixed threshold, accuracy mean and std over
  seeds, mean MACs, number of seeds and schedule; the MAC reduction at equal
  accuracy; which model beat which at each threshold, by how much and with
  what paired-t p-value; anchors
  (last-exit accuracy against published numbers);
- ``results.md``: the paper-style table and the same facts as tables;
- ``tradeoff.png``: mean accuracy against mean MACs with a +-1 std band;
- ``difference.png``: each student's paired difference against KD per threshold, with
  its 95 % interval, at the same threshold and at equal MACs.

Schedules: ``full`` is the data set's preset (``configs/<dataset>.yaml``);
``reduced`` lays ``configs/schedules/reduced.yaml`` over it (a budget for a
2-core CPU; the file gives the measurements it was sized from); ``fast`` lays
``configs/schedules/fast.yaml`` over it (a few tens of epochs, for a teacher
near its trained accuracy).

The package is split by concern: :mod:`~erde.reproduce.runs` runs the seeds
(schedules, configs, training, evaluation), :mod:`~erde.reproduce.stats` turns
per-seed reports into statistics (pure functions, testable without training)
and :mod:`~erde.reproduce.render` writes them as Markdown, plots and files
(:mod:`~erde.reproduce.differences` draws the paired differences);
:mod:`~erde.reproduce.publish` puts a block into the docs.

Thresholds are those of the entropy rule, written ``theta = h * log K`` so that
one grid of ``h`` (``TABLE_LEVELS``) reads the same for 10 and 100 classes.
Accuracies are fractions in [0, 1] in the JSON and percentages in the Markdown;
std is the sample standard deviation over seeds (0 with one seed).
"""

from erde.reproduce.publish import publish, replace_block
from erde.reproduce.render import render_markdown, render_plot, summary_lines, write_results
from erde.reproduce.runs import (
    SCHEDULES,
    SeedPlan,
    check_reusable,
    detect_loader,
    reproduce,
    reproduce_command,
    reproduce_config,
    run_seed,
    schedule_path,
    seed_plans,
    teacher_design,
)
from erde.reproduce.stats import (
    MODELS,
    PAIRS,
    PUBLISHED_KD,
    PUBLISHED_PLAIN,
    TABLE_LEVELS,
    aggregate,
    mean_std,
    paired_p_value,
    table_thresholds,
    threshold_grid,
    training_time,
)

__all__ = [
    "MODELS",
    "SeedPlan",
    "PAIRS",
    "PUBLISHED_KD",
    "PUBLISHED_PLAIN",
    "SCHEDULES",
    "TABLE_LEVELS",
    "aggregate",
    "check_reusable",
    "detect_loader",
    "mean_std",
    "paired_p_value",
    "publish",
    "render_markdown",
    "render_plot",
    "replace_block",
    "reproduce",
    "reproduce_command",
    "reproduce_config",
    "run_seed",
    "schedule_path",
    "seed_plans",
    "summary_lines",
    "table_thresholds",
    "teacher_design",
    "threshold_grid",
    "training_time",
    "write_results",
]
