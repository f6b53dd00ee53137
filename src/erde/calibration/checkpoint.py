"""Calibration of a checkpoint: open it with its data, record its logits, write its thresholds.

The fitting itself is :mod:`erde.calibration.thresholds` (tensors in, a policy
out); this module is the part that reads files and writes the thresholds file
next to the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from erde.calibration.thresholds import (
    DEFAULT_BUDGETS,
    Calibration,
    Target,
    budgeted_curve,
    calibrate,
)
from erde.errors import ConfigError


def record_logits(
    model: torch.nn.Module,
    splits: Any,
    split: str,
    device: torch.device,
    batch_size: int,
    progress: bool,
) -> tuple[Tensor, Tensor]:
    """Every exit's logits (E, N, K) and the labels (N,) of ``split`` ("val" or "test"), one pass."""
    from erde.data import iterate_batches, prepare_batch
    from erde.evaluation import collect_exit_logits

    data = getattr(splits, split)
    batches = (
        (prepare_batch(x, splits, train=False), y)
        for x, y in iterate_batches(data, batch_size, shuffle=False, device=device)
    )
    return collect_exit_logits(model, batches, device=device, progress=progress)


class CalibrationInput(NamedTuple):
    """A checkpoint opened for calibration: everything the fit and the thresholds file need."""

    ckpt: dict[str, Any]  # the loaded checkpoint (``load_checkpoint``)
    cfg: Any  # ExperimentConfig: the checkpoint's own unless one was given
    splits: Any  # DataSplits, with a non-empty validation split
    model: torch.nn.Module  # on ``device``, in eval mode
    costs: Any  # ExitCosts of the model at the data's image size
    device: torch.device


def open_checkpoint(
    checkpoint: str | Path, cfg: Any = None, device: str | None = None, splits: Any = None
) -> CalibrationInput:
    """Checkpoint, config, data splits, model on device, costs and device, all checked.

    The data set is the checkpoint's own (its saved config) unless ``cfg`` or
    ``splits`` are given; a data set without a validation split is refused
    (thresholds are never chosen on the test set).
    """
    from erde.checkpoints import check_compatible, load_checkpoint, model_from_checkpoint
    from erde.config import config_from_dict
    from erde.data import load_splits
    from erde.distributed import resolve_device
    from erde.models import measure_exit_costs

    ckpt = load_checkpoint(checkpoint)
    cfg = cfg or config_from_dict(ckpt["config"])
    splits = splits or load_splits(cfg)
    check_compatible(ckpt, splits.num_classes, splits.image_shape, "checkpoint")
    if len(splits.val) == 0:
        raise ConfigError(
            "calibration needs a validation split (data.val_fraction > 0); thresholds are "
            "never chosen on the test set"
        )
    dev = resolve_device(device or cfg.device)
    model = model_from_checkpoint(ckpt).to(dev).eval()
    costs = measure_exit_costs(model, splits.image_shape)
    return CalibrationInput(ckpt, cfg, splits, model, costs, dev)


def calibrate_checkpoint(
    checkpoint: str | Path,
    *,
    budget: float | None = None,
    max_drop: float | None = None,
    rule: str = "entropy",
    per_exit: bool = False,
    temperature: bool = False,
    out: str | Path | None = None,
    cfg: Any = None,
    device: str | None = None,
    progress: bool = False,
    splits: Any = None,
) -> tuple[Calibration, Path]:
    """Calibrate a checkpoint on its validation split and write its thresholds file.

    The data set is the checkpoint's own (its saved config) unless ``cfg`` is
    given, or ``splits`` (:class:`erde.data.DataSplits`, e.g. from
    :func:`erde.data.splits_from_tensors`) are. Writes ``<checkpoint
    stem>.thresholds.json`` beside the checkpoint (or ``out``) and returns the
    result and the path.
    """
    Target.create(budget, max_drop)  # fail before loading anything
    check_thresholds_output(checkpoint, out)
    ckpt, cfg, splits, model, costs, dev = open_checkpoint(checkpoint, cfg, device, splits)
    val_logits, val_labels, test_logits, test_labels = val_and_test_logits(
        model, splits, dev, cfg.data.eval_batch_size, progress
    )
    result = calibrate(
        val_logits, val_labels, costs.macs_per_exit, budget=budget, max_drop=max_drop, rule=rule,
        per_exit=per_exit, temperature=temperature, test_logits=test_logits, test_labels=test_labels,
    )  # fmt: skip
    return result, save_checkpoint_thresholds(ckpt, model, splits, costs, result, per_exit, out)


