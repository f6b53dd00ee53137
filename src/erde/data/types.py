"""Plain containers passed between loaders, splitting, batching and training."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erde.errors import DataError


@dataclass
class ImageSet:
    """Images kept as uint8 so a whole data set fits in memory and moves cheaply to a device."""

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"ImageSet.images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise DataError(
                f"ImageSet.labels must be int64 (N,), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ImageSet:
        """Pick samples by index (used for validation carving and subsampling)."""
        return ImageSet(self.images[indices], self.labels[indices])


@dataclass(frozen=True)
class AugmentSpec:
    """Train-time augmentation; the defaults mean "none"."""

    crop_padding: int = 0  # pixels of padding for random crop; 0 = no crop
    flip: bool = False  # random horizontal flip
    crop_padding_mode: str = "zeros"  # what fills the padding: zeros | reflect (mirrored edge)


@dataclass
class RawData:
    """What a dataset factory in ``DATASETS`` returns: official train/test before splitting."""

    train: ImageSet
    test: ImageSet
    class_names: list[str]
    augment: AugmentSpec


@dataclass
class DataSplits:
    """Everything training and evaluation need to know about one data set."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    augment: AugmentSpec

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image, the model's input shape."""
        c, h, w = self.train.images.shape[1:]
        return (int(c), int(h), int(w))
