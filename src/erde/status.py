"""``erde status``: where a long run stands, read from its folders while it trains (or after).

A run of many hours writes a checkpoint every epoch (or every N steps) and a
line per epoch to ``metrics.jsonl``; this module reads them back, without
touching anything, and says for every model below a folder: finished, or at
which epoch and step, the last validation accuracy per exit, when the last
checkpoint was written and about how long is left (or, before its first
checkpoint, since when it trains); in an ``erde reproduce`` folder, each student a
seed has not started yet that another seed holds; and whether an erde process
holds the folder's lock now (is the run alive, or was it stopped?).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from erde import io
from erde.checkpoints import load_checkpoint
from erde.errors import ErdeError
from erde.monitor import duration, recent_seconds_per_step
from erde.outputs import LOCK_NAME
from erde.report.curves import curve_of, read_metrics, render_curves_png

MAX_DEPTH = 3  # run folder / seed_<n> / model folder
MAX_MODELS = 200
MAX_LOCK_BYTES = 64 << 10
SEED_FOLDER = re.compile(r"seed_\d+")  # erde reproduce's folder of one seed


@dataclass(frozen=True)
class ModelStatus:
    """One model folder: where its training stands."""

    folder: Path
    finished: bool
    epoch: int  # finished epochs
    epochs: int
    step_in_epoch: int
    steps_per_epoch: int
    val_exit_accuracy: list[float]
    updated: float  # checkpoint mtime (seconds since the epoch)
    eta_seconds: float | None  # None when finished or when no steps have been timed yet
    metrics_error: str | None = None  # why metrics.jsonl could not be read, named in the line


def _records(folder: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The metrics records, or none and why: a broken file is said, not silently skipped."""
    try:
        return read_metrics(folder), None
    except ErdeError as exc:
        return [], str(exc)


def _time_per_step(records: list[dict[str, Any]], steps_per_epoch: int) -> float | None:
    """Seconds per step: the median of the recent epochs' (:func:`recent_seconds_per_step`),
    else, for records written before epochs were timed per step, from the last epoch's
    estimate or its time."""
    if not records or steps_per_epoch < 1:
        return None
    recent = recent_seconds_per_step(records)
    if recent is not None:
        return recent
    record = records[-1]
    eta, epochs = record.get("eta_seconds"), record.get("epochs")
    if eta and epochs:
        left = (int(epochs) - int(record["epoch"])) * steps_per_epoch
        return float(eta) / left if left > 0 else None
    seconds = record.get("seconds")
    return float(seconds) / steps_per_epoch if seconds else None


def _checkpoint_time_per_step(ckpt: dict[str, Any]) -> float | None:
    """The steady seconds per step of the epoch in progress, as its last checkpoint saved it."""
    value = ckpt.get("steady_seconds_per_step")
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if ok and math.isfinite(value) and value > 0 else None


def model_status(folder: str | Path) -> ModelStatus:
    """Read ``folder/checkpoint.pt`` (``weights_only``) and ``metrics.jsonl``."""
    folder = Path(folder)
    ckpt = load_checkpoint(folder)
    role = "teacher_train" if ckpt.get("role") == "teacher" else "student_train"
    epochs = int(((ckpt.get("config") or {}).get(role) or {}).get("epochs") or 0)
    steps = int(ckpt.get("steps_per_epoch") or 0)
    records, metrics_error = _records(folder)
    record = records[-1] if records else None
    finished = bool(ckpt.get("finished"))
    per_step = None
    if not finished:
        per_step = _time_per_step(records, steps) or _checkpoint_time_per_step(ckpt)
    left = max(epochs * steps - int(ckpt["global_step"]), 0)
    return ModelStatus(
        folder=folder,
        finished=finished,
        epoch=int(ckpt["epoch"]),
        epochs=epochs,
        step_in_epoch=int(ckpt["step_in_epoch"]),
        steps_per_epoch=steps,
        val_exit_accuracy=list((record or {}).get("val_exit_accuracy") or []),
        updated=(folder / "checkpoint.pt").stat().st_mtime,
        eta_seconds=per_step * left if per_step is not None else None,
        metrics_error=metrics_error,
    )


