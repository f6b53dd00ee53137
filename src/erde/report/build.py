"""The report's JSON: per-model evaluations turned into one comparison (schema_version 1).

The JSON is the source of truth; the Markdown, the plots, sweep.csv and the
HTML page are rendered from it (:mod:`erde.report.files`), so all always agree.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from erde import io
from erde.evaluation import (
    SweepPoint,
    mac_reduction_at_equal_accuracy,
    reduction_ladder,
    reference_point,
)
from erde.report.styles import model_label, pct

SCHEMA_VERSION = 1


def dataset_summary(
    name: str,
    num_classes: int,
    image_shape: Sequence[int],
    test_images: int,
    val_images: int | None = None,
    train_images: int | None = None,
) -> dict[str, Any]:
    """The ``dataset`` block of the report, with the key names the schema fixes."""
    return {
        "name": name,
        "num_classes": int(num_classes),
        "image_shape": [int(s) for s in image_shape],
        "test_images": int(test_images),
        "val_images": None if val_images is None else int(val_images),
        "train_images": None if train_images is None else int(train_images),
    }


def _check_model(name: str, model: Mapping[str, Any]) -> None:
    """A model entry must be a :func:`erde.evaluation.model_report` dict."""
    missing = [k for k in ("exit_accuracy", "macs_per_exit", "sweep") if k not in model]
    if missing:
        raise ValueError(f"model {name!r} lacks {', '.join(missing)}; use evaluation.model_report")


def _reference(models: Mapping[str, Mapping[str, Any]], wanted: str, tolerance: float) -> dict:
    """Reference operating point: last exit of ``wanted``, else of the first model (noted)."""
    name = wanted if wanted in models else next(iter(models))
    accuracy, macs = reference_point(models[name])
    ref: dict[str, Any] = {
        "model": name,
        "accuracy": accuracy,
        "macs": macs,
        "tolerance": tolerance,
    }
    if name != wanted:
        ref["note"] = f"reference model {wanted!r} absent; using the last exit of {name!r}"
    return ref


# A reference within this many points of chance (1 / classes) counts as not trained: its
# "equal accuracy" is what guessing reaches, and any model beats it with no computation.
UNTRAINED_MARGIN = 0.05


def chance_accuracy(
    models: Mapping[str, Mapping[str, Any]], name: str, dataset: Mapping[str, Any] | None
) -> float | None:
    """1 / classes of the data set (or of the model ``name``), None when neither says."""
    classes = (dataset or {}).get("num_classes") or models[name].get("num_classes")
    return 1.0 / classes if classes and classes > 1 else None


def reference_untrained(ref: Mapping[str, Any]) -> bool:
    """Whether the reference is at or near chance, so no reduction may be claimed against it."""
    chance = ref.get("chance_accuracy")
    return chance is not None and ref["accuracy"] <= chance + UNTRAINED_MARGIN


def untrained_text(ref: Mapping[str, Any]) -> str:
    """One sentence: the reference is not trained, so no MAC reduction is claimed."""
    return (
        f"the reference ({model_label(ref['model'])}, last exit {pct(ref['accuracy'])}) is "
        f"not trained: within {100 * UNTRAINED_MARGIN:g} points of chance "
        f"({pct(ref['chance_accuracy'])}), so no MAC reduction is claimed against it; "
        "train it longer or with more optimiser steps per epoch (a smaller data.batch_size)"
    )


def _report_rule(models: Mapping[str, Mapping[str, Any]], wanted: str) -> str:
    """``wanted`` if any model was swept with it, else the first rule that was (e.g. max_softmax only)."""
    present = [p["rule"] for model in models.values() for p in model["sweep"]]
    return wanted if wanted in present or not present else present[0]


def _sweep_points(model: Mapping[str, Any], rule: str) -> list[SweepPoint]:
    """The model's sweep points for one rule."""
    return [SweepPoint.from_dict(p) for p in model["sweep"] if p["rule"] == rule]


def build_report(
    models: Mapping[str, Mapping[str, Any]],
    *,
    reference: str = "teacher",
    config: Mapping[str, Any] | None = None,
    dataset: Mapping[str, Any] | None = None,
    tolerance: float = 0.005,
    rule: str = "entropy",
) -> dict[str, Any]:
    """Assemble the full report from ``{name: evaluation.model_report(...)}``.

    Any subset of models works. Each model gains ``mac_reduction``: the
    cheapest ``rule`` threshold within ``tolerance`` of the reference's
    last-exit accuracy (None if no threshold gets there), and
    ``mac_reduction_by_tolerance``: the same for 0.5, 1, 2 and 5 points, split
    into network x exits (:func:`erde.evaluation.reduction_ladder`). When no model was
    swept with ``rule``, the first rule found in the sweeps is used instead;
    the rule used is recorded as ``reference.rule``. A reference within
    ``UNTRAINED_MARGIN`` of chance is recorded as ``reference.untrained`` (with
    ``reference.chance_accuracy``) and no model gets a reduction against it.
    Inputs are not mutated.
    """
    if not models:
        raise ValueError("no models to report")
    for name, model in models.items():
        _check_model(name, model)
    rule = _report_rule(models, rule)
    ref = _reference(models, reference, tolerance)
    ref["rule"] = rule
    ref["chance_accuracy"] = chance_accuracy(models, ref["model"], dataset)
    ref["untrained"] = reference_untrained(ref)
    entries = {}
    for name, model in models.items():
        entry = copy.deepcopy(dict(model))
        if ref["untrained"]:  # a reduction "at equal accuracy" with chance means nothing
            entry["mac_reduction"], entry["mac_reduction_by_tolerance"] = None, []
            entries[name] = entry
            continue
        points = _sweep_points(model, rule)
        entry["mac_reduction"] = mac_reduction_at_equal_accuracy(
            points, ref["accuracy"], ref["macs"], tolerance
        )
        entry["mac_reduction_by_tolerance"] = reduction_ladder(
            points, ref["accuracy"], ref["macs"], float(model["macs_per_exit"][-1])
        )
        entries[name] = entry
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": io.environment_info(),
        "config": copy.deepcopy(dict(config)) if config is not None else None,
        "dataset": copy.deepcopy(dict(dataset)) if dataset is not None else None,
        "reference": ref,
        "models": entries,
    }


def rule_of(report: Mapping[str, Any], rule: str | None) -> str:
    """The rule to show: the one asked for, else the one the report's summary used."""
    return rule or (report.get("reference") or {}).get("rule") or "entropy"
