"""--threads / ERDE_THREADS, the start-up and per-epoch lines, TensorBoard files, erde --version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_OVERRIDES

from erde import __version__
from erde.cli import main
from erde.errors import ConfigError, ErdeError
from erde.hardware import cpu_has_bf16
from erde.monitor import TensorBoardLogger, epoch_line, scalars
from erde.threads import (
    DEFAULT_MAX_THREADS,
    ENV_VAR,
    busy_cores,
    cpu_ticks,
    default_threads,
    idle_cores,
    parse_threads,
)

TINY_SET = [arg for override in TINY_OVERRIDES for arg in ("--set", override)]


@pytest.fixture
def keep_threads():
    """Commands set torch's thread count for the process: put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_version_flag_prints_the_version_without_importing_torch() -> None:
    code = "import sys; from erde.cli import main; main(['--version'])"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"erde {__version__}"


@pytest.mark.parametrize(
    ("cores", "busy", "expected"),
    [(2, 0.1, 2), (2, 6.2, 1), (2, 0.6, 1), (16, 3.4, 13), (4, 1.5, 3)],
)
def test_idle_cores_leave_room_for_the_busy_ones(cores: int, busy: float, expected: int) -> None:
    assert idle_cores(cores, busy) == expected


def test_cpu_ticks_count_idle_and_iowait_as_idle_and_only_the_cpus_asked_for(tmp_path) -> None:
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  30 0 10 60 0 0 0 0 0 0\n"
        "cpu0 10 0 5 30 5 0 0 0 0 0\n"  # user nice system idle iowait irq softirq steal ...
        "cpu1 20 0 5 30 0 0 0 0 0 0\n"
        "intr 1 2 3\n"
    )
    assert cpu_ticks(path=str(stat)) == (40, 105)
    assert cpu_ticks([1], path=str(stat)) == (25, 55)
    assert cpu_ticks(path=str(tmp_path / "absent")) is None


def test_busy_cores_are_sampled_now_between_none_and_every_core() -> None:
    busy = busy_cores(0.05)
    assert busy is None or 0.0 <= busy <= len(os.sched_getaffinity(0)) + 1e-9