def _subfolders(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _walk(root: Path, keep: Callable[[Path], bool]) -> list[Path]:
    """Folders at ``root`` or up to ``MAX_DEPTH`` levels below it for which ``keep`` holds."""
    found: list[Path] = []
    frontier = [root]
    for _ in range(MAX_DEPTH + 1):
        found += [folder for folder in frontier if keep(folder)]
        if len(found) >= MAX_MODELS:
            break
        frontier = [p for folder in frontier for p in _subfolders(folder)]
    return sorted(found)[:MAX_MODELS]


def find_model_folders(root: str | Path) -> list[Path]:
    """Folders holding a ``checkpoint.pt`` at ``root`` or up to ``MAX_DEPTH`` levels below it."""
    return _walk(Path(root), lambda folder: (folder / "checkpoint.pt").is_file())


def _is_started(folder: Path) -> bool:
    """A model whose training began but has not written its first checkpoint yet.

    Training writes the model's ``config.yaml`` first and ``checkpoint.pt`` after
    its first N steps or epoch; a folder of several models (a seed folder) also
    holds a ``config.yaml`` but has model folders below it, and a report folder
    (``erde evaluate``) holds one beside its ``report.json``.
    """
    if not (folder / "config.yaml").is_file() or (folder / "checkpoint.pt").exists():
        return False
    if (folder / "report.json").exists():
        return False
    return not any(
        (sub / "config.yaml").exists() or (sub / "checkpoint.pt").exists()
        for sub in _subfolders(folder)
    )


def find_started_folders(root: str | Path) -> list[Path]:
    """Model folders below ``root`` (as :func:`find_model_folders`) with no checkpoint yet."""
    return _walk(Path(root), _is_started)


def lock_holder(folder: str | Path) -> str | None:
    """Who holds ``folder``'s erde lock now (pid and command), or None.

    Read from the lock file and the kernel's table of flock locks
    (``/proc/locks``, Linux): nothing is locked or opened for writing, so a
    running command is never disturbed. A lock file left by a killed process
    is not held, and reads as None.
    """
    lock = Path(folder) / LOCK_NAME
    table = _flock_table()
    try:
        st = lock.stat()
    except OSError:
        return None
    if table is None:
        return None
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    if not any(
        line.split()[1:2] == ["FLOCK"] and device in line.split() for line in table.splitlines()
    ):
        return None
    try:  # not through a link, and a FIFO planted there must not block the read
        fd = os.open(lock, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            info = json.loads(f.read(MAX_LOCK_BYTES))  # a lock file is a line of JSON
        return f"pid {info['pid']} ({info.get('command', 'erde')})"
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "an erde process"


def _flock_table() -> str | None:
    """The kernel's table of file locks (Linux), or None where there is none to read."""
    try:
        return Path("/proc/locks").read_text()
    except OSError:
        return None


def _line(s: ModelStatus, root: Path, now: float) -> str:
    name = str(s.folder.relative_to(root)) if s.folder != root else s.folder.name
    if s.finished:
        where = f"finished ({s.epochs} epochs)"
    else:
        where = f"epoch {s.epoch + 1}/{s.epochs} step {s.step_in_epoch}/{s.steps_per_epoch}"
    acc = "/".join(f"{100 * a:.1f}" for a in s.val_exit_accuracy)
    parts = [f"{name}: {where}"]
    if acc:
        parts.append(f"val acc {acc} %")
    parts.append(f"checkpoint {duration(max(now - s.updated, 0))} ago")
    if s.eta_seconds is not None:
        parts.append(f"about {duration(s.eta_seconds)} left")
    if s.metrics_error:
        parts.append(f"metrics unreadable ({s.metrics_error})")
    return ", ".join(parts)


def _started_line(folder: Path, root: Path, now: float) -> str:
    name = str(folder.relative_to(root)) if folder != root else folder.name
    begun = duration(max(now - (folder / "config.yaml").stat().st_mtime, 0))
    return f"{name}: started {begun} ago, no checkpoint yet"


def _not_started(folders: list[Path], root: Path) -> list[Path]:
    """Student folders that a seed of an ``erde reproduce`` run lacks and another of its seeds
    holds: what the run has still to train, where nothing of it is on disk yet (a seed
    folder with no model in it yet counts too).

    Teachers are left out: seeds that share another seed's teacher never train one.
    """
    by_seed: dict[Path, set[str]] = {}
    for folder in folders:
        if SEED_FOLDER.fullmatch(folder.parent.name):
            by_seed.setdefault(folder.parent, set()).add(folder.name)
    missing = []
    runs = {seed.parent for seed in by_seed if seed.parent.is_relative_to(root)}  # not above
    for run in runs:  # its seed folders, those with no model too
        seeds = {
            seed: by_seed.get(seed, set())
            for seed in _subfolders(run)
            if SEED_FOLDER.fullmatch(seed.name)
        }
        students = {name for held in seeds.values() for name in held if name != "teacher"}
        missing += [seed / name for seed, held in seeds.items() for name in students - held]
    return sorted(missing)


def status_lines(root: str | Path, now: float | None = None) -> list[str]:
    """One line per model below ``root`` (and per student a seed has still to train, where
    another seed of the run holds it), then whether an erde process is writing there."""
    root = Path(root)
    started = find_started_folders(root) if root.is_dir() else []
    folders = _folders_of(root) if not started else find_model_folders(root)
    now = time.time() if now is None else now
    lines = {}
    for folder in folders:
        try:
            lines[folder] = _line(model_status(folder), root, now)
        except ErdeError as exc:
            lines[folder] = f"{folder.relative_to(root)}: unreadable ({exc})"
    for folder in started:
        lines[folder] = _started_line(folder, root, now)
    for folder in _not_started(list(lines), root):
        lines[folder] = f"{folder.relative_to(root)}: not started (another seed here has it)"
    folders = sorted(lines)
    lines = [lines[folder] for folder in folders]
    # the lock sits on the folder the command writes to: the model's, or any above it up to
    # root (erde reproduce locks its --out, two levels above a model), or just above root
    candidates = {*root.resolve().parents[:2], root}
    for folder in folders:
        candidates |= {folder, *(p for p in folder.parents if p.is_relative_to(root))}
    holders = {h for f in candidates if (h := lock_holder(f))}
    if holders:
        lines.append("running: " + "; ".join(sorted(holders)))
    elif _flock_table() is None:
        lines.append("running or not: unknown here (no /proc/locks to read the folder's lock)")
    else:
        lines.append(
            "not running: no erde process holds these folders (resume with the same command)"
        )
    return lines


def _folders_of(root: Path) -> list[Path]:
    """The model folders below ``root``, or one error saying why there are none."""
    if not root.is_dir():
        what = (
            "not a folder (give a run folder or a model folder)"
            if root.exists()
            else "no such folder"
        )
        raise ErdeError(f"{root}: {what}")
    folders = find_model_folders(root)
    if not folders:
        raise ErdeError(f"{root}: no checkpoint.pt here or up to {MAX_DEPTH} folders below")
    return folders


def write_status_plot(root: str | Path, path: str | Path) -> list[str]:
    """Draw the training curves of every model below ``root`` into the PNG ``path``.

    One panel per model (named by its folder below ``root``): validation
    accuracy per exit over the finished epochs, read from metrics.jsonl while
    the run goes on. Returns a line per model left out (no finished epoch yet,
    or an unreadable metrics file); nothing is written when no model has one.
    """
    root, path = Path(root), Path(path)
    if path.suffix.lower() != ".png":
        raise ErdeError(f"{path}: the plot is a PNG file; give a name ending in .png")
    if path.is_dir():
        raise ErdeError(f"{path}: is a folder; give a file name ending in .png")
    curves, skipped = {}, []
    for folder in _folders_of(root):
        name = str(folder.relative_to(root)) if folder != root else folder.name
        try:
            curve = curve_of(read_metrics(folder))
        except ErdeError as exc:
            skipped.append(f"{name}: not plotted ({exc})")
            continue
        if curve["epoch"]:
            curves[name] = curve
        else:
            skipped.append(f"{name}: not plotted (no finished epoch yet)")
    if not curves:
        raise ErdeError(f"{root}: no model has finished an epoch yet; nothing to plot")
    title = f"Training curves: {root.resolve().name}"
    io.atomic_write_bytes(path, render_curves_png(curves, title=title))
    return skipped


__all__ = [
    "ModelStatus",
    "find_model_folders",
    "lock_holder",
    "model_status",
    "status_lines",
    "write_status_plot",
]
