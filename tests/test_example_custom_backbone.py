"""examples/custom_backbone.py runs as a user would run it: a separate process, from its file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from erde.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_custom_backbone_example_trains_a_teacher_and_an_erde_student(tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "custom_backbone.py"), "--out", str(out),
         "--epochs", "1", "--max-steps", "3"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student_erde"}
    assert all(len(m["exit_accuracy"]) == 3 for m in report["models"].values())
    assert "student_erde:" in result.stdout and "MACs" in result.stdout
    assert "for 1 epoch on " in result.stdout and "1 epochs" not in result.stdout
    student = load_checkpoint(out / "student_erde")
    assert student["model_config"]["arch"] == "custom_backbone:small_cnn"
    assert student["method"] == "erde" and student["model_config"]["width"] == 0.5
    # half width: about a quarter of the teacher's MACs at the last exit
    teacher_macs = report["models"]["teacher"]["macs_per_exit"][-1]
    assert report["models"]["student_erde"]["macs_per_exit"][-1] < 0.3 * teacher_macs


def test_custom_backbone_example_uses_the_public_api_only() -> None:
    """A user copies the example: it must show ``import erde`` (docs/API.md), not internals."""
    import ast

    tree = ast.parse((ROOT / "examples" / "custom_backbone.py").read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    modules |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    internal = {m for m in modules if m and m.startswith("erde.") and m != "erde.models"}
    assert not internal, internal  # erde.models: backbone_factory, as docs/BACKBONES.md shows
    assert "erde" in modules
