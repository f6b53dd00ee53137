"""Training curves: metrics.jsonl read back (bounded), averaged over seeds, drawn per model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

import erde.report.curves
from erde.cli import main
from erde.errors import ErdeError
from erde.report.curves import curve_of, curves_figure, mean_curve, read_metrics, render_curves_png
from erde.status import write_status_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_metrics(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _record(epoch: int, acc: list[float], loss: float = 1.0) -> dict:
    return {"model": "teacher", "epoch": epoch, "train_loss": loss, "val_exit_accuracy": acc}


def test_records_come_back_in_epoch_order_and_a_repeated_epoch_keeps_its_last_line(
    tmp_path: Path,
) -> None:
    folder = _write_metrics(
        tmp_path, [_record(2, [0.5, 0.6]), _record(1, [0.3, 0.4]), _record(2, [0.55, 0.65])]
    )
    records = read_metrics(folder)
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["val_exit_accuracy"] == [0.55, 0.65]
    assert read_metrics(tmp_path / "no-run-yet") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json\n", "line 1 is not JSON"),
        ('{"epoch": 1}\n[1, 2]\n', "line 2 has no epoch number"),
        ('{"epoch": 0}\n', "line 1 has no epoch number in [1, "),
        ('{"epoch": true}\n', "line 1 has no epoch number"),
        ("[" * 200_000 + "\n", "line 1 is not JSON"),  # nesting deep enough to exhaust the stack
    ],
)
def test_a_broken_metrics_file_is_one_error_naming_file_and_line(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "metrics.jsonl").write_text(text)
    with pytest.raises(ErdeError, match=r"metrics\.jsonl: ") as err:
        read_metrics(tmp_path)
    assert message in str(err.value)


def test_a_metrics_file_beyond_the_size_bound_is_refused_without_reading_it_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(erde.report.curves, "MAX_METRICS_BYTES", 1024)
    _write_metrics(tmp_path, [_record(e, [0.5]) for e in range(1, 40)])
    assert (tmp_path / "metrics.jsonl").stat().st_size > 1024
    with pytest.raises(ErdeError, match="larger than"):
        read_metrics(tmp_path)


def test_curve_keeps_the_epochs_with_a_validation_accuracy_of_the_first_exit_count() -> None:
    records = [
        _record(1, [0.3, 0.4], loss=2.0),
        {"epoch": 2, "train_loss": 1.8},  # no validation split measured this epoch
        _record(3, [0.5, 0.6, 0.7]),  # another exit count: not the same model's curve
        _record(4, [0.6, float("nan")]),  # not a number
        _record(5, [0.7, 0.8], loss=float("inf")),
    ]
    curve = curve_of(records)
    assert curve["epoch"] == [1, 5]
    assert curve["val_exit_accuracy"] == [[0.3, 0.4], [0.7, 0.8]]
    assert curve["train_loss"][0] == 2.0 and math.isnan(curve["train_loss"][1])


def test_mean_curve_is_the_mean_and_sample_std_over_runs_on_their_common_epochs() -> None:
    a = curve_of([_record(1, [0.2, 0.4], 3.0), _record(2, [0.4, 0.6], 2.0)])
    b = curve_of([_record(1, [0.4, 0.6], 1.0), _record(2, [0.6, 0.8], 1.0), _record(3, [1, 1])])
    mean = mean_curve([a, b])
    assert mean["epoch"] == [1, 2] and mean["runs"] == 2  # epoch 3: one run only
    assert np.allclose(mean["val_exit_accuracy"], [[0.3, 0.5], [0.5, 0.7]])
    assert np.allclose(mean["val_exit_accuracy_std"], math.sqrt(0.02))
    assert mean["train_loss"] == pytest.approx([2.0, 1.5])
    assert mean_curve([a])["val_exit_accuracy_std"] == [[0.0, 0.0], [0.0, 0.0]]
    three_exits = curve_of([_record(1, [0.1, 0.2, 0.3])])
    assert mean_curve([a, three_exits]) is None  # different models: not averaged
    assert mean_curve([curve_of([])]) is None


def test_the_figure_has_a_panel_per_model_and_draws_each_exit_as_measured() -> None:
    teacher = curve_of([_record(1, [0.3, 0.5]), _record(2, [0.5, 0.7])])
    student = mean_curve([teacher, curve_of([_record(1, [0.5, 0.7]), _record(2, [0.7, 0.9])])])
    fig = curves_figure(
        {"teacher": teacher, "student_erde": student, "student_kd": curve_of([])}, title="t"
    )
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 2  # the KD student has no epoch yet
    assert shown[0].get_title() == "Teacher: last exit 70.0 % at epoch 2"
    assert shown[1].get_title() == "ERDE student: last exit 80.0 % at epoch 2, mean of 2 seeds"
    lines = shown[1].get_lines()
    assert [line.get_label() for line in lines] == ["exit 0", "exit 1"]
    assert list(lines[1].get_xdata()) == [1, 2]
    assert list(lines[1].get_ydata()) == pytest.approx([60.0, 80.0])
    assert shown[1].collections  # the ±1 std band over the two seeds
    one = curves_figure({"teacher": curve_of([_record(1, [0.3, 0.5])])}).axes[0]
    low, high = one.get_xlim()
    assert [t for t in one.get_xticks() if low <= t <= high] == [1]  # whole epochs only
    with pytest.raises(ErdeError, match="no finished epoch"):
        curves_figure({"teacher": curve_of([])})


def test_the_png_is_a_readable_image() -> None:
    curve = curve_of([_record(e, [0.1 * e, 0.1 * e + 0.05]) for e in range(1, 6)])
    raw = render_curves_png({"teacher": curve}, title="Training curves")
    assert raw.startswith(PNG_SIGNATURE)
    from io import BytesIO

    image = matplotlib.image.imread(BytesIO(raw), format="png")
    assert image.shape[0] >= 300 and image.shape[1] >= 400 and image.std() > 0.01


def test_erde_run_writes_the_training_curves_of_its_four_models(tiny_run) -> None:
    out = tiny_run["out"]
    assert (out / "training.png").read_bytes().startswith(PNG_SIGNATURE)


def test_status_plot_draws_the_models_with_an_epoch_and_names_the_others(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    png = tmp_path / "curves.png"
    assert main(["status", str(tiny_run["out"]), "--plot", str(png)]) == 0
    assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert capsys.readouterr().out.splitlines()[-1] == f"training curves: {png}"

    run = tmp_path / "run"  # a model stopped before its first epoch ended: named, not drawn
    for name in ("teacher", "student_kd"):
        (run / name).mkdir(parents=True)
        (run / name / "checkpoint.pt").write_bytes(
            (tiny_run["out"] / name / "checkpoint.pt").read_bytes()
        )
    (run / "teacher" / "metrics.jsonl").write_text(
        (tiny_run["out"] / "teacher" / "metrics.jsonl").read_text()
    )
    assert write_status_plot(run, png) == ["student_kd: not plotted (no finished epoch yet)"]


@pytest.mark.parametrize("name", ["curves.jsonl", "checkpoint.pt", "plot"])
def test_status_plot_refuses_a_name_that_is_not_a_png_and_writes_nothing(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture, name: str
) -> None:
    target = tmp_path / name
    target.write_text("keep me")
    assert main(["status", str(tiny_run["out"]), "--plot", str(target)]) == 2
    assert "give a name ending in .png" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_status_plot_of_a_run_without_any_finished_epoch_is_one_error(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "teacher").mkdir()
    ckpt = (tiny_run["out"] / "teacher" / "checkpoint.pt").read_bytes()
    (tmp_path / "teacher" / "checkpoint.pt").write_bytes(ckpt)
    assert main(["status", str(tmp_path), "--plot", str(tmp_path / "c.png")]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()
