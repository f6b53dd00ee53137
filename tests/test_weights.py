"""The trained models shipped in weights/: each loads, is a finished release, and is the file
weights/README.md describes (its SHA-256 there), with the config it was trained with beside it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import yaml

from erde.checkpoints import RESUME_ONLY_KEYS, load_checkpoint, model_from_checkpoint

WEIGHTS = Path(__file__).resolve().parents[1] / "weights"
SHIPPED = sorted(WEIGHTS.glob("*/checkpoint.pt"))


def test_every_shipped_folder_has_its_checkpoint() -> None:
    folders = sorted(p for p in WEIGHTS.iterdir() if p.is_dir()) if WEIGHTS.is_dir() else []
    assert [f / "checkpoint.pt" for f in folders] == SHIPPED


@pytest.mark.parametrize("path", SHIPPED, ids=[p.parent.name for p in SHIPPED])
def test_a_shipped_model_loads_and_is_the_one_documented(path: Path) -> None:
    ckpt = load_checkpoint(path)
    assert ckpt["finished"] and not set(RESUME_ONLY_KEYS) & set(ckpt)
    assert yaml.safe_load((path.parent / "config.yaml").read_text()) == ckpt["config"]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    readme = (WEIGHTS / "README.md").read_text()
    assert f"`{path.parent.name}/checkpoint.pt`" in readme and digest in readme
    model = model_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        logits = model(torch.zeros(2, *ckpt["image_shape"]))
    assert [t.shape for t in logits] == [(2, ckpt["num_classes"])] * model.num_exits
