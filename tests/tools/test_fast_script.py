"""scripts/cifar10-fast.sh, run for real by bash on tiny CIFAR-10 files with tiny models.

The script chains hours of training; what must not fail after those hours is the
chaining: steps 3 and 4 start from a copy of step 1's finished teacher, step 2 adds seeds to
step 1's run, which
``erde reproduce`` must accept as reusable (same teacher settings) and not retrain.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import write_cifar10
from test_reproduce import TINY

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "cifar10-fast.sh"


def _run(data: Path, runs: Path, docs: Path, lanes: str = "1") -> subprocess.CompletedProcess:
    extra = " ".join(f"--set {o}" for o in (*TINY, "student_train.epochs=1"))
    env = {
        **os.environ,
        "DATA": str(data), "RUNS": str(runs), "EXTRA": extra, "OMP_NUM_THREADS": "1",
        "ERDE_CACHE_DIR": str(runs / "cache"), "PYTHON": sys.executable, "DOCS": str(docs),
        "LANES": lanes,
    }  # fmt: skip
    return subprocess.run(
        ["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("lanes", ["1", "2"])  # 2: steps 2-3 and step 4 as two processes
def test_the_three_steps_share_one_teacher_and_a_rerun_reuses_everything(
    tmp_path: Path, lanes: str
) -> None:
    data, runs, docs = tmp_path / "cifar10", tmp_path / "runs", tmp_path / "docs"
    write_cifar10(data)
    first = _run(data, runs, docs, lanes)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    assert "all CIFAR-10 fast-schedule runs finished" in first.stdout
    # step 2 adds seeds 1 and 2 to step 1's seed 0 without training seed 0 again
    reused = f"student_erde: already finished in {runs / 'cifar10-fast/seed_0/student_erde'}"
    assert reused in first.stdout

    teacher = (runs / "cifar10-fast/seed_0/teacher/checkpoint.pt").read_bytes()
    students = {}
    for out, seeds in (("cifar10-fast", 3), ("cifar10-fast-r20x0.5", 1),
                       ("cifar10-fast-mobilenetv2x0.5", 1)):  # fmt: skip
        results = json.loads((runs / out / "results.json").read_text())
        assert (results["n_seeds"], results["schedule"]) == (seeds, "fast")
        assert (runs / out / "seed_0/teacher/checkpoint.pt").read_bytes() == teacher
        students[out] = (runs / out / "seed_0/student_erde/config.yaml").read_text()
    assert "width: 0.5" in students["cifar10-fast-r20x0.5"]
    assert "arch: mobilenetv2_x0.5" in students["cifar10-fast-mobilenetv2x0.5"]
    assert "exit_mapping_by: cost" in students["cifar10-fast-mobilenetv2x0.5"]

    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/seed_*/*/checkpoint.pt")}
    # each step published under its own name (tiny models here, so each names its pair): the
    # wider student of step 4 did not replace step 1's block
    page = (docs / "RESULTS.md").read_text()
    for name in ("cifar10-fast-resnet8_x0.5-resnet8_x0.25", "cifar10-fast-resnet8_x0.5-resnet8_x0.5",
                 "cifar10-fast-resnet8_x0.5-mobilenetv2_x0.5_x0.25"):  # fmt: skip
        assert page.count(f"<!-- erde-results:{name}:begin -->") == 1, name
        assert (docs / "results" / f"{name}.json").is_file(), name

    if lanes == "1":  # the same reproduce commands either way: one rerun shows the reuse
        again = _run(data, runs, docs, lanes)
        assert again.returncode == 0, again.stderr[-2000:]
        assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing trained again


def test_a_missing_data_copy_is_one_line_before_anything_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    result = _run(tmp_path / "missing.tar.gz", runs, tmp_path / "docs")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"cifar10-fast.sh: no CIFAR-10 copy at {tmp_path / 'missing.tar.gz'} (set DATA)"
    )
    assert not runs.exists()
