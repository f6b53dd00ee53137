"""Official train/test sets -> train/val/test splits, the same way for every source."""

from __future__ import annotations

from erde.data.augment import channel_stats
from erde.data.sampling import random_subset, stratified_split
from erde.data.types import DataSplits, RawData
from erde.errors import DataError


def split_raw(
    name: str, raw: RawData, *, val_fraction: float, seed: int, max_train: int | None = None
) -> DataSplits:
    """Official train/test -> train/val/test splits with the training set's channel statistics."""
    train_idx, val_idx = stratified_split(raw.train.labels, val_fraction, seed)
    train, val = raw.train.subset(train_idx), raw.train.subset(val_idx)
    if max_train is not None and max_train < len(train):
        train = train.subset(random_subset(len(train), max_train, seed))
    if len(train) == 0:
        raise DataError(f"{name}: no training images left after holding out validation")
    mean, std = channel_stats(train.images)
    return DataSplits(
        name=name,
        train=train,
        val=val,
        test=raw.test,
        num_classes=len(raw.class_names),
        class_names=list(raw.class_names),
        mean=mean,
        std=std,
        augment=raw.augment,
    )
