"""The whole method end to end: teacher, ce/kd/erde students, evaluation, report.

Each step is an ordinary library call, so the CLI stays thin and users can run
the same pipeline from Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from erde.checkpoints import check_compatible, load_checkpoint, model_from_checkpoint
from erde.config import ExperimentConfig, config_from_dict, save_config
from erde.data import DataSplits, iterate_batches, prepare_batch
from erde.distributed import resolve_device
from erde.errors import ConfigError
from erde.evaluation import collect_exit_logits, default_thresholds, model_report
from erde.exits import check_thresholds
from erde.models import measure_exit_costs
from erde.report import build_report, write_report
from erde.training import Job, load_splits, train

STUDENT_METHODS = ("ce", "kd", "erde")


def evaluate_checkpoints(
    checkpoints: Sequence[str | Path],
    out_dir: str | Path,
    *,
    cfg: ExperimentConfig | None = None,
    splits: DataSplits | None = None,
    thresholds: Sequence[float] | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Record every exit's test logits once per checkpoint, sweep thresholds, write the report.

    The data set comes from ``cfg`` (default: the first checkpoint's own config).
    All checkpoints are loaded and checked before anything is written.
    """
    loaded = [load_checkpoint(p) for p in checkpoints]
    if not loaded:
        raise ConfigError("no checkpoint to evaluate")
    if cfg is None:
        cfg = config_from_dict(loaded[0]["config"])
    splits = splits or load_splits(cfg)
    names = [c["name"] for c in loaded]
    if len(set(names)) != len(names):
        raise ConfigError(f"two checkpoints hold the same model name: {names}")
    for ckpt in loaded:
        check_compatible(ckpt, splits.num_classes, splits.image_shape, "checkpoint")
    for rule in cfg.evaluation.rules if thresholds is not None else ():
        for t in thresholds:
            check_thresholds(t, rule, splits.num_classes, 2)  # ValueError naming the rule's range
    device = resolve_device(cfg.device)

    models: dict[str, dict[str, Any]] = {}
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
        per_rule = []
        for rule in cfg.evaluation.rules:
            grid = (
                list(thresholds)
                if thresholds is not None
                else default_thresholds(rule, splits.num_classes, cfg.evaluation.num_thresholds)
            )
            per_rule.append(
                model_report(
                    ckpt["name"], exit_logits, labels, costs.macs_per_exit, costs.params_per_exit,
                    thresholds=grid, rules=(rule,),
                )
            )  # fmt: skip
        report = per_rule[0]
        for extra in per_rule[1:]:
            report["sweep"] = report["sweep"] + extra["sweep"]
        report["checkpoint"] = ckpt["path"]
        report["exit_after"] = ckpt["model_config"].get("exit_after")
        report["arch"] = ckpt["model_config"]["arch"]
        models[ckpt["name"]] = report
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    dataset = {
        "name": splits.name,
        "num_classes": splits.num_classes,
        "image_shape": list(splits.image_shape),
        "test_images": len(splits.test),
        "val_images": len(splits.val),
        "train_images": len(splits.train),
    }
    report = build_report(
        models, config=cfg.to_dict(), dataset=dataset, tolerance=cfg.evaluation.tolerance
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = write_report(out_dir, report)
    save_config(cfg, out_dir / "config.yaml")
    return paths


def run_pipeline(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    methods: Sequence[str] = STUDENT_METHODS,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Path]:
    """Train the teacher and one student per method, then evaluate all of them."""
    out_dir = Path(out_dir)
    unknown = [m for m in methods if m not in STUDENT_METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; valid: {', '.join(STUDENT_METHODS)}")
    splits = load_splits(cfg)
    teacher = train(
        cfg,
        Job("teacher"),
        out_dir / "teacher",
        resume=resume,
        force=force,
        progress=progress,
        splits=splits,
    )
    checkpoints = [teacher]
    for method in methods:
        checkpoints.append(
            train(
                cfg, Job("student", method), out_dir / f"student_{method}",
                teacher_checkpoint=teacher, resume=resume, force=force, progress=progress, splits=splits,
            )
        )  # fmt: skip
    return evaluate_checkpoints(checkpoints, out_dir, cfg=cfg, splits=splits, progress=progress)
