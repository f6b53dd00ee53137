"""Reduced precision: answer agreement per exit, the teacher's own autocast switch, the script."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

from erde.evaluation import precision_agreement
from erde.training import context, train_students


def test_agreement_counts_changed_classes_and_verdicts_per_exit() -> None:
    labels = torch.tensor([0, 1, 2, 0])
    ref = torch.zeros(2, 4, 3)
    ref[0, torch.arange(4), torch.tensor([0, 1, 2, 1])] = 5.0  # exit 0: right, right, right, wrong
    ref[1, torch.arange(4), labels] = 5.0  # exit 1: all right
    other = ref.clone()
    other[0, 3] = torch.tensor([0.0, 0.0, 9.0])  # wrong -> another wrong class: verdict kept
    other[1, 0] = torch.tensor([0.0, 9.0, 0.0])  # right -> wrong
    out = precision_agreement(ref, other, labels)
    assert out["same_class"] == [0.75, 0.75]
    assert out["same_correctness"] == [1.0, 0.75]
    assert out["max_abs_diff"] == [9.0, 9.0]
    same = precision_agreement(ref, ref.clone(), labels)
    assert same["same_class"] == [1.0, 1.0] and same["max_abs_diff"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="one shape"):
        precision_agreement(ref, other[:, :2], labels)


def test_teacher_amp_sets_the_teacher_forward_precision_only(
    tmp_path: Path, tiny_run: dict, monkeypatch: pytest.MonkeyPatch, one_thread
) -> None:
    from helpers import tiny_config

    seen = []
    real = context.teacher_exit_logits

    def spy(teacher, x):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return real(teacher, x)

    monkeypatch.setattr(context, "teacher_exit_logits", spy)
    cfg = tiny_config("distill.teacher_amp=true", "student_train.amp=false")
    train_students(cfg, ["kd"], [tmp_path / "kd"], teacher_checkpoint=tiny_run["teacher"],
                   progress=False)  # fmt: skip
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    cfg = tiny_config("student_train.amp=false")  # default: as the student
    train_students(cfg, ["kd"], [tmp_path / "kd2"], teacher_checkpoint=tiny_run["teacher"],
                   progress=False)  # fmt: skip
    assert seen and set(seen) == {None}


def test_precision_script_reports_agreement_of_a_trained_teacher(
    tmp_path: Path, tiny_run: dict, capsys: pytest.CaptureFixture, one_thread
) -> None:
    script = load_benchmark("precision")
    out = tmp_path / "precision.json"
    assert script.main([str(tiny_run["teacher"]), "--rounds", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    n_exits = len(record["agreement"]["same_class"])
    assert n_exits >= 2 and record["images"] > 0
    assert all(0.5 <= a <= 1.0 for a in record["agreement"]["same_class"])  # bf16 ~ fp32
    assert "same right/wrong" in capsys.readouterr().out


def test_cpu_settings_benchmark_times_every_setting(tmp_path: Path, one_thread) -> None:
    script = load_benchmark("cpu_settings")
    out = tmp_path / "cpu.json"
    argv = ["--batch-size", "4", "--steps", "1", "--rounds", "1", "--teacher-arch", "resnet8",
            "--student-arch", "resnet8", "--bf16", "--json", str(out)]  # fmt: skip
    assert script.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    for kind in ("teacher", "erde"):
        assert set(results[kind]) == {"NCHW fp32", "NHWC fp32", "NHWC bf16"}
        assert all(v > 0 for v in results[kind].values())
    # the compiled setting really goes through torch.compile (dynamo captures a graph)
    from torch._dynamo.utils import counters

    counters.clear()
    script.make_step("teacher", True, False, 4, "resnet8", "resnet8", compiled=True)()
    assert counters["stats"]["unique_graphs"] >= 1
