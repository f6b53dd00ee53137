"""The paired-difference figure of a results block: what it draws is the block's JSON, an
interval where seeds give one, students too far off to share the axis named instead of drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from erde.reproduce.differences import (
    OFF_SCALE,
    against_baseline,
    difference_figure,
    render_difference_png,
)
from erde.reproduce.publish import publish
from erde.reproduce.render import render_markdown
from erde.reproduce.variants import TESTS, render_variants_png, variant_rows, variants_figure

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
BLOCK = RESULTS / "cifar10-speed.json"  # several seeds: intervals
ABLATION = RESULTS / "cifar10-speed-fastnet-fastnet_x0.25-ablation.json"  # tau = 1 collapsed


def _errorbars(ax) -> list:
    """(x, y, lower, upper) arrays of every errorbar drawn on ``ax``, in drawing order
    (lower = upper = y where no bar is drawn)."""
    drawn = []
    for container in ax.containers:
        line, _, bars = container.lines  # data line, caps, bar collections
        x, y = (np.asarray(v, dtype=float) for v in line.get_data())
        if not bars:
            drawn.append((x, y, y, y))
            continue
        segments = np.asarray(bars[0].get_segments(), dtype=float)  # [point][end][x, y]
        drawn.append((x, y, segments[:, 0, 1], segments[:, 1, 1]))
    return drawn


@pytest.fixture(scope="module")
def block() -> dict:
    return json.loads(BLOCK.read_text())


def test_the_figure_draws_the_blocks_paired_differences_and_intervals(block) -> None:
    fig = difference_figure(block)
    (comp,) = against_baseline(block)  # the headline block: ERDE against KD only
    keys = (("accuracy_diff_mean", "ci95"), ("equal_macs_diff_mean", "equal_macs_ci95"))
    for ax, (mean, ci) in zip(fig.axes[:2], keys, strict=True):
        ((x, y, low, high),) = _errorbars(ax)
        rows = comp["per_threshold"]
        assert len(x) == len(rows)
        np.testing.assert_allclose(y, [100 * r[mean] for r in rows])
        np.testing.assert_allclose(low, [100 * r[f"{ci}_low"] for r in rows])
        np.testing.assert_allclose(high, [100 * r[f"{ci}_high"] for r in rows])
    assert f"over {block['n_seeds']} seeds" in fig._suptitle.get_text()
    assert render_difference_png(block)[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_third_panel_draws_the_difference_along_the_mac_axis_with_its_band(block) -> None:
    """The whole-curve comparison (erde.reproduce.tradeoff): its profile as a line, its 95 %
    band, its one-test number in the legend; no third panel in a block without it."""
    fig = difference_figure(block)
    assert len(fig.axes) == 3
    (whole,) = [
        w
        for w in block["whole_curve"]
        if (w["model"], w["other"]) == ("student_erde", "student_kd")
    ]
    (line,) = [ln for ln in fig.axes[2].get_lines() if ln.get_label().startswith("ERDE")]
    x, y = (np.asarray(v, dtype=float) for v in line.get_data())
    np.testing.assert_allclose(y, [100 * v for v in whole["profile_diff_mean"]])
    assert x[0] == pytest.approx(whole["macs_low"] / 1e6) and x[-1] == pytest.approx(
        whole["macs_high"] / 1e6
    )
    assert f"{100 * whole['diff_mean']:+.2f} ({100 * whole['ci95_low']:+.2f}" in line.get_label()
    (band,) = fig.axes[2].collections
    edges = np.concatenate([path.vertices[:, 1] for path in band.get_paths()])
    assert edges.min() == pytest.approx(100 * min(whole["profile_ci95_low"]))
    assert edges.max() == pytest.approx(100 * max(whole["profile_ci95_high"]))

    older = {k: v for k, v in block.items() if k != "whole_curve"}
    assert len(difference_figure(older).axes) == 2


def test_students_too_far_off_are_named_not_drawn() -> None:
    ablation = json.loads(ABLATION.read_text())
    fig = difference_figure(ablation)
    far = [
        c["model"] for c in against_baseline(ablation)
        if max(abs(p["accuracy_diff_mean"]) for p in c["per_threshold"]) > OFF_SCALE
    ]  # fmt: skip
    assert far  # the tau = 1 students of this block collapsed
    (note,) = [t.get_text() for t in fig.texts if t.get_text().startswith("Not drawn")]
    drawn = [h.get_label() for h in fig.axes[0].containers]
    assert len(drawn) == len(against_baseline(ablation)) - len(far)
    assert not any(name in label for name in far for label in drawn)
    assert all(name in note for name in far)
    for _, y, _, _ in _errorbars(fig.axes[0]):
        assert np.all(np.abs(y) <= 100 * OFF_SCALE)
    along = [ln.get_label() for ln in fig.axes[2].get_lines() if "over the curve" in ln.get_label()]
    assert len(along) == len(drawn) and not any(name in a for name in far for a in along)
    assert not fig.axes[2].collections  # more than three students: no bands hiding each other


def test_one_seed_draws_no_interval_and_no_kd_draws_nothing(block) -> None:
    one = json.loads(json.dumps(block))
    one["n_seeds"] = 1
    for p in one["comparisons"][0]["per_threshold"]:
        for key in ("ci95_low", "ci95_high", "equal_macs_ci95_low", "equal_macs_ci95_high"):
            p[key] = None
    for whole in one["whole_curve"]:  # as curve_difference gives them for one seed
        whole["ci95_low"] = whole["ci95_high"] = None
        whole["profile_ci95_low"] = whole["profile_ci95_high"] = [None] * whole["grid_points"]
    fig = difference_figure(one)
    for ax in fig.axes[:2]:
        ((_, y, low, high),) = _errorbars(ax)
        assert np.array_equal(low, y) and np.array_equal(high, y)
    assert not fig.axes[2].collections  # no band
    assert "over the curve" in fig.axes[2].get_lines()[0].get_label()
    assert "one seed, no interval" in fig._suptitle.get_text()
    one["comparisons"] = [c for c in one["comparisons"] if c["other"] != "student_kd"]
    assert difference_figure(one) is None and render_difference_png(one) is None
    assert "difference.png" not in render_markdown(one)


def test_publish_writes_the_figure_and_links_it(tmp_path: Path, block) -> None:
    docs = tmp_path / "docs"
    paths = publish(block, docs)
    assert paths["docs_difference"].name == "cifar10-speed-difference.png"
    assert paths["docs_difference"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (docs / "RESULTS.md").read_text()
    assert "](results/cifar10-speed-difference.png)" in text


def _xbars(ax) -> list:
    """(x, y, left, right) arrays of every horizontal errorbar drawn on ``ax``."""
    drawn = []
    for container in ax.containers:
        line, _, bars = container.lines
        x, y = (np.asarray(v, dtype=float) for v in line.get_data())
        segments = np.asarray(bars[0].get_segments(), dtype=float)  # [point][end][x, y]
        drawn.append((x, y, segments[:, 0, 0], segments[:, 1, 0]))
    return drawn


def test_the_forest_plot_draws_each_students_two_tests_against_kd() -> None:
    """The ablation's summary: per student the whole-curve test and the last exit against
    KD, each the block's number with its interval; the collapsed tau = 1 students named with
    their numbers instead of stretching the axis."""
    ablation = json.loads(ABLATION.read_text())
    rows = variant_rows(ablation)
    assert [r["model"] for r in rows] == [c["model"] for c in against_baseline(ablation)]
    fig = variants_figure(ablation)
    ax = fig.axes[0]
    far = [r for r in rows if abs(r[TESTS[0]][0]) > OFF_SCALE or abs(r[TESTS[1]][0]) > OFF_SCALE]
    near = [r for r in rows if r not in far]
    assert {r["model"] for r in far} == {"student_kd_t1", "student_erde_t1"}
    for (x, _, left, right), test in zip(_xbars(ax), TESTS, strict=True):
        np.testing.assert_allclose(x, [100 * r[test][0] for r in near])
        np.testing.assert_allclose(left, [100 * r[test][1] for r in near])
        np.testing.assert_allclose(right, [100 * r[test][2] for r in near])
    whole = {(w["model"], w["other"]): w for w in ablation["whole_curve"]}
    g4 = whole[("student_erde_g4", "student_kd")]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == len(near)
    expected = f"{100 * g4['diff_mean']:+.2f} ({100 * g4['ci95_low']:+.2f} to "
    assert any(expected.replace("-", "−") in label for label in labels), labels
    (note,) = [t.get_text() for t in fig.texts if t.get_text().startswith("Not drawn")]
    assert "student_kd_t1" in note and "student_erde_t1" in note
    assert render_variants_png(ablation)[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_forest_plot_is_for_ablations_only(tmp_path: Path, block) -> None:
    """One student against KD: the difference figure's legend already says it; no forest
    plot, no link. An ablation block published: the figure written and linked."""
    assert len(variant_rows(block)) == 1
    assert variants_figure(block) is None and render_variants_png(block) is None
    assert "variants.png" not in render_markdown(block)
    ablation = json.loads(ABLATION.read_text())
    paths = publish(ablation, tmp_path / "docs")
    name = paths["docs_variants"].name
    assert name == "cifar10-speed-fastnet-fastnet_x0.25-ablation-variants.png"
    assert paths["docs_variants"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"](results/{name})" in (tmp_path / "docs" / "RESULTS.md").read_text()
