"""Output paths: nothing good overwritten, one writer per folder, clear errors for bad places.

Real processes for the concurrency cases, real read-only and full file
systems (small tmpfs mounts; skipped with the reason where mounting is refused).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hostile import SRC, erde, one_error_line, png, snapshot, tmpfs

from erde.cli import main
from erde.errors import OutputError
from erde.outputs import LOCK_NAME, OutputLockedError, output_lock

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = [
    "--set", "data.image_size=8", "--set", "teacher.arch=resnet8", "--set", "teacher.width=0.5",
    "--set", "student.arch=resnet8", "--set", "student.width=0.25", "--set", "device=cpu",
    "--set", "teacher_train.max_steps_per_epoch=2", "--set", "student_train.max_steps_per_epoch=2",
    "--set", "teacher_train.epochs=1", "--set", "student_train.epochs=1",
    "--set", "evaluation.num_thresholds=3", "--set", "evaluation.rules=[entropy]", "--no-progress",
]  # fmt: skip


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for i in range(3):
        png(folder / f"{i}.png", np.full((8, 8, 3), 60 * i, np.uint8))
    return folder


# --------------------------------------------------------------------------- erde predict --output


def test_predict_refuses_an_output_that_is_one_of_its_inputs(
    tiny_run, images: Path, tmp_path: Path, capsys
) -> None:
    target = shutil.copy(images / "1.png", tmp_path / "1.png")
    before = Path(target).read_bytes()
    argv = ["predict", str(tiny_run["teacher"]), str(tmp_path), "--threshold", "0.5"]
    assert main([*argv, "--output", str(target)]) == 2
    assert "is also an input" in one_error_line(capsys.readouterr().err)
    assert Path(target).read_bytes() == before


def test_predict_checks_options_before_touching_an_existing_output(
    tiny_run, images: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "answers.jsonl"
    output.write_text("earlier results\n")
    argv = ["predict", str(tiny_run["teacher"]), str(images), "--threshold", "0.5"]
    assert main([*argv, "--output", str(output), "--batch-size", "0"]) == 2
    assert "--batch-size" in one_error_line(capsys.readouterr().err)
    assert output.read_text() == "earlier results\n"


def test_predict_output_is_replaced_only_when_complete(
    tiny_run, images: Path, tmp_path: Path
) -> None:
    output = tmp_path / "answers.jsonl"
    output.write_text("earlier results\n")
    argv = ["predict", str(tiny_run["teacher"]), str(images), "--threshold", "0.5"]
    assert main([*argv, "--output", str(output)]) == 0
    assert len(output.read_text().splitlines()) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["answers.jsonl"]  # no temporary file left


@pytest.mark.parametrize("where", ["folder", "missing_folder"])
def test_predict_output_in_a_bad_place_is_one_line(
    tiny_run, images: Path, tmp_path: Path, capsys, where: str
) -> None:
    output = tmp_path if where == "folder" else tmp_path / "nope" / "a.jsonl"
    argv = ["predict", str(tiny_run["teacher"]), str(images), "--threshold", "0.5"]
    assert main([*argv, "--output", str(output)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert ("is a folder" if where == "folder" else "does not exist") in line


# --------------------------------------------------------------------------- output folder lock


def test_two_runs_into_one_out_the_second_is_refused_and_the_first_is_whole(
    tmp_path: Path,
) -> None:
    out = tmp_path / "run"
    first = erde("run", "--out", str(out), "--methods", "ce", "--seed", "1", *TINY, start_only=True)
    deadline = time.monotonic() + 120
    while not (out / LOCK_NAME).exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    second = erde("run", "--out", str(out), "--methods", "ce", "--seed", "2", *TINY)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    line = one_error_line(second.stderr)
    assert second.returncode == 2 and "is in use by pid" in line and str(first.pid) in line
    for saved in (
        out / "config.yaml",
        out / "teacher" / "config.yaml",
        out / "student_ce" / "config.yaml",
    ):
        assert yaml.safe_load(saved.read_text())["seed"] == 1  # all of the first run's
    assert not (out / LOCK_NAME).exists()


def _lock_holder(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s output lock (for 10 minutes, or until killed)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from erde.outputs import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(600)",
         str(folder)],
        env={**os.environ, "PYTHONPATH": SRC}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    holder = _lock_holder(tmp_path)
    with pytest.raises(OutputLockedError, match=f"pid {holder.pid}"), output_lock(tmp_path):
        pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the killed holder left its file behind...
    with output_lock(tmp_path):  # ...which does not block
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_NAME).read_text()


def test_a_second_calibrate_into_the_same_folder_is_refused_naming_the_first(
    tiny_run, tmp_path: Path
) -> None:
    folder = tmp_path / "thresholds"
    folder.mkdir()
    holder = _lock_holder(folder)
    try:
        out = folder / "t.json"
        done = erde("calibrate", str(tiny_run["teacher"]), "--budget", "0.5", "--out", str(out))
        line = one_error_line(done.stderr)
        assert done.returncode == 2 and f"is in use by pid {holder.pid}" in line
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_process_may_nest_locks_on_its_own_folder(tmp_path: Path) -> None:
    with output_lock(tmp_path), output_lock(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()
    assert not (tmp_path / LOCK_NAME).exists()


@pytest.mark.parametrize("dangling", [False, True], ids=["link_to_a_file", "dangling_link"])
def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(
    tmp_path: Path, dangling: bool
) -> None:
    out, outside = tmp_path / "out", tmp_path / "precious.txt"
    out.mkdir()
    if not dangling:
        outside.write_text("keep me")
    (out / LOCK_NAME).symlink_to(outside)
    done = erde("train-teacher", "--out", str(out), *TINY)
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and "is a symbolic link" in line and LOCK_NAME in line
    if dangling:
        assert not outside.exists()  # not created through the link
    else:
        assert outside.read_text() == "keep me"
    assert not (out / "checkpoint.pt").exists()


def test_a_lock_file_hard_linked_to_another_file_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    (tmp_path / "out").mkdir()
    os.link(outside, tmp_path / "out" / LOCK_NAME)
    with pytest.raises(OutputError, match="hard link"), output_lock(tmp_path / "out"):
        pass
    assert outside.read_text() == "keep me"


# --------------------------------------------------------------------------- bad output folders


def test_out_that_is_an_existing_file_is_one_line(tmp_path: Path, capsys) -> None:
    out = tmp_path / "a-file"
    out.write_text("keep me")
    assert main(["train-teacher", "--out", str(out), *TINY]) == 2
    assert "exists and is not a folder" in one_error_line(capsys.readouterr().err)
    assert out.read_text() == "keep me"


def test_read_only_out_is_one_line(tmp_path: Path, capsys) -> None:
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        assert main(["train-teacher", "--out", str(ro / "teacher"), *TINY]) == 2
        assert "Read-only file system" in one_error_line(capsys.readouterr().err)


def test_calibrate_on_a_read_only_checkpoint_folder_fails_and_writes_nothing(
    tiny_run, tmp_path: Path, capsys
) -> None:
    with tmpfs(tmp_path / "ro", "2m", read_only=True, fill=tiny_run["teacher"].parent) as ro:
        before = snapshot(ro)
        assert main(["calibrate", str(ro), "--budget", "0.5", "--no-progress"]) == 2
        assert "not writable" in one_error_line(capsys.readouterr().err)
        assert snapshot(ro) == before


def test_full_disk_during_training_says_so_and_keeps_the_last_checkpoint(
    tiny_run, tmp_path: Path, capsys
) -> None:
    with tmpfs(tmp_path / "small", "1m", fill=tiny_run["teacher"].parent) as disk:
        good = (disk / "checkpoint.pt").read_bytes()
        free = shutil.disk_usage(disk).free
        (disk / "filler").write_bytes(b"\0" * max(0, free - len(good) // 4))
        code = main(["train-teacher", "--out", str(disk), "--force", *TINY])
        line = one_error_line(capsys.readouterr().err)
        assert code == 2 and "disk full" in line and str(disk / "checkpoint.pt") in line
        assert (disk / "checkpoint.pt").read_bytes() == good
        assert not list(disk.glob(".checkpoint.pt.*"))  # no half-written temporary file


# --------------------------------------------------------------------------- outputs over inputs


@pytest.fixture
def model_copy(tiny_run, tmp_path: Path) -> Path:
    """A copy of the tiny teacher's folder, calibrated: checkpoint, thresholds, config."""
    folder = tmp_path / "teacher"
    shutil.copytree(tiny_run["teacher"].parent, folder)
    assert main(["calibrate", str(folder), "--budget", "0.7", "--no-progress"]) == 0
    return folder


