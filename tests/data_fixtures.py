"""Writers for tiny data sets in the official on-disk formats, and hostile files.

Every image written here carries its own index in its first pixels (see
``image_id``), so tests can tell exactly which sample ended up in which split.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from erde.data.formats import CIFAR10_NAMES  # the names batches.meta lists

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"


@dataclass
class Written:
    """What a writer put on disk, in file order: uint8 (N, 3, H, W) images and labels."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


def tagged_images(n: int, rng: np.random.Generator, first_id: int, size: int = 32) -> np.ndarray:
    """Random uint8 (n, 3, size, size) images whose pixels [0, 0, 0:2] hold ``first_id + i``."""
    images = rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)
    ids = np.arange(first_id, first_id + n)
    images[:, 0, 0, 0] = ids // 256
    images[:, 0, 0, 1] = ids % 256
    return images


def image_id(images) -> list[int]:
    """The ids ``tagged_images`` wrote, read back from (N, 3, H, W) uint8 images."""
    arr = np.asarray(images)
    return (arr[:, 0, 0, 0].astype(np.int64) * 256 + arr[:, 0, 0, 1]).tolist()


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % num_classes).astype(np.int64)


def to_cifar_rows(images: np.ndarray) -> np.ndarray:
    """(N, 3, 32, 32) -> official (N, 3072) rows: the R, G and B 32x32 planes in turn."""
    return images.reshape(len(images), 3072).copy()


