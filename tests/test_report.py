"""The comparison report: report.json schema, report.md tables and a readable tradeoff.png."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import matplotlib.image
import pytest
import torch

from erde.evaluation import model_report
from erde.report import build_report, dataset_summary, render_markdown, write_report

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


def test_report_markdown_tables(tmp_path: Path) -> None:
    models = _models()
    dataset = dataset_summary("synthetic", 5, (3, 8, 8), 120, 30, 270)
    write_report(tmp_path, build_report(models, dataset=dataset))
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
    assert text.count("| Exit | Params | MACs | Accuracy |") == 4
    assert text.count("entropy sweep") == 4 and text.count("max_softmax sweep") == 4
    teacher_exit_0 = 100 * models["teacher"]["exit_accuracy"][0]
    assert f"| 0 | 100 | 40.00K | {teacher_exit_0:.2f}% |" in text  # 100 params, 40,000 MACs
    assert "## Environment" in text and "## Config" in text


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