@pytest.mark.parametrize(
    "argv",
    [
        ["predict", "{ck}", "{img}", "--output", "{ck}/checkpoint.pt"],
        ["predict", "{ck}", "{img}", "--output", "{ck}/checkpoint.thresholds.json"],
        ["calibrate", "{ck}", "--budget", "0.5", "--out", "{ck}/checkpoint.pt"],
        [
            "calibrate",
            "{ck}",
            "--max-drop",
            "0.5",
            "--confidence",
            "0.9",
            "--out",
            "{ck}/checkpoint.pt",
        ],
        ["release", "{ck}", "--out", "{ck}/checkpoint.pt"],
        ["bench", "{ck}", "--no-onnx", "--json", "{ck}/checkpoint.pt"],
        ["evaluate", "{ck}", "--out", "{ck}"],
        ["export", "{ck}", "--out", "{ck}"],
        ["train-student", "--teacher", "{ck}", "--out", "{ck}", "--force", "--method", "kd"],
    ],
    ids=lambda argv: f"{argv[0]}-{argv[-1].rsplit('/', 1)[-1]}",
)
def test_no_output_option_writes_over_the_model_it_reads(
    model_copy: Path, images: Path, argv: list[str], capsys
) -> None:
    before = snapshot(model_copy)
    argv = [a.format(ck=model_copy, img=images / "0.png") for a in argv]
    extra = TINY if argv[0] == "train-student" else []
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("erde: error:") == 1 and "Traceback" not in err
    named = ("is also an input", "holds the input model", "is the checkpoint itself")
    assert any(words in err for words in named), err
    assert snapshot(model_copy) == before


def test_an_output_that_is_a_hard_link_to_the_checkpoint_is_refused(
    model_copy: Path, images: Path, capsys
) -> None:
    link = model_copy.parent / "looks-new.jsonl"
    os.link(model_copy / "checkpoint.pt", link)
    before = snapshot(model_copy)
    assert main(["predict", str(model_copy), str(images / "0.png"), "--output", str(link)]) == 2
    assert "is also an input" in capsys.readouterr().err
    assert snapshot(model_copy) == before
