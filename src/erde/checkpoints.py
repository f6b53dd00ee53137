"""Checkpoints: plain dicts of tensors and primitives, saved atomically, loaded with weights_only.

A checkpoint carries everything needed to rebuild its model (architecture,
classes, input shape, normalisation) and the full config that produced it, so
a checkpoint found on disk is self-describing and never executes code on load.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from erde.config import ModelConfig
from erde.errors import CheckpointError
from erde.io import atomic_torch_save

FORMAT = "erde-checkpoint"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "name", "model_config", "num_classes", "image_shape", "model")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a crash mid-write leaves the previous good checkpoint in place."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check a checkpoint; any problem is one ``CheckpointError``."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle refusing a foreign class, random bytes ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable erde checkpoint ({first[:200]})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an erde checkpoint (no '{FORMAT}' marker)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}")
    if ckpt["version"] > VERSION:
        raise CheckpointError(
            f"{path} has format version {ckpt['version']}; this erde reads <= {VERSION}"
        )
    ckpt["path"] = str(path)
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> torch.nn.Module:
    """Rebuild the early-exit model a checkpoint describes and load its weights."""
    from erde.models import build_model

    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    mcfg = {k: v for k, v in ckpt["model_config"].items() if k in fields}
    model = build_model(num_classes=int(ckpt["num_classes"]), **mcfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{ckpt.get('path', 'checkpoint')}: weights do not fit the model: {exc}"
        ) from None
    return model


def check_compatible(
    ckpt: dict[str, Any], num_classes: int, image_shape: tuple[int, ...], what: str
) -> None:
    """Refuse a checkpoint trained for another number of classes or input shape."""
    where = ckpt.get("path", "checkpoint")
    if int(ckpt["num_classes"]) != num_classes:
        raise CheckpointError(
            f"{what} {where} was trained for {ckpt['num_classes']} classes "
            f"but the data set has {num_classes}"
        )
    if tuple(ckpt["image_shape"])[0] != image_shape[0]:
        raise CheckpointError(
            f"{what} {where} expects {ckpt['image_shape'][0]}-channel images, the data has {image_shape[0]}"
        )