def dump_pickle(obj: object, path: Path, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def write_cifar10(
    root: Path,
    per_batch: int = 20,
    n_test: int = 20,
    seed: int = 0,
    protocol: int = 2,
    with_meta: bool = True,
) -> Written:
    """``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR10_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = [], []
    for b in range(1, 6):
        images = tagged_images(per_batch, rng, first_id=(b - 1) * per_batch)
        labels = balanced_labels(per_batch, 10, rng)
        batch = {
            b"batch_label": f"training batch {b} of 5".encode(),
            b"labels": labels.tolist(),
            b"data": to_cifar_rows(images),
            b"filenames": [f"img_{i}.png".encode() for i in range(per_batch)],
        }
        dump_pickle(batch, folder / f"data_batch_{b}", protocol)
        train_images.append(images)
        train_labels.append(labels)
    test_images = tagged_images(n_test, rng, first_id=10_000)
    test_labels = balanced_labels(n_test, 10, rng)
    test = {
        b"batch_label": b"testing batch 1 of 1",
        b"labels": test_labels.tolist(),
        b"data": to_cifar_rows(test_images),
        b"filenames": [f"test_{i}.png".encode() for i in range(n_test)],
    }
    dump_pickle(test, folder / "test_batch", protocol)
    if with_meta:
        meta = {
            b"num_cases_per_batch": per_batch,
            b"label_names": [n.encode() for n in CIFAR10_NAMES],
            b"num_vis": 3072,
        }
        dump_pickle(meta, folder / "batches.meta", protocol)
    return Written(
        np.concatenate(train_images),
        np.concatenate(train_labels),
        test_images,
        test_labels,
        list(CIFAR10_NAMES),
    )


def write_cifar100(root: Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> Written:
    """``root/cifar-100-python/{train, test, meta}`` with fine and coarse labels."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR100_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"class_{i:02d}" for i in range(100)]
    written = []
    for split, n, first in (("train", n_train, 0), ("test", n_test, 10_000)):
        images = tagged_images(n, rng, first_id=first)
        fine = balanced_labels(n, 100, rng)
        obj = {
            b"filenames": [f"{split}_{i}.png".encode() for i in range(n)],
            b"batch_label": f"{split}ing batch 1 of 1".encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": (fine // 5).tolist(),
            b"data": to_cifar_rows(images),
        }
        dump_pickle(obj, folder / split)
        written += [images, fine]
    meta = {
        b"fine_label_names": [n.encode() for n in names],
        b"coarse_label_names": [f"super_{i}".encode() for i in range(20)],
    }
    dump_pickle(meta, folder / "meta")
    return Written(*written, names)


def write_svhn(
    root: Path, n_train: int = 40, n_test: int = 20, seed: int = 0, raw_train_labels=None
) -> Written:
    """``train_32x32.mat`` / ``test_32x32.mat``: X (32, 32, 3, N) uint8, y (N, 1) with 10 = digit 0."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    written = []
    for name, n, first, raw in (
        ("train_32x32.mat", n_train, 0, raw_train_labels),
        ("test_32x32.mat", n_test, 10_000, None),
    ):
        images = tagged_images(n, rng, first_id=first)  # (N, 3, 32, 32)
        digits = balanced_labels(n, 10, rng)
        if raw is None:
            raw = np.where(digits == 0, 10, digits)  # the official files store 0 as 10
        x = np.ascontiguousarray(images.transpose(2, 3, 1, 0))  # (32, 32, 3, N)
        savemat(root / name, {"X": x, "y": np.asarray(raw, dtype=np.uint8).reshape(-1, 1)})
        written += [images, digits]
    return Written(*written, [str(i) for i in range(10)])


def write_image(path: Path, image_hwc: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG"
    kwargs = {"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}
    Image.fromarray(image_hwc).save(path, format=fmt, **kwargs)


def write_imagefolder(
    root: Path,
    classes: tuple[str, ...] = ("cat", "dog", "emu"),
    per_class: tuple[int, int] = (4, 2),
    size: int = 8,
    seed: int = 0,
) -> dict[str, dict[Path, np.ndarray]]:
    """``root/{train,test}/<class>/*``; even-numbered files PNG, odd-numbered JPEG.

    Returns ``{split: {path: (H, W, 3) uint8 pixels written}}``.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, dict[Path, np.ndarray]] = {"train": {}, "test": {}}
    for split, n in zip(("train", "test"), per_class, strict=True):
        for cls in classes:
            for i in range(n):
                suffix = ".png" if i % 2 == 0 else ".jpg"
                path = root / split / cls / f"{i:03d}{suffix}"
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                if suffix == ".jpg":  # flat colour: survives JPEG almost exactly
                    pixels[:] = rng.integers(0, 256, size=3, dtype=np.uint8)
                write_image(path, pixels)
                out[split][path] = pixels
    return out


def make_tar_gz(archive: Path, members: dict[str, bytes | Path]) -> None:
    """Tar ``members`` (archive name -> bytes, or a file/folder to add) into ``archive``."""
    with tarfile.open(archive, "w:gz") as tar:
        for name, content in members.items():
            if isinstance(content, Path):
                tar.add(content, arcname=name)
            else:
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))


def add_link(archive: Path, name: str, target: str, symbolic: bool = True) -> None:
    """Append a link member to an uncompressed tar (used to build hostile archives)."""
    with tarfile.open(archive, "a") as tar:
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE if symbolic else tarfile.LNKTYPE
        info.linkname = target
        tar.addfile(info)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


class WritesMarker:
    """Unpickling this runs ``touch <marker>``: a stand-in for a hostile pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def malicious_pickle_bytes(marker: Path) -> bytes:
    """A pickled dict that looks like a CIFAR batch but runs a command when loaded."""
    return pickle.dumps({b"data": WritesMarker(marker), b"labels": [0]}, protocol=2)


TINY_TEACHER_OVERRIDES = ("teacher_train.epochs=1", "teacher_train.max_steps_per_epoch=1")


def train_tiny_teacher(out_dir: Path) -> Path:
    """A real teacher checkpoint in seconds: the tiny config (helpers), one optimizer step."""
    from helpers import tiny_config

    from erde.training import Job, train

    cfg = tiny_config(*TINY_TEACHER_OVERRIDES)
    return train(cfg, Job("teacher"), out_dir, progress=False)