def check_thresholds_output(checkpoint: str | Path, out: str | Path | None) -> Path:
    """Where calibration writes (``out``, else beside the checkpoint), checked before any work.

    Never the checkpoint itself (nor a link to it): a thresholds file written over
    the model would destroy it.
    """
    from erde.inference.policy import thresholds_path
    from erde.outputs import check_output_file

    return check_output_file(
        Path(out) if out is not None else thresholds_path(checkpoint), [checkpoint]
    )


def val_and_test_logits(
    model: torch.nn.Module, splits: Any, dev: torch.device, batch_size: int, progress: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Every exit's logits (E, N, K) and the labels (N,) of the validation and the test split."""
    val_logits, val_labels = record_logits(model, splits, "val", dev, batch_size, progress)
    test_logits, test_labels = record_logits(model, splits, "test", dev, batch_size, progress)
    return val_logits, val_labels, test_logits, test_labels


def save_checkpoint_thresholds(
    ckpt: dict, model: Any, splits: Any, costs: Any, result: Any, per_exit: bool,
    out: str | Path | None,
) -> Path:  # fmt: skip
    """Write ``result``'s thresholds for the checkpoint's model (beside it unless ``out``)."""
    from erde.inference.policy import (
        ModelIdentity,
        model_fingerprint,
        save_thresholds,
        thresholds_path,
    )

    identity = ModelIdentity(
        ckpt["name"], model_fingerprint(ckpt["model"]), splits.num_classes, model.num_exits
    )
    details = {
        **result.to_dict(),
        "checkpoint": ckpt["path"],
        "dataset": splits.name,
        "macs_per_exit": list(costs.macs_per_exit),
        "per_exit": per_exit,
    }
    path = Path(out) if out is not None else thresholds_path(ckpt["path"])
    save_thresholds(path, result.policy, identity, details)
    return path


def budgeted_evaluation(
    checkpoints: Sequence[str | Path],
    *,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    rule: str = "entropy",
    per_exit: bool = False,
    temperature: bool = False,
    cfg: Any = None,
    device: str | None = None,
    progress: bool = False,
    names: Sequence[str] | None = None,
    splits: Any = None,
) -> dict[str, Any]:
    """Budgeted evaluation of each checkpoint, as the dict ``budgeted.json`` holds.

    For each model, the test accuracy and MACs of thresholds fitted on
    validation for each budget (:func:`budgeted_curve`). ``names`` labels the
    models (default: each checkpoint's own). The data set is the first
    checkpoint's own unless ``cfg`` or ``splits`` say otherwise. Writes nothing:
    :func:`erde.report.budgeted.evaluate_budgeted` writes the files.
    """
    from erde import io

    check_budgeted_args(checkpoints, budgets, names)
    models: dict[str, Any] = {}
    for index, checkpoint in enumerate(checkpoints):
        ckpt, cfg, splits, model, costs, dev = open_checkpoint(checkpoint, cfg, device, splits)
        if names is not None:
            ckpt["name"] = names[index]
        if ckpt["name"] in models:
            raise ConfigError(
                f"two checkpoints hold the same model name {ckpt['name']!r}; give each a name of "
                "its own (--names)"
            )
        bs = cfg.data.eval_batch_size
        val = record_logits(model, splits, "val", dev, bs, progress)
        test = record_logits(model, splits, "test", dev, bs, progress)
        models[ckpt["name"]] = {
            "checkpoint": ckpt["path"],
            "macs_per_exit": list(costs.macs_per_exit),
            "curve": budgeted_curve(
                *val,
                *test,
                costs.macs_per_exit,
                budgets,
                rule=rule,
                per_exit=per_exit,
                temperature=temperature,
            ),
        }
    assert splits is not None
    return {
        "rule": rule,
        "per_exit": per_exit,
        "temperature": temperature,
        "dataset": {
            "name": splits.name,
            "val_images": len(splits.val),
            "test_images": len(splits.test),
        },
        "models": models,
        "environment": io.environment_info(),
    }


def check_budgeted_args(
    checkpoints: Sequence[str | Path], budgets: Sequence[float], names: Sequence[str] | None
) -> None:
    """Refuse budgets that are not positive fractions, or names that do not match the checkpoints."""
    from erde.errors import require_list

    for value, what in ((checkpoints, "checkpoints"), (names, "names"), (budgets, "budgets")):
        require_list(value, what)
    if not budgets or any(not (math.isfinite(b) and b > 0) for b in budgets):
        raise ConfigError(f"budgets must be fractions of the full MACs > 0, got {list(budgets)}")
    if names is not None and (len(names) != len(checkpoints) or not all(names)):
        raise ConfigError(
            f"names: one non-empty name per checkpoint ({len(checkpoints)}), got {names}"
        )
