"""The scripts in examples/ run end to end, as a user would start them, on tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    # this checkout's erde first, whatever the folder the example runs in
    path = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "ERDE_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_every_example_is_covered_here() -> None:
    covered = {"train_on_tensors.py", "train_on_image_folder.py", "deploy_onnx.py"}
    covered.add("custom_backbone.py")  # run by tests/test_example_custom_backbone.py
    assert {p.name for p in EXAMPLES.glob("*.py")} == covered


def test_train_on_tensors_from_an_npz_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(120, 8, 8, 3), dtype=np.uint8)  # channels last, as saved
    y = np.arange(120) % 3
    np.savez(tmp_path / "data.npz", x_train=x[:90], y_train=y[:90], x_test=x[90:], y_test=y[90:])
    out = run_example("train_on_tensors.py", "--data", "data.npz", "--quick", cwd=tmp_path)
    report = json.loads((tmp_path / "runs/tensors/report/report.json").read_text())
    assert set(report["models"]) == {"teacher", "student_erde"}
    assert report["dataset"]["num_classes"] == 3 and report["dataset"]["test_images"] == 30
    assert "student_erde: exit accuracies" in out


def test_train_on_image_folder_runs_the_pipeline_and_calibrates(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "my_images", per_class=(24, 6), size=8)
    out = run_example(
        "train_on_image_folder.py", "my_images", "--image-size", "8", "--quick", cwd=tmp_path
    )
    report = json.loads((tmp_path / "runs/imagefolder/report.json").read_text())
    assert set(report["models"]) == {"teacher", "student_ce", "student_kd", "student_erde"}
    assert (tmp_path / "runs/imagefolder/student_erde/checkpoint.thresholds.json").is_file()
    assert "test accuracy" in out


def test_deploy_onnx_answers_every_image_like_pytorch(tmp_path: Path, tiny_run) -> None:
    pytest.importorskip("onnxruntime")
    import shutil

    shutil.copytree(tiny_run["out"] / "student_erde", tmp_path / "student_erde")
    files = list(write_imagefolder(tmp_path / "imgs", per_class=(3, 0), size=8)["train"])
    out = run_example("deploy_onnx.py", "student_erde", *map(str, files), cwd=tmp_path)
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [line["file"] for line in lines] == [str(f) for f in files]
    assert all({"class", "exit", "macs"} <= set(line) for line in lines)
    assert (tmp_path / "student_erde_onnx" / "manifest.json").is_file()
    assert f"agree on {len(files)} of {len(files)} images" in out
