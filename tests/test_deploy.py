"""The deployment table on the tiny trained pipeline: every row measured, bad calls refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark

from erde.cli import main

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
    script = load_benchmark("deploy")
    argv = ["--teacher", str(tiny_run["teacher"]), "--student", str(tiny_run["student_erde"]),
            "--batch-sizes", "32", "--images", "32", "--repeats", "1", "--min-time", "0"]  # fmt: skip
    assert script.main(argv) == 0
    out = capsys.readouterr().out
    assert "measured / MAC-ideal =" in out and "int8 vs fp32 early exit @32" in out


def test_a_missed_ratio_is_split_into_the_smaller_network_and_early_exit() -> None:
    script = load_benchmark("deploy")
    row = lambda name, speedup, ideal: {  # noqa: E731
        "row": name, "accuracy": 0.9, "speedup_1": speedup, "mac_ideal_speedup": ideal,
        "ips_1": 100 * speedup,
    }  # fmt: skip
    result = {
        "setup": {"batch_sizes": [1]},
        "rows": [row(ROWS[0], 1.0, 1.0), row(ROWS[1], 3.0, 12.0), row(ROWS[2], 4.5, 24.0)],
    }
    lines = script.targets(result)
    assert lines[0].endswith("= 0.19 (misses >= 0.9)")  # 4.5 / 24
    # 0.25 of the MAC ratio for the smaller network (3x for 12x), 0.75 for early exit (1.5x for 2x)
    assert lines[1] == (
        "  bound: the smaller network turns 0.25 of its MAC ratio into time (3.00x for 12.00x "
        "fewer MACs), early exit 0.75 of its own (1.50x for 2.00x fewer MACs)"
    )


def test_the_deployment_table_says_when_the_full_network_serves_faster() -> None:
    from erde.inference.deployment import serving_advice
    from erde.report.deployment import render_table

    rows = [
        {"row": ROWS[0], "accuracy": 0.9, "mean_macs": 4e6, "ips_1": 100.0, "ips_256": 900.0},
        {"row": ROWS[1], "accuracy": 0.9, "mean_macs": 1e6, "ips_1": 300.0, "ips_256": 4000.0},
        {"row": ROWS[2], "accuracy": 0.9, "mean_macs": 5e5, "ips_1": 450.0, "ips_256": 2500.0},
    ]
    for r in rows:
        r.update(speedup_1=1.0, speedup_256=1.0, mac_ideal_speedup=1.0)
    assert serving_advice(rows, 1) is None
    advice = serving_advice(rows, 256)
    assert advice.startswith("at batch 256 the student's full network without exits is faster")
    assert "(4000 img/s)" in advice and "serve it without routing" in advice
    table = render_table({"rows": rows, "setup": {"batch_sizes": [1, 256]}, "advice": [advice]})
    assert table[-1] == f"Note: {advice}."