def test_a_high_load_average_left_by_a_finished_install_does_not_cost_threads(
    monkeypatch,
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("erde.threads.available_cores", lambda: 2)
    monkeypatch.setattr("os.getloadavg", lambda: (2.3, 1.0, 0.4))  # pip just finished
    idle_now = [(100, 1000), (102, 1200)]  # 2 of 200 ticks busy: both cores idle now
    monkeypatch.setattr("erde.threads.cpu_ticks", lambda *a, **k: idle_now.pop(0))
    assert default_threads() == 2


def test_default_threads_follow_the_environment_then_the_load(monkeypatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(ENV_VAR, "3")  # erde's own variable first
    assert default_threads() == 3
    monkeypatch.setenv(ENV_VAR, "two")
    with pytest.raises(ConfigError, match=f"{ENV_VAR} must be a positive whole number"):
        default_threads()
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # as a user or torchrun set it
    assert default_threads() == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr("erde.threads.available_cores", lambda: 64)
    monkeypatch.setattr("erde.threads.busy_cores", lambda: 0.0)
    assert default_threads() == DEFAULT_MAX_THREADS  # idle big machine: capped
    monkeypatch.setattr("erde.threads.busy_cores", lambda: 63.5)
    assert default_threads() == 1  # every core taken
    with pytest.raises(ConfigError, match="at least 1"):
        parse_threads(0, "--threads")


def test_a_thread_count_far_beyond_the_cores_is_refused(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setattr("erde.threads.available_cores", lambda: 2)
    with pytest.raises(ConfigError, match="--threads must be at most 8 .*got 256"):
        parse_threads(256, "--threads")
    assert parse_threads(8, "--threads") == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "64")  # set for other programs: held to the cap
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_threads() == 8
    assert main(["train-teacher", "--threads", "256", "--out", str(tmp_path / "t")]) == 2
    assert "--threads must be at most 8" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_train_prints_what_it_trains_where_and_one_line_per_epoch(
    tmp_path: Path, capsys, keep_threads
) -> None:
    out = tmp_path / "t"
    args = ["train-teacher", "--out", str(out), "--no-progress", "--threads", "1", *TINY_SET]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert torch.get_num_threads() == 1
    # the precision follows the CPU's flags (amp: null), so the line says which one ran
    precision = "bf16" if cpu_has_bf16() else "fp32"
    assert lines[0] == (
        f"teacher: training resnet8 x0.5 (3 exits) for 2 epochs on 1293 images, on cpu, "
        f"1 CPU thread ({precision}, NCHW), into {out}"
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["precision"] for m in metrics] == [precision, precision]
    assert lines[1:3] == [epoch_line(record) for record in metrics]
    assert lines[1].startswith("teacher: epoch 1/2  loss ")
    # after the first epoch, an estimate of the rest: one more epoch of as many steps
    first, last = metrics
    assert first["eta_seconds"] == pytest.approx(first["seconds"])
    assert lines[1].endswith(" left") and "about " in lines[1]
    assert last["eta_seconds"] == 0 and not lines[2].endswith(" left")


def test_the_start_line_names_forced_precision_and_nhwc(tmp_path: Path, capsys, keep_threads):
    out = tmp_path / "t"
    setting = ["--set", "teacher_train.amp=false", "--set", "teacher_train.channels_last=true"]
    args = ["train-teacher", "--out", str(out), "--no-progress", "--threads", "1", *TINY_SET]
    assert main([*args, *setting]) == 0
    assert "1 CPU thread (fp32, NHWC), into" in capsys.readouterr().out.splitlines()[0]
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["precision"] == "fp32"


def test_a_bad_thread_count_is_one_error_line_and_nothing_is_written(
    tmp_path: Path, capsys, monkeypatch, keep_threads
) -> None:
    monkeypatch.setenv(ENV_VAR, "0")
    assert main(["train-teacher", "--out", str(tmp_path / "t"), *TINY_SET]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"erde: error: {ENV_VAR} must be at least 1, got 0"
    assert not (tmp_path / "t").exists()


def test_erde_terms_get_tensorboard_tags_per_exit() -> None:
    record = {
        "model": "student_erde", "epoch": 2, "train_loss": 1.5, "lr": 0.01,
        "train_exit_accuracy": [0.5, 0.7], "val_exit_accuracy": [0.4, 0.8],
        "terms": {"ce_0": 1.0, "kl_0": 0.2, "entropy_0": 0.1, "teacher_correct_0": 0.9,
                  "ce_1": 0.5, "kl_1": 0.3, "entropy_1": 0.05, "teacher_correct_1": 0.95},
        "images_per_second": 100.0, "seconds": 1.0,
    }  # fmt: skip
    tags = scalars(record)
    assert tags["erde/kl_teacher_correct/exit_1"] == 0.3
    assert tags["erde/entropy_teacher_wrong/exit_0"] == 0.1
    assert tags["erde/teacher_correct_share/exit_1"] == 0.95
    assert tags["loss/ce/exit_0"] == 1.0 and tags["accuracy/val/exit_1"] == 0.8
    kd = scalars({**record, "model": "student_kd", "terms": {"kl_0": 0.2}})
    assert kd["loss/kl/exit_0"] == 0.2 and not any(t.startswith("erde/") for t in kd)


def test_tensorboard_files_hold_what_metrics_jsonl_holds(
    tmp_path: Path, tiny_run, keep_threads
) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "s"
    args = ["train-student", "--method", "erde", "--teacher", str(tiny_run["teacher"]),
            "--out", str(out), "--no-progress", "--tensorboard", "--threads", "1", *TINY_SET,
            "--set", "student_train.epochs=2"]  # fmt: skip
    assert main(args) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for i in range(3):
        assert {f"erde/kl_teacher_correct/exit_{i}", f"erde/entropy_teacher_wrong/exit_{i}",
                f"erde/teacher_correct_share/exit_{i}", f"accuracy/val/exit_{i}"} <= tags  # fmt: skip
    share = events.Scalars("erde/teacher_correct_share/exit_2")
    assert [e.step for e in share] == [1, 2]
    assert [e.value for e in share] == pytest.approx(
        [r["terms"]["teacher_correct_2"] for r in metrics], rel=1e-6
    )


def test_tensorboard_missing_is_refused_before_training(
    tmp_path: Path, monkeypatch, capsys, keep_threads
) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if not installed
    with pytest.raises(ErdeError, match=r"erde\[tb\]"):
        TensorBoardLogger()
    out = tmp_path / "t"
    assert main(["train-teacher", "--out", str(out), "--tensorboard", *TINY_SET]) == 2
    assert 'pip install "erde[tb]"' in capsys.readouterr().err
    assert not out.exists()
