"""Configurations, command-line values, thresholds files and resumed runs: named refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from helpers import TINY_OVERRIDES
from hostile import one_error_line, snapshot

from erde.cli import main
from erde.config import load_config
from erde.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [arg for override in TINY_OVERRIDES for arg in ("--set", override)]


def _error(capsys) -> str:
    return one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- config files


def test_duplicate_key_in_a_config_file_is_refused(tmp_path: Path, capsys) -> None:
    config = tmp_path / "exp.yaml"
    config.write_text("teacher_train:\n  epochs: 5\n  lr: 0.1\n  epochs: 50\n")
    assert main(["train-teacher", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    line = _error(capsys)
    assert "duplicate key 'epochs' at line 4 (first at line 2)" in line and str(config) in line
    assert not (tmp_path / "o").exists()


def test_deeply_nested_config_file_is_one_line(tmp_path: Path, capsys) -> None:
    config = tmp_path / "deep.yaml"
    config.write_text("a: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert main(["train-teacher", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "nested too deeply" in _error(capsys)


def _alias_bomb(levels: int = 9) -> list[str]:
    """List items, each nine aliases of the one before: a few hundred bytes, 9**levels values."""
    items = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return items


@pytest.mark.parametrize(
    ("section", "key"),
    [("teacher", "exit_after"), ("teacher", "arch"), ("data", "name")],
)
def test_alias_bomb_under_a_valid_key_is_refused_at_once_in_one_short_line(
    tmp_path: Path, section: str, key: str
) -> None:
    from hostile import erde

    config = tmp_path / "bomb.yaml"
    items = "".join(f"    - {item}\n" for item in _alias_bomb())
    config.write_text(f"{section}:\n  {key}:\n{items}")
    assert len(config.read_bytes()) < 800
    done = erde("train-teacher", "--config", str(config), "--out", str(tmp_path / "o"), timeout=60,
                memory_limit=3 << 30)  # fmt: skip
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and "aliases expand to more than 100,000 values" in line
    assert len(done.stderr) < 1000 and not (tmp_path / "o").exists()


def test_an_error_quotes_a_long_value_cut_short(capsys, tmp_path: Path) -> None:
    argv = ["train-teacher", "--set", f"teacher_train.optimizer={'x' * 100_000}",
            "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 2
    line = _error(capsys)
    assert "teacher_train.optimizer must be sgd or adamw" in line and len(line) < 300
    assert "100,002 characters" in line


def test_all_zero_exit_weights_are_refused() -> None:
    with pytest.raises(ConfigError, match="teacher_train.exit_weights are all 0"):
        load_config(None, ["teacher_train.exit_weights=[0, 0, 0]"])


@pytest.mark.parametrize("value", ["1e23", "-5", "4294967296"])
def test_out_of_range_seed_names_the_option(value: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train-teacher", "--seed", value, "--out", str(tmp_path / "o")])
    assert info.value.code == 2
    assert "argument --seed: " in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"seed must be in \[0, 4294967295\]"):
        load_config(None, ["seed=-5"])


@pytest.mark.parametrize("argv", [["--device", "tpu"], ["--set", "device=tpu"]])
def test_unknown_device_is_one_line(argv: list[str], tmp_path: Path, capsys) -> None:
    assert main(["train-teacher", *argv, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "tpu" in _error(capsys)


def test_unknown_device_for_predict_is_one_line(tiny_run, tmp_path: Path, capsys) -> None:
    argv = ["predict", str(tiny_run["teacher"]), str(tmp_path), "--threshold", "0.5"]
    (tmp_path / "a.png").write_bytes(b"")
    assert main([*argv, "--device", "tpu"]) == 2
    assert "unknown device 'tpu'" in _error(capsys)


# --------------------------------------------------------------------------- thresholds


def test_threshold_parse_error_names_the_option_given(tiny_run, tmp_path: Path, capsys) -> None:
    argv = ["predict", str(tiny_run["teacher"]), str(tmp_path), "--threshold", "x"]
    (tmp_path / "a.png").write_bytes(b"")
    assert main(argv) == 2
    line = _error(capsys)
    assert "--threshold must be" in line and "--thresholds" not in line


def test_deeply_nested_thresholds_file_is_one_line(tiny_run, tmp_path: Path, capsys) -> None:
    nested = tmp_path / "t.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "a.png").write_bytes(b"")
    argv = ["predict", str(tiny_run["teacher"]), str(tmp_path / "a.png")]
    assert main([*argv, "--thresholds-file", str(nested)]) == 2
    assert "nested too deeply" in _error(capsys)


# --------------------------------------------------------------------------- interruptions


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def test_interruption_before_the_first_checkpoint_does_not_promise_one(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr("erde.api.train_teacher", _interrupt)
    assert main(["train-teacher", "--out", str(tmp_path / "o"), *TINY]) == 130
    err = capsys.readouterr().err
    assert "before the first checkpoint" in err and "is kept" not in err


def test_interruption_after_a_checkpoint_says_it_is_kept(
    tiny_run, tmp_path: Path, capsys, monkeypatch
) -> None:
    out = shutil.copytree(tiny_run["teacher"].parent, tmp_path / "teacher")
    monkeypatch.setattr("erde.api.train_teacher", _interrupt)
    assert main(["train-teacher", "--out", str(out), "--resume", *TINY]) == 130
    assert f"the last checkpoint in {out} is kept" in capsys.readouterr().err


# --------------------------------------------------------------------------- --resume


@pytest.fixture
def finished_run(tiny_run, tmp_path: Path) -> Path:
    """A writable copy of the tiny run (teacher, three students, report)."""
    return shutil.copytree(tiny_run["out"], tmp_path / "run")


def test_resume_with_a_changed_config_lists_the_differences_and_changes_nothing(
    finished_run: Path, capsys
) -> None:
    before = snapshot(finished_run)
    same = ["--config", str(finished_run / "config.yaml"), "--no-progress"]
    argv = ["run", "--out", str(finished_run), "--resume", *same]
    assert main([*argv, "--set", "distill.gamma=0.5", "--set", "student_train.lr=0.05"]) == 2
    line = _error(capsys)
    assert "distill.gamma: 1.0 -> 0.5" in line and "student_train.lr: 0.1 -> 0.05" in line
    assert "--allow-config-change" in line
    assert snapshot(finished_run) == before


def test_resume_with_fewer_methods_does_not_silently_shrink_the_report(
    finished_run: Path, capsys
) -> None:
    before = snapshot(finished_run)
    argv = [
        "run",
        "--out",
        str(finished_run),
        "--resume",
        "--methods",
        "ce",
        *TINY,
        "--no-progress",
    ]
    assert main(argv) == 2
    assert "reports teacher, student_ce, student_kd, student_erde" in _error(capsys)
    assert snapshot(finished_run) == before


def _retrain_teacher(run: Path) -> None:
    """The teacher replaced by another one (as ``train-teacher --force`` does), its students kept."""
    from hostile import crafted_checkpoint

    teacher = run / "teacher" / "checkpoint.pt"
    ckpt = torch.load(teacher, weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    weights = {**ckpt["model"], name: ckpt["model"][name] + 0.5}
    crafted_checkpoint(teacher, teacher, model=weights)


def test_resume_refuses_students_distilled_from_a_teacher_since_retrained(
    finished_run: Path, capsys
) -> None:
    _retrain_teacher(finished_run)
    before = snapshot(finished_run)
    same = ["--config", str(finished_run / "config.yaml"), "--no-progress"]
    assert main(["run", "--out", str(finished_run), "--resume", *same]) == 2
    line = _error(capsys)
    assert "student_kd" in line and "was distilled from another teacher" in line
    assert "--force" in line
    assert snapshot(finished_run) == before


def test_students_without_a_recorded_teacher_are_reused_unchecked(
    finished_run: Path, capsys
) -> None:
    for method in ("kd", "erde"):
        student = finished_run / f"student_{method}" / "checkpoint.pt"
        ckpt = torch.load(student, weights_only=True)
        assert len(ckpt.pop("teacher_sha256")) == 64  # recorded by this erde
        torch.save(ckpt, student)  # as written before the field existed
    _retrain_teacher(finished_run)
    same = ["--config", str(finished_run / "config.yaml"), "--no-progress"]
    assert main(["run", "--out", str(finished_run), "--resume", *same]) == 0
    assert "student_kd: already finished" in capsys.readouterr().out


def test_allow_config_change_reuses_the_model_explicitly(finished_run: Path, capsys) -> None:
    same = ["--config", str(finished_run / "config.yaml"), "--no-progress"]
    argv = ["train-teacher", "--out", str(finished_run / "teacher"), "--resume", *same]
    assert main([*argv, "--set", "teacher_train.lr=0.05"]) == 2
    assert "teacher_train.lr: 0.1 -> 0.05" in _error(capsys)
    assert main([*argv, "--set", "teacher_train.lr=0.05", "--allow-config-change"]) == 0
    assert "already finished" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("teacher_train.weight_decay=.inf", "teacher_train.weight_decay must be >= 0 and finite"),
        ("teacher_train.warmup_epochs=.inf", "teacher_train.warmup_epochs must be >= 0 and finite"),
        ("teacher.width=1e6", "teacher.width must be in (0, 16]"),
        ("data.image_size=100000", "data.image_size must be <= 1024"),
        ("teacher_train.lr=1e308", "teacher_train.lr must be in (0, 10], got 1e+308"),
        ("student_train.lr=1e30", "student_train.lr must be in (0, 10]"),
        ("student_train.lr=.nan", "student_train.lr must be in (0, 10]"),
    ],
)
def test_unbounded_or_infinite_settings_are_refused(override: str, named: str) -> None:
    # validation only: nothing is built from the value (a regression must not allocate)
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert named in str(info.value)


def test_backbone_depth_is_bounded_before_anything_is_built() -> None:
    from erde.models import UnknownModelError, resolve

    with pytest.raises(UnknownModelError, match="at most 2000"):
        resolve("resnet600002")  # a name is resolved to a factory before any layer exists


def test_bench_with_a_time_that_can_never_be_reached_is_refused(tiny_run, capsys) -> None:
    argv = ["bench", str(tiny_run["teacher"]), "--threshold", "0.5", "--no-onnx"]
    assert main([*argv, "--repeats", "0", "--min-time", "nan"]) == 2  # would loop forever
    assert "min_time" in _error(capsys)
