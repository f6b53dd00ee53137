"""Small shared I/O utilities: atomic writes and a record of the environment.

Every artefact erde writes (checkpoints, reports, plots) goes through an atomic
write: the data lands in a temporary file in the target's directory, is
fsync'ed, then ``os.replace``d over the target. A crash or a serialization
error midway therefore leaves either the old file or the new one, never a
truncated mix, and no stray temporary file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from erde.errors import DiskFullError, ErdeError, OutputError
from erde.hardware import cpu_description
from erde.version import __version__

PathLike = str | os.PathLike


def _default_mode() -> int:
    """Permissions a plain ``open()`` would give a new file (temp files start at 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (best effort: not every OS lets a directory be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Run ``write`` on a temp file next to ``path``, then move it over ``path``."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = target.stat().st_mode & 0o777 if target.exists() else _default_mode()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        _raise_write_error(exc, target)
        raise
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_write_error(exc, target)
        raise
    _fsync_dir(target.parent)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: torch.save reports a full disk as a RuntimeError from C++."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _raise_write_error(exc: BaseException, target: Path) -> None:
    """A full disk or an unwritable folder as one clear ``OutputError`` (other errors pass)."""
    cause = _os_error_in(exc)
    if cause is None:
        return
    if cause.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(target.parent).free
        raise DiskFullError(
            f"disk full: no space left to write {target} ({free} bytes free on its file system); "
            "the previous version of the file, if any, is kept"
        ) from None
    if cause.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        raise OutputError(f"cannot write {target}: {cause.strerror}") from None


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers never see a half-written file."""
    _atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: PathLike, text: str) -> None:
    """Atomic UTF-8 text write (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_default(obj: Any) -> Any:
    """``json.dumps`` hook: turn the few non-JSON types erde hands around (paths, numpy, tensors) into JSON ones."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def atomic_write_json(path: PathLike, obj: Any) -> None:
    """Serialize ``obj`` fully first (indent=2, key order kept), then write atomically.

    A serialization error is raised before the target is touched.
    """
    text = json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n"
    atomic_write_text(path, text)


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def read_json(path: PathLike, *, max_bytes: int, error: type[ErdeError], what: str) -> Any:
    """JSON from a file that may not be ours: size-capped before it is read.

    Every way the file can fail (missing, too large, not UTF-8, not JSON, nested
    deeply enough to exhaust the parser's recursion) is one ``error`` naming the
    file, never a MemoryError or a traceback. ``what`` says what the file should
    have been ("a report").
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    size = path.stat().st_size
    if size > max_bytes:
        raise error(f"{path} is {_size(size)}, over the {_size(max_bytes)} allowed for {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not readable JSON ({exc})") from None
    except RecursionError:
        raise error(f"{path} is not {what} (nested too deeply to read)") from None


def atomic_torch_save(obj: Any, path: PathLike) -> None:
    """``torch.save`` that never leaves a truncated checkpoint behind."""
    _atomic_write(path, lambda handle: torch.save(obj, handle))


def environment_info() -> dict[str, Any]:
    """Versions and hardware a result was produced with, so that reports can be compared."""
    cuda = torch.cuda.is_available()
    return {
        "erde": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        **cpu_description(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
    }


def file_sha256(path: PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks (checkpoints, records files)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
