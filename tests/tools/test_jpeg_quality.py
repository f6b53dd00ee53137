"""benchmarks/jpeg_quality.py on a tiny image folder: re-encodes, trains, tabulates, reuses."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import write_imagefolder
from helpers import load_benchmark
from PIL import Image, JpegImagePlugin

TINY = [
    "data.batch_size=16",
    "teacher.width=0.125",
    "teacher_train.epochs=1",
    "teacher_train.max_steps_per_epoch=2",
    "teacher_train.warmup_epochs=0",
]


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    write_imagefolder(root, per_class=(12, 4), size=16)
    return root


def test_each_quality_is_a_reencoded_copy_trained_and_tabulated_against_the_copy(
    folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    monkeypatch.setenv("ERDE_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "jpeg"
    argv = ["--data-dir", str(folder), "--out", str(out), "--qualities", "40", "--seeds", "1",
            "--no-progress", *[a for o in TINY for a in ("--set", o)]]  # fmt: skip
    script = load_benchmark("jpeg_quality")
    assert script.main(argv) == 0

    source = sorted(p.relative_to(folder) for p in folder.glob("*/*/*.*"))
    copy = out / "data-q40"
    written = sorted(p.relative_to(copy) for p in copy.rglob("*.jpg"))
    assert written == [p.with_suffix(".jpg") for p in source]  # every image, same place
    sample = Image.open(copy / written[0])
    assert JpegImagePlugin.get_sampling(sample) == 2  # 4:2:0 like the CIFAR-10 copy

    record = json.loads((out / "jpeg_quality.json").read_text())
    rows = {r["version"]: r for r in record["rows"]}
    assert set(rows) == {"copy", "40"}
    assert rows["copy"]["psnr_db"] is None and rows["copy"]["last_exit_vs_copy"] is None
    assert 10 < rows["40"]["psnr_db"] < 60  # the random-pixel PNGs lose a lot, not everything
    for version in ("copy", "40"):
        accuracy = record["results"][version]["accuracy"]["0"]
        assert rows[version]["mean"] == pytest.approx(accuracy)
        assert all(0 <= a <= 1 for a in accuracy)
    diff = (
        record["results"]["40"]["accuracy"]["0"][-1]
        - record["results"]["copy"]["accuracy"]["0"][-1]
    )
    assert rows["40"]["last_exit_vs_copy"] == pytest.approx(diff)
    table = (out / "jpeg_quality.md").read_text()
    assert "| copy + quality 40 |" in table and "fastnet x0.125" in table

    stamp = (out / "copy-seed0" / "checkpoint.pt").stat().st_mtime_ns
    pixels = np.asarray(Image.open(copy / written[0]))
    assert script.main(argv) == 0  # runs and the re-encoded copy are reused
    assert (out / "copy-seed0" / "checkpoint.pt").stat().st_mtime_ns == stamp
    assert np.array_equal(np.asarray(Image.open(copy / written[0])), pixels)


def test_a_quality_outside_1_to_95_is_refused_before_any_work(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = load_benchmark("jpeg_quality")
    with pytest.raises(SystemExit) as exc:
        script.main(["--data-dir", str(folder), "--out", str(tmp_path / "o"), "--qualities", "100"])
    assert exc.value.code == 2
    assert "--qualities must lie in 1-95" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
