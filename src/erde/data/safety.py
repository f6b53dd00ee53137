"""Reading untrusted files safely: pickles that cannot run code, tars that cannot escape."""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PureWindowsPath
from typing import Any, BinaryIO

from erde.errors import DataError

_MULTIARRAY = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
# Exactly what numpy 1 and 2 need to rebuild plain arrays (CIFAR pickles hold nothing else).
_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
    | {(m, "_reconstruct") for m in _MULTIARRAY}
    | {(m, "scalar") for m in _MULTIARRAY}
    | {(m, "_frombuffer") for m in _NUMERIC}
)
_HAS_TAR_FILTER = hasattr(tarfile, "data_filter")


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays, so a crafted pickle cannot execute code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        return getattr(importlib.import_module(_current_numpy_module(module)), name)


def _current_numpy_module(module: str) -> str:
    """numpy 2 renamed numpy.core to numpy._core; old pickles still name the former."""
    if module.startswith("numpy.core."):
        renamed = "numpy._core." + module.removeprefix("numpy.core.")
        try:
            importlib.import_module(renamed)
            return renamed
        except ImportError:
            return module
    return module


def restricted_pickle_load(f: BinaryIO) -> Any:
    """``pickle.load(f, encoding="bytes")`` limited to numpy arrays and plain containers."""
    return RestrictedUnpickler(f, encoding="bytes").load()


def load_pickle_file(path: Path) -> Any:
    """Load a data pickle, turning every way it can be broken into a DataError."""
    try:
        with open(path, "rb") as f:
            return restricted_pickle_load(f)
    except FileNotFoundError as exc:
        raise DataError(f"missing file {path}") from exc
    except pickle.UnpicklingError as exc:
        raise DataError(f"refusing or unable to read {path}: {exc}") from exc
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, OSError) as exc:
        raise DataError(f"could not read {path} (truncated or corrupted?): {exc!r}") from exc


def cache_dir() -> Path:
    """Where derived files go when the data folder is read-only."""
    env = os.environ.get("ERDE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "erde"


def _is_within(root: str, target: str) -> bool:
    return os.path.commonpath([root, target]) == root


def check_tar_member(member: tarfile.TarInfo, dest: Path, archive: Path) -> None:
    """Refuse absolute paths, ``..``, special files and links pointing outside ``dest``."""
    name = member.name
    root = os.path.realpath(dest)
    bad = ""
    if os.path.isabs(name) or name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        bad = "absolute path"
    elif ".." in Path(name.replace("\\", "/")).parts:
        bad = "path with '..'"
    elif not _is_within(root, os.path.realpath(os.path.join(root, name))):
        bad = "path outside the target folder"
    elif member.ischr() or member.isblk() or member.isfifo() or member.isdev():
        bad = "device or fifo"
    elif member.issym() or member.islnk():
        base = os.path.dirname(name) if member.issym() else ""
        link = os.path.realpath(os.path.join(root, base, member.linkname))
        if os.path.isabs(member.linkname) or not _is_within(root, link):
            bad = f"link to {member.linkname!r} outside the target folder"
    if bad:
        raise DataError(f"refusing to extract {archive}: unsafe member {name!r} ({bad})")


def _extract_checked(archive: Path, dest: Path) -> None:
    """Check every member first, so nothing is written if any member is unsafe."""
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for member in members:
            check_tar_member(member, dest, archive)
        if _HAS_TAR_FILTER:
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.11.4
            tar.extractall(dest, members=members)  # noqa: S202 - members checked above


def safe_extract_folder(archive: Path, dest: Path, folder: str) -> Path:
    """Extract ``archive`` and move its top folder ``folder`` into ``dest`` atomically."""
    return safe_extract_folders(archive, dest, (folder,))[0]


def safe_extract_folders(archive: Path, dest: Path, folders: tuple[str, ...]) -> list[Path]:
    """Extract ``archive`` once and move each top folder in ``folders`` into ``dest``.

    Extraction goes to a temporary folder first so a truncated archive never leaves a
    half-written data folder that would be mistaken for a complete one later.
    """
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".erde_extract_", dir=dest))
    ok = False
    try:
        try:
            _extract_checked(archive, tmp)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
            raise DataError(
                f"could not extract {archive} (truncated or corrupted archive?): {exc}"
            ) from exc
        missing = [f for f in folders if not (tmp / f).is_dir()]
        if missing:
            raise DataError(f"{archive} does not contain the folder(s) {', '.join(missing)}")
        targets = []
        for folder in folders:
            target = dest / folder
            if not target.exists():
                os.replace(tmp / folder, target)
            targets.append(target)
        ok = True
        return targets
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not ok:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only if empty: a failed extraction leaves no trace
