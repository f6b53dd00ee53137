"""Where commands write: output folders checked and locked, output files checked and atomic.

Three promises, kept here for every command:

- an output is checked before any work starts (a folder that is a file, a
  read-only folder, a missing parent, an output file that is also an input)
  and refused with one :class:`OutputError`;
- one writer per output folder: :func:`output_lock` holds an exclusive lock
  (``.erde.lock``, recording pid, host and command) for the whole command, so
  a second ``erde`` writing to the same folder stops at once with the first
  one's pid instead of mixing its files in. The lock is a kernel ``flock``: a
  process that dies, even by SIGKILL, releases it, so a stale lock file never
  blocks anyone;
- an output file is written to a temporary file beside it and moved over the
  target only when complete (:func:`atomic_text_output`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

from erde.errors import OutputError

LOCK_NAME = ".erde.lock"

_held: dict[Path, int] = {}  # folders this process has locked -> nesting depth


class OutputLockedError(OutputError):
    """Another process is writing to the same output folder."""


def _describe_os_error(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def check_output_dir(path: str | os.PathLike) -> Path:
    """A folder erde may create or write into: not a file, not under a file, writable."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"output folder {folder} exists and is not a folder")
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create output folder {folder}: {existing} is a file")
    return folder


# What erde reads from a folder given as a model: a checkpoint folder or an export folder.
MODEL_FILES = ("checkpoint.pt", "manifest.json", "stage_*.onnx")


def files_read_from(item: str | os.PathLike) -> list[Path]:
    """The files an input names: itself, or for a model folder the model files inside it."""
    path = Path(item)
    if not path.is_dir():
        return [path]
    return [f for pattern in MODEL_FILES for f in sorted(path.glob(pattern)) if f.is_file()]


def check_not_input(
    path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], option: str = "output"
) -> None:
    """Refuse an output that is one of ``inputs`` (a model folder counts as its model files).

    Compared by identity on disk (``samefile``), so another spelling, a symbolic
    or a hard link to an input is caught as well as the same path.
    """
    target = Path(path)
    if not target.exists():
        return
    for item in inputs:
        if item is None:
            continue
        for read in files_read_from(item):
            with contextlib.suppress(OSError):
                if os.path.samefile(read, target):
                    shown = item if Path(item) == read else f"{item}: {read}"
                    raise OutputError(
                        f"{option} {target} is also an input ({shown}); it would be overwritten"
                    )


def check_out_folder(folder: str | os.PathLike, checkpoints: Iterable[str | os.PathLike]) -> None:
    """Refuse an output folder that holds one of the input models: its files would be replaced."""
    target = Path(folder)
    if not target.is_dir():
        return
    for item in checkpoints:
        path = Path(item)
        home = path if path.is_dir() else path.parent
        with contextlib.suppress(OSError):
            if os.path.samefile(home, target):
                raise OutputError(
                    f"output folder {target} holds the input model {item}; its files would be "
                    "replaced: choose another --out"
                )


