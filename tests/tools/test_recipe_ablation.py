"""benchmarks/recipe_ablation.py on tiny official-format files: variants train, resume, tabulate."""

from __future__ import annotations

import json
from pathlib import Path

from data_fixtures import write_svhn
from helpers import TINY_OVERRIDES, load_benchmark

TINY = [
    *(o for o in TINY_OVERRIDES if o.split("=")[0] not in ("data.name", "data.image_size")),
    "data.image_size=16",
    "data.batch_size=32",
    "teacher_train.max_steps_per_epoch=2",
]


def _script():
    return load_benchmark("recipe_ablation")


def test_two_variants_give_a_table_of_validation_accuracies_and_rerun_reuses_them(
    tmp_path: Path, monkeypatch, one_thread
) -> None:
    monkeypatch.setenv("ERDE_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "svhn"
    write_svhn(data, n_train=80, n_test=20)
    out = tmp_path / "ablation"
    argv = ["--dataset", "svhn", "--data-dir", str(data), "--out", str(out), "--epochs", "2",
            "--variants", "fast", "linear", "--no-progress",
            *[a for o in TINY for a in ("--set", o)]]  # fmt: skip
    script = _script()
    assert script.main(argv) == 0

    record = json.loads((out / "ablation.json").read_text())
    assert [r["variant"] for r in record["rows"]] == ["fast", "linear"]
    for r in record["rows"]:
        history = [json.loads(x) for x in (out / r["variant"] / "metrics.jsonl").open()]
        assert r["epochs"] == 2 == len(history)
        assert r["val_exit_accuracy"] == history[-1]["val_exit_accuracy"]
    saved = (out / "linear" / "config.yaml").read_text()
    assert "schedule: linear" in saved and "epochs: 2" in saved
    table = (out / "ablation.md").read_text()
    assert "| linear |" in table and "after 2 epochs" in table

    mtime = (out / "fast" / "checkpoint.pt").stat().st_mtime_ns
    assert script.main(argv) == 0  # finished variants are reused, not retrained
    assert (out / "fast" / "checkpoint.pt").stat().st_mtime_ns == mtime
