"""Tests for erde.config: typed loading, validation, overrides, YAML files, round trips."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import yaml

from erde.cli import build_parser, main
from erde.config import (
    DistillConfig,
    ExperimentConfig,
    config_from_dict,
    load_config,
    parse_override,
    preset_path,
    save_config,
)
from erde.errors import ConfigError


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("erde: error: ")
    return err[0]


# --- defaults and presets -----------------------------------------------------------------


def test_defaults_are_valid_and_documented() -> None:
    cfg = load_config()
    assert cfg == ExperimentConfig()
    assert cfg.distill.method == "erde" and cfg.student.arch == "resnet8"


def test_digits_preset_loads() -> None:
    cfg = load_config(preset_path("digits"))
    assert cfg.data.name == "digits" and cfg.data.image_size == 16
    assert cfg.teacher.arch == "resnet20"


# --- unknown keys and wrong types ---------------------------------------------------------


def test_unknown_key_lists_valid_keys_of_its_section() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"distill": {"gama": 0.5}})
    message = str(info.value)
    assert "distill.gama" in message
    valid = [f.name for f in dataclasses.fields(DistillConfig)]
    assert f"valid keys of distill: {', '.join(valid)}" in message


def test_unknown_section_lists_sections() -> None:
    with pytest.raises(ConfigError, match="valid keys: data, teacher, student, teacher_train"):
        config_from_dict({"distil": {"gamma": 0.5}})


@pytest.mark.parametrize(
    ("data", "where"),
    [
        ({"teacher_train": {"epochs": "ten"}}, "teacher_train.epochs"),
        ({"teacher_train": {"epochs": 2.5}}, "teacher_train.epochs"),
        ({"teacher_train": {"epochs": True}}, "teacher_train.epochs"),  # bool is not an int
        ({"distill": {"alpha": "lots"}}, "distill.alpha"),
        ({"data": {"data_dir": 5}}, "data.data_dir"),
        ({"teacher": {"exit_after": [1, "x"]}}, "teacher.exit_after"),
        ({"teacher": {"exit_after": 3}}, "teacher.exit_after"),
        ({"distill": 3}, "distill"),
        ({"seed": None}, "seed"),
    ],
)
def test_wrong_type_names_the_field(data: dict, where: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{where}: expected"):
        config_from_dict(data)


def test_ints_are_accepted_for_floats() -> None:
    cfg = config_from_dict({"distill": {"alpha": 2}, "teacher": {"width": 1}})
    assert cfg.distill.alpha == 2.0 and isinstance(cfg.distill.alpha, float)
    assert isinstance(cfg.teacher.width, float)


def test_exponent_without_dot_is_a_float() -> None:
    """YAML 1.1 reads ``1e-3`` as text; a learning rate written that way must still work."""
    cfg = load_config(None, ["teacher_train.lr=1e-3", "student_train.weight_decay=5E-4"])
    assert cfg.teacher_train.lr == 0.001
    assert cfg.student_train.weight_decay == 0.0005
    with pytest.raises(ConfigError, match="teacher_train.lr"):
        load_config(None, ["teacher_train.lr=1e-3x"])


# --- range checks -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["alpha", "beta", "gamma"])
@pytest.mark.parametrize("value", [-0.1, -1, ".nan", ".inf"])
def test_distill_weights_must_be_nonnegative_and_finite(name: str, value) -> None:
    with pytest.raises(ConfigError, match=f"distill.{name} must be >= 0"):
        load_config(None, [f"distill.{name}={value}"])


def test_distill_weights_may_be_zero() -> None:
    cfg = load_config(None, ["distill.beta=0", "distill.gamma=0"])
    assert cfg.distill.beta == 0.0 and cfg.distill.gamma == 0.0


@pytest.mark.parametrize("value", [0, -1, ".nan", ".inf"])
def test_temperature_must_be_positive(value) -> None:
    with pytest.raises(ConfigError, match="distill.temperature must be > 0"):
        load_config(None, [f"distill.temperature={value}"])


@pytest.mark.parametrize("method", ["foo", "ERDE", "dkd"])
def test_bad_method(method: str) -> None:
    with pytest.raises(
        ConfigError, match=r"distill.method must be a registered method \(ce, kd, erde\)"
    ):
        load_config(None, [f"distill.method={method}"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("data.val_fraction=-0.1", "data.val_fraction"),
        ("data.batch_size=0", "data.batch_size"),
        ("data.crop_padding_mode=wrap", "data.crop_padding_mode must be one of zeros, reflect"),
        ("data.max_train=0", "data.max_train"),
        ("data.max_train=-5", "data.max_train"),
        ("data.image_size=0", "data.image_size"),
        ("teacher_train.epochs=0", "teacher_train.epochs"),
        ("student_train.lr=0", "student_train.lr"),
        ("student_train.lr=.nan", "student_train.lr"),
        ("teacher_train.optimizer=adam", "teacher_train.optimizer"),
        ("teacher_train.schedule=step", "teacher_train.schedule"),
        ("teacher_train.label_smoothing=1", "teacher_train.label_smoothing"),
        ("student_train.label_smoothing=-0.1", "student_train.label_smoothing"),
        ("data.split_seed=-1", "data.split_seed"),
        ("teacher_train.momentum=1.5", "teacher_train.momentum"),
        ("teacher_train.max_steps_per_epoch=0", "teacher_train.max_steps_per_epoch"),
        ("teacher_train.checkpoint_every_steps=-1", "teacher_train.checkpoint_every_steps"),
        ("student_train.exit_weights=[1, -1]", "student_train.exit_weights"),
        ("student.width=0", "student.width"),
        ("student.head_dropout=1", "student.head_dropout"),
        ("teacher.dropout=1.5", "teacher.dropout"),
        ("teacher.head_hidden=-1", "teacher.head_hidden"),
        ("teacher.num_early_exits=-1", "teacher.num_early_exits"),
        ("teacher.exit_after=[0, 2]", "teacher.exit_after"),
        ("distill.exit_mapping=[-1, 0]", "distill.exit_mapping"),
        ("evaluation.num_thresholds=1", "evaluation.num_thresholds"),
        ("evaluation.rules=[]", "evaluation.rules"),
        ("evaluation.rules=[entropy, margin]", "evaluation.rules"),
    ],
)
def test_out_of_range_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, [override])


# --- overrides ----------------------------------------------------------------------------


def test_parse_override_nests_and_parses_yaml_values() -> None:
    assert parse_override("student_train.epochs=5") == {"student_train": {"epochs": 5}}
    assert parse_override("seed=3") == {"seed": 3}
    assert parse_override("teacher.exit_after=[2, 4]") == {"teacher": {"exit_after": [2, 4]}}
    assert parse_override("data.max_train=null") == {"data": {"max_train": None}}
    assert parse_override("train.amp=true") == {"train": {"amp": True}}
    assert parse_override("distill.alpha= 0.5 ") == {"distill": {"alpha": 0.5}}


def test_text_fields_are_taken_verbatim() -> None:
    """Paths are not YAML: a numeric folder or a '#' must not change the value."""
    for path in ("2024", "/data/run #2", "/data/a: b", "yes", "[x]", "{y}", "~/data"):
        cfg = load_config(None, [f"data.data_dir={path}"])
        assert cfg.data.data_dir == path
    assert load_config(None, ["data.data_dir=null"]).data.data_dir is None
    assert load_config(None, ["data.data_dir='1.5'"]).data.data_dir == "1.5"
    assert load_config(None, ["teacher.arch=resnet56"]).teacher.arch == "resnet56"
    assert load_config(None, ["device=cuda:1"]).device == "cuda:1"


@pytest.mark.parametrize("bad", ["distill.gamma", "=3", "distill..gamma=1", ".x=1"])
def test_malformed_override(bad: str) -> None:
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override(bad)


def test_override_with_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match="valid keys of student_train: epochs, optimizer"):
        load_config(None, ["student_train.epoch=3"])


def test_override_with_unparsable_value() -> None:
    with pytest.raises(ConfigError, match="cannot parse value"):
        load_config(None, ["teacher.exit_after=[1, 2"])


# --- YAML files and precedence ------------------------------------------------------------


def test_yaml_file_overrides_defaults_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("distill:\n  gamma: 0.25\n  method: kd\nteacher:\n  arch: resnet32\n")
    cfg = load_config(path)
    assert cfg.distill.gamma == 0.25 and cfg.distill.method == "kd"
    assert cfg.teacher.arch == "resnet32"
    assert cfg.distill.temperature == DistillConfig().temperature
    assert cfg.student == ExperimentConfig().student


def test_precedence_defaults_base_file_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 2\ndistill:\n  alpha: 0.5\n")
    base = {"seed": 1, "distill": {"alpha": 0.1, "beta": 0.7}}
    cfg = load_config(path, ["distill.alpha=0.9"], base=base)
    assert cfg.seed == 2  # file beats base
    assert cfg.distill.alpha == 0.9  # override beats file
    assert cfg.distill.beta == 0.7  # base beats defaults, untouched by the file


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("distill: [1, 2\n", "not valid YAML"),
        ("- 1\n- 2\n", "mapping at the top level"),
        (b"\xff\xfe\x00bad", "not valid YAML"),
        ("distill:\n  gama: 1\n", "valid keys of distill"),
        ("distill:\n  temperature: 0\n", "distill.temperature"),
    ],
)
def test_bad_yaml_files(tmp_path: Path, content, message: str) -> None:
    path = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_empty_yaml_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(path) == ExperimentConfig()


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


# --- round trips --------------------------------------------------------------------------


def test_save_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            "teacher.exit_after=[2, 5]",
            "student_train.exit_weights=[0.5, 1, 2]",
            "distill.exit_mapping=[0, 1, 2]",
            "data.data_dir=/data/run #2",
            "data.max_train=100",
            "teacher_train.amp=false",
            "seed=9",
        ],
    )
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert yaml.safe_load(path.read_text())["data"]["data_dir"] == "/data/run #2"


def test_config_saved_with_checkpoint_round_trips(tmp_path: Path) -> None:
    """The config.yaml next to a checkpoint and the config inside it rebuild the same run."""
    from data_fixtures import TINY_TEACHER_OVERRIDES, train_tiny_teacher
    from helpers import tiny_config

    checkpoint = train_tiny_teacher(tmp_path / "teacher")
    used = tiny_config(*TINY_TEACHER_OVERRIDES)
    from_yaml = load_config(checkpoint.parent / "config.yaml")
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert from_yaml == config_from_dict(ckpt["config"]) == used
    assert from_yaml.teacher_train.max_steps_per_epoch == 1  # not the defaults


# --- through the command line -------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "distill.gama=1"], "valid keys of distill"),
        (["--set", "distill.temperature=0"], "distill.temperature must be > 0"),
        (["--set", "distill.uncertain_above=1"], "distill.uncertain_above must be null"),
        (["--set", "distill.uncertain_above=0"], "a normalised entropy in (0, 1), got 0"),
        (["--set", "distill.method=bogus"], "distill.method"),
        (["--set", "teacher_train.epochs=ten"], "teacher_train.epochs: expected int"),
        (["--set", "nokey"], "section.key=value"),
        (["--config", "/nonexistent/exp.yaml"], "config file not found"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(tmp_path: Path, capsys, args, message) -> None:
    out = tmp_path / "out"
    code = main(["train-teacher", *args, "--out", str(out), "--no-progress"])
    assert code == 2
    assert message in _one_error_line(capsys)
    assert not out.exists()


def test_uncertain_above_reads_a_number_or_null_from_the_command_line() -> None:
    from erde.cli import build_config

    for value, expected in (("0.5", 0.5), ("null", None)):
        argv = ["train-student", "--set", f"distill.uncertain_above={value}"]
        assert build_config(build_parser().parse_args(argv)).distill.uncertain_above == expected


def test_cli_data_dir_is_a_path_not_yaml(tmp_path: Path) -> None:
    from erde.cli import build_config

    weird = str(tmp_path / "2024 #1")
    args = build_parser().parse_args(["train-teacher", "--dataset", "svhn", "--data-dir", weird])
    assert build_config(args).data.data_dir == weird
    args = build_parser().parse_args(["train-teacher", "--data-dir", "2024"])
    assert build_config(args).data.data_dir == "2024"
