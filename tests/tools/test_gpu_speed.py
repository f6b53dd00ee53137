"""scripts/gpu-speed.sh rehearsed on the CPU with tiny FastNets, run for real by bash.

GPU time comes in minutes: every step of the script (environment, benchmark, the headline
reproduce, the quarter-width and ablation blocks from the released teacher, the block of
several teachers, erde verify on every block, one archive of what comes back) must work
before the device starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_fixtures import CIFAR10_NAMES, make_tar_gz, write_imagefolder
from test_reproduce import TINY

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-speed.sh"
TINY_FAST = (
    *(o for o in TINY if o.split("=")[0] not in ("teacher.arch", "student.arch",
                                                  "teacher.width", "student.width")),
    "teacher.width=0.125", "student.width=0.125", "student_train.epochs=1",
)  # fmt: skip


def test_every_step_of_the_speed_script_runs_and_every_block_verifies(tmp_path: Path) -> None:
    folder = tmp_path / "jpeg"
    write_imagefolder(folder, classes=tuple(CIFAR10_NAMES), per_class=(5, 2), size=32)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    make_tar_gz(archive, {"train": folder / "train", "test": folder / "test"})
    bin_dir = tmp_path / "bin"  # `python3` in the script is this interpreter (venv or not)
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "OUT": str(out), "CIFAR10_JPEG": str(archive), "RUNS": str(tmp_path / "runs"),
        "DEVICE": "cpu", "OMP_NUM_THREADS": "1", "COMPILE": "0",
        "SEEDS": "2", "QUARTER_SEEDS": "1", "ABLATION_SEEDS": "1",
        "TEACHERS_SECONDS": "600", "TEACHER_SEEDS": "2",
        "BENCH_ARGS": "--preset speed --batch-size 8 --steps 1 --warmup 1 --rounds 1",
        "EXTRA": " ".join(f"--set {o}" for o in TINY_FAST),
        "ERDE_CACHE_DIR": str(tmp_path / "cache"),
    }  # fmt: skip

    run = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip

    log = (out / "gpu-speed.log").read_text()
    assert run.returncode == 0, log[-3000:]
    assert log.rstrip().endswith("done"), log[-3000:]
    assert json.loads((out / "bench.json").read_text())["settings"]["preset"] == "speed"
    assert log.count("reproduce exit status: 0") == 4, log[-3000:]
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8, files  # what the device returns at most
    unpacked = tmp_path / "unpacked"
    unpacked.mkdir()
    subprocess.run(["tar", "-xzf", str(out / "results.tar.gz"), "-C", str(unpacked)], check=True)
    results = unpacked / "results"
    blocks = sorted(p.stem for p in results.glob("*.json"))
    assert len(blocks) == 4 and any(b.endswith("-ablation") for b in blocks), blocks
    for block in blocks:
        assert (results / f"{block}-records.npz").is_file()
        assert (results / f"{block}-seeds.json.gz").is_file()  # the block continues elsewhere
    assert log.count("numbers re-derived from the per-image records") == 4
    ablation = json.loads(next(results.glob("*-ablation.json")).read_text())
    assert "student_erde_mask" in ablation["models"] and ablation["n_seeds"] == 1
    teachers = json.loads((results / "cifar10-speed-2teachers.json").read_text())
    assert (teachers["n_seeds"], teachers["teacher_seeds"]) == (2, 2)
    import torch

    released = torch.load(unpacked / "teacher" / "checkpoint.pt", weights_only=True)
    weights = [v for v in released["model"].values() if v.is_floating_point()]
    assert weights and all(v.dtype == torch.float16 for v in weights)  # --half: a quarter of fp32
