"""The comparison report: report.json schema, report.md tables and a readable tradeoff.png."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch

from erde.evaluation import model_report
from erde.report import (
    build_report,
    dataset_summary,
    fmt_thresholds,
    model_label,
    reliability_figure,
    render_markdown,
    rule_ends,
    write_report,
)

NAMES = ("teacher", "student_ce", "student_kd", "student_erde")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _model(name: str, seed: int, macs: list[int], rules=("entropy", "max_softmax")) -> dict:
    """A model_report of synthetic logits whose later exits are sharper and more often right."""
    g = torch.Generator().manual_seed(seed)
    n, k = 120, 5
    labels = torch.randint(0, k, (n,), generator=g)
    exits = []
    for e, hit_rate in enumerate((0.5, 0.7, 0.9)):
        logits = torch.randn(n, k, generator=g)
        right = torch.rand(n, generator=g) < hit_rate
        logits[right, labels[right]] += 2.0 + 2 * e
        exits.append(logits)
    params = [100 * (i + 1) for i in range(len(macs))]
    return model_report(
        name, torch.stack(exits), labels, macs, params, thresholds=None, rules=rules
    ) | {"arch": "resnet8"}


def _models(rules=("entropy", "max_softmax")) -> dict[str, dict]:
    return {
        name: _model(name, seed, [s * 1000, s * 2500, s * 4000], rules)
        for seed, (name, s) in enumerate(zip(NAMES, (40, 5, 5, 5), strict=True))
    }


def test_report_json_schema(tmp_path: Path) -> None:
    models = _models()
    before = copy.deepcopy(models)
    report = build_report(models, config={"seed": 0}, dataset={"name": "synthetic"})
    assert models == before  # inputs are not mutated
    paths = write_report(tmp_path, report)
    assert paths == {
        "json": tmp_path / "report.json",
        "markdown": tmp_path / "report.md",
        "plot": tmp_path / "tradeoff.png",
        "csv": tmp_path / "sweep.csv",
        "reliability": tmp_path / "reliability.png",
    }
    data = json.loads(paths["json"].read_text())
    assert data["schema_version"] == 1
    assert data["config"] == {"seed": 0} and data["dataset"] == {"name": "synthetic"}
    assert "torch" in data["environment"] and "python" in data["environment"]
    assert list(data["models"]) == list(NAMES)
    for name, model in data["models"].items():
        assert model["macs_per_exit"] == models[name]["macs_per_exit"]
        assert all(isinstance(m, int) for m in model["macs_per_exit"])
        assert len(model["exit_accuracy"]) == 3
        assert all(0.0 <= a <= 1.0 for a in model["exit_accuracy"])
        assert {p["rule"] for p in model["sweep"]} == {"entropy", "max_softmax"}
        for point in model["sweep"]:
            assert set(point) == {"rule", "threshold", "accuracy", "mean_macs", "exit_fractions"}
            assert 0.0 <= point["accuracy"] <= 1.0
            assert sum(point["exit_fractions"]) == pytest.approx(1.0)
            assert min(model["macs_per_exit"]) <= point["mean_macs"] <= max(model["macs_per_exit"])
        assert "mac_reduction" in model
    ref = data["reference"]
    teacher = data["models"]["teacher"]
    assert ref["model"] == "teacher" and ref["rule"] == "entropy"
    assert ref["accuracy"] == teacher["exit_accuracy"][-1]
    assert ref["macs"] == teacher["macs_per_exit"][-1]


def test_mac_reduction_is_measured_against_the_teacher_last_exit(tmp_path: Path) -> None:
    report = build_report(_models(), tolerance=0.5)
    ref = report["reference"]
    for name, model in report["models"].items():
        red = model["mac_reduction"]
        entropy_points = [p for p in model["sweep"] if p["rule"] == "entropy"]
        qualifying = [p for p in entropy_points if p["accuracy"] >= ref["accuracy"] - 0.5]
        assert red is not None, name  # tolerance 0.5: every sweep has qualifying points
        assert red["mean_macs"] == min(p["mean_macs"] for p in qualifying)
        assert red["reduction"] == pytest.approx(ref["macs"] / red["mean_macs"])
    # students are 8x cheaper than the teacher at their last exit, so they save MACs
    assert report["models"]["student_erde"]["mac_reduction"]["reduction"] >= 8.0


def test_strict_tolerance_reports_unreached_reduction(tmp_path: Path) -> None:
    models = _models()
    for point in models["student_ce"]["sweep"]:
        point["accuracy"] = 0.0  # a student that never gets anything right
    report = build_report(models)
    assert report["models"]["student_ce"]["mac_reduction"] is None
    write_report(tmp_path, report)
    assert "not reached" in (tmp_path / "report.md").read_text()


def test_reduction_ladder_grows_with_the_accuracy_given_up_and_splits_network_x_exits(
    tmp_path: Path,
) -> None:
    report = build_report(_models())
    ref = report["reference"]
    for name, model in report["models"].items():
        ladder = model["mac_reduction_by_tolerance"]
        assert [r["tolerance"] for r in ladder] == [0.005, 0.01, 0.02, 0.05]
        entropy_points = [p for p in model["sweep"] if p["rule"] == "entropy"]
        full_macs = model["macs_per_exit"][-1]
        for rung in ladder:
            floor = ref["accuracy"] - rung["tolerance"]
            qualifying = [p for p in entropy_points if p["accuracy"] >= floor - 1e-12]
            if not qualifying:
                assert rung["reduction"] is None, (name, rung)
                continue
            cheapest = min(p["mean_macs"] for p in qualifying)
            assert rung["mean_macs"] == cheapest and rung["accuracy"] >= floor - 1e-12
            assert rung["from_network"] == pytest.approx(ref["macs"] / full_macs)
            assert rung["from_exits"] == pytest.approx(full_macs / cheapest)
            assert rung["reduction"] == pytest.approx(rung["from_network"] * rung["from_exits"])
        reached = [r["reduction"] for r in ladder if r["reduction"] is not None]
        assert reached == sorted(reached)  # giving up more accuracy never costs MACs
    # the teacher against itself: its exits alone, the network factor is exactly 1
    assert report["models"]["teacher"]["mac_reduction_by_tolerance"][0]["from_network"] == 1.0
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert "## MAC reduction for accuracy given up" in text
    assert "within 0.5, 1, 2 and 5 points of the reference (Teacher, last exit" in text
    header = "| Model | within 0.5 points | within 1 point | within 2 points | within 5 points |"
    assert header in text
    rung = report["models"]["student_erde"]["mac_reduction_by_tolerance"][-1]
    cell = (
        f"{rung['reduction']:.2f}x ({rung['from_network']:.2f} × {rung['from_exits']:.2f}), "
        f"{100 * rung['accuracy']:.2f} %"
    )
    ladder_rows = text.split("## MAC reduction for accuracy given up")[1].split("## Models")[0]
    erde_row = next(
        line for line in ladder_rows.splitlines() if line.startswith("| ERDE student |")
    )
    assert erde_row.endswith(f"| {cell} |")
    older = copy.deepcopy(report)  # a report.json from before the ladder still renders
    for model in older["models"].values():
        del model["mac_reduction_by_tolerance"]
    assert "accuracy given up" not in render_markdown(older)


def test_report_markdown_tables(tmp_path: Path) -> None:
    models = _models()
    dataset = dataset_summary("synthetic", 5, (3, 8, 8), 120, 30, 270)
    report = build_report(models, dataset=dataset)
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()
    assert text.startswith("# ERDE evaluation report")
    assert "Dataset: synthetic (5 classes, 120 test images, 3x8x8)." in text
    assert "## MAC reduction at equal accuracy" in text
    summary_header = "| Model | Params | Last-exit acc. | Full MACs | θ | Accuracy | Mean MACs |"
    assert summary_header in text
    for label, name in [
        ("Teacher", "teacher"),
        ("CE student", "student_ce"),
        ("KD student", "student_kd"),
        ("ERDE student", "student_erde"),
    ]:
        assert f"| {label} (`{name}`) |" in text  # summary row
        assert f"### {label} (`{name}`)" in text  # per-model section
    assert text.count("| Exit | Params | MACs | Accuracy | ECE |") == 4
    assert text.count("entropy sweep") == 4 and text.count("max_softmax sweep") == 4
    teacher_exit_0 = 100 * models["teacher"]["exit_accuracy"][0]
    teacher_ece_0 = 100 * models["teacher"]["exit_ece"][0]
    # 100 params, 40,000 MACs
    assert f"| 0 | 100 | 40.00K | {teacher_exit_0:.2f}% | {teacher_ece_0:.2f}% |" in text
    older = copy.deepcopy(report)  # a report.json from before ECE was measured still renders
    for model in older["models"].values():
        del model["exit_ece"]
    assert "| Exit | Params | MACs | Accuracy |\n" in render_markdown(older)
    assert "## Environment" in text and "## Config" in text


def test_reliability_bins_add_up_to_each_exits_accuracy_and_calibration_error() -> None:
    """The diagram's bins are the ECE's: Σ n_b |acc_b - conf_b| / N, and Σ n_b acc_b / N = accuracy."""
    for model in _models().values():
        for r, acc, ece in zip(model["exit_reliability"], model["exit_accuracy"],
                               model["exit_ece"], strict=True):  # fmt: skip
            n = sum(r["count"])
            filled = [(k, c, a) for k, c, a in zip(r["count"], r["confidence"], r["accuracy"],
                                                    strict=True) if k]  # fmt: skip
            assert n == model["num_samples"] and len(r["count"]) == 15
            assert sum(k * a for k, _, a in filled) / n == pytest.approx(acc)
            assert sum(k * abs(a - c) for k, c, a in filled) / n == pytest.approx(ece)
            assert all(c is None for k, c in zip(r["count"], r["confidence"], strict=True) if not k)


def test_reliability_png_draws_each_exit_of_each_model_from_its_bins(tmp_path: Path) -> None:
    report = build_report(_models())
    axes = reliability_figure(report).axes
    assert len(axes) == 4
    for ax, (name, model) in zip(axes, report["models"].items(), strict=True):
        lines = ax.get_lines()[1:]  # after the diagonal
        assert [line.get_label() for line in lines] == ["exit 0", "exit 1", "exit 2"]
        bins = model["exit_reliability"][1]
        kept = [(c, a) for c, a, k in zip(bins["confidence"], bins["accuracy"], bins["count"],
                                          strict=True) if c and k >= 10]  # fmt: skip
        assert list(lines[1].get_xdata()) == pytest.approx([100 * c for c, _ in kept])
        assert list(lines[1].get_ydata()) == pytest.approx([100 * a for _, a in kept])
        last = model["exit_reliability"][-1]["count"]
        assert sorted(t.get_text() for t in ax.texts) == sorted(str(k) for k in last if k)
        assert ax.get_title().startswith(f"{model_label(name)}: ECE ")
    raw = write_report(tmp_path, report)["reliability"].read_bytes()
    assert raw.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(tmp_path / "reliability.png")
    assert image.shape[0] >= 400 and image.std() > 0.01
    older = copy.deepcopy(report)  # a report from before the bins were recorded: no diagram
    for model in older["models"].values():
        del model["exit_reliability"]
    (tmp_path / "old").mkdir()
    assert set(write_report(tmp_path / "old", older)) == {"json", "markdown", "plot", "csv"}
    assert not (tmp_path / "old" / "reliability.png").exists()


def test_reliability_bins_of_under_ten_images_are_faded_and_off_the_line() -> None:
    report = build_report(_models())
    ax = reliability_figure(report).axes[0]
    for e, (line, r) in enumerate(
        zip(ax.get_lines()[1:], report["models"]["teacher"]["exit_reliability"], strict=True)
    ):
        sparse = [c for c, k in zip(r["confidence"], r["count"], strict=True) if c and k < 10]
        assert not set(line.get_xdata()) & {100 * c for c in sparse}, e
    faded = [p for p in ax.collections if p.get_alpha() == 0.25]
    assert faded and all(len(p.get_offsets()) for p in faded)


def test_tradeoff_png_is_a_readable_image(tmp_path: Path) -> None:
    paths = write_report(tmp_path, build_report(_models()))
    raw = paths["plot"].read_bytes()
    assert raw.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(paths["plot"])
    height, width = image.shape[:2]
    assert 300 <= height <= 3000 and 400 <= width <= 4000
    assert image.std() > 0.01  # not a blank canvas: curves and text were drawn


def test_report_for_a_subset_notes_the_missing_reference(tmp_path: Path) -> None:
    models = _models()
    del models["teacher"]
    report = build_report(models)
    assert report["reference"]["model"] == "student_ce"
    assert "absent" in report["reference"]["note"]
    write_report(tmp_path, report)
    assert "Note: reference model 'teacher' absent" in (tmp_path / "report.md").read_text()


def test_report_with_only_max_softmax_uses_that_rule(tmp_path: Path) -> None:
    report = build_report(_models(rules=("max_softmax",)), tolerance=0.5)
    assert report["reference"]["rule"] == "max_softmax"
    for model in report["models"].values():
        assert model["mac_reduction"] is not None
        assert model["mac_reduction"]["rule"] == "max_softmax"
    text = render_markdown(report)
    assert "Cheapest max_softmax threshold" in text and "max_softmax sweep" in text


def test_write_report_leaves_files_alone_when_rendering_fails(tmp_path: Path) -> None:
    write_report(tmp_path, build_report(_models()))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    broken = build_report(_models(), config={"not json": object()})
    with pytest.raises(TypeError):
        write_report(tmp_path, broken)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_build_report_rejects_empty_and_malformed_models() -> None:
    with pytest.raises(ValueError, match="no models"):
        build_report({})
    with pytest.raises(ValueError, match="lacks sweep"):
        build_report({"teacher": {"exit_accuracy": [0.5], "macs_per_exit": [1]}})


# --------------------------------------------------------------------------- papercuts


def test_thresholds_are_never_rounded_onto_the_end_of_their_range() -> None:
    assert fmt_thresholds([0.5, 0.99999, 1.0]) == ["0.5", "0.99999", "1"]
    assert fmt_thresholds([0.999999]) == ["0.999999"]  # "1" would read as "nobody leaves early"
    assert fmt_thresholds([0.1, 0.10000001]) == ["0.1", "0.1"]  # exact values: sweep.csv
    # just below log 10 = 2.302585...: not "2.303", which reads as beyond the range
    assert fmt_thresholds([2.3025], rule_ends("entropy", 10)) == ["2.3025"]


def test_markdown_thresholds_have_four_significant_digits() -> None:
    assert fmt_thresholds([0.0001007491358374871, 1.2345678, 0.5]) == ["0.0001007", "1.235", "0.5"]
    report = build_report(_models(), dataset={"name": "synthetic", "num_classes": 5})
    for rule in ("entropy", "max_softmax"):
        table = render_markdown(report, rule=rule).split(f"{rule} sweep")[1].split("\n\n")[1]
        thetas = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]]
        numbers = [t for t in thetas if t != "ln 5"]  # entropy's top end, log K, reads as such
        digits = [len(t.split("e")[0].replace(".", "").lstrip("0")) for t in numbers]
        assert len(thetas) > 5, thetas
        for text, n in zip(numbers, digits, strict=True):  # more only where 4 would read "1"
            assert n <= 4 or f"{float(text):.4g}" == "1", text


def test_max_softmax_rows_below_one_never_read_as_one() -> None:
    report = build_report(_models(), dataset={"name": "synthetic", "num_classes": 5})
    table = render_markdown(report, rule="max_softmax").split("max_softmax sweep")[1]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ")][1:]
    rows = [r for r in rows if r[0] != "| θ"]
    sweep = [p for p in report["models"]["teacher"]["sweep"] if p["rule"] == "max_softmax"]
    texts = [r[0].lstrip("| ") for r in rows[: len(sweep)]]
    for text, point in zip(texts, sweep, strict=True):
        assert (float(text) == 1.0) == (point["threshold"] == 1.0), (text, point["threshold"])


def test_sweep_csv_has_one_row_per_point_with_exact_thresholds(tmp_path: Path) -> None:
    import csv

    report = build_report(_models())
    paths = write_report(tmp_path, report)
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    points = [(n, p) for n, m in report["models"].items() for p in m["sweep"]]
    assert len(rows) == len(points)
    assert list(rows[0])[:4] == ["model", "arch", "rule", "threshold"]
    for row, (name, point) in zip(rows, points, strict=True):
        assert row["model"] == name and row["rule"] == point["rule"]
        assert float(row["threshold"]) == point["threshold"]
        assert float(row["accuracy"]) == point["accuracy"]
        fractions = [float(row[f"exit_{i}_fraction"]) for i in range(3)]
        assert fractions == point["exit_fractions"]


def _tick_labels(ax) -> list[tuple[float, str]]:
    """(position, text) of every labelled x tick inside the axis limits, after drawing."""
    ax.figure.canvas.draw()
    low, high = ax.get_xlim()
    return [
        (t.get_position()[0], t.get_text())
        for t in ax.get_xticklabels()
        if t.get_text() and low <= t.get_position()[0] <= high
    ]


def test_log_mac_axis_labels_every_model_s_cost() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from erde.report.plots import _draw

    models = _models()  # teacher 40x the students' MACs: a log axis
    report = build_report(models)
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    _draw(ax, report, "entropy")
    assert ax.get_xscale() == "log"
    labels = _tick_labels(ax)
    assert len(labels) >= 4
    assert all("^" not in text and "$" not in text for _, text in labels)  # plain numbers
    for model in models.values():
        full = model["macs_per_exit"][-1] / 1e3  # the axis is in KMACs here
        assert any(full / 2.5 <= x <= full * 2.5 for x, _ in labels), (full, labels)


def test_budgeted_plot_puts_models_on_one_mac_axis() -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from erde.report.budgeted import draw_budgeted

    def curve(mean_macs: list[float], full: float) -> dict:
        return {
            "macs_per_exit": [full / 4, full / 2, full],
            "curve": [
                {"test_mean_macs": m, "test_macs_fraction": m / full, "test_accuracy": 0.9}
                for m in mean_macs
            ],
        }

    # the teacher spends 0.3 of its 10M MACs, the student 0.5 of its 0.8M
    report = {"rule": "entropy", "models": {
        "teacher": curve([3e6, 5e6], 10e6), "student_erde": curve([4e5, 6e5], 8e5)}}  # fmt: skip
    fig = Figure()
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    draw_budgeted(ax, report)
    teacher, student = ax.get_lines()[:2]
    assert min(teacher.get_xdata()) > max(student.get_xdata())  # the teacher costs more
    assert "MACs per image (MMACs)" in ax.get_xlabel() and ax.get_xscale() == "log"


def test_user_model_names_cannot_break_the_markdown_or_run_in_a_spreadsheet(
    tmp_path: Path,
) -> None:
    import csv

    names = ["a|b\nc", '=HYPERLINK("x")', "-1+2", "@SUM(A1)", "+x"]
    models = {name: _model(name, i, [1000, 2500, 4000]) for i, name in enumerate(names)}
    dataset = dataset_summary("evil|set\n# heading", 5, (3, 8, 8), 120, 30, 270)
    paths = write_report(tmp_path, build_report(models, dataset=dataset))
    text = paths["markdown"].read_text()
    assert "| a\\|b c (`a\\|b c`) |" in text  # one cell, on its row
    assert "### a|b c (`a|b c`)" in text and "\n# heading" not in text
    header = next(line for line in text.splitlines() if line.startswith("| Model | Params"))
    row = next(line for line in text.splitlines() if line.startswith("| a\\|b c"))
    assert row.replace("\\|", "").count("|") == header.count("|")  # as many cells as the header
    with open(paths["csv"], newline="") as f:
        cells = [row["model"] for row in csv.DictReader(f)]
    assert set(cells) == {"a|b\nc", '\'=HYPERLINK("x")', "'-1+2", "'@SUM(A1)", "'+x"}


def _at_chance(model: dict, classes: int) -> dict:
    """``model`` with its last exit at chance for ``classes`` classes."""
    accuracy = list(model["exit_accuracy"])
    accuracy[-1] = 1.0 / classes
    return model | {"exit_accuracy": accuracy}


def test_no_reduction_is_claimed_against_a_reference_at_chance(tmp_path: Path) -> None:
    models = _models()
    models["teacher"] = _at_chance(models["teacher"], 3)
    dataset = dataset_summary("folder", 3, (3, 32, 32), 36)

    report = build_report(models, dataset=dataset)
    write_report(tmp_path, report)

    ref = json.loads((tmp_path / "report.json").read_text())["reference"]
    assert ref["untrained"] is True and ref["chance_accuracy"] == pytest.approx(1 / 3)
    assert all(m["mac_reduction"] is None for m in report["models"].values())
    assert all(m["mac_reduction_by_tolerance"] == [] for m in report["models"].values())
    markdown = (tmp_path / "report.md").read_text()
    assert "is not trained" in markdown and "no MAC reduction is claimed" in markdown
    assert "x |" not in markdown.split("## Models")[0]  # no "2.80x" in the summary tables
    assert "| not claimed |" in markdown and "not reached" not in markdown
    assert "No recommendation: the reference (Teacher) is not trained" in markdown


def test_a_trained_reference_is_marked_trained_and_keeps_its_reductions() -> None:
    report = build_report(_models(), dataset=dataset_summary("synthetic", 5, (3, 8, 8), 120))
    assert report["reference"]["untrained"] is False
    assert report["models"]["student_erde"]["mac_reduction_by_tolerance"]


def test_the_run_summary_says_the_reference_is_not_trained_instead_of_a_reduction(
    tmp_path: Path, capsys
) -> None:
    from erde.cli.train import _print_summary

    models = _models()
    models["teacher"] = _at_chance(models["teacher"], 3)
    paths = write_report(
        tmp_path, build_report(models, dataset=dataset_summary("f", 3, (3, 8, 8), 9))
    )

    _print_summary(paths["json"])

    out = capsys.readouterr().out
    assert "none: the reference is not trained" in out and "x (acc" not in out
    assert "warning: the reference (Teacher, last exit 33.33%) is not trained" in out


def test_report_md_starts_with_which_model_for_which_budget_and_ends_with_the_sweeps(
    tmp_path: Path,
) -> None:
    report = build_report(_models(), dataset=dataset_summary("synthetic", 5, (3, 8, 8), 120))
    write_report(tmp_path, report)
    text = (tmp_path / "report.md").read_text()

    order = ["## Which model for which budget", "## MAC reduction at equal accuracy",
             "## Models", "## Config", "## Threshold sweeps"]  # fmt: skip
    assert [text.index(h) for h in order] == sorted(text.index(h) for h in order)
    budget = text.split("## Which model for which budget")[1].split("\n## ")[0]
    rows = [line for line in budget.splitlines() if line.startswith("| ") and "point" in line]
    ladders = {n: m["mac_reduction_by_tolerance"] for n, m in report["models"].items()}
    for row in rows:  # each level's cheapest model among those that reach it
        level = float(row.split(" | ")[0].lstrip("| ").split()[0]) / 100
        reached = {n: r["mean_macs"] for n, lad in ladders.items() for r in lad
                   if r["tolerance"] == pytest.approx(level) and r["reduction"]}  # fmt: skip
        cheapest = min(reached, key=reached.get)
        assert f"(`{cheapest}`)" in row and "x fewer (" in row, row
    assert rows


def test_budget_levels_that_chose_the_same_model_and_threshold_share_one_row() -> None:
    from erde.report import level_range, merge_same_choices

    same = {"threshold": 0.5}
    choices = [("a", same | {"tolerance": 0.005}), ("a", same | {"tolerance": 0.01}),
               ("b", same | {"tolerance": 0.02}), ("b", {"threshold": 0.9, "tolerance": 0.05})]  # fmt: skip
    merged = merge_same_choices(choices)
    assert [(n, levels) for n, _, levels in merged] == [
        ("a", [0.005, 0.01]), ("b", [0.02]), ("b", [0.05])
    ]  # fmt: skip
    assert [level_range(levels) for _, _, levels in merged] == [
        "0.5 to 1 point", "2 points", "5 points"
    ]  # fmt: skip
