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
from dataclasses import dataclass
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

DEFAULT_MAX_UNPACKED_BYTES = 64 << 30  # 64 GiB
DEFAULT_MAX_MEMBERS = 2_000_000
MAX_EXPANSION = 100.0  # unpacked bytes per archive byte, beyond RATIO_FLOOR_BYTES
RATIO_FLOOR_BYTES = 64 << 20  # any archive may unpack to 64 MiB whatever its ratio
ENV_MAX_BYTES = "ERDE_MAX_UNPACKED_BYTES"
ENV_MAX_MEMBERS = "ERDE_MAX_ARCHIVE_MEMBERS"
_SUFFIXES = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


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


@dataclass(frozen=True)
class ArchiveLimits:
    """How much an archive may unpack to: total bytes and number of members.

    Defaults fit the data sets erde reads (CIFAR-10 as JPEGs: 60,000 files,
    about 150 MB) with a wide margin; ``ERDE_MAX_UNPACKED_BYTES`` and
    ``ERDE_MAX_ARCHIVE_MEMBERS`` raise them for genuinely large archives.
    """

    max_bytes: int = DEFAULT_MAX_UNPACKED_BYTES
    max_members: int = DEFAULT_MAX_MEMBERS
    max_ratio: float | None = MAX_EXPANSION  # unpacked / archive bytes; None = no ratio check

    @classmethod
    def from_env(cls) -> ArchiveLimits:
        """Defaults, or the environment's; an explicit byte limit replaces the ratio check."""
        explicit = bool(os.environ.get(ENV_MAX_BYTES, "").strip())
        return cls(
            _env_size(ENV_MAX_BYTES, DEFAULT_MAX_UNPACKED_BYTES),
            _env_size(ENV_MAX_MEMBERS, DEFAULT_MAX_MEMBERS),
            None if explicit else MAX_EXPANSION,
        )

    def for_archive(self, archive: Path) -> ArchiveLimits:
        """The byte limit for this archive: a compression bomb (far above any image
        archive's ratio, which is near 1 since PNG and JPEG are compressed) stops early."""
        if self.max_ratio is None:
            return self
        by_ratio = max(RATIO_FLOOR_BYTES, int(self.max_ratio * archive.stat().st_size))
        return ArchiveLimits(min(self.max_bytes, by_ratio), self.max_members, self.max_ratio)


def _env_size(name: str, default: int) -> int:
    """A positive integer from the environment, with an optional K/M/G/T suffix (powers of 1024)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    scale = 1
    if text[-1].upper() in _SUFFIXES:
        scale, text = _SUFFIXES[text[-1].upper()], text[:-1]
    try:
        value = int(text) * scale
    except ValueError:
        value = 0
    if value < 1:
        raise DataError(
            f"{name} must be a positive integer (optionally K, M, G or T), got {os.environ[name]!r}"
        )
    return value


def _check_totals(archive: Path, count: int, total: int, limits: ArchiveLimits) -> None:
    if count > limits.max_members:
        raise DataError(
            f"refusing to extract {archive}: more than {limits.max_members:,} members "
            f"(set {ENV_MAX_MEMBERS} to allow more)"
        )
    if total > limits.max_bytes:
        raise DataError(
            f"refusing to extract {archive}: it unpacks to more than {limits.max_bytes:,} bytes "
            f"(set {ENV_MAX_BYTES} to allow more, e.g. {ENV_MAX_BYTES}=100G)"
        )


def _extract_checked(archive: Path, dest: Path, limits: ArchiveLimits | None = None) -> None:
    """Check every member first (safety, count, total size), so nothing is written if any fails.

    The count and size are checked while the member list is read (a stream of
    100,000 tiny members stops at the limit instead of being listed in full),
    and again while extracting, on the bytes actually written.
    """
    limits = (limits or ArchiveLimits.from_env()).for_archive(archive)
    with tarfile.open(archive, "r:*") as tar:
        members: list[tarfile.TarInfo] = []
        total = 0
        for member in tar:
            check_tar_member(member, dest, archive)
            members.append(member)
            total += max(member.size, 0) if member.isfile() else 0
            _check_totals(archive, len(members), total, limits)
        written = 0
        for member in members:
            if _HAS_TAR_FILTER:
                tar.extract(member, dest, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extract(member, dest)  # noqa: S202 - member checked above
            if member.isfile():
                written += (dest / member.name).stat().st_size
                _check_totals(archive, 1, written, limits)


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