def check_output_file(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """A file erde may (re)write: its folder exists, it is not a folder and not one of ``inputs``."""
    target = Path(path)
    if target.is_dir():
        raise OutputError(f"output {target} is a folder; give a file name")
    if not target.parent.is_dir():
        raise OutputError(f"the folder of output {target} does not exist: {target.parent}")
    check_not_input(target, inputs)
    if not os.access(target.parent, os.W_OK):
        raise OutputError(f"cannot write {target}: its folder {target.parent} is not writable")
    return target


@contextlib.contextmanager
def atomic_text_output(path: str | os.PathLike) -> Iterator[IO[str]]:
    """A text file handle whose content replaces ``path`` only if the block completes.

    On any error the target keeps its old content (or stays absent) and the
    temporary file is removed.
    """
    target = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        mode = target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask()
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _holder(text: str) -> str:
    """Who holds a lock, from the lock file's JSON (best effort: it may be half-written)."""
    try:
        info = json.loads(text)
        return (
            f"pid {info['pid']} on {info['host']} since {info['started']} "
            f"({info.get('command', '?')})"
        )
    except (ValueError, KeyError, TypeError, RecursionError):
        return "another process"


def _command_line() -> str:
    return " ".join(["erde", *sys.argv[1:]])[:300] if sys.argv else "erde"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, *, enabled: bool = True) -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if needed) while the block runs.

    Re-entrant within one process (a pipeline locks its folder and then calls
    commands that lock it again). Raises :class:`OutputLockedError` naming the
    holder when another process has it, :class:`OutputError` when the folder
    cannot be created or written.
    """
    path = check_output_dir(folder)
    if not enabled:
        yield path
        return
    created = _missing_folders(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create output folder {path}: {_describe_os_error(exc)}"
        ) from None
    key = path.resolve()
    if key in _held:
        _held[key] += 1
        try:
            yield path
        finally:
            _held[key] -= 1
        return
    try:
        fd = _acquire(path / LOCK_NAME)
    except OutputError:
        _remove_if_empty(created)
        raise
    _held[key] = 1
    try:
        yield path
    finally:
        del _held[key]
        _release(path / LOCK_NAME, fd)
        _remove_if_empty(created)  # a command that failed before writing leaves no folder


@contextlib.contextmanager
def folder_update_lock(folder: str | Path) -> Iterator[Path]:
    """Wait for, then hold, an exclusive ``flock`` on ``folder`` itself for a read-modify-write.

    For files that several commands update in turn (``erde reproduce --docs``
    rewrites one block of a shared RESULTS.md): two runs publishing at the same
    moment take turns instead of one losing the other's block. No lock file is
    left behind (the lock is on the folder's own descriptor), and unlike
    :func:`output_lock` it waits, since each holder keeps it for a moment only.
    """
    import fcntl

    path = Path(folder)
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        os.close(fd)  # releases the lock


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return  # not empty (the command wrote something) or already gone


def _acquire(lock: Path) -> int:
    """Open, flock and stamp the lock file; retry if it was replaced while we waited."""
    import fcntl

    for _ in range(10):
        fd = _open_lock_file(lock)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputLockedError(
                    f"{lock.parent} is in use by {_holder(text)}; wait for it to finish or "
                    "choose another --out"
                ) from None
            raise OutputError(f"cannot lock {lock}: {_describe_os_error(exc)}") from None
        try:  # the file we locked must still be the one at the path (not unlinked by a releaser)
            same = os.fstat(fd).st_ino == os.lstat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        stamp = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": _command_line(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(stamp) + "\n").encode(), 0)
        return fd
    raise OutputLockedError(f"{lock.parent}: could not take its lock (contended); try again")


def _open_lock_file(lock: Path) -> int:
    """Open (or create) the lock file itself, never what a link in its place points to.

    The lock file is truncated and stamped, so a symbolic link (even a dangling
    one) or a hard link planted at ``.erde.lock`` would make erde overwrite or
    create a file outside the folder: anything but a plain file of our own is refused.
    """
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(lock, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(
                f"{lock} is a symbolic link; erde writes its lock only as a plain file in the "
                "output folder: remove the link"
            ) from None
        raise OutputError(
            f"cannot write to output folder {lock.parent}: {_describe_os_error(exc)}"
        ) from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink > 1:
        os.close(fd)
        what = (
            "not a plain file" if not stat.S_ISREG(info.st_mode) else "a hard link to another file"
        )
        raise OutputError(
            f"{lock} is {what}; erde writes its lock only as a plain file of its own: remove it"
        )
    return fd


def _release(lock: Path, fd: int) -> None:
    """Remove the lock file while still holding it, then let go."""
    with contextlib.suppress(OSError):
        lock.unlink()
    os.close(fd)


__all__ = [
    "LOCK_NAME",
    "OutputError",
    "OutputLockedError",
    "atomic_text_output",
    "check_not_input",
    "check_out_folder",
    "check_output_dir",
    "check_output_file",
    "files_read_from",
    "output_lock",
]
