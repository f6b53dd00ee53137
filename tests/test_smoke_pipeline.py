"""The tiny pipeline fixture itself: four models trained and reported."""

import json


def test_tiny_run_reports_four_models(tiny_run) -> None:
    report = json.loads(tiny_run["report"].read_text())
    assert set(report["models"]) == {"teacher", "student_ce", "student_kd", "student_erde"}
    for name in report["models"]:
        assert tiny_run[name].is_file()
