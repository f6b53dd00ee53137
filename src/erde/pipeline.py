"""The whole method end to end: teacher, ce/kd/erde students, evaluation, report.

Each step is an ordinary library call, so the CLI stays thin and users can run
the same pipeline from Python.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from erde import distributed as D
from erde import io
from erde.checkpoints import check_compatible, load_checkpoint, model_from_checkpoint
from erde.config import (
    STUDENT_METHODS,
    ExperimentConfig,
    StudentSpec,
    check_students,
    config_from_dict,
    parse_student,
    save_config,
    student_specs,
)
from erde.data import DataSplits, iterate_batches, prepare_batch
from erde.diagnostics import run_diagnostics
from erde.distributed import resolve_device
from erde.errors import ConfigError, ReportError, require_list
from erde.evaluation import collect_exit_logits, default_thresholds, model_report
from erde.exits import ThresholdError, check_thresholds
from erde.models import measure_exit_costs
from erde.models.custom import config_modules, trusted_modules
from erde.outputs import check_out_folder
from erde.records import ExitRecords, exit_records, save_records
from erde.report import build_report, dataset_summary, write_report
from erde.report.curves import folder_curves, render_curves_png
from erde.report.html import MAX_REPORT_BYTES, write_report_html
from erde.training import EpochCallback, Job, build_job_model, load_splits, train, train_students

__all__ = ["STUDENT_METHODS", "as_specs", "evaluate_checkpoints", "run_pipeline"]


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path],
    out_dir: str | Path,
    *,
    cfg: ExperimentConfig | None = None,
    splits: DataSplits | None = None,
    thresholds: Sequence[float] | None = None,
    progress: bool = True,
    names: Sequence[str] | None = None,
    records: str | Path | None = None,
) -> dict[str, Path]:
    """Record every exit's test logits once per checkpoint, sweep thresholds, write the report.

    With ``records``, the per-image records of every model (:mod:`erde.records`) are
    written there too, keyed by model name.

    The data set comes from ``cfg`` (default: the first checkpoint's own config).
    All checkpoints are loaded and checked before anything is written. ``names``
    labels the models in the report (default: each checkpoint's own, e.g.
    ``student_erde``), for comparing several students trained with one method.
    """
    for value, what in ((checkpoints, "checkpoints"), (names, "names"), (thresholds, "thresholds")):
        require_list(value, what)
    loaded = [load_checkpoint(p) for p in checkpoints]
    if not loaded:
        raise ConfigError("no checkpoint to evaluate")
    check_out_folder(out_dir, [c["path"] for c in loaded])  # its config.yaml would be replaced
    if names is not None:
        if len(names) != len(loaded) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(
                f"names: one non-empty name per checkpoint ({len(loaded)}), got {names}"
            )
        for ckpt, name in zip(loaded, names, strict=True):
            ckpt["name"] = name
    if cfg is None:
        cfg = config_from_dict(loaded[0]["config"])
    splits = splits or load_splits(cfg)
    names = [c["name"] for c in loaded]
    if len(set(names)) != len(names):
        raise ConfigError(
            f"two checkpoints hold the same model name: {names}; give each a name of its own "
            "(erde evaluate --names, or names=[...] from Python)"
        )
    for ckpt in loaded:
        check_compatible(ckpt, splits.num_classes, splits.image_shape, "checkpoint")
    if thresholds is not None and len(thresholds) == 0:
        raise ThresholdError("no thresholds given; pass at least one or none for the default grid")
    grids = {  # one grid per rule; a given grid is range-checked for every rule before any work
        rule: [check_thresholds(t, rule, splits.num_classes, 2)[0] for t in thresholds]
        if thresholds is not None
        else default_thresholds(rule, splits.num_classes, cfg.evaluation.num_thresholds)
        for rule in cfg.evaluation.rules
    }
    device = resolve_device(cfg.device)

    models: dict[str, dict[str, Any]] = {}
    per_image: dict[str, ExitRecords] = {}
    for ckpt in loaded:
        model = model_from_checkpoint(ckpt).to(device)
        costs = measure_exit_costs(model, splits.image_shape)
        batches = (
            (prepare_batch(x, splits, train=False), y)
            for x, y in iterate_batches(
                splits.test, cfg.data.eval_batch_size, shuffle=False, device=device
            )
        )
        exit_logits, labels = collect_exit_logits(model, batches, device=device, progress=progress)
        per_image[ckpt["name"]] = exit_records(exit_logits)  # small: (E, N) per field
        models[ckpt["name"]] = model_report(
            ckpt["name"], exit_logits, labels, costs.macs_per_exit, costs.params_per_exit,
            thresholds=grids, rules=cfg.evaluation.rules,
            extra={
                "checkpoint": ckpt["path"],
                "exit_after": ckpt["model_config"].get("exit_after"),
                "arch": ckpt["model_config"]["arch"],
            },
        )  # fmt: skip
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    dataset = dataset_summary(
        splits.name, splits.num_classes, splits.image_shape,
        len(splits.test), len(splits.val), len(splits.train),
    )  # fmt: skip
    report = build_report(
        models, config=cfg.to_dict(), dataset=dataset, tolerance=cfg.evaluation.tolerance
    )
    diagnostics = run_diagnostics(
        per_image, labels.cpu().numpy(), {name: m["macs_per_exit"] for name, m in models.items()}
    )
    if diagnostics is not None:  # a teacher and a KD student: what the entropy term changed
        report["entropy_diagnostics"] = diagnostics
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_report(out_dir, report)
    paths["html"] = write_report_html(out_dir, report)
    curves = folder_curves({c["name"]: Path(c["path"]).parent for c in loaded})
    if any(c["epoch"] for c in curves.values()):  # checkpoints from elsewhere may have no metrics
        paths["training"] = out_dir / "training.png"
        io.atomic_write_bytes(paths["training"], render_curves_png(curves, title="Training curves"))
    save_config(cfg, out_dir / "config.yaml")
    if records is not None:
        save_records(records, per_image, labels)
        paths["records"] = Path(records)
    return paths


def as_specs(
    methods: Sequence[str | StudentSpec] | None, cfg: ExperimentConfig
) -> list[StudentSpec]:
    """Students to train: ``methods`` (names, spec text or specs), else ``distill.students``.

    Unknown methods, duplicate names and settings out of range are one ConfigError.
    """
    if methods is None:
        return student_specs(cfg.distill)
    if isinstance(methods, str):
        raise ConfigError(f"methods must be a list of students, got the string {methods[:80]!r}")
    specs = [parse_student(m) if isinstance(m, str) else m for m in methods]
    if specs:  # none: the teacher alone
        check_students(specs)
    return specs


def check_teacher_folder(source: str | Path, target: str | Path | None = None) -> None:
    """Refuse (``ConfigError``) a ``--teacher`` folder without checkpoint.pt and config.yaml,
    a checkpoint that is not a finished teacher, or a ``target`` already holding another
    teacher: checked before any data is read or file written."""
    source = Path(source)
    files = [source / "checkpoint.pt", source / "config.yaml"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"--teacher {source}: needs checkpoint.pt and config.yaml, missing "
                          f"{', '.join(missing)}")  # fmt: skip
    ckpt = load_checkpoint(files[0])
    if ckpt.get("role") != "teacher" or not ckpt.get("finished"):
        raise ConfigError(f"--teacher {source}: not a finished teacher checkpoint")
    there = None if target is None else Path(target) / "checkpoint.pt"
    if there is not None and there.exists() and there.read_bytes() != files[0].read_bytes():
        raise ConfigError(f"{target} already holds another teacher; use another --out")


def place_teacher(source: str | Path, target: str | Path) -> bool:
    """Copy a released teacher folder (checkpoint.pt, config.yaml, metrics.jsonl) to
    ``target``, so that a run folder holds every model it reports; True when copied, False
    when the same checkpoint is already there. Refused as :func:`check_teacher_folder`
    says, nothing copied."""
    import shutil

    source, target = Path(source), Path(target)
    check_teacher_folder(source, target)
    if (target / "checkpoint.pt").exists():
        return False
    target.mkdir(parents=True, exist_ok=True)
    # checkpoint last, each file whole (copied aside, then renamed): a process starting
    # beside this one (erde reproduce --only-seeds) sees a teacher folder finished or none
    for f in (source / "config.yaml", source / "metrics.jsonl", source / "checkpoint.pt"):
        if f.is_file():
            aside = target / f".{f.name}.{os.getpid()}.part"
            shutil.copy2(f, aside)
            os.replace(aside, target / f.name)
    return True


def run_pipeline(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    methods: Sequence[str | StudentSpec] | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    allow_config_change: bool = False,
    on_epoch: EpochCallback | None = None,
    teacher: str | Path | None = None,
) -> dict[str, Path]:
    """Train the teacher, then one student per method side by side, then evaluate all of them.

    The students share every batch and one teacher forward per batch (see
    :func:`erde.training.train_students`), so they differ only by their loss.
    ``methods``: method names or student specs (``NAME=METHOD:key=value`` text or
    :class:`~erde.config.StudentSpec`); default ``distill.students`` (ce, kd, erde).
    ``teacher``: a finished teacher's folder (e.g. a released one) to distil from instead of
    training one; it is copied into ``out_dir/teacher`` (:func:`place_teacher`) and reported
    with the students.

    Every output folder is checked before the first model is trained, so a run
    into a folder that already holds checkpoints fails without touching any
    file unless ``resume`` or ``force`` says what to do with them.
    ``on_epoch(out_dir, record)`` is called after every epoch of every model.
    """
    out_dir = Path(out_dir)
    specs = as_specs(methods, cfg)
    names = [f"student_{spec.name}" for spec in specs]
    given = teacher is not None
    existing = [
        out_dir / name / "checkpoint.pt"
        for name in (*(() if given else ("teacher",)), *names)
        if (out_dir / name / "checkpoint.pt").exists()
    ]
    if existing and not (resume or force):
        raise ConfigError(
            f"{out_dir} already holds {', '.join(str(p) for p in existing)}; "
            "pass --resume to continue (finished models are reused) or --force to start over"
        )
    if resume and not force and not allow_config_change:
        _check_same_models(out_dir, ["teacher", *names])
    if given:
        if not specs:
            raise ConfigError("a given teacher and no students: nothing to train; name --students")
        check_teacher_folder(teacher, out_dir / "teacher")
    splits = load_splits(cfg)
    for role in ("student",) if given else ("teacher", "student") if specs else ("teacher",):
        build_job_model(getattr(cfg, role), splits, role)  # fails before any model trains
    if given:
        ctx, _ = D.setup(cfg.device)
        if ctx.is_main:  # one copy under torchrun; the other ranks wait for it
            place_teacher(teacher, out_dir / "teacher")
        D.barrier(ctx)
        teacher = out_dir / "teacher" / "checkpoint.pt"
    else:
        teacher = train(
            cfg, Job("teacher"), out_dir / "teacher", resume=resume, force=force,
            progress=progress, splits=splits, allow_config_change=allow_config_change,
            on_epoch=on_epoch,
        )  # fmt: skip
    students = train_students(
        cfg, specs, [out_dir / name for name in names], teacher_checkpoint=teacher,
        resume=resume, force=force, progress=progress, splits=splits,
        allow_config_change=allow_config_change,
        on_epoch=on_epoch,
    )  # fmt: skip
    checkpoints = [teacher, *students]
    ctx, _ = D.setup(cfg.device)  # already joined by train(); rank 0 alone evaluates and writes
    paths: dict[str, Path] = {}
    if ctx.is_main:
        with trusted_modules(config_modules(cfg)):  # the models this config itself names
            paths = evaluate_checkpoints(
                checkpoints, out_dir, cfg=cfg, splits=splits, progress=progress
            )
    D.barrier(ctx)
    return paths


def _check_same_models(out_dir: Path, names: list[str]) -> None:
    """A resumed run must not silently replace a report on other models with a smaller one."""
    path = out_dir / "report.json"
    if not path.is_file():
        return
    try:
        report = io.read_json(path, max_bytes=MAX_REPORT_BYTES, error=ReportError, what="a report")
        before = list(report.get("models", {}))
    except (ReportError, AttributeError, TypeError):
        return  # an unreadable report is replaced like a missing one
    if sorted(before) != sorted(names):
        raise ConfigError(
            f"{path} reports {', '.join(before)}; this run would replace it with a report on "
            f"{', '.join(names)}; pass the same --methods, or --allow-config-change to replace it"
        )
