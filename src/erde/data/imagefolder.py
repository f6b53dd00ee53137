"""``root/train/<class>/*`` and ``root/test/<class>/*`` image folders (PNG/JPEG).

Decoding tens of thousands of small JPEGs takes a while on a laptop, so the
decoded images are cached once as a uint8 ``.npz`` next to the folder (or in
the user cache when the folder is read-only), keyed by the file list, sizes
and modification times: editing the folder invalidates the cache, and the
stale cache is deleted once the new one is written, so caches never pile up.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from erde.data.formats import DATASETS, make_image_set, require_data_dir
from erde.data.pixels import ImageTooLargeError, read_errors, read_image
from erde.data.safety import cache_dir, safe_extract_folders
from erde.data.types import AugmentSpec, ImageSet, RawData
from erde.errors import DataError
from erde.io import atomic_write_bytes
from erde.limits import MAX_IMAGE_SIDE

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
SPLITS = ("train", "test")
CACHE_VERSION = 2  # 2: 16-bit images scaled to 8 bits instead of clipped


class DataWarning(UserWarning):
    """A data set that loads but is probably not what was meant (e.g. empty class folders)."""


def list_images(split_dir: Path) -> tuple[list[Path], list[str]]:
    """Image files and class names (sorted folder names) of one split folder."""
    classes = sorted(
        d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
    )
    for name in classes:
        _check_class_name(split_dir, name)
    per_class = {
        cls: [
            f
            for f in sorted((split_dir / cls).iterdir())
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        ]
        for cls in classes
    }
    empty = [cls for cls, found in per_class.items() if not found]
    if empty and len(empty) < len(classes):
        warnings.warn(
            f"{split_dir}: {len(empty)} class folder(s) hold no images "
            f"({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}); they still count as "
            "classes the model can answer",
            DataWarning,
            stacklevel=2,
        )
    return [f for cls in classes for f in per_class[cls]], classes


def _check_class_name(split_dir: Path, name: str) -> None:
    """Class names go into checkpoints, reports and JSON lines: they must be valid UTF-8."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(name)
        raise DataError(
            f"{split_dir}: class folder {raw!r} has a name that is not valid UTF-8; rename it"
        ) from None


def decode_image(path: Path, size: int | None) -> np.ndarray:
    """One image file -> uint8 (H, W, 3) RGB, resized to ``size`` when given.

    At native size (no ``size``) the images become the model's input, at most
    ``MAX_IMAGE_SIDE`` per side: a larger one is refused from its header, before
    it is decoded and cached at full size.
    """
    from PIL import Image

    try:
        img = read_image(path, "RGB", max_side=MAX_IMAGE_SIDE if size is None else None)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
    except ImageTooLargeError as exc:
        raise DataError(f"{exc}; set data.image_size to resize the images") from None
    except read_errors() as exc:
        raise DataError(f"cannot decode image {path}: {type(exc).__name__}: {exc}") from None


