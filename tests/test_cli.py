"""The command line: help texts, a tiny `erde run`, `erde evaluate`, and user errors as exit 2."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_OVERRIDES

from erde import cli
from erde.cli import build_parser, main

FOUR_MODELS = ["teacher", "student_ce", "student_kd", "student_erde"]
TINY_SET = [arg for override in TINY_OVERRIDES for arg in ("--set", override)]
KEY_OPTIONS = {
    "train-teacher": ["--out", "--resume", "--force", "--set", "--dataset", "--data-dir"],
    "train-student": ["--out", "--method", "--teacher", "--resume", "--force", "--set"],
    "evaluate": ["--out", "--thresholds", "--set", "--dataset", "checkpoints"],
    "run": [
        "--out",
        "--students",
        "--methods",
        "--resume",
        "--force",
        "--set",
        "--dataset",
        "--data-dir",
    ],
}


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("erde: error: ") and "\n" not in err, err
    return err


# --------------------------------------------------------------------------- help


def test_foundation_subcommands_exist() -> None:
    assert set(KEY_OPTIONS) <= set(_subcommands())


@pytest.mark.parametrize("command", sorted(_subcommands()))
def test_help_of_every_subcommand_exits_0_and_names_its_options(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: erde {command}" in text
    options = list(KEY_OPTIONS.get(command, []))
    for action in _subcommands()[command]._actions:
        if action.help != argparse.SUPPRESS and action.option_strings:
            options.append(max(action.option_strings, key=len))
    assert options, f"{command} has no options to document"
    for option in options:
        assert option in text, f"{command} --help does not mention {option}"


def test_help_answers_without_importing_torch() -> None:
    """`erde --help` and every `erde CMD --help` answer at once (importing torch takes seconds)."""
    code = (
        "import sys\n"
        "from erde.cli import main\n"
        "for args in ([], *([c] for c in sys.argv[1:])):\n"
        "    try:\n"
        "        main([*args, '--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, (args, e.code)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *sorted(_subcommands())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("terminal", [False, True])
def test_bars_only_on_a_terminal_and_epoch_lines_elsewhere(
    terminal: bool, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Redrawn bars fill a log file with one endless line; a log gets a line per epoch."""
    monkeypatch.setattr(cli, "_stderr_is_terminal", lambda: terminal)
    argv = ["train-teacher", "--out", str(tmp_path / "t"), *TINY_SET,
            "--set", "teacher_train.epochs=2", "--set", "teacher_train.max_steps_per_epoch=2"]  # fmt: skip
    assert main(argv) == 0
    out, err = capsys.readouterr()
    epoch_lines = [line for line in out.splitlines() if line.startswith("teacher: epoch ")]
    if terminal:
        assert "it/s" in err and not epoch_lines
    else:
        assert "it/s" not in err and "\r" not in err
        assert [line.split()[2] for line in epoch_lines] == ["1/2", "2/2"]


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code == 2
    assert "usage: erde" in capsys.readouterr().err


# --------------------------------------------------------------------------- run and evaluate


