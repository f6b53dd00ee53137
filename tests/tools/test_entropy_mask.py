"""benchmarks/entropy_mask.py: ERDE students per entropy mask, paired by seed, on real runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark, tiny_config

from erde.checkpoints import load_checkpoint
from erde.training import Job, train


@pytest.fixture(scope="module")
def teachers(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The session's seed-0 teacher and a seed-1 one: two seeds to pair."""
    other = train(tiny_config("seed=1"), Job("teacher"), tmp_path_factory.mktemp("t1"),
                  progress=False)  # fmt: skip
    return [tiny_run["teacher"], other]


def test_each_setting_trains_from_the_same_teachers_and_is_compared_with_the_default_by_seed(
    teachers: list[Path], tmp_path: Path, one_thread, capsys
) -> None:
    script = load_benchmark("entropy_mask")
    out = tmp_path / "mask"
    argv = ["--teachers", *map(str, teachers), "--values", "0.3", "--out", str(out),
            "--no-progress", "--set", "student_train.max_steps_per_epoch=2"]  # fmt: skip
    assert script.main(argv) == 0

    for seed in (0, 1):
        saved = {
            name: load_checkpoint(out / f"seed_{seed}" / name)["config"]
            for name in ("erde", "erde_u0.3")
        }
        assert saved["erde"]["distill"]["uncertain_above"] is None  # the default always runs
        assert saved["erde_u0.3"]["distill"]["uncertain_above"] == 0.3
        assert saved["erde"]["seed"] == saved["erde_u0.3"]["seed"] == seed  # the teacher's seed
        assert saved["erde"]["student_train"]["max_steps_per_epoch"] == 2  # --set applies

    record = json.loads((out / "entropy_mask.json").read_text())
    assert [r["setting"] for r in record["rows"]] == ["erde", "erde_u0.3"]
    default, setting = record["rows"]
    assert default["diff_vs_default"] == [0.0] * len(default["diff_vs_default"])
    reports = [
        json.loads((out / f"seed_{s}" / "report" / "report.json").read_text()) for s in (0, 1)
    ]
    # h = 0: every image reaches the last exit, so the first difference is the last exits'
    last = [r["models"]["erde_u0.3"]["exit_accuracy"][-1] - r["models"]["erde"]["exit_accuracy"][-1]
            for r in reports]  # fmt: skip
    assert setting["diff_vs_default"][0] == pytest.approx(sum(last) / 2)
    assert setting["seeds_ahead"][0] == sum(d > 0 for d in last)
    ece = [r["models"]["erde_u0.3"]["exit_ece"][-1] for r in reports]
    assert setting["exit_ece"][-1][0] == pytest.approx(sum(ece) / 2)  # last exit, mean over seeds
    table = (out / "entropy_mask.md").read_text()
    assert "| erde_u0.3 |" in table and "2 seed(s)" in table and "ECE per exit (%)" in table
    assert table in capsys.readouterr().out

    before = (out / "seed_1" / "erde_u0.3" / "checkpoint.pt").stat().st_mtime_ns
    assert script.main(argv) == 0  # finished students are reused
    assert (out / "seed_1" / "erde_u0.3" / "checkpoint.pt").stat().st_mtime_ns == before


@pytest.mark.parametrize("value", ["1", "0", "half"])
def test_a_value_outside_0_1_is_refused_before_anything_trains(
    teachers: list[Path], tmp_path: Path, value: str, capsys
) -> None:
    script = load_benchmark("entropy_mask")
    with pytest.raises(SystemExit) as stop:
        script.main(
            ["--teachers", str(teachers[0]), "--values", value, "--out", str(tmp_path / "o")]
        )
    assert stop.value.code == 2
    assert "(0, 1)" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
