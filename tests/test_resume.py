"""Crashes: SIGKILL mid-epoch then --resume, non-finite losses, out of memory.

A killed run is a real process: this file, run as a script, trains with
:func:`erde.training.train` and (optionally) stops at a given step, printing a
line; the test then SIGKILLs it from outside. On CPU with a fixed seed the
resumed run must end with exactly the weights of a run that was never killed,
given the same thread count: every run here, in this process and in the child,
uses one thread (a different count changes float reductions in the last bits).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from erde.checkpoints import load_checkpoint
from erde.training import Job, TrainingError, jobs, train

EPOCHS = 2
STEPS = 6  # per epoch


def _config(checkpoint_every: int = 0):
    from helpers import tiny_config

    return tiny_config(
        f"teacher_train.epochs={EPOCHS}",
        f"teacher_train.max_steps_per_epoch={STEPS}",
        f"teacher_train.checkpoint_every_steps={checkpoint_every}",
        f"student_train.epochs={EPOCHS}",
        f"student_train.max_steps_per_epoch={STEPS}",
        f"student_train.checkpoint_every_steps={checkpoint_every}",
    )


def _job(name: str) -> Job:
    return Job("teacher") if name == "teacher" else Job("student", name.split("_")[1])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    """A briefly trained teacher for the student runs."""
    out = tmp_path_factory.mktemp("teacher")
    return train(_config(), Job("teacher"), out, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, teacher_ckpt: Path, one_thread: None
) -> dict[str, Path]:
    """Reference runs that nothing interrupts (and that checkpoint once per epoch only)."""
    base = tmp_path_factory.mktemp("uninterrupted")
    return {
        name: train(
            _config(), _job(name), base / name, teacher_checkpoint=teacher_ckpt, progress=False
        )
        for name in ("teacher", "student_erde")
    }


def _start(out: Path, name: str, teacher: Path, checkpoint_every: int, pause_at: int, log: Path):
    cmd = [
        sys.executable,
        __file__,
        str(out),
        name,
        str(teacher),
        str(checkpoint_every),
        str(pause_at),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _assert_clean_and_same_as(out: Path, reference: Path) -> None:
    """Finished, loadable, no half-written file, same weights and epoch metrics as the reference."""
    ckpt = load_checkpoint(out)
    assert ckpt["finished"] and ckpt["global_step"] == EPOCHS * STEPS
    assert not list(out.glob(".*.tmp"))
    _assert_same_weights(out / "checkpoint.pt", reference)
    ours, theirs = _metrics(out), _metrics(reference.parent)
    assert [r["epoch"] for r in ours] == list(range(1, EPOCHS + 1))  # no line lost or repeated
    for mine, ref in zip(ours, theirs, strict=True):
        # the interrupted epoch's sums were carried over in the checkpoint
        assert mine["train_loss"] == ref["train_loss"]
        assert mine["train_exit_accuracy"] == ref["train_exit_accuracy"]


@pytest.mark.parametrize("name", ["teacher", "student_erde"])
def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(
    name: str, tmp_path: Path, teacher_ckpt: Path, uninterrupted: dict[str, Path], capsys
) -> None:
    out = tmp_path / name
    pause_at = STEPS + 3  # epoch 2, step 3; the last checkpoint is at step STEPS + 2
    proc = _start(out, name, teacher_ckpt, 2, pause_at, tmp_path / "stderr.txt")
    try:
        line = proc.stdout.readline()
        while ": training " in line:  # the start-up line comes first
            line = proc.stdout.readline()
        assert line.strip() == f"paused at step {pause_at}", (tmp_path / "stderr.txt").read_text()
    finally:
        _kill(proc)

    ckpt = load_checkpoint(out)
    assert (ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]) == (1, 2, STEPS + 2)
    assert not ckpt["finished"]

    capsys.readouterr()
    train(_config(2), _job(name), out, teacher_checkpoint=teacher_ckpt, resume=True, progress=False)
    # the start-up line says where it continues: epoch 2, after its second step
    assert f"into {out}, resuming at epoch 2 step 2/{STEPS}\n" in capsys.readouterr().out
    _assert_clean_and_same_as(out, uninterrupted[name])


def test_sigkill_at_any_moment_leaves_a_checkpoint_that_resumes_exactly(
    tmp_path: Path, teacher_ckpt: Path, uninterrupted: dict[str, Path]
) -> None:
    """Checkpoint every step and kill as soon as one exists: often in the middle of a write."""
    out = tmp_path / "teacher"
    proc = _start(out, "teacher", teacher_ckpt, 1, 0, tmp_path / "stderr.txt")
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
    finally:
        _kill(proc)

    ckpt = load_checkpoint(out)  # whatever moment it died at, the file is whole
    assert not ckpt["finished"]
    train(_config(1), Job("teacher"), out, resume=True, progress=False)
    _assert_clean_and_same_as(out, uninterrupted["teacher"])


def _loss_that_turns_nan_at(bad_step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = jobs.teacher_loss

    def loss(exit_logits, labels, weights, **kwargs):
        calls["n"] += 1
        terms = real(exit_logits, labels, weights, **kwargs)
        if calls["n"] == bad_step:
            terms["total"] = terms["total"] * float("nan")
        return terms

    monkeypatch.setattr(jobs, "teacher_loss", loss)


@pytest.mark.parametrize(
    ("checkpoint_every", "bad_step", "kept_step"),
    [(2, 5, 4), (0, STEPS + 3, STEPS)],  # mid-epoch checkpoints; epoch checkpoints only
)
def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    checkpoint_every: int, bad_step: int, kept_step: int, tmp_path: Path, monkeypatch
) -> None:
    _loss_that_turns_nan_at(bad_step, monkeypatch)
    with pytest.raises(TrainingError, match=rf"nan or inf at step {bad_step} \(epoch \d\)"):
        train(_config(checkpoint_every), Job("teacher"), tmp_path, progress=False)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt["global_step"] == kept_step
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_nan_loss_before_the_first_checkpoint_does_not_claim_one(
    tmp_path: Path, monkeypatch
) -> None:
    _loss_that_turns_nan_at(2, monkeypatch)
    with pytest.raises(TrainingError) as info:
        train(_config(0), Job("teacher"), tmp_path, progress=False)
    assert "no checkpoint was written yet" in str(info.value)
    assert "last good checkpoint" not in str(info.value)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_out_of_memory_suggests_a_smaller_batch(tmp_path: Path, monkeypatch) -> None:
    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(jobs, "teacher_loss", no_memory)
    with pytest.raises(TrainingError, match=r"out of memory .* batch size 64; try a smaller"):
        train(_config(), Job("teacher"), tmp_path, progress=False)


def _child(out: Path, name: str, teacher: Path, checkpoint_every: int, pause_at: int) -> None:
    """Train; at step ``pause_at`` (if > 0) say so and wait to be killed."""

    def pause(step: int) -> None:
        if step == pause_at:
            print(f"paused at step {step}", flush=True)
            time.sleep(600)

    train(
        _config(checkpoint_every), _job(name), out, teacher_checkpoint=teacher, progress=False,
        on_step=pause,
    )  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    torch.set_num_threads(1)  # as the parent's runs: the same reductions, the same bits
    a = sys.argv[1:]
    _child(Path(a[0]), a[1], Path(a[2]), int(a[3]), int(a[4]))


def test_the_time_left_after_a_resume_counts_only_the_steps_this_process_ran(
    tmp_path: Path,
) -> None:
    """A run stopped at step 2 of epoch 1 and resumed times STEPS - 2 steps in that epoch."""

    def stop(step: int) -> None:
        if step == 3:
            raise KeyboardInterrupt

    cfg = _config(2)  # a checkpoint every 2 steps
    cfg.teacher_train.epochs = 3
    with pytest.raises(KeyboardInterrupt):
        train(cfg, Job("teacher"), tmp_path, progress=False, on_step=stop)
    assert load_checkpoint(tmp_path)["global_step"] == 2

    records: list[dict] = []
    train(cfg, Job("teacher"), tmp_path, resume=True, progress=False,
          on_epoch=lambda _out, record: records.append(record))  # fmt: skip
    first = records[0]
    assert (first["epoch"], first["epochs"]) == (1, 3)
    left = 3 * STEPS - STEPS  # steps of epochs 2 and 3
    assert first["seconds_per_step"] == pytest.approx(first["seconds"] / (STEPS - 2))
    # the estimate: the steady time per step (median over the blocks between checkpoints)
    assert first["steady_seconds_per_step"] > 0
    assert first["eta_seconds"] == pytest.approx(first["steady_seconds_per_step"] * left)
    # throughput of the steps timed here, not of the whole epoch's images over part of its time
    assert first["steps"] == STEPS
    per_step = first["images"] / STEPS
    assert first["images_per_second"] == pytest.approx(per_step * (STEPS - 2) / first["seconds"])
    assert records[1]["images_per_second"] == pytest.approx(
        records[1]["images"] / records[1]["seconds"]
    )
    # later estimates: the median time per step of the epochs so far (one slow epoch moves it little)
    per_step = statistics.median(r["steady_seconds_per_step"] for r in records[:2])
    assert records[1]["eta_seconds"] == pytest.approx(per_step * STEPS)
    assert records[-1]["eta_seconds"] == 0
