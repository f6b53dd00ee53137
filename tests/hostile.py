"""Helpers for the bad-input tests: crafted files, real erde processes, small file systems.

Each ``test_hostile_*`` module covers one area of input a user hands erde; the
helpers here build the hostile version of a real file and run the real CLI.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import erde

SRC = str(Path(erde.__file__).resolve().parents[1])  # child processes run the erde under test


def crafted_checkpoint(source: Path, target: Path, **changes) -> Path:
    """A copy of a real checkpoint with top-level fields replaced (``model_config`` merged)."""
    ckpt = torch.load(source, map_location="cpu", weights_only=True)
    model_config = changes.pop("model_config", None)
    if model_config:
        ckpt["model_config"] = {**ckpt["model_config"], **model_config}
    ckpt.update(changes)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, target)
    return target


def png(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (H, W) or (H, W, 3) as a PNG (uint16 arrays give a 16-bit greyscale PNG)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def erde(
    *args: str,
    memory_limit: int | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    start_only: bool = False,
) -> subprocess.CompletedProcess | subprocess.Popen:
    """Run ``python -m erde.cli ARGS`` in a child process (optionally under an address-space cap)."""

    def limit() -> None:
        if memory_limit is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))

    full_env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, "-m", "erde.cli", *args]
    if start_only:
        return subprocess.Popen(
            command, env=full_env, preexec_fn=limit, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
    return subprocess.run(
        command, env=full_env, preexec_fn=limit, capture_output=True, text=True, timeout=timeout
    )


def one_error_line(stderr: str) -> str:
    """The CLI's contract for bad input: exactly one ``erde: error:`` line, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    errors = [line for line in lines if line.startswith("erde: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _can_mount() -> str | None:
    """None if this process may mount a tmpfs, else why not."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    if shutil.which("mount") is None:
        return "no mount command"
    return None


@contextlib.contextmanager
def tmpfs(
    where: Path, size: str, read_only: bool = False, fill: Path | None = None
) -> Iterator[Path]:
    """A small tmpfs mounted at ``where`` (files of ``fill`` copied in first; then made read-only).

    Skips the test with the reason when the machine does not allow mounting.
    """
    reason = _can_mount()
    if reason:
        pytest.skip(reason)
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", f"erde-test-{uuid.uuid4().hex[:6]}", str(where)],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        if fill is not None:
            for item in fill.iterdir():
                if item.is_file():
                    shutil.copy2(item, where / item.name)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)