def _fingerprint(files: list[Path], size: int | None) -> str:
    h = hashlib.sha256(f"v{CACHE_VERSION}:{size}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _decode_all(files: list[Path], size: int | None, desc: str) -> np.ndarray:
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
        arrays = list(
            tqdm(
                pool.map(lambda f: decode_image(f, size), files, chunksize=64),
                total=len(files),
                desc=desc,
                unit="img",
                disable=len(files) < 2000 or not sys.stderr.isatty(),  # no bars in logs
            )
        )
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(
            f"{desc}: images have different sizes {sorted(shapes)[:3]}...; "
            "set data.image_size to resize them to one size"
        )
    return np.stack(arrays).transpose(0, 3, 1, 2)  # (N, 3, H, W)


def _cache_prefix(split: str, size: int | None) -> str:
    """Caches of one split at one size share this prefix; only the newest is kept."""
    return f".erde-cache-{split}-{size or 'native'}-"


def _cache_paths(root: Path, split: str, size: int | None, key: str) -> list[Path]:
    name = f"{_cache_prefix(split, size)}{key}.npz"
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return [root / name, cache_dir() / f"imagefolder-{digest}" / name]


def _prune_stale(fresh: Path, prefix: str) -> None:
    """Delete the caches ``fresh`` replaces: same split and size, older file list."""
    for old in fresh.parent.glob(f"{prefix}*.npz"):
        if old != fresh:
            old.unlink(missing_ok=True)


def _load_cached(paths: list[Path]) -> np.ndarray | None:
    for path in paths:
        if path.is_file():
            try:
                # our own handle: np.load leaks its file when the archive is damaged
                with path.open("rb") as handle, np.load(handle, allow_pickle=False) as data:
                    return data["images"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                continue  # a damaged cache is rebuilt, never trusted
    return None


def _save_cache(paths: list[Path], images: np.ndarray, prefix: str) -> None:
    from io import BytesIO

    buffer = BytesIO()
    np.savez(buffer, images=images)
    for path in paths:
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError:
            continue  # read-only data folder: fall back to the user cache
        with contextlib.suppress(OSError):  # a cache we cannot delete is only wasted space
            _prune_stale(path, prefix)
        return


def read_split(root: Path, split: str, size: int | None) -> tuple[ImageSet, list[str]]:
    """Decode (or load from cache) one split folder."""
    split_dir = root / split
    files, classes = list_images(split_dir)
    if not classes or not files:
        raise DataError(
            f"{split_dir} holds no class folders with images ({', '.join(IMAGE_SUFFIXES)})"
        )
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[f.parent.name] for f in files], dtype=np.int64)
    paths = _cache_paths(root, split, size, _fingerprint(files, size))
    images = _load_cached(paths)
    if images is None or len(images) != len(files):
        images = _decode_all(files, size, f"decoding {split_dir}")
        _save_cache(paths, images, _cache_prefix(split, size))
    return make_image_set(images, labels, len(classes), str(split_dir)), classes


def _unpacked(archive: Path) -> Path:
    """The archive's folders in the user cache, unpacked once per version of the archive.

    Keyed by the archive's path, size and time, so a replaced archive is unpacked again;
    the copy of the version it replaces is then deleted.
    """
    where = hashlib.sha256(str(archive.resolve()).encode()).hexdigest()[:12]
    st = archive.stat()
    version = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    dest = cache_dir() / f"imagefolder-archive-{where}-{version}"
    if not all((dest / s).is_dir() for s in SPLITS):
        safe_extract_folders(archive, dest, SPLITS)
        for old in dest.parent.glob(f"imagefolder-archive-{where}-*"):
            if old != dest:
                shutil.rmtree(old, ignore_errors=True)
    return dest


def find_root(data_dir: str | os.PathLike | None) -> Path:
    """The folder holding train/ and test/, unpacking a .tar.gz given instead (safely)."""
    root = require_data_dir(data_dir, "imagefolder", "train/<class>/* and test/<class>/*")
    if root.is_file() and root.name.endswith((".tar.gz", ".tgz", ".tar")):
        root = _unpacked(root)
    missing = [s for s in SPLITS if not (root / s).is_dir()]
    if missing:
        raise DataError(
            f"imagefolder not found in {root}: expected train/<class>/*.png|jpg and "
            f"test/<class>/*.png|jpg (missing {', '.join(s + '/' for s in missing)})"
        )
    return root


@DATASETS.register("imagefolder")
def load_imagefolder_raw(
    data_dir: str | os.PathLike | None = None, image_size: int | None = None
) -> RawData:
    """Any image classification folder; the real CIFAR-10 JPEG copy reads this way."""
    root = find_root(data_dir)
    train, train_classes = read_split(root, "train", image_size)
    test, test_classes = read_split(root, "test", image_size)
    if train_classes != test_classes:
        raise DataError(
            f"{root}: train and test have different class folders "
            f"({len(train_classes)} vs {len(test_classes)})"
        )
    if train.images.shape[1:] != test.images.shape[1:]:
        raise DataError(f"{root}: train and test images differ in size; set data.image_size")
    side = train.images.shape[-1]
    return RawData(
        train=ImageSet(train.images, train.labels),
        test=ImageSet(test.images, test.labels),
        class_names=train_classes,
        augment=AugmentSpec(crop_padding=max(1, side // 8), flip=True),
    )


__all__ = ["load_imagefolder_raw", "read_split"]
