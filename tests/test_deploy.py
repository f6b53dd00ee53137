"""The deployment table on the tiny trained pipeline: every row measured, bad calls refused."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from erde.cli import main

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "deploy.py"
ROWS = [
    "teacher, full network, fp32 (PyTorch)",
    "student, full network, fp32 (PyTorch)",
    "student, early exit, fp32 (PyTorch)",
    "student, early exit, fp32 (ONNX Runtime)",
    "student, early exit, int8 (ONNX Runtime)",
]


def test_deploy_table_rows_are_measured_and_consistent(
    tiny_run, tmp_path: Path, capsys, one_thread
) -> None:
    out = tmp_path / "deploy.json"
    argv = ["bench", str(tiny_run["student_erde"]), "--deploy", "--teacher", str(tiny_run["teacher"]),
            "--batch-sizes", "1,64", "--images", "64", "--repeats", "1", "--min-time", "0",
            "--json", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert list(rows) == ROWS
    teacher, full, early = (rows[n] for n in ROWS[:3])
    assert teacher["speedup_1"] == pytest.approx(1.0) and teacher["mac_ideal_speedup"] == 1.0
    assert full["mac_ideal_speedup"] == pytest.approx(teacher["mean_macs"] / full["mean_macs"])
    assert early["mean_macs"] <= full["mean_macs"]  # early exit never costs more
    # PyTorch and ONNX Runtime route the same fp32 model with the same thresholds
    assert rows[ROWS[3]]["accuracy"] == pytest.approx(early["accuracy"], abs=0.01)
    for r in rows.values():
        assert 0 <= r["accuracy"] <= 1 and r["ips_1"] > 0 and r["ips_64"] > 0
    assert "| student, early exit, int8 (ONNX Runtime) |" in capsys.readouterr().out


def test_deploy_without_a_teacher_is_one_line(tiny_run, capsys) -> None:
    assert main(["bench", str(tiny_run["student_erde"]), "--deploy"]) == 2
    err = capsys.readouterr().err
    assert "give both --deploy and --teacher" in err and len(err.strip().splitlines()) == 1
    argv = ["bench", str(tiny_run["student_erde"]), "--deploy", "--teacher",
            str(tiny_run["student_ce"])]  # fmt: skip
    assert main(argv) == 2
    assert "is not a teacher checkpoint" in capsys.readouterr().err


def test_deploy_benchmark_script_prints_the_targets(tiny_run, capsys, one_thread) -> None:
    spec = importlib.util.spec_from_file_location("deploy_bench", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--teacher", str(tiny_run["teacher"]), "--student", str(tiny_run["student_erde"]),
            "--batch-sizes", "32", "--images", "32", "--repeats", "1", "--min-time", "0"]  # fmt: skip
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "measured / MAC-ideal =" in out and "int8 vs fp32 early exit @32" in out
