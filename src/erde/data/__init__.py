"""Data sets in their official formats, validation carving and batched, on-device batches.

``load_data`` returns :class:`DataSplits`: uint8 train / val / test images, the
train-set channel statistics and the augmentation the data set calls for.
``iterate_batches`` slices uint8 batches (on the device the data lives on) and
``prepare_batch`` augments and normalises a whole batch at once.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from erde.data import imagefolder as _imagefolder  # noqa: F401  (registers "imagefolder")
from erde.data.augment import AugmentDraws, apply_augment, augment, normalize
from erde.data.formats import DATASETS
from erde.data.sampling import stratified_split
from erde.data.splits import split_raw
from erde.data.tensors import splits_from_tensors
from erde.data.types import AugmentSpec, DataSplits, ImageSet, RawData
from erde.errors import DataError

if TYPE_CHECKING:  # read for its data section only
    from erde.config import ExperimentConfig


def load_data(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    seed: int = 0,
    image_size: int | None = None,
    max_train: int | None = None,
) -> DataSplits:
    """Load ``name`` and hold out ``val_fraction`` of train (stratified, fixed by ``seed``).

    The test set is never touched by the split. Mean and std are computed on
    the remaining training images only.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS.names())}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_train is not None and max_train < 1:
        raise DataError(f"max_train must be a positive number of images, got {max_train}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")
    raw: RawData = DATASETS.build(name, data_dir, image_size)
    return split_raw(name, raw, val_fraction=val_fraction, seed=seed, max_train=max_train)


def load_splits(cfg: ExperimentConfig) -> DataSplits:
    """The data set of an experiment config (its ``data`` section), augmentation included.

    ``data.crop_padding`` replaces the data set's own crop padding and
    ``data.crop_padding_mode`` says what fills it; the split seed is
    ``data.split_seed`` or else the experiment's seed.
    """
    d = cfg.data
    splits = load_data(
        d.name,
        d.data_dir,
        val_fraction=d.val_fraction,
        seed=cfg.seed if d.split_seed is None else d.split_seed,
        image_size=d.image_size,
        max_train=d.max_train,
    )
    if d.crop_padding is not None:
        splits.augment = dataclasses.replace(splits.augment, crop_padding=d.crop_padding)
    if d.crop_padding_mode != splits.augment.crop_padding_mode:
        side = min(splits.train.images.shape[-2:])
        if d.crop_padding_mode == "reflect" and splits.augment.crop_padding >= side:
            raise DataError(
                f"data.crop_padding_mode reflect needs crop_padding < the image side ({side} "
                f"pixels), got crop_padding {splits.augment.crop_padding}"
            )
        splits.augment = dataclasses.replace(splits.augment, crop_padding_mode=d.crop_padding_mode)
    return splits


def to_device(data: ImageSet, device: torch.device | str) -> ImageSet:
    """The same uint8 set on ``device`` (a few hundred MB at most for CIFAR-sized data)."""
    return ImageSet(data.images.to(device), data.labels.to(device))


def iterate_batches(
    data: ImageSet,
    batch_size: int,
    *,
    shuffle: bool = False,
    drop_last: bool = False,
    device: torch.device | str | None = None,
    indices: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (uint8 images (B, C, H, W), labels (B,)) on ``device``.

    ``indices`` fixes the order (e.g. a rank's shard); otherwise ``shuffle``
    draws one from ``generator``. Indexing happens where the data lives, so
    data already on the GPU never goes through the host.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if indices is None:
        indices = torch.randperm(len(data), generator=generator) if shuffle else None
    n = len(data) if indices is None else len(indices)
    stop = n - n % batch_size if drop_last else n
    where = data.images.device
    if indices is not None:
        indices = indices.to(where)
    for start in range(0, stop, batch_size):
        if indices is None:
            images = data.images[start : start + batch_size]
            labels = data.labels[start : start + batch_size]
        else:
            idx = indices[start : start + batch_size]
            images, labels = data.images[idx], data.labels[idx]
        if device is not None:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
        yield images, labels


def prepare_batch(
    images: torch.Tensor,
    splits: DataSplits,
    *,
    train: bool,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    draws: AugmentDraws | None = None,
) -> torch.Tensor:
    """uint8 batch -> augmented (when ``train``) and normalised float batch, on its device.

    The augmentation's random numbers come from ``draws`` (already on the device) when
    given, else from ``generator``.
    """
    if train:
        if draws is not None:
            images = apply_augment(images, splits.augment, draws)
        else:
            images = augment(images, splits.augment, generator)
    return normalize(images, splits.mean, splits.std, dtype)


__all__ = [
    "load_splits",
    "DATASETS",
    "AugmentSpec",
    "DataSplits",
    "ImageSet",
    "RawData",
    "iterate_batches",
    "load_data",
    "prepare_batch",
    "split_raw",
    "splits_from_tensors",
    "stratified_split",
    "to_device",
]
