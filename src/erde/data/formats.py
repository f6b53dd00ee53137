"""Loaders for the built-in data sets, each registered in ``DATASETS``.

A factory takes ``(data_dir, image_size)`` and returns the official train and test
sets as ``RawData``; validation carving and statistics happen in ``load_data``.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from erde.data.safety import cache_dir, load_pickle_file, safe_extract_folder
from erde.data.sampling import stratified_split
from erde.data.types import AugmentSpec, ImageSet, RawData
from erde.errors import DataError
from erde.registry import Registry

DATASETS: Registry[RawData] = Registry("dataset")

DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 1797  # constant so the digits test set never changes with --seed
DIGITS_DEFAULT_SIZE = 16
_RESIZE_CHUNK = 4096

CIFAR10_NAMES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def resize_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of uint8 (N, C, H, W) to (N, C, size, size), in chunks to bound memory."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    antialias = size < max(h, w)  # avoid aliasing when shrinking
    out = images.new_empty((n, c, size, size))  # (N, C, S, S)
    for start in range(0, n, _RESIZE_CHUNK):
        chunk = images[start : start + _RESIZE_CHUNK].float()
        resized = F.interpolate(
            chunk, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias
        )
        out[start : start + _RESIZE_CHUNK] = resized.round_().clamp_(0, 255).to(torch.uint8)
    return out


def integer_labels(values: Any, source: str) -> np.ndarray:
    """Labels as int64, refusing text, booleans and fractional numbers instead of truncating them."""
    try:
        labels = np.asarray(values)
    except (ValueError, TypeError) as exc:  # ragged nested lists
        raise DataError(f"{source}: labels must be integer class indices ({exc})") from None
    kind = labels.dtype.kind
    if kind == "f" and np.isfinite(labels).all() and (labels == np.round(labels)).all():
        kind = "i"  # e.g. MATLAB stores labels as doubles
    if kind not in "iu":
        raise DataError(
            f"{source}: labels must be integer class indices, got {labels.dtype} values "
            f"such as {labels.reshape(-1)[:3].tolist()}"
        )
    return labels.astype(np.int64)


def make_image_set(
    images: np.ndarray, labels: np.ndarray, num_classes: int, source: str
) -> ImageSet:
    """Wrap numpy (N, C, H, W) uint8 + labels, checking labels fit ``num_classes``."""
    labels = integer_labels(labels, source).reshape(-1)
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{source}: labels must lie in 0..{num_classes - 1}, "
            f"found {labels.min()}..{labels.max()}"
        )
    return ImageSet(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels))


def require_data_dir(data_dir: str | os.PathLike | None, what: str, expected: str) -> Path:
    """Data sets other than digits need a folder; say exactly what should be in it."""
    if data_dir is None:
        data_dir = os.environ.get("ERDE_DATA_DIR")
    if data_dir is None:
        raise DataError(
            f"{what} needs a data directory (data_dir / --data-dir, or env ERDE_DATA_DIR) "
            f"containing {expected}"
        )
    return Path(data_dir).expanduser()


def _check_image_size(image_size: int | None) -> None:
    if image_size is not None and image_size < 1:
        raise DataError(f"image_size must be a positive number of pixels, got {image_size}")


# --- digits -------------------------------------------------------------------------------


@DATASETS.register("digits")
def load_digits_raw(
    data_dir: str | os.PathLike | None = None, image_size: int | None = None
) -> RawData:
    """scikit-learn's 1,797 8x8 digits: real data that needs no download (data_dir ignored)."""
    from sklearn.datasets import load_digits

    _check_image_size(image_size)
    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1)  # (N, 1, 8, 8)
    images = resize_batch(images, image_size or DIGITS_DEFAULT_SIZE)
    images = images.expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S) grey as RGB
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    full = ImageSet(images, labels)
    train_idx, test_idx = stratified_split(labels, DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
    return RawData(
        train=full.subset(train_idx),
        test=full.subset(test_idx),
        class_names=[str(i) for i in range(10)],
        augment=AugmentSpec(crop_padding=2, flip=False),  # flipping changes digit identity
    )


# --- CIFAR --------------------------------------------------------------------------------


@dataclass(frozen=True)
class CifarLayout:
    """File names of one official CIFAR python release."""

    display: str
    folder: str
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    files_text: str

    def not_found(self, root: Path) -> DataError:
        copy = (root / "train").is_dir() and (root / "test").is_dir()
        return DataError(
            f"{self.display} not found in {root}: expected {self.folder}/{self.files_text}, "
            f"or {self.archive}"
            + ("; it holds train/ and test/ folders: an ImageFolder copy is read with "
               "data.name = imagefolder" if copy else "")
        )  # fmt: skip


CIFAR10 = CifarLayout(
    display="CIFAR-10",
    folder="cifar-10-batches-py",
    archive="cifar-10-python.tar.gz",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    files_text="data_batch_1..5 and test_batch (+ batches.meta)",
)
CIFAR100 = CifarLayout(
    display="CIFAR-100",
    folder="cifar-100-python",
    archive="cifar-100-python.tar.gz",
    train_files=("train",),
    test_files=("test",),
    meta_file="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
    files_text="train and test (+ meta)",
)


def _looks_like_cifar_folder(folder: Path, layout: CifarLayout) -> bool:
    names = layout.train_files[:1] + layout.test_files
    return folder.is_dir() and any((folder / n).is_file() for n in names)


def _fallback_extract_root(archive: Path) -> Path:
    """Per-archive folder in the user cache, for archives in read-only folders."""
    digest = hashlib.sha256(str(archive.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / f"extracted-{digest}"


def _extract_cifar(archive: Path, root: Path, layout: CifarLayout) -> Path:
    """Unpack next to the archive, or into the user cache if that folder is read-only."""
    try:
        return safe_extract_folder(archive, root, layout.folder)
    except PermissionError:
        return safe_extract_folder(archive, _fallback_extract_root(archive), layout.folder)


def find_cifar_folder(data_dir: str | os.PathLike | None, layout: CifarLayout) -> Path:
    """Accept the parent folder, the batches folder itself, or a folder with the archive."""
    root = require_data_dir(data_dir, layout.display, f"{layout.folder}/ or {layout.archive}")
    if root.is_file() and root.name == layout.archive:
        root, archive = root.parent, root
    else:
        archive = root / layout.archive
    for folder in (root / layout.folder, root):
        if _looks_like_cifar_folder(folder, layout):
            return folder
    fallback = _fallback_extract_root(archive) / layout.folder
    if _looks_like_cifar_folder(fallback, layout):
        return fallback
    if archive.is_file():
        return _extract_cifar(archive, root, layout)
    raise layout.not_found(root)


def _str_keys(obj: Any, path: Path) -> dict[str, Any]:
    """Pickles read with encoding="bytes" have bytes keys; accept str keys as well."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def read_cifar_batch(path: Path, layout: CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch -> uint8 (N, 3, 32, 32) images and int64 (N,) labels."""
    batch = _str_keys(load_pickle_file(path), path)
    missing = [k for k in ("data", layout.label_key) if k not in batch]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)} in the pickled dict")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' must have shape (N, 3072), got {data.shape}")
    labels = integer_labels(batch[layout.label_key], str(path))
    if labels.shape != (len(data),):
        raise DataError(
            f"{path}: {len(data)} images but {layout.label_key!r} has shape {labels.shape}"
        )
    # Rows hold the red, green and blue 32x32 planes one after another.
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar_names(folder: Path, layout: CifarLayout) -> list[str]:
    """Class names from the meta file; a missing meta file falls back to default names."""
    path = folder / layout.meta_file
    if not path.is_file():
        if layout.num_classes == len(CIFAR10_NAMES):
            return list(CIFAR10_NAMES)
        return [str(i) for i in range(layout.num_classes)]
    meta = _str_keys(load_pickle_file(path), path)
    names = meta.get(layout.names_key)
    if not isinstance(names, list) or len(names) != layout.num_classes:
        raise DataError(f"{path}: expected {layout.num_classes} names under {layout.names_key!r}")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def _read_cifar_split(folder: Path, files: tuple[str, ...], layout: CifarLayout) -> ImageSet:
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"{layout.display} in {folder} is incomplete: missing {', '.join(missing)} "
            f"(expected {layout.files_text})"
        )
    parts = [read_cifar_batch(folder / f, layout) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return make_image_set(images, labels, layout.num_classes, str(folder))


def load_cifar(
    layout: CifarLayout, data_dir: str | os.PathLike | None, image_size: int | None
) -> RawData:
    _check_image_size(image_size)
    folder = find_cifar_folder(data_dir, layout)
    train = _read_cifar_split(folder, layout.train_files, layout)
    test = _read_cifar_split(folder, layout.test_files, layout)
    if image_size is not None:
        train = ImageSet(resize_batch(train.images, image_size), train.labels)
        test = ImageSet(resize_batch(test.images, image_size), test.labels)
    return RawData(
        train=train,
        test=test,
        class_names=read_cifar_names(folder, layout),
        augment=AugmentSpec(crop_padding=4, flip=True),
    )


@DATASETS.register("cifar10")
def load_cifar10_raw(
    data_dir: str | os.PathLike | None = None, image_size: int | None = None
) -> RawData:
    """Official CIFAR-10 python release (folder or .tar.gz)."""
    return load_cifar(CIFAR10, data_dir, image_size)


@DATASETS.register("cifar100")
def load_cifar100_raw(
    data_dir: str | os.PathLike | None = None, image_size: int | None = None
) -> RawData:
    """Official CIFAR-100 python release, fine labels (100 classes)."""
    return load_cifar(CIFAR100, data_dir, image_size)


# --- SVHN ---------------------------------------------------------------------------------

SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One SVHN cropped-digits .mat -> uint8 (N, 3, H, W) images and labels 0..9."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except NotImplementedError as exc:  # MATLAB v7.3 (HDF5) files
        raise DataError(f"{path}: MATLAB v7.3 files are not supported; expected v5 .mat") from exc
    except (
        MatReadError,
        ValueError,
        TypeError,
        OSError,
        EOFError,
        KeyError,
        IndexError,
        zlib.error,
    ) as exc:
        raise DataError(f"could not read {path} (truncated or corrupted .mat?): {exc!r}") from exc
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None:
        raise DataError(f"{path}: expected variables 'X' (32, 32, 3, N) and 'y' (N, 1)")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise DataError(f"{path}: 'X' must be uint8 (H, W, 3, N), got {x.dtype} {x.shape}")
    labels = integer_labels(y, str(path)).reshape(-1)
    if len(labels) != x.shape[3]:
        raise DataError(f"{path}: {x.shape[3]} images but 'y' has {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 10):
        raise DataError(
            f"{path}: labels in 'y' must lie in 1..10 (10 stands for the digit 0), "
            f"found {labels.min()}..{labels.max()}"
        )
    labels[labels == 10] = 0  # SVHN stores the digit 0 as label 10
    images = x.transpose(3, 2, 0, 1)  # (H, W, C, N) -> (N, C, H, W)
    return np.ascontiguousarray(images), labels


@DATASETS.register("svhn")
def load_svhn_raw(
    data_dir: str | os.PathLike | None = None, image_size: int | None = None
) -> RawData:
    """SVHN cropped digits (train + test .mat, no "extra").

    Augmentation is a 2-pixel random crop and no flip: flips change digit identity,
    and SVHN crops are tight around the centre digit, so larger shifts tend to move
    the neighbouring distractor digits into view.
    """
    _check_image_size(image_size)
    root = require_data_dir(data_dir, "SVHN", " and ".join(SVHN_FILES))
    missing = [f for f in SVHN_FILES if not (root / f).is_file()]
    if missing:
        raise DataError(
            f"SVHN not found in {root}: expected {' and '.join(SVHN_FILES)} "
            f"(missing {', '.join(missing)})"
        )
    sets = []
    for name in SVHN_FILES:
        images, labels = read_svhn_mat(root / name)
        image_set = make_image_set(images, labels, 10, str(root / name))
        if image_size is not None:
            image_set = ImageSet(resize_batch(image_set.images, image_size), image_set.labels)
        sets.append(image_set)
    return RawData(
        train=sets[0],
        test=sets[1],
        class_names=[str(i) for i in range(10)],
        augment=AugmentSpec(crop_padding=2, flip=False),
    )
