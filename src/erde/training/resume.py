"""Resuming and reusing: which checkpoint a run continues, and what it refuses to continue.

A run continues from its own checkpoint only when the model, the data, the
steps per epoch, the settings that shape what it learns and (for a student)
the teacher are the same; otherwise one clear error says which differs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from erde.checkpoints import check_compatible, load_checkpoint
from erde.config import ExperimentConfig, ModelConfig, explicit_split_seed
from erde.data import DataSplits
from erde.errors import CheckpointError, ConfigError
from erde.io import file_sha256
from erde.training.jobs import Job


def existing_checkpoint(out_dir: Path, resume: bool, force: bool) -> dict[str, Any] | None:
    """Checkpoint to resume from, after refusing to silently overwrite finished work."""
    path = out_dir / "checkpoint.pt"
    if not path.exists():
        return None
    if resume:
        return load_checkpoint(path)
    if force:
        return None
    raise ConfigError(
        f"{path} already exists; pass --resume to continue it or --force to start over"
    )


def check_resumable(
    previous: dict[str, Any], job: Job, mcfg: ModelConfig, splits: DataSplits, steps: int
) -> None:
    """Refuse a checkpoint of another model, data set, architecture or steps per epoch."""
    check_compatible(previous, splits.num_classes, splits.image_shape, "checkpoint to resume")
    if previous.get("name") != job.name:
        raise CheckpointError(f"{previous['path']} holds {previous.get('name')}, not {job.name}")
    wanted = dataclasses.asdict(mcfg)
    changed = [k for k in wanted if previous["model_config"].get(k) != wanted[k]]
    if changed:
        k = changed[0]
        raise CheckpointError(
            f"{previous['path']} holds a model with {k}={previous['model_config'].get(k)!r} but "
            f"the config asks for {k}={wanted[k]!r}; resume with the config it was trained with"
        )
    saved = previous.get("steps_per_epoch", steps)
    if saved != steps and not previous.get("finished"):
        raise CheckpointError(
            f"{previous['path']} was written with {saved} steps per epoch "
            f"({previous.get('world_size', 1)} process(es), batch size {previous.get('batch_size')}); "
            f"this run has {steps}: resume with the same number of processes and data.batch_size"
        )


# Settings that do not change what a model learns: a resumed run may differ in them.
# switches that change speed, not the method (results move by float round-off at most)
PERFORMANCE_ONLY = ("checkpoint_every_steps", "compile", "channels_last")


_NOT_COMPARED = (
    "device",
    "data.data_dir",
    "data.eval_batch_size",
    "distill.method",
    "distill.students",  # the list of a side-by-side run; each student compares its own settings
    *(f"{t}.{k}" for t in ("teacher_train", "student_train")
      for k in PERFORMANCE_ONLY),
)  # fmt: skip


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def settings_that_shape(job: Job) -> tuple[str, ...]:
    """Config sections (and keys) a model of ``job`` depends on."""
    if job.role == "teacher":
        return ("data", "teacher", "teacher_train", "seed")
    return ("data", "student", "student_train", "distill", "seed")


def config_differences(saved: dict[str, Any], wanted: dict[str, Any], job: Job) -> list[str]:
    """``key: saved -> wanted`` for every setting of ``job`` that differs."""
    old, new = _flatten(explicit_split_seed(saved)), _flatten(explicit_split_seed(wanted))
    sections = settings_that_shape(job)
    keys = [
        k
        for k in new
        if k.split(".")[0] in sections and k not in _NOT_COMPARED and old.get(k, new[k]) != new[k]
    ]
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in keys]


def check_same_settings(previous: dict[str, Any], cfg: ExperimentConfig, job: Job) -> None:
    """Refuse to reuse or continue a model trained with other settings than those asked for.

    Otherwise the report and config.yaml written next would claim settings the
    model was never trained with.
    """
    diffs = config_differences(previous["config"], cfg.to_dict(), job)
    if diffs:
        shown = "; ".join(diffs[:8]) + (f"; and {len(diffs) - 8} more" if len(diffs) > 8 else "")
        raise ConfigError(
            f"{previous['path']} was trained with other settings than asked for ({shown}); "
            "resume with the same configuration, or pass --allow-config-change to use it anyway"
        )


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """Global RNG states (dropout). Every rank draws the same stream, so rank 0's is everyone's."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Make ``state`` (from :func:`rng_state`) the global RNG state again."""
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def remove_stale_temp_files(out_dir: Path) -> None:
    """Half-written checkpoints a killed process left behind (never the checkpoint itself)."""
    for stale in out_dir.glob(".checkpoint.pt.*.tmp"):
        stale.unlink(missing_ok=True)


def teacher_sha256(teacher_checkpoint: str | Path) -> str:
    """The sha256 of the teacher's checkpoint file: which teacher a student learnt from."""
    path = Path(teacher_checkpoint)
    return file_sha256(path / "checkpoint.pt" if path.is_dir() else path)


def check_same_teacher(
    previous: dict[str, Any], teacher_checkpoint: str | Path | None, sha: str | None
) -> None:
    """Refuse to reuse or continue a student distilled from a teacher that has since changed.

    Students written before the field existed carry no ``teacher_sha256``: accepted unchecked.
    """
    saved = previous.get("teacher_sha256")
    if saved is None or sha is None or saved == sha:
        return
    raise CheckpointError(
        f"{previous['path']} was distilled from another teacher: {teacher_checkpoint} has "
        f"changed since (sha256 {str(saved)[:12]}... then, {sha[:12]}... now); pass --force "
        f"to train it again from this teacher, or remove {Path(previous['path']).parent}"
    )
