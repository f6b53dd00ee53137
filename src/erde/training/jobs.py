"""What one model of a training loop is: its job, model, teacher and loss.

A :class:`Job` is the teacher or one student (a registered method with its own
loss settings); :func:`make_loss` turns it into the per-batch loss the loop
calls, from :mod:`erde.losses`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from erde.checkpoints import check_compatible, load_checkpoint, model_from_checkpoint
from erde.config import (
    DistillConfig,
    ExperimentConfig,
    ModelConfig,
    StudentSpec,
    parse_student,
    spec_distill,
)
from erde.data import DataSplits
from erde.errors import CheckpointError, ConfigError
from erde.losses import METHODS, exit_mapping, exit_mapping_by_cost, student_loss, teacher_loss
from erde.models import build_model, measure_exit_costs


# (student exit logits, teacher exit logits or None, labels) -> {"total": loss, term: value}
@dataclass
class Job:
    """What one call of :func:`train` trains: the teacher or one student.

    A student is a method (``Job("student", "kd")``) or a spec with a name and its
    own loss settings (:meth:`student`, e.g. ERDE at gamma 2 as ``student_erde_g2``).
    """

    role: str  # teacher | student
    method: str | None = None  # ce | kd | erde for students
    spec: StudentSpec | None = None  # a named student with its own settings

    @classmethod
    def student(cls, spec: StudentSpec | str) -> Job:
        """The job of a spec, or of ``NAME[=METHOD][:key=value]...`` text (just ``kd`` works)."""
        spec = parse_student(spec) if isinstance(spec, str) else spec
        return cls("student", spec.method, spec)

    @property
    def name(self) -> str:
        if self.role == "teacher":
            return "teacher"
        return f"student_{self.spec.name if self.spec is not None else self.method}"

    def config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        """``cfg`` as this model trains with it: a student's ``distill`` is its own.

        This is the config saved next to the student's checkpoint, so each one
        says which method and which gamma, beta, ... it was trained with.
        """
        if self.role == "teacher":
            return cfg
        spec = self.spec or StudentSpec(str(self.method), str(self.method))
        return dataclasses.replace(cfg, distill=spec_distill(cfg.distill, spec))


def needs_teacher(job: Job) -> bool:
    """Whether ``job`` is a student whose registered method learns from the teacher's logits."""
    return job.role == "student" and METHODS[str(job.method)].needs_teacher


LossFn = Callable[[list[torch.Tensor], list[torch.Tensor] | None, torch.Tensor], dict]


def build_job_model(mcfg: ModelConfig, splits: DataSplits, role: str) -> nn.Module:
    """The early-exit model ``mcfg`` describes, for the data's classes and image size.

    The image size is where ``exit_at_macs`` is measured and a user's network is
    probed; checkpoints record it, so a loaded model gets the same exits.
    """
    try:
        return build_model(
            num_classes=splits.num_classes,
            input_shape=splits.image_shape,
            **dataclasses.asdict(mcfg),
        )
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{role}: {exc}") from None


def load_teacher(path: str | Path, splits: DataSplits, device: torch.device) -> nn.Module:
    """The teacher of ``path`` on ``device``, frozen in eval mode, checked against the data."""
    ckpt = load_checkpoint(path)
    if ckpt.get("role") != "teacher":
        raise CheckpointError(f"{ckpt['path']} is a {ckpt.get('role')} checkpoint, not a teacher")
    check_compatible(ckpt, splits.num_classes, splits.image_shape, "teacher checkpoint")
    teacher = model_from_checkpoint(ckpt).to(device)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def default_exit_mapping(
    distill: DistillConfig, student: nn.Module, teacher: nn.Module, image_shape: tuple
) -> list[int]:
    """Teacher exit per student exit by relative depth (exit index) or relative cost (MACs)."""
    if distill.exit_mapping_by == "cost":
        return exit_mapping_by_cost(
            measure_exit_costs(student, image_shape).macs_per_exit,
            measure_exit_costs(teacher, image_shape).macs_per_exit,
        )
    return exit_mapping(student.num_exits, teacher.num_exits)


def exit_mapping_for(
    cfg: ExperimentConfig, model: nn.Module, teacher: nn.Module | None, splits: DataSplits
) -> list[int]:
    """Teacher exit for each student exit, checked against both models."""
    assert teacher is not None
    mapping = cfg.distill.exit_mapping or default_exit_mapping(
        cfg.distill, model, teacher, splits.image_shape
    )
    if len(mapping) != model.num_exits or not all(0 <= m < teacher.num_exits for m in mapping):
        raise ConfigError(
            f"distill.exit_mapping must give one teacher exit in [0, {teacher.num_exits - 1}] "
            f"for each of the student's {model.num_exits} exits, got {mapping}"
        )
    return mapping


def make_loss(
    job: Job,
    weights: list[float],
    mapping: list[int],
    d: DistillConfig,
    label_smoothing: float = 0.0,
) -> LossFn:
    """(student exit logits, teacher exit logits or None, labels) -> dict of loss terms."""
    if job.role == "teacher":
        return lambda exit_logits, _teacher, labels: teacher_loss(
            exit_logits, labels, weights, label_smoothing=label_smoothing
        )

    def loss(exit_logits, teacher_logits, labels):
        return student_loss(
            job.method, exit_logits, teacher_logits, labels, weights, mapping,
            alpha=d.alpha, beta=d.beta, gamma=d.gamma, tau=d.temperature,
            label_smoothing=label_smoothing, uncertain_above=d.uncertain_above,
        )  # fmt: skip

    return loss


def check_jobs(jobs: Sequence[Job], out_dirs: Sequence[Path]) -> None:
    """Refuse a set of jobs one loop cannot train: none, duplicates, shared folders, unknown methods."""
    if not jobs:
        raise ConfigError("nothing to train: no job given")
    if len(jobs) != len(out_dirs):
        raise ConfigError(f"{len(jobs)} jobs but {len(out_dirs)} output folders")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ConfigError(f"each model may be trained once per call, got {names}")
    if len({d.resolve() for d in out_dirs}) != len(out_dirs):
        raise ConfigError("each model needs its own output folder")
    if any(j.role == "teacher" for j in jobs) and len(jobs) > 1:
        raise ConfigError("the teacher trains alone: its students need it finished")
    bad = [j.method for j in jobs if j.role == "student" and j.method not in METHODS]
    if bad:
        raise ConfigError(f"unknown student method(s) {bad}; valid: {', '.join(METHODS)}")
