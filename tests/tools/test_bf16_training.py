"""benchmarks/bf16_training.py on tiny digits models: two precisions per seed, paired, resumable."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from helpers import TINY_OVERRIDES, load_benchmark


def _script():
    return load_benchmark("bf16_training")


def test_each_seed_trains_in_both_precisions_and_the_difference_is_paired(
    tmp_path: Path, one_thread
) -> None:
    out = tmp_path / "bf16"
    argv = ["--seeds", "2", "--out", str(out), "--no-progress",
            *[a for o in TINY_OVERRIDES for a in ("--set", o)]]  # fmt: skip
    script = _script()
    assert script.main(argv) == 0

    record = json.loads((out / "bf16_training.json").read_text())
    summary = record["summary"]
    for precision, amp in (("fp32", "amp: false"), ("bf16", "amp: true")):
        for seed in (0, 1):
            run = out / precision / f"seed_{seed}"
            assert amp in (run / "config.yaml").read_text()
            assert len(record["accuracy"][precision][str(seed)]) == 3  # resnet8: 3 exits
    last = {p: [record["accuracy"][p][s][-1] for s in ("0", "1")] for p in ("fp32", "bf16")}
    diffs = [b - f for b, f in zip(last["bf16"], last["fp32"], strict=True)]
    assert summary["diff_per_seed"] == pytest.approx(diffs)
    assert summary["diff_mean"] == pytest.approx(statistics.fmean(diffs))
    assert summary["std"]["fp32"] == pytest.approx(statistics.stdev(last["fp32"]))
    table = (out / "bf16_training.md").read_text()
    assert "fp32 against bf16 autocast training" in table and "| 1 |" in table

    mtime = (out / "bf16" / "seed_1" / "checkpoint.pt").stat().st_mtime_ns
    assert script.main(argv) == 0  # finished runs are reused, not retrained
    assert (out / "bf16" / "seed_1" / "checkpoint.pt").stat().st_mtime_ns == mtime


def test_one_seed_is_refused_since_seed_noise_is_the_yardstick(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        _script().main(["--seeds", "1", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert not any(tmp_path.iterdir())
