"""Which loader reads a folder: CIFAR-10 comes in two layouts.

The official python release (a folder or ``cifar-10-python.tar.gz``) is read by the
``cifar10`` loader; an ImageFolder copy (``train/<class>/*.jpg``, ``test/<class>/*.jpg``,
unpacked or as a .tar.gz) by the ``imagefolder`` loader. Every command that is given
``--dataset cifar10`` asks here which of the two it has, so both layouts work everywhere.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from erde.data.formats import CIFAR10
from erde.errors import DataError


def _archive_is_imagefolder(path: Path, members: int = 64) -> bool:
    """Whether the first members of a tar archive sit under train/ or test/."""
    try:
        with tarfile.open(path, "r|*") as tar:
            for i, member in enumerate(tar):
                top = member.name.replace("\\", "/").lstrip("./").split("/", 1)[0]
                if top in ("train", "test"):
                    return True
                if top == CIFAR10.folder or i + 1 >= members:
                    return False
    except (tarfile.TarError, OSError, EOFError):
        return False  # the loader reports the unreadable archive
    return False


def detect_loader(dataset: str, data_dir: str | Path | None) -> str:
    """The loader that reads ``data_dir``: ``imagefolder`` for a CIFAR-10 ImageFolder copy.

    CIFAR-10 is accepted in two layouts: the official python release (folder or
    ``cifar-10-python.tar.gz``) and an ImageFolder copy (``train/<class>/*.jpg``,
    ``test/<class>/*.jpg``, unpacked or as a .tar.gz). The official layout wins
    when both are present; a folder with neither is a ``DataError`` naming both.
    Every other data set keeps its own loader.
    """
    if dataset != "cifar10" or data_dir is None:
        return dataset
    root = Path(data_dir).expanduser()
    if root.is_file():
        if root.name != CIFAR10.archive and root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "imagefolder" if _archive_is_imagefolder(root) else dataset
        return dataset
    official = (
        (root / CIFAR10.folder).is_dir()
        or (root / CIFAR10.archive).is_file()
        or (root / CIFAR10.train_files[0]).is_file()
    )
    if official:
        return dataset
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "imagefolder"
    raise DataError(
        f"CIFAR-10 not found in {root}: expected the official release ({CIFAR10.folder}/ or "
        f"{CIFAR10.archive}; --download fetches it) or an ImageFolder copy "
        "(train/<class>/*.jpg and test/<class>/*.jpg, as a folder or a .tar.gz given as --data-dir)"
    )


def cifar10_copy_loader(dataset: str, data_dir: str | Path | None) -> str:
    """Like :func:`detect_loader`, but never raises: ``imagefolder`` only where a CIFAR-10
    ImageFolder copy is found, else ``dataset`` (whose loader reports what is missing)."""
    try:
        return detect_loader(dataset, data_dir)
    except DataError:
        return dataset
