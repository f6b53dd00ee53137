"""The public Python API: `import erde` names, configs like the CLI's, training on tensors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_OVERRIDES

import erde
from erde.errors import DataError
from erde.inference import ImageInputError


def test_import_erde_is_cheap_and_every_public_name_resolves() -> None:
    code = "import sys, erde; print('torch' in sys.modules, erde.__version__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", erde.__version__]  # --version needs no torch
    assert erde.__all__ == ["__version__", *erde._API]
    for name in erde.__all__:
        assert getattr(erde, name) is not None, name
    assert callable(erde.train_student) and erde.train_student.__doc__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        erde.nope  # noqa: B018


def test_make_config_builds_what_the_cli_builds() -> None:
    from erde.cli import build_config

    args = argparse.Namespace(
        dataset="svhn", data_dir="/data", config=None, seed=None, device=None,
        overrides=["student_train.epochs=3"],
    )  # fmt: skip
    made = erde.make_config("svhn", ["student_train.epochs=3"], data_dir="/data")
    assert made.to_dict() == build_config(args).to_dict()


def _tensors(n: int, k: int = 3, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g), torch.arange(
        n
    ) % k


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda x, y: (x.float(), y), "must be uint8"),
        (lambda x, y: (x[:, :1], y), "repeat a greyscale channel"),
        (lambda x, y: (x[0], y), "must be (N, C, H, W)"),
        (lambda x, y: (x, y[:-1]), "one class index per image"),
        (lambda x, y: (x, y.float()), "integer class indices"),
        (lambda x, y: (x, y - 1), "negative class index"),
        (lambda x, y: (x, torch.where(y == 0, 10**12, y)), "at most 100,000 classes"),
    ],
    ids=["float", "grey", "3d", "short-labels", "float-labels", "negative", "huge-label"],
)
def test_splits_from_tensors_refuses_bad_input_in_one_line(change, message) -> None:
    x, y = _tensors(30)
    bad_x, bad_y = change(x, y)
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")) as exc:
        erde.splits_from_tensors(bad_x, bad_y, x, y)
    assert "\n" not in str(exc.value)


def test_splits_from_tensors_holds_out_validation_and_names_classes() -> None:
    x, y = _tensors(60)
    with pytest.raises(DataError, match="3 class names"):
        erde.splits_from_tensors(x, y + 1, x, y, class_names=["a", "b", "c"])
    with pytest.raises(DataError, match="a list of names, got one string 'abc'"):
        erde.splits_from_tensors(x, y, x, y, class_names="abc")  # not three classes a, b, c
    splits = erde.splits_from_tensors(
        x.numpy(), y.numpy(), x[:9], y[:9], class_names=["a", "b", "c"], val_fraction=0.2, seed=1
    )
    assert (len(splits.train), len(splits.val), len(splits.test)) == (48, 12, 9)
    assert torch.bincount(splits.val.labels).tolist() == [4, 4, 4]  # stratified
    assert splits.class_names == ["a", "b", "c"] and splits.image_shape == (3, 8, 8)
    train_mean = splits.train.images.double().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(torch.tensor(splits.mean, dtype=torch.float64), train_mean)


def test_a_model_trained_on_tensors_loads_predicts_and_calibrates(tmp_path, one_thread) -> None:
    x, y = _tensors(120)
    splits = erde.splits_from_tensors(x, y, x[:30], y[:30], val_fraction=0.25)
    cfg = erde.make_config("digits", [*TINY_OVERRIDES, "teacher_train.epochs=1"])
    path = erde.train_teacher(cfg, tmp_path / "t", splits=splits, progress=False)
    m = erde.load_model(path)
    assert (
        m.config["data"]["name"] == "tensors"
    )  # not "digits": evaluating it on digits would be wrong
    assert m.image_shape == (3, 8, 8) and m.class_names == ["0", "1", "2"]
    assert len(m.macs_per_exit) == m.model.num_exits == 3

    result, thresholds = erde.calibrate(path, budget=0.7, splits=splits)
    assert thresholds.is_file() and result.validation["num_images"] == len(splits.val)
    predictor = erde.load_predictor(path)
    assert predictor.policy == result.policy
    routed = predictor.predict(x[:16])
    # the same answers as routing the normalised batch by hand
    by_hand = predictor.engine(m.normalize(x[:16]))
    assert torch.equal(routed.classes, by_hand.classes)
    assert torch.equal(routed.exit_index, by_hand.exit_index)
    with pytest.raises(ImageInputError, match="uint8"):
        predictor.predict(m.normalize(x[:2]))
    with pytest.raises(ImageInputError, match="3x4x4"):
        predictor.predict(x[:2, :, :4, :4])
    # a numpy uint8 batch is uint8 pixels too (it was refused as "takes uint8, got uint8")
    assert torch.equal(predictor.predict(x[:16].numpy()).classes, routed.classes)
    with pytest.raises(ImageInputError, match="got list"):
        predictor.predict(x[:2].tolist())


def test_one_string_where_a_list_is_expected_is_refused_not_read_letter_by_letter(
    tmp_path: Path,
) -> None:
    from erde.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoints must be a list, got one string 'runs/t'"):
        erde.evaluate("runs/t", tmp_path / "report")
    with pytest.raises(ConfigError, match="methods must be a list"):
        erde.run(erde.make_config(), tmp_path / "run", methods="kd")
    with pytest.raises(ConfigError, match="names must be a list"):
        erde.evaluate(["runs/t"], tmp_path / "report", names="t")
    assert not (tmp_path / "report").exists() and not (tmp_path / "run").exists()


def _cli_defaults(argv: list[str]) -> dict:
    from erde.cli import build_parser

    return vars(build_parser().parse_args(argv))


@pytest.mark.parametrize(
    ("argv", "function"),
    [
        (["calibrate", "c", "--budget", "0.5"], "calibrate"),
        (["evaluate", "c", "--budgeted"], "evaluate_budgeted"),
        (["export", "c", "--out", "o", "--int8"], "quantize_checkpoint"),
        (["run"], "run"),
    ],
)
def test_every_option_a_command_shares_with_its_python_call_has_the_same_default(
    argv: list[str], function: str
) -> None:
    """The CLI calls these functions; a default changed on one side only would make
    ``erde X`` and ``erde.X(...)`` do different things with the same words."""
    import inspect

    from erde.calibration import DEFAULT_BUDGETS

    cli = _cli_defaults(argv)
    given = {word.lstrip("-").replace("-", "_") for word in argv}
    compared = []
    for name, param in inspect.signature(getattr(erde, function)).parameters.items():
        if param.default is inspect.Parameter.empty or name not in cli or name in given:
            continue
        # --budgets unset means the library's default budgets
        expected = DEFAULT_BUDGETS if name == "budgets" and cli[name] is None else cli[name]
        assert param.default == expected, (function, name, param.default, expected)
        compared.append(name)
    assert len(compared) >= 3, compared  # the comparison saw the options, not nothing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_drop": 0.05, "risk": "drop"}, "risk goes with confidence"),
        ({"budget": 0.5, "confidence": 0.9}, "confidence goes with max_drop"),
        ({"max_drop": 0.05, "confidence": 0.9, "temperature": True}, "void the guarantee"),
    ],
)
def test_calibrate_refuses_a_guarantee_asked_for_wrongly_before_reading_anything(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    from erde.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        erde.calibrate(tmp_path / "no-such-checkpoint.pt", **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_run_trains_the_configs_students_and_calibrates_with_a_guarantee(
    tmp_path: Path, one_thread
) -> None:
    """``erde.run(cfg)`` trains ``distill.students`` as ``erde run`` does (it trained
    ce/kd/erde whatever the config said), and ``erde.calibrate(..., confidence=)`` on
    your own tensors gives thresholds with a guarantee, as ``erde calibrate --confidence``;
    ``erde.evaluate_budgeted`` takes the same tensors."""
    from erde.calibration.guaranteed import GuaranteedCalibration

    x, y = _tensors(120)
    cfg = erde.make_config(
        "digits", [*TINY_OVERRIDES, 'distill.students=[{"method": "ce", "name": "only"}]']
    )
    paths = erde.run(cfg, tmp_path / "run", progress=False)
    report = json.loads(Path(paths["json"]).read_text())
    assert sorted(report["models"]) == ["student_only", "teacher"]
    assert not (tmp_path / "run" / "student_kd").exists()

    splits = erde.splits_from_tensors(x, y, x[:30], y[:30], val_fraction=0.5)
    t = erde.train_teacher(cfg, tmp_path / "t", splits=splits, progress=False)
    result, path = erde.calibrate(t, max_drop=0.5, confidence=0.6, splits=splits)
    assert isinstance(result, GuaranteedCalibration) and path.is_file()
    assert result.validation["num_images"] == len(splits.val)
    assert "0.6" in result.guarantee() or "60" in result.guarantee()
    budgeted = erde.evaluate_budgeted(
        [t], tmp_path / "b", budgets=[0.5, 1.0], splits=splits, progress=False
    )
    table = json.loads(budgeted["json"].read_text())
    assert table["dataset"] == {
        "name": "tensors",
        "val_images": len(splits.val),
        "test_images": len(splits.test),
    }
    assert [p["budget"] for p in table["models"]["teacher"]["curve"]] == [0.5, 1.0]
