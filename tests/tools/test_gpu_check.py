"""scripts/gpu-check.sh rehearsed on the CPU with tiny models, run for real by bash.

Time on a GPU is often minutes, not hours: the script must not fail on its first line of
shell after the device has started. This runs every step (environment, benchmark,
torchrun training, reproduce against a time budget, status plot) with DEVICE=cpu.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from data_fixtures import CIFAR10_NAMES, make_tar_gz, write_imagefolder
from test_reproduce import TINY

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu-check.sh"


def python3_shim(bin_dir: Path, interpreter: str = sys.executable) -> Path:
    """``bin_dir/python3``: a script that runs ``interpreter``, put first on the script's PATH.

    A wrapper, not a symlink: a virtual environment's interpreter reached through a link
    outside the environment finds no ``pyvenv.cfg`` beside it and starts as the base
    interpreter, without the environment's packages (``import torch`` then fails).
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "python3"
    shim.write_text(f'#!/bin/sh\nexec "{interpreter}" "$@"\n')
    shim.chmod(0o755)
    return shim


def test_the_python3_shim_keeps_a_virtual_environment(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    shim = python3_shim(tmp_path / "bin", str(venv / "bin" / "python"))

    prefix = subprocess.run(
        [str(shim), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True
    ).stdout.strip()

    assert Path(prefix) == venv


def test_every_step_runs_and_writes_its_files(tmp_path: Path) -> None:
    folder = tmp_path / "jpeg"
    write_imagefolder(folder, classes=tuple(CIFAR10_NAMES), per_class=(5, 2), size=32)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    make_tar_gz(archive, {"train": folder / "train", "test": folder / "test"})
    bin_dir = tmp_path / "bin"  # `python3` in the script is this interpreter
    python3_shim(bin_dir)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "OUT": str(out), "CIFAR10_JPEG": str(archive), "RUNS": str(tmp_path / "runs"),
        "DEVICE": "cpu", "TESTS": "none", "OMP_NUM_THREADS": "1", "REPRODUCE_SECONDS": "300",
        "BENCH_ARGS": "--preset cpu --batch-size 8 --steps 1 --warmup 1 --rounds 1",
        "BENCH_FP32_ARGS": "--preset cpu --batch-size 8 --steps 1 --warmup 1 --rounds 1 --no-amp",
        "EXTRA": " ".join(f"--set {o}" for o in TINY),
        "ERDE_CACHE_DIR": str(tmp_path / "cache"),
    }  # fmt: skip

    run = subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )

    log = (out / "gpu-check.log").read_text()
    assert run.returncode == 0, log[-3000:]
    assert "=== " in log and log.rstrip().endswith("done"), log[-3000:]
    env_txt = (out / "env.txt").read_text()
    assert "python" in env_txt and "torch" in env_txt, env_txt
    assert f"cpus {len(os.sched_getaffinity(0))}" in env_txt, env_txt  # not OMP_NUM_THREADS=1
    assert json.loads((out / "training-bench.json").read_text())
    assert json.loads((out / "training-bench-fp32.json").read_text())["settings"]["amp"] is False
    assert "torchrun teacher:" in log and "reproduce exit status: 0" in log
    results = json.loads((out / "reproduce" / "results.json").read_text())
    files = [f for f in out.rglob("*") if f.is_file()]
    assert len(files) <= 8, files  # the script promises at most 8 result files
    assert (results["n_seeds"], results["schedule"], results["teacher_seeds"]) == (3, "fast", 1)
    for name in ("tradeoff.png", "curves.png"):
        assert (out / "reproduce" / name).stat().st_size > 0, name
    assert "student_erde epoch 1" in log  # the epoch times, read back from metrics.jsonl