def test_run_on_a_tiny_budget_writes_the_report_with_four_curves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--no-progress", *TINY_SET]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == FOUR_MODELS
    for name, model in report["models"].items():
        assert (out / name / "checkpoint.pt").is_file()
        assert name in printed  # the summary table
        entropy_points = [p for p in model["sweep"] if p["rule"] == "entropy"]
        assert len(entropy_points) == 9  # evaluation.num_thresholds=9 from the overrides
        assert len({p["mean_macs"] for p in entropy_points}) >= 2  # a curve, not a single point
    assert report["config"]["teacher"]["arch"] == "resnet8"
    assert report["dataset"]["image_shape"] == [3, 8, 8]
    assert (out / "tradeoff.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    markdown = (out / "report.md").read_text()
    assert all(f"`{name}`" in markdown for name in FOUR_MODELS)
    assert (out / "config.yaml").is_file()


def _checkpoints(tiny_run: dict[str, Path]) -> list[str]:
    return [str(tiny_run[name]) for name in FOUR_MODELS]


def test_evaluate_tiny_run_checkpoints(tiny_run: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert main(["evaluate", *_checkpoints(tiny_run), "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    original = json.loads(tiny_run["report"].read_text())
    assert list(report["models"]) == FOUR_MODELS
    for name in FOUR_MODELS:  # same checkpoints, same test set: same numbers as the run itself
        assert report["models"][name]["exit_accuracy"] == original["models"][name]["exit_accuracy"]
        assert report["models"][name]["macs_per_exit"] == original["models"][name]["macs_per_exit"]
        assert report["models"][name]["checkpoint"] == str(tiny_run[name])
    assert report["dataset"] == original["dataset"]
    assert (out / "tradeoff.png").is_file() and (out / "report.md").is_file()


def test_evaluate_names_tell_apart_students_of_one_method_from_different_runs(
    tiny_run: dict[str, Path], tmp_path: Path, capsys
) -> None:
    other = tmp_path / "other_run" / "student_erde"  # the same method from another run
    shutil.copytree(tiny_run["student_erde"].parent, other)
    pair = [str(tiny_run["student_erde"]), str(other)]
    out = tmp_path / "report"
    assert main(["evaluate", *pair, "--out", str(out), "--no-progress"]) == 2
    assert "same model name" in capsys.readouterr().err and not out.exists()
    assert main(["evaluate", *pair, "--names", "erde_a,erde_a", "--out", str(out)]) == 2
    assert "--names needs 2 different non-empty names" in capsys.readouterr().err
    assert main(["evaluate", *pair, "--names", "erde_a", "--out", str(out)]) == 2
    assert not out.exists()

    assert main(["evaluate", *pair, "--names", "erde_a, erde_b", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["erde_a", "erde_b"]
    assert (
        report["models"]["erde_a"]["exit_accuracy"] == report["models"]["erde_b"]["exit_accuracy"]
    )
    assert "erde_b" in (out / "report.md").read_text()
    budgeted = tmp_path / "budgeted"
    assert main(["evaluate", *pair, "--names", "erde_a,erde_b", "--budgeted", "--budgets", "1.0",
                 "--out", str(budgeted), "--no-progress"]) == 0  # fmt: skip
    assert list(json.loads((budgeted / "budgeted.json").read_text())["models"]) == [
        "erde_a",
        "erde_b",
    ]


def test_evaluate_set_overrides_apply_on_top_of_the_checkpoint_config(
    tiny_run: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    args = ["evaluate", str(tiny_run["teacher"]), "--out", str(out), "--no-progress"]
    assert main([*args, "--set", "evaluation.rules=[entropy]", "--thresholds", "0,0.5,2"]) == 0
    report = json.loads((out / "report.json").read_text())
    # still the checkpoint's 8x8 data, not the digits preset's 16x16
    assert report["dataset"]["image_shape"] == [3, 8, 8]
    sweep = report["models"]["teacher"]["sweep"]
    assert [(p["rule"], p["threshold"]) for p in sweep] == [
        ("entropy", 0.0),
        ("entropy", 0.5),
        ("entropy", 2.0),
    ]
    assert sweep[0]["exit_fractions"][-1] == 1.0  # theta 0: everyone at the last exit


@pytest.fixture(scope="module")
def teacher_report(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished report of the tiny teacher (read-only; copy it before writing)."""
    out = tmp_path_factory.mktemp("teacher_report")
    args = ["evaluate", str(tiny_run["teacher"]), "--out", str(out), "--no-progress"]
    assert main(args) == 0
    return out


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [
        ("--thresholds 5", r"threshold 5.0 is outside the entropy rule's range [0, 2.303]"),
        ("--thresholds -0.5", r"threshold -0.5 is outside the entropy rule's range [0, 2.303]"),
        ("--thresholds=0.1,nan", "threshold nan is outside"),
        ("--thresholds=0.5,1.5", "max_softmax rule's range [0, 1]"),
        ("--thresholds=", "no thresholds"),
        ("--thresholds=0.1,abc", "comma-separated numbers"),
    ],
)
def test_evaluate_rejects_bad_thresholds_and_keeps_the_report(
    thresholds: str,
    message: str,
    tiny_run: dict[str, Path],
    teacher_report: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "report"
    shutil.copytree(teacher_report, out)
    before = _snapshot(out)
    assert "report.json" in before
    args = ["evaluate", str(tiny_run["teacher"]), "--out", str(out), "--no-progress"]
    assert main([*args, *thresholds.split(" ")]) == 2
    assert message in _error_line(capsys)
    assert _snapshot(out) == before


# --------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("command", ["run", "train-teacher", "train-student"])
def test_negative_gamma_is_refused_naming_gamma(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = [command, "--out", str(out), "--no-progress", *TINY_SET, "--set", "distill.gamma=-1"]
    assert main(argv) == 2
    err = _error_line(capsys)
    assert "distill.gamma must be >= 0" in err and "got -1" in err
    assert not out.exists()


def test_unknown_set_key_lists_valid_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), *TINY_SET, "--set", "foo.bar=1"]) == 2
    err = _error_line(capsys)
    assert "unknown config key(s) foo" in err
    for section in ("data", "teacher", "student", "distill", "evaluation", "seed", "device"):
        assert section in err.split("valid keys", 1)[1]
    assert main(["run", "--out", str(out), *TINY_SET, "--set", "distill.tau=2"]) == 2
    err = _error_line(capsys)
    assert "distill.tau" in err and "alpha, beta, gamma, temperature" in err
    assert not out.exists()


def test_run_into_finished_output_without_resume_or_force_changes_nothing(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(tiny_run["out"], out)
    before = _snapshot(out)
    assert any(name.endswith("checkpoint.pt") for name in before)
    assert main(["run", "--out", str(out), "--no-progress", *TINY_SET]) == 2
    err = _error_line(capsys)
    assert "--resume" in err and "--force" in err and "checkpoint.pt" in err
    assert _snapshot(out) == before


def test_run_refuses_before_training_when_only_a_student_is_finished(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "partial"
    shutil.copytree(tiny_run["out"] / "student_kd", out / "student_kd")
    before = _snapshot(out)
    assert main(["run", "--out", str(out), "--no-progress", *TINY_SET]) == 2
    assert "student_kd" in _error_line(capsys)
    assert _snapshot(out) == before  # the teacher was not trained into the folder first


def test_run_rejects_unknown_and_repeated_methods(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["run", "--out", str(out), *TINY_SET, "--students", "ce,fitnet"]) == 2
    assert "fitnet" in _error_line(capsys)
    assert main(["run", "--out", str(out), *TINY_SET, "--students", "ce,ce"]) == 2
    assert "once" in _error_line(capsys)
    assert not out.exists()


MODEL_SET = [
    arg
    for override in TINY_OVERRIDES
    if not override.startswith("data.")
    for arg in ("--set", override)
]


def test_a_student_takes_its_data_settings_from_its_teacher_s_checkpoint(
    tmp_path: Path, capsys
) -> None:
    from data_fixtures import write_imagefolder

    from erde.checkpoints import load_checkpoint

    folder = tmp_path / "folder"
    write_imagefolder(folder, per_class=(20, 4))  # 3 classes: digits would have 10
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    common = ["--no-progress", "--threads", "1", *MODEL_SET]
    data = ["--set", "data.image_size=8", "--set", "data.batch_size=16"]
    assert cli.main(["train-teacher", "--dataset", "imagefolder", "--data-dir", str(folder),
                     "--out", str(teacher), *common, *data]) == 0  # fmt: skip
    capsys.readouterr()

    assert cli.main(["train-student", "--teacher", str(teacher), "--method", "erde",
                     "--out", str(student), *common]) == 0  # fmt: skip

    out = capsys.readouterr().out
    assert f"data: imagefolder {folder} from the teacher's checkpoint\n" in out, out
    data_cfg = load_checkpoint(student)["config"]["data"]
    assert (data_cfg["name"], data_cfg["data_dir"]) == ("imagefolder", str(folder))
    assert (data_cfg["image_size"], data_cfg["batch_size"]) == (8, 16)


def test_every_command_reads_a_cifar10_imagefolder_copy_given_dataset_cifar10(
    tmp_path: Path, capsys
) -> None:
    """``--dataset cifar10`` on the JPEG ImageFolder copy works in train-teacher as in
    erde reproduce (it used to fail there, asking for the official batch files)."""
    from data_fixtures import write_imagefolder

    from erde.checkpoints import load_checkpoint
    from erde.data.formats import CIFAR10_NAMES

    folder = tmp_path / "cifar10-jpeg"
    write_imagefolder(folder, classes=tuple(CIFAR10_NAMES), per_class=(4, 2), size=8)
    teacher = tmp_path / "teacher"
    assert cli.main(["train-teacher", "--dataset", "cifar10", "--data-dir", str(folder),
                     "--out", str(teacher), "--no-progress", "--threads", "1", *MODEL_SET,
                     "--set", "data.batch_size=16"]) == 0  # fmt: skip

    err = capsys.readouterr().err
    assert f"{folder}: cifar10 in imagefolder layout, read with the imagefolder loader" in err
    config = load_checkpoint(teacher)["config"]
    assert (config["data"]["name"], config["data"]["data_dir"]) == ("imagefolder", str(folder))
    assert config["teacher_train"]["warmup_epochs"] == 1.0  # the CIFAR-10 preset's, kept


def test_a_student_s_command_line_data_settings_win_over_its_teacher_s(
    tmp_path: Path, tiny_run
) -> None:
    from erde.cli.train import origin_lines, teacher_config

    args = cli.build_parser().parse_args(
        ["train-student", "--teacher", str(tiny_run["out"] / "teacher"),
         "--set", "data.batch_size=32"]
    )  # fmt: skip
    base = teacher_config(args)
    cfg = cli.build_config(args, fallback=base)
    assert (cfg.data.name, cfg.data.image_size, cfg.data.batch_size) == ("digits", 8, 32)
    assert "(batch_size from the command line)" in origin_lines(cfg, args, base)
    named = cli.build_parser().parse_args(
        ["train-student", "--teacher", str(tiny_run["out"] / "teacher"), "--dataset", "cifar10"]
    )
    assert teacher_config(named) is None


def test_a_student_takes_its_recipe_from_its_teacher_s_config_unless_a_data_set_is_named(
    tmp_path: Path, tiny_run
) -> None:
    """``--teacher`` without a data set: the students follow the teacher's saved config (the
    released speed teacher brings the speed schedule), --config and --set laid over it;
    ``--dataset`` takes the preset, as without --teacher."""
    from erde.checkpoints import load_checkpoint, save_checkpoint
    from erde.cli.train import origin_lines, teacher_config
    from erde.config import load_config

    saved = load_config(None, ["data.name=digits", "student.arch=fastnet", "student.width=0.5",
                               "student_train.epochs=7", "student_train.lr=0.25",
                               "distill.gamma=3"], base={})  # fmt: skip
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    ckpt = load_checkpoint(tiny_run["out"] / "teacher")
    save_checkpoint({**ckpt, "config": saved.to_dict()}, teacher / "checkpoint.pt")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("student_train:\n  lr: 0.5\n")
    parse = cli.build_parser().parse_args
    args = parse(["run", "--teacher", str(teacher), "--config", str(recipe),
                  "--set", "distill.gamma=2"])  # fmt: skip
    base = teacher_config(args)
    cfg = cli.build_config(args, fallback=base)
    got = (cfg.student.arch, cfg.student.width, cfg.student_train.epochs, cfg.student_train.lr)
    assert got == ("fastnet", 0.5, 7, 0.5)
    assert cfg.distill.gamma == 2.0
    line = origin_lines(cfg, args, base).splitlines()[1]
    assert line.startswith("recipe: student fastnet x0.5, 7 epochs at lr 0.5, from the teacher's")
    preset = parse(["run", "--teacher", str(teacher), "--dataset", "digits"])
    assert teacher_config(preset) is None
    fresh = cli.build_config(preset, fallback=teacher_config(preset))
    alone = cli.build_config(parse(["run", "--dataset", "digits"]))
    assert fresh == alone and fresh.student_train.epochs != 7


def test_run_takes_its_students_as_reproduce_does() -> None:
    """``erde run --students`` (reproduce's name) and ``--methods`` are one option."""
    parser = build_parser()
    students = parser.parse_args(["run", "--students", "kd,erde_g2=erde:gamma=2"])
    methods = parser.parse_args(["run", "--methods", "kd,erde_g2=erde:gamma=2"])
    assert students.methods == methods.methods == "kd,erde_g2=erde:gamma=2"
    assert parser.parse_args(["run"]).methods is None


def test_run_distils_from_a_given_teacher_without_training_one(
    tmp_path: Path, tiny_run, capsys
) -> None:
    """``erde run --teacher DIR``: the students of a released teacher in one command; the
    teacher is copied, not trained, its data settings used, and reported with them."""
    teacher = tiny_run["out"] / "teacher"
    out = tmp_path / "run"
    assert cli.main(["run", "--teacher", str(teacher), "--students", "kd", "--out", str(out),
                     "--no-progress", "--threads", "1", *MODEL_SET]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "from the teacher's checkpoint" in printed
    assert "teacher: epoch" not in printed  # nothing trained it
    copied = out / "teacher" / "checkpoint.pt"
    assert copied.read_bytes() == (teacher / "checkpoint.pt").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["teacher", "student_kd"]


def test_run_refuses_a_teacher_that_is_not_one_before_writing(tmp_path: Path, tiny_run) -> None:
    out = tmp_path / "run"
    student = tiny_run["out"] / "student_kd"
    argv = ["run", "--teacher", str(student), "--students", "kd", "--out", str(out),
            "--no-progress", "--threads", "1", *MODEL_SET]  # fmt: skip
    assert cli.main(argv) == 2
    assert not (out / "teacher").exists() and not (out / "student_kd").exists()
