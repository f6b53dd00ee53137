"""A user's own images, given as arrays, turned into the splits every erde call takes.

The built-in data sets come from files (``load_data``); this is the same
result from tensors already in memory, so a model can be trained, evaluated
and calibrated on any labelled images from Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from erde.data.splits import split_raw
from erde.data.types import AugmentSpec, DataSplits, ImageSet, RawData
from erde.errors import DataError
from erde.limits import MAX_CLASSES


def _images(value: Any, what: str) -> torch.Tensor:
    """uint8 (N, C, H, W) as a CPU tensor, or one DataError saying what was wrong."""
    images = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    if images.dim() != 4:
        raise DataError(f"{what} must be (N, C, H, W), got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise DataError(
            f"{what} must be uint8 pixels in [0, 255], got {images.dtype}; for floats in [0, 1] "
            "pass (x * 255).round().clamp(0, 255).to(torch.uint8)"
        )
    if images.shape[0] == 0:
        raise DataError(f"{what} holds no images")
    if images.shape[1] != 3:
        raise DataError(
            f"{what} has {images.shape[1]} channel(s); erde's models take RGB (N, 3, H, W): "
            "repeat a greyscale channel with x.expand(-1, 3, -1, -1)"
        )
    return images.detach().cpu().contiguous()


def _labels(value: Any, count: int, what: str) -> torch.Tensor:
    """int64 (N,) class indices, as many as there are images."""
    labels = torch.from_numpy(np.asarray(value)) if not isinstance(value, torch.Tensor) else value
    if labels.dim() != 1 or labels.shape[0] != count:
        raise DataError(
            f"{what} must be one class index per image ({count},), got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise DataError(f"{what} must be integer class indices, got {labels.dtype}")
    labels = labels.detach().cpu().to(torch.int64)
    if int(labels.min()) < 0:
        raise DataError(f"{what} holds a negative class index ({int(labels.min())})")
    return labels


def splits_from_tensors(
    train_images: Any,
    train_labels: Any,
    test_images: Any,
    test_labels: Any,
    *,
    class_names: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: AugmentSpec | None = None,
    name: str = "tensors",
    max_train: int | None = None,
) -> DataSplits:
    """Train/val/test splits from in-memory images, as :func:`erde.data.load_data` gives for files.

    Images are uint8 pixels (N, C, H, W) (torch tensors or numpy arrays), labels
    integer class indices (N,). ``val_fraction`` of the training images is held
    out, stratified and fixed by ``seed``, for calibration; the test images are
    only ever used for reporting. ``augment`` defaults to none (pass
    ``AugmentSpec(crop_padding=4, flip=True)`` for CIFAR-like photos).

    >>> import torch
    >>> x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    >>> y = torch.arange(40) % 4
    >>> splits = splits_from_tensors(x, y, x[:8], y[:8], val_fraction=0.25)
    >>> len(splits.train), len(splits.val), len(splits.test), splits.num_classes
    (28, 12, 8, 4)
    """
    train_x = _images(train_images, "train_images")
    test_x = _images(test_images, "test_images")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"train images are {tuple(train_x.shape[1:])} (C, H, W) but test images are "
            f"{tuple(test_x.shape[1:])}"
        )
    train_y = _labels(train_labels, len(train_x), "train_labels")
    test_y = _labels(test_labels, len(test_x), "test_labels")
    largest = int(max(train_y.max(), test_y.max()))
    if largest >= MAX_CLASSES:  # before a name is made per class: a stray 10**12 would hang
        raise DataError(
            f"labels go up to {largest}; at most {MAX_CLASSES:,} classes (labels 0 ... "
            f"{MAX_CLASSES - 1})"
        )
    if isinstance(class_names, (str, bytes)):
        raise DataError(f"class_names must be a list of names, got one string {class_names[:40]!r}")
    if class_names is None:
        class_names = [str(k) for k in range(largest + 1)]
    elif len(class_names) > MAX_CLASSES:
        raise DataError(f"{len(class_names):,} class names; at most {MAX_CLASSES:,} classes")
    class_names = [str(c) for c in class_names]
    if largest >= len(class_names):
        raise DataError(f"labels go up to {largest} but there are {len(class_names)} class names")
    if len(class_names) < 2:
        raise DataError("an early-exit classifier needs at least 2 classes")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    raw = RawData(
        train=ImageSet(train_x, train_y),
        test=ImageSet(test_x, test_y),
        class_names=class_names,
        augment=augment or AugmentSpec(),
    )
    return split_raw(name, raw, val_fraction=val_fraction, seed=seed, max_train=max_train)
