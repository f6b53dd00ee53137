"""Shared fixtures: a tiny experiment config and one tiny trained pipeline per test session.

Tiny means digits at 8x8, ResNet-8 teacher and a quarter-width ResNet-8
student, a handful of steps: seconds on a laptop CPU, yet every code path
(teacher, three students, evaluation, report) is the real one.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_config

from erde.config import ExperimentConfig


def pytest_configure(config: pytest.Config) -> None:
    """Under ``pytest -n N`` each worker process runs torch on one thread: the workers already
    fill the cores, and more threads than cores make torch's threads wait on each other.

    ``ERDE_THREADS=1`` says the same to the in-process ``erde`` commands and the processes the
    tests start: without ``--threads`` a command takes the cores idle at that moment, which
    under a busy second worker differed from one command to the next (a report records it,
    and a float sum can change with it). Tests of the default itself set or clear it.
    """
    import os

    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        torch.set_num_threads(1)
        os.environ.setdefault("ERDE_THREADS", "1")


@pytest.fixture(autouse=True)
def _restore_threads():
    """Undo a test's thread count (an in-process ``erde`` command sets it for the whole
    process), so the next test starts with the count the session started with."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: small models gain nothing from a second, and a busy CPU
    makes two stall."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_cfg() -> ExperimentConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Teacher, ce/kd/erde students and the report, trained once per session.

    Returns paths: ``out`` (the run folder), ``teacher``, ``student_ce``,
    ``student_kd``, ``student_erde`` (checkpoint files) and ``report`` (report.json).
    Tests must treat these files as read-only (copy before modifying).
    """
    from erde.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("tiny_run")
    paths = run_pipeline(tiny_config(), out, progress=False)
    result = {"out": out, "report": paths["json"]}
    for name in ("teacher", "student_ce", "student_kd", "student_erde"):
        result[name] = out / name / "checkpoint.pt"
    return result


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny teacher, calibrated then exported once through the CLI (ONNX Runtime needed).

    Returns ``ckpt`` (a copy of the teacher checkpoint, with its thresholds file
    beside it) and ``dir`` (the export folder). Read-only for tests, like ``tiny_run``.
    """
    import shutil

    pytest.importorskip("onnxruntime")
    from erde.cli import main

    root = tmp_path_factory.mktemp("export")
    ckpt = root / "teacher" / "checkpoint.pt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_run["teacher"], ckpt)
    assert main(["calibrate", str(ckpt), "--budget", "0.7", "--no-progress"]) == 0
    assert main(["export", str(ckpt), "--out", str(root / "onnx")]) == 0
    return {"ckpt": ckpt, "dir": root / "onnx"}
