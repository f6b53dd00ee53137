"""Students trained side by side: the same weights as separate runs, resumable after SIGKILL.

:func:`erde.training.train_students` trains the CE, KD and ERDE students of one
seed in one loop (same batches, one teacher forward per batch). On CPU with a
fixed seed each must end bit for bit where :func:`erde.training.train` would
take it alone; a killed side-by-side run is a real process, SIGKILLed from
outside, and must resume to the same weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from erde.checkpoints import load_checkpoint
from erde.config import load_yaml, parse_student
from erde.errors import ConfigError
from erde.training import Job, context, train, train_students

METHODS = ("ce", "kd", "erde")
STEPS = 5  # per epoch


def _config(*extra: str, checkpoint_every: int = 0):
    from helpers import tiny_config

    return tiny_config(
        "teacher_train.epochs=1",
        "student_train.epochs=2",
        f"student_train.max_steps_per_epoch={STEPS}",
        f"student_train.checkpoint_every_steps={checkpoint_every}",
        "student.head_dropout=0.5",  # dropout draws must follow each student's own stream
        *extra,
    )


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory, one_thread) -> Path:
    return train(_config(), Job("teacher"), tmp_path_factory.mktemp("teacher"), progress=False)


@pytest.fixture(scope="module")
def separate(tmp_path_factory: pytest.TempPathFactory, teacher_ckpt: Path) -> dict[str, Path]:
    """Each student trained alone, the way `erde train-student` does."""
    base = tmp_path_factory.mktemp("separate")
    return {
        m: train(
            _config(), Job("student", m), base / m, teacher_checkpoint=teacher_ckpt, progress=False
        )
        for m in METHODS
    }


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def test_side_by_side_gives_the_weights_of_separate_runs(
    tmp_path: Path, teacher_ckpt: Path, separate: dict[str, Path]
) -> None:
    paths = train_students(
        _config(), METHODS, [tmp_path / m for m in METHODS], teacher_checkpoint=teacher_ckpt,
        progress=False,
    )  # fmt: skip
    for method, path in zip(METHODS, paths, strict=True):
        _assert_same_weights(path, separate[method])
        ckpt = load_checkpoint(path)
        assert ckpt["finished"] and ckpt["name"] == f"student_{method}"
    # the three differ (by their loss only), so the equality above is not vacuous
    weights = [load_checkpoint(p)["model"] for p in paths]
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[0])


def test_one_teacher_forward_per_batch_for_kd_and_erde_together(
    tmp_path: Path, teacher_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = context.teacher_exit_logits

    def counted(teacher, x):
        calls["n"] += 1
        return real(teacher, x)

    monkeypatch.setattr(context, "teacher_exit_logits", counted)
    train_students(
        _config(), ("kd", "erde"), [tmp_path / "kd", tmp_path / "erde"],
        teacher_checkpoint=teacher_ckpt, progress=False,
    )  # fmt: skip
    assert calls["n"] == 2 * STEPS  # epochs x steps, not twice that


def test_two_students_into_one_folder_are_refused_before_any_file(
    tmp_path: Path, teacher_ckpt: Path
) -> None:
    with pytest.raises(ConfigError, match="own output folder"):
        train_students(
            _config(), ("kd", "erde"), [tmp_path / "x", tmp_path / "x"],
            teacher_checkpoint=teacher_ckpt, progress=False,
        )  # fmt: skip
    assert not (tmp_path / "x").exists()


def _start(out: Path, teacher: Path, pause_at: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, __file__, str(out), str(teacher), str(pause_at)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)


def test_sigkill_then_resume_ends_with_the_separate_weights(
    tmp_path: Path, teacher_ckpt: Path, separate: dict[str, Path]
) -> None:
    out = tmp_path / "run"
    pause_at = STEPS + 3  # epoch 2, before its checkpoint; the one before is 2 steps back
    proc = _start(out, teacher_ckpt, pause_at, tmp_path / "stderr.txt")
    try:
        line = proc.stdout.readline()
        while ": training " in line:  # each student's start-up line comes first
            line = proc.stdout.readline()
        assert line.strip() == f"paused at step {pause_at}", (tmp_path / "stderr.txt").read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    for m in METHODS:
        ckpt = load_checkpoint(out / m)
        assert ckpt["global_step"] == pause_at - 2 and not ckpt["finished"]

    # a kill between two students' checkpoint writes leaves them at different steps:
    # put the CE student back at step 2 and resume all three together
    early = tmp_path / "early"
    with pytest.raises(KeyboardInterrupt):
        train(
            _config(checkpoint_every=2),
            Job("student", "ce"),
            early,
            progress=False,
            on_step=_stop_at(3),
        )
    assert load_checkpoint(early)["global_step"] == 2
    (early / "checkpoint.pt").replace(out / "ce" / "checkpoint.pt")
    paths = train_students(
        _config(checkpoint_every=2), METHODS, [out / m for m in METHODS], teacher_checkpoint=teacher_ckpt,
        resume=True, progress=False,
    )  # fmt: skip
    for method, path in zip(METHODS, paths, strict=True):
        _assert_same_weights(path, separate[method])


def _stop_at(step: int):
    def stop(s: int) -> None:
        if s == step:
            raise KeyboardInterrupt

    return stop


def _child(out: Path, teacher: Path, pause_at: int) -> None:
    def pause(step: int) -> None:
        if step == pause_at:
            print(f"paused at step {step}", flush=True)
            time.sleep(600)

    train_students(
        _config(checkpoint_every=2), METHODS, [out / m for m in METHODS], teacher_checkpoint=teacher,
        progress=False, on_step=pause,
    )  # fmt: skip


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    a = sys.argv[1:]
    _child(Path(a[0]), Path(a[1]), int(a[2]))


# --- any set of students: specs with their own loss settings ----------------------------


def test_named_students_with_their_own_settings_match_separate_runs_with_those_settings(
    tmp_path: Path, teacher_ckpt: Path, separate: dict[str, Path]
) -> None:
    """ERDE at gamma 1 and 4 and KD at tau 1 in one loop: each ends where a run of its own
    config would, and its config.yaml says which method and settings it trained with."""
    specs = [parse_student("erde"), parse_student("erde_g4=erde:gamma=4"),
             parse_student("kd_t1=kd:temperature=1")]  # fmt: skip
    dirs = [tmp_path / s.name for s in specs]
    paths = train_students(_config(), specs, dirs, teacher_checkpoint=teacher_ckpt, progress=False)
    _assert_same_weights(paths[0], separate["erde"])
    alone = train(
        _config("distill.gamma=4"), Job("student", "erde"), tmp_path / "alone_g4",
        teacher_checkpoint=teacher_ckpt, progress=False,
    )  # fmt: skip
    _assert_same_weights(paths[1], alone)
    assert load_checkpoint(paths[1])["name"] == "student_erde_g4"
    saved = load_yaml(dirs[1] / "config.yaml")["distill"]
    assert saved["method"] == "erde" and saved["gamma"] == 4.0
    saved_kd = load_yaml(dirs[2] / "config.yaml")["distill"]
    assert saved_kd["method"] == "kd" and saved_kd["temperature"] == 1.0
    g1, g4 = load_checkpoint(paths[0])["model"], load_checkpoint(paths[1])["model"]
    assert any(not torch.equal(g1[k], g4[k]) for k in g1)  # gamma changed what was learnt


@pytest.mark.parametrize(
    ("methods", "message"),
    [
        ("kd,kd", "each name once, kd given twice"),
        ("kd,x=bogus", "x has unknown method 'bogus'; valid: ce, kd, erde"),
        ("erde_g=erde:gamma=-1", "erde_g.gamma out of range"),
        ("a=erde:zeta=1", "key one of alpha, beta, gamma"),
        ("../up=kd", "must be 1-64 letters"),
        (",".join(f"s{i}=ce" for i in range(33)), "at most 32 students side by side, got 33"),
    ],
)
def test_bad_student_specs_are_one_line_and_write_nothing(
    tmp_path: Path, methods: str, message: str
) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "erde.cli", "run", "--out", str(out), "--methods", methods,
           "--set", "data.image_size=8", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()


def test_students_from_the_config_train_side_by_side_and_are_compared_with_kd(
    tmp_path: Path,
) -> None:
    from erde.pipeline import run_pipeline
    from erde.reproduce.stats import comparison_pairs

    cfg = _config(
        "teacher_train.max_steps_per_epoch=2", "student_train.epochs=1",
        "distill.students=[{name: kd, method: kd}, {name: erde_g2, method: erde, gamma: 2}]",
    )  # fmt: skip
    paths = run_pipeline(cfg, tmp_path, progress=False)
    report = json.loads(paths["json"].read_text())
    assert list(report["models"]) == ["teacher", "student_kd", "student_erde_g2"]
    assert comparison_pairs(list(report["models"])) == [("student_erde_g2", "student_kd")]
