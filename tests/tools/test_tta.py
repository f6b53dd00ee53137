"""benchmarks/tta.py: test-time augmentation levels, against erde's own evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

from erde.checkpoints import load_checkpoint, model_from_checkpoint
from erde.config import config_from_dict
from erde.data import load_splits


def test_level_0_is_erdes_test_accuracy_and_the_levels_are_written(
    tiny_run, tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None
) -> None:
    tta = load_benchmark("tta")
    out = tmp_path / "tta.json"
    assert tta.main([str(tiny_run["teacher"]), "--device", "cpu", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    report = json.loads(tiny_run["report"].read_text())
    expected = report["models"]["teacher"]["exit_accuracy"]
    levels = record["accuracy_by_level"]
    assert levels["0"] == pytest.approx(expected, abs=1e-9)  # one view: what erde evaluate says
    assert len(levels["1"]) == len(levels["2"]) == len(expected)
    assert "level 2 (mirror and two 1-pixel shifts)" in capsys.readouterr().out


def test_the_views_are_the_mirror_and_the_shifted_images(tiny_run) -> None:
    """A probe model that returns its input's pixels: level 1 and 2 are the described means."""
    tta = load_benchmark("tta")

    class Pixels(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, C, H, W) -> [(B, C*H*W)]
            return [x.flatten(1)]

    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    (level1,) = tta.mirrored(Pixels())(x)
    torch.testing.assert_close(level1, 0.5 * (x + x.flip(3)).flatten(1))
    (level2,) = tta.translated(Pixels())(x)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    up_left, down_right = padded[:, :, :4, :4], padded[:, :, 2:, 2:]
    mean = lambda v: 0.5 * (v + v.flip(3))  # noqa: E731
    want = 0.5 * mean(x) + 0.25 * (mean(up_left) + mean(down_right))
    torch.testing.assert_close(level2, want.flatten(1))
    ckpt = load_checkpoint(tiny_run["teacher"])
    splits = load_splits(config_from_dict(ckpt["config"]))
    acc = tta.tta_accuracy(
        model_from_checkpoint(ckpt).eval(), splits.test, splits, torch.device("cpu")
    )
    assert set(acc) == {0, 1, 2} and all(0.0 <= a <= 1.0 for a in acc[2])
