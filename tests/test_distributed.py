"""Training under torchrun: two real CPU processes joined with gloo.

The test launches this very file with ``python -m torch.distributed.run`` (what
the ``torchrun`` command runs); as a script it trains the tiny teacher and an
KD and ERDE students side by side with :func:`erde.training.train` and
:func:`erde.training.train_students`, as the ``erde`` commands do, and each
rank saves the weights it ended with.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from erde.checkpoints import load_checkpoint

TEACHER_STEPS = 6  # per epoch and process
TEACHER_EPOCHS = 3
BATCH = 32  # per process


def _config():
    from helpers import tiny_config

    return tiny_config(
        f"data.batch_size={BATCH}",
        f"teacher_train.epochs={TEACHER_EPOCHS}",
        f"teacher_train.max_steps_per_epoch={TEACHER_STEPS}",
        "teacher_train.lr=0.05",
        "student_train.max_steps_per_epoch=3",
    )


def _worker(out: Path, dumps: Path) -> None:
    """One rank: train as the CLI does, then save the weights this process holds."""
    from erde import training
    from erde.training import Job, jobs

    built = []
    real_build_model = jobs.build_model

    def build_and_keep(**kwargs):  # the trained module itself, not rank 0's checkpoint
        model = real_build_model(**kwargs)
        built.append(model)
        return model

    jobs.build_model = build_and_keep
    rank = os.environ["RANK"]
    cfg = _config()
    teacher = training.train(cfg, Job("teacher"), out / "teacher", progress=False)
    torch.save(built[-1].state_dict(), dumps / f"teacher_rank{rank}.pt")
    methods = ("kd", "erde")  # side by side, as `erde run` trains them
    training.train_students(
        cfg, methods, [out / f"student_{m}" for m in methods], teacher_checkpoint=teacher,
        progress=False,
    )  # fmt: skip
    for method, model in zip(methods, built[-2:], strict=True):
        torch.save(model.state_dict(), dumps / f"student_{method}_rank{rank}.pt")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_two_gloo_processes_end_with_identical_weights_and_a_lower_loss(tmp_path: Path) -> None:
    out, dumps = tmp_path / "run", tmp_path / "ranks"
    dumps.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        __file__, str(out), str(dumps),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    for name in ("teacher", "student_kd", "student_erde"):
        rank0 = torch.load(dumps / f"{name}_rank0.pt", weights_only=True)
        rank1 = torch.load(dumps / f"{name}_rank1.pt", weights_only=True)
        _assert_same_state(rank0, rank1)  # parameters and BatchNorm statistics alike
        ckpt = load_checkpoint(out / name)
        _assert_same_state(ckpt["model"], rank0)
        assert ckpt["world_size"] == 2 and ckpt["finished"]
        # rank 0 alone wrote, and wrote each file once
        assert sorted(p.name for p in (out / name).iterdir()) == [
            "checkpoint.pt",
            "config.yaml",
            "metrics.jsonl",
        ]

    records = [json.loads(line) for line in (out / "teacher" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == list(range(1, TEACHER_EPOCHS + 1))
    assert all(r["images"] == 2 * TEACHER_STEPS * BATCH for r in records)  # summed over ranks
    assert records[-1]["train_loss"] < records[0]["train_loss"]


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(Path(sys.argv[1]), Path(sys.argv[2]))


def test_erde_run_under_torchrun_reports_once_from_rank_zero(tmp_path: Path) -> None:
    from helpers import TINY_OVERRIDES

    out = tmp_path / "run"
    sets = [arg for o in TINY_OVERRIDES for arg in ("--set", o)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
        "-m", "erde.cli", "run", "--no-progress", "--methods", "erde", "--out", str(out),
        "--set", "data.batch_size=32", *sets,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student_erde"}
    assert done.stdout.count("report.json") == 1  # one process printed the summary
    assert load_checkpoint(out / "student_erde")["world_size"] == 2
