"""Tests for erde.checkpoints: round trips, and every way a checkpoint file can be bad.

A bad checkpoint must be one CheckpointError (exit code 2 and one line from the
CLI), must never run code, and must never cost the user a good checkpoint or
report already in the output folder.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import WritesMarker, train_tiny_teacher, truncate

from erde.checkpoints import (
    FORMAT,
    VERSION,
    check_compatible,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from erde.cli import main
from erde.errors import CheckpointError
from erde.models import build_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny real teacher checkpoint and a report made from it (read-only)."""
    from erde.pipeline import evaluate_checkpoints

    root = tmp_path_factory.mktemp("trained")
    teacher = train_tiny_teacher(root / "teacher")
    report = evaluate_checkpoints([teacher], root / "report", progress=False)["json"]
    return {"teacher": teacher, "config": teacher.parent / "config.yaml", "report": report}


def _raw(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("erde: error: "), captured.err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# --- round trip ---------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path: Path) -> None:
    model = build_model(num_classes=4, arch="resnet8", width=0.25)
    state = {
        "name": "teacher",
        "model_config": {"arch": "resnet8", "width": 0.25},
        "num_classes": 4,
        "image_shape": [3, 8, 8],
        "model": model.state_dict(),
        "config": {"seed": 1},
    }
    save_checkpoint(state, tmp_path / "run" / "checkpoint.pt")
    ckpt = load_checkpoint(tmp_path / "run")  # a folder means its checkpoint.pt
    assert ckpt["format"] == FORMAT and ckpt["version"] == VERSION
    assert ckpt["path"] == str(tmp_path / "run" / "checkpoint.pt")
    rebuilt = model_from_checkpoint(ckpt)
    for key, value in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    rebuilt.eval()
    for a, b in zip(model(x), rebuilt(x), strict=True):
        assert torch.equal(a, b)


def test_trained_checkpoint_rebuilds_its_model(trained) -> None:
    ckpt = load_checkpoint(trained["teacher"])
    model = model_from_checkpoint(ckpt).eval()
    exit_logits = model(torch.zeros(2, *ckpt["image_shape"]))
    assert [tuple(z.shape) for z in exit_logits] == [(2, 10)] * model.num_exits
    check_compatible(ckpt, 10, (3, 8, 8), "teacher")  # the data it was trained on: fine


def test_failed_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"name": "good"}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises for a lambda
        save_checkpoint({"name": "bad", "fn": lambda: None}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left


# --- bad files, library level -------------------------------------------------------------


def _good_state(trained) -> dict:
    return _raw(trained["teacher"])


BadMaker = Callable[[Path, dict], None]


def _random_bytes(path: Path, good: dict) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _empty_file(path: Path, good: dict) -> None:
    path.write_bytes(b"")


def _truncated_zip(path: Path, good: dict) -> None:
    torch.save(good, path)
    truncate(path, 0.5)


def _foreign_torch_dict(path: Path, good: dict) -> None:
    torch.save({"state_dict": good["model"], "epoch": 3}, path)  # e.g. another project's file


def _foreign_tensor(path: Path, good: dict) -> None:
    torch.save(torch.zeros(3), path)


def _code_in_zip(path: Path, good: dict) -> None:
    torch.save({**good, "extra": WritesMarker(path.parent / "code-ran")}, path)


def _code_in_legacy_format(path: Path, good: dict) -> None:
    obj = {**good, "extra": WritesMarker(path.parent / "code-ran")}
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _code_in_plain_pickle(path: Path, good: dict) -> None:
    path.write_bytes(pickle.dumps({"format": FORMAT, "x": WritesMarker(path.parent / "code-ran")}))


def _missing_keys(path: Path, good: dict) -> None:
    torch.save({k: v for k, v in good.items() if k not in ("model", "num_classes")}, path)


def _newer_version(path: Path, good: dict) -> None:
    torch.save({**good, "version": VERSION + 1}, path)


def _version_not_a_number(path: Path, good: dict) -> None:
    torch.save({**good, "version": "2"}, path)


def _num_classes_text(path: Path, good: dict) -> None:
    torch.save({**good, "num_classes": "ten"}, path)


def _bad_image_shape(path: Path, good: dict) -> None:
    torch.save({**good, "image_shape": [3, 8]}, path)


def _model_config_not_a_mapping(path: Path, good: dict) -> None:
    torch.save({**good, "model_config": "resnet8"}, path)


def _weights_not_tensors(path: Path, good: dict) -> None:
    torch.save({**good, "model": [1, 2, 3]}, path)


BAD_AT_LOAD: dict[str, tuple[BadMaker, str]] = {
    "random_bytes": (_random_bytes, "not a readable erde checkpoint"),
    "empty_file": (_empty_file, "not a readable erde checkpoint"),
    "truncated_zip": (_truncated_zip, "not a readable erde checkpoint"),
    "foreign_torch_dict": (_foreign_torch_dict, f"no '{FORMAT}' marker"),
    "foreign_tensor": (_foreign_tensor, f"no '{FORMAT}' marker"),
    "code_in_zip": (_code_in_zip, "refused to unpickle it without running anything"),
    "code_in_legacy_format": (
        _code_in_legacy_format,
        "refused to unpickle it without running anything",
    ),
    "code_in_plain_pickle": (
        _code_in_plain_pickle,
        "refused to unpickle it without running anything",
    ),
    "missing_keys": (_missing_keys, "missing num_classes, model"),
    "newer_version": (_newer_version, f"format version {VERSION + 1}"),
    "version_not_a_number": (_version_not_a_number, "format version must be an integer"),
    "num_classes_text": (_num_classes_text, "num_classes must be an integer in [1, "),
    "bad_image_shape": (_bad_image_shape, "image_shape must be [C, H, W]"),
    "model_config_not_a_mapping": (_model_config_not_a_mapping, "model_config must be a mapping"),
    "weights_not_tensors": (_weights_not_tensors, "must map parameter names to tensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_AT_LOAD))
def test_bad_checkpoint_file_is_one_checkpoint_error(tmp_path: Path, trained, case: str) -> None:
    path = tmp_path / "bad.pt"
    message = _write_bad(case, path, trained)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert message in str(info.value)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "code-ran").exists()


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_checkpoint(tmp_path)  # a folder without checkpoint.pt


def test_unknown_architecture_is_a_checkpoint_error(tmp_path: Path, trained) -> None:
    good = _good_state(trained)
    torch.save(
        {**good, "model_config": {**good["model_config"], "arch": "resnet7x"}}, tmp_path / "a"
    )
    ckpt = load_checkpoint(tmp_path / "a")
    with pytest.raises(CheckpointError, match="describes a model erde cannot build"):
        model_from_checkpoint(ckpt)


def test_weights_that_do_not_fit_are_one_line(tmp_path: Path, trained) -> None:
    good = _good_state(trained)
    weights = dict(good["model"])
    first = next(iter(weights))
    weights[first] = torch.zeros(1)
    del weights[list(weights)[-1]]
    torch.save({**good, "model": weights}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError) as info:
        model_from_checkpoint(load_checkpoint(tmp_path / "w.pt"))
    message = str(info.value)
    assert "1 missing, 0 unexpected, 1 of another shape" in message
    assert "\n" not in message


def test_check_compatible_refuses_other_classes_channels_and_sizes(trained) -> None:
    ckpt = load_checkpoint(trained["teacher"])
    with pytest.raises(CheckpointError, match="trained for 10 classes but the data set has 3"):
        check_compatible(ckpt, 3, (3, 8, 8), "teacher checkpoint")
    with pytest.raises(CheckpointError, match="expects 3-channel images, the data has 1"):
        check_compatible(ckpt, 10, (1, 8, 8), "teacher checkpoint")
    with pytest.raises(
        CheckpointError, match=r"trained on 8x8 images, the data has 16x16; set data.image_size=8"
    ):
        check_compatible(ckpt, 10, (3, 16, 16), "teacher checkpoint")


def test_evaluate_on_another_image_size_exits_2_with_the_fix(
    trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    argv = ["evaluate", str(trained["teacher"]), "--out", str(out), "--no-progress"]
    assert main([*argv, "--set", "data.image_size=16"]) == 2
    assert "--set data.image_size=8" in _one_error_line(capsys)
    assert not out.exists()


# --- bad teachers through the CLI: exit 2, and the output folder is untouched -------------


def _teacher_for_classes(path: Path, good: dict, num_classes: int) -> None:
    """A consistent teacher for another class count: same architecture, its own weights."""
    model = build_model(num_classes=num_classes, **good["model_config"])
    state = {
        **good,
        "num_classes": num_classes,
        "class_names": [f"c{i}" for i in range(num_classes)],
        "model": model.state_dict(),
    }
    save_checkpoint(state, path)


def _teacher_for_grey_images(path: Path, good: dict) -> None:
    grey = {
        "image_shape": [1, *good["image_shape"][1:]],
        "mean": good["mean"][:1],
        "std": good["std"][:1],
    }
    torch.save({**good, **grey}, path)


BAD_TEACHERS: dict[str, tuple[BadMaker, str]] = {
    **BAD_AT_LOAD,
    "three_classes": (
        lambda path, good: _teacher_for_classes(path, good, 3),
        "was trained for 3 classes but the data set has 10",
    ),
    "grey_images": (_teacher_for_grey_images, "expects 1-channel images"),
    "student_as_teacher": (
        lambda path, good: torch.save({**good, "role": "student", "name": "student_ce"}, path),
        "is a student checkpoint, not a teacher",
    ),
}


def _write_bad(case: str, path: Path, trained) -> str:
    """Write bad case ``case`` to ``path``; returns the text its error must contain."""
    make, message = BAD_TEACHERS[case]
    make(path, _good_state(trained))
    return message


@pytest.fixture
def out_with_good_results(tmp_path: Path, trained) -> Path:
    """An output folder already holding a good checkpoint, its config and a report."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(trained["teacher"], out / "checkpoint.pt")
    shutil.copy(trained["config"], out / "config.yaml")
    shutil.copy(trained["report"], out / "report.json")
    return out


def _tiny_config_file(trained) -> str:
    return str(trained["config"])


# --force is the dangerous case (it may replace the checkpoint), so every bad teacher is
# tried with it; a few without it.
BAD_TEACHER_RUNS = [(case, True) for case in sorted(BAD_TEACHERS)] + [
    (case, False) for case in ("code_in_zip", "three_classes", "truncated_zip")
]


@pytest.mark.parametrize(
    ("case", "force"),
    BAD_TEACHER_RUNS,
    ids=[f"{case}-{'force' if force else 'no-force'}" for case, force in BAD_TEACHER_RUNS],
)
def test_bad_teacher_exits_2_and_keeps_out(
    tmp_path: Path, trained, out_with_good_results: Path, capsys, case: str, force: bool
) -> None:
    teacher = tmp_path / "teacher.pt"
    message = _write_bad(case, teacher, trained)
    before = _snapshot(out_with_good_results)
    argv = ["train-student", "--method", "erde", "--teacher", str(teacher)]
    argv += ["--config", _tiny_config_file(trained), "--out", str(out_with_good_results)]
    argv += ["--no-progress", "--device", "cpu", *(["--force"] if force else [])]
    capsys.readouterr()
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert message in line
    assert _snapshot(out_with_good_results) == before
    assert not (tmp_path / "code-ran").exists()


def test_cli_stderr_is_exactly_one_line_in_a_real_process(tmp_path: Path, trained) -> None:
    """Outside pytest's capture too: no warning or traceback before the error line."""
    import subprocess
    import sys

    teacher = tmp_path / "teacher.pt"
    _write_bad("code_in_plain_pickle", teacher, trained)
    argv = ["train-student", "--method", "kd", "--teacher", str(teacher)]
    argv += ["--config", str(trained["config"]), "--out", str(tmp_path / "out"), "--no-progress"]
    result = subprocess.run(
        [sys.executable, "-m", "erde.cli", *argv], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr.startswith("erde: error: ")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "code-ran").exists()
    assert not (tmp_path / "out").exists()


def test_good_teacher_with_force_does_replace_the_checkpoint(
    tmp_path: Path, trained, out_with_good_results: Path, capsys
) -> None:
    """Control for the test above: the same command with a good teacher does write."""
    before = _snapshot(out_with_good_results)
    argv = ["train-student", "--method", "erde", "--teacher", str(trained["teacher"])]
    argv += ["--config", _tiny_config_file(trained), "--out", str(out_with_good_results)]
    assert main([*argv, "--no-progress", "--device", "cpu", "--force"]) == 0
    after = _snapshot(out_with_good_results)
    assert after["checkpoint.pt"] != before["checkpoint.pt"]
    assert after["report.json"] == before["report.json"]  # training never touches a report
    assert load_checkpoint(out_with_good_results)["name"] == "student_erde"


def test_existing_checkpoint_without_resume_or_force_is_kept(
    trained, out_with_good_results: Path, capsys
) -> None:
    before = _snapshot(out_with_good_results)
    argv = ["train-student", "--method", "erde", "--teacher", str(trained["teacher"])]
    argv += ["--config", _tiny_config_file(trained), "--out", str(out_with_good_results)]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert "--resume" in line and "--force" in line
    assert _snapshot(out_with_good_results) == before


@pytest.mark.parametrize("case", ["random_bytes", "truncated_zip", "code_in_zip", "three_classes"])
def test_resume_from_bad_checkpoint_exits_2_and_keeps_it(
    tmp_path: Path, trained, capsys, case: str
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    message = _write_bad(case, out / "checkpoint.pt", trained)
    before = _snapshot(out)
    argv = ["train-teacher", "--config", _tiny_config_file(trained), "--out", str(out)]
    assert main([*argv, "--resume", "--no-progress", "--device", "cpu"]) == 2
    line = _one_error_line(capsys)
    assert message.replace("3 classes but the data set has 10", "3 classes") in line
    assert _snapshot(out) == before
    assert not (out / "code-ran").exists()


@pytest.mark.parametrize(
    "case", ["random_bytes", "foreign_torch_dict", "code_in_legacy_format", "three_classes"]
)
def test_evaluate_bad_checkpoint_exits_2_and_keeps_report(
    tmp_path: Path, trained, out_with_good_results: Path, capsys, case: str
) -> None:
    bad = tmp_path / "bad.pt"
    message = _write_bad(case, bad, trained)
    before = _snapshot(out_with_good_results)
    argv = ["evaluate", str(bad), "--out", str(out_with_good_results)]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 2
    assert message.split(" but ")[0] in _one_error_line(capsys)
    assert _snapshot(out_with_good_results) == before
    assert not (tmp_path / "code-ran").exists()


def test_a_released_checkpoint_is_smaller_loads_the_same_and_counts_as_finished(
    tiny_run, tmp_path: Path, capsys
) -> None:
    """erde.checkpoints.release_checkpoint: the form a trained teacher is shared in."""
    from helpers import tiny_config

    from erde.checkpoints import RESUME_ONLY_KEYS
    from erde.training import Job, train

    out = tmp_path / "teacher" / "checkpoint.pt"
    assert main(["release", str(tiny_run["teacher"].parent), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: ")
    released, full = load_checkpoint(out), load_checkpoint(tiny_run["teacher"])
    assert not set(RESUME_ONLY_KEYS) & set(released)
    assert out.stat().st_size < 0.75 * tiny_run["teacher"].stat().st_size
    x = torch.randn(5, *full["image_shape"])
    with torch.no_grad():
        same = [torch.equal(a, b) for a, b in zip(
            model_from_checkpoint(released).eval()(x), model_from_checkpoint(full).eval()(x),
            strict=True,
        )]  # fmt: skip
    assert same and all(same)
    # a run folder holding it is finished: reused, never trained again or overwritten
    stamp = out.stat().st_mtime_ns
    train(tiny_config(), Job("teacher"), out.parent, resume=True, progress=False)
    assert f"teacher: already finished in {out.parent}, reusing it" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == stamp


def test_a_half_release_stores_float16_and_predicts_as_the_full_checkpoint(
    tiny_run, tmp_path: Path, capsys
) -> None:
    """--half: the form a headline teacher is committed in; a student can be trained from it."""
    from helpers import tiny_config

    from erde.training import Job, train

    full_out, half_out = tmp_path / "full.pt", tmp_path / "teacher" / "checkpoint.pt"
    assert main(["release", str(tiny_run["teacher"]), "--out", str(full_out)]) == 0
    assert main(["release", str(tiny_run["teacher"]), "--out", str(half_out), "--half"]) == 0
    capsys.readouterr()
    half, full = load_checkpoint(half_out), load_checkpoint(full_out)
    floats = [k for k, v in full["model"].items() if v.is_floating_point()]
    assert floats and all(half["model"][k].dtype == torch.float16 for k in floats)
    assert half["model"].keys() == full["model"].keys()
    assert half_out.stat().st_size < 0.7 * full_out.stat().st_size
    model = model_from_checkpoint(half).eval()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(64, *full["image_shape"])
    with torch.no_grad():
        pairs = list(zip(model(x), model_from_checkpoint(full).eval()(x), strict=True))
    for a, b in pairs:
        torch.testing.assert_close(a, b, atol=0.02, rtol=0.01)
        assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95
    student = train(tiny_config(), Job("student", "kd"), tmp_path / "student",
                    teacher_checkpoint=half_out, progress=False)  # fmt: skip
    assert load_checkpoint(student)["finished"]


def test_an_unfinished_checkpoint_is_not_released(tiny_run, tmp_path: Path) -> None:
    from erde.checkpoints import release_checkpoint

    ckpt = torch.load(tiny_run["teacher"], weights_only=True)
    ckpt["finished"] = False
    torch.save(ckpt, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match="has not finished training"):
        release_checkpoint(tmp_path / "partial.pt", tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    with pytest.raises(CheckpointError, match="is the checkpoint itself"):
        release_checkpoint(tiny_run["teacher"], tiny_run["teacher"])
