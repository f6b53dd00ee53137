"""benchmarks/recipe_ablation.py on tiny official-format files: variants train, resume, tabulate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import write_imagefolder, write_svhn
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


def test_the_speed_schedule_has_its_own_switches_and_a_wrong_name_is_refused(
    tmp_path: Path, capsys
) -> None:
    script = _script()
    write_imagefolder(tmp_path / "images")  # a CIFAR-10 copy in ImageFolder form, as DATA
    args = script.argparse.Namespace(schedule="speed", epochs=3, seed=1, overrides=[],
                                     dataset="cifar10", data_dir=str(tmp_path / "images"))  # fmt: skip
    shipped = script.variant_config(args, "speed")
    assert shipped.teacher.arch == "fastnet" and shipped.teacher_train.whiten_init
    changed = {
        "no_whiten": lambda c: not c.teacher_train.whiten_init,
        "no_lookahead": lambda c: not c.teacher_train.lookahead,
        "random_flip": lambda c: not c.data.alternating_flip,
        "bias_lr_1": lambda c: c.teacher_train.norm_bias_lr_scale == 1,
        "exits_1": lambda c: list(c.teacher_train.exit_weights) == [1, 1, 1],
    }
    assert set(changed) | {"speed"} == set(script.SPEED_VARIANTS)
    for name, check in changed.items():
        cfg = script.variant_config(args, name)
        assert check(cfg) and not check(shipped), name
        assert cfg.teacher_train.epochs == 3 and cfg.seed == 1

    with pytest.raises(SystemExit) as exc:
        script.main(["--schedule", "speed", "--data-dir", str(tmp_path), "--out",
                     str(tmp_path / "o"), "--variants", "linear"])  # fmt: skip
    assert exc.value.code == 2
    assert "no variant linear in the speed schedule" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
