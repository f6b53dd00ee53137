"""Range checks that types alone cannot express: one clear message per problem."""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

from erde.config.schema import (
    CROP_PADDING_MODES,
    ExperimentConfig,
    ModelConfig,
    StudentSpec,
    TrainConfig,
)
from erde.errors import ConfigError
from erde.limits import MAX_HEAD_HIDDEN, MAX_HEAD_POOL, MAX_IMAGE_SIDE, MAX_WIDTH

MAX_LR = 10.0  # learning rates in use are 1e-4 ... 1; far above, every step diverges
MAX_SEED = 2**32 - 1  # numpy and torch both accept seeds in [0, 2**32)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def show_value(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: an error names a value, it does not print it all."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,} characters)"


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def registered_rules() -> tuple[str, ...]:
    """Names of the exit rules registered in :mod:`erde.exits` (imported on first use)."""
    from erde.exits import RULES

    return tuple(RULES)


def registered_methods() -> tuple[str, ...]:
    """Names of the student methods registered in :mod:`erde.losses` (imported on first use:
    the config module itself stays free of torch, so ``--help`` answers at once)."""
    from erde.losses import METHODS

    return tuple(METHODS)


MAX_STUDENTS = 32  # side by side in one loop: each holds a model and an optimizer in memory
_SPEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_students(specs: list[StudentSpec]) -> None:
    """Known methods, folder-safe unique names, settings in their ranges: one line per problem."""
    _check(len(specs) >= 1, "distill.students: name at least one student")
    _check(
        len(specs) <= MAX_STUDENTS,
        f"distill.students: at most {MAX_STUDENTS} students side by side, got {len(specs)}",
    )
    names = [s.name for s in specs]
    for spec in specs:
        _check(
            isinstance(spec.name, str) and _SPEC_NAME.fullmatch(spec.name) is not None,
            f"distill.students: name {str(spec.name)[:80]!r} must be 1-64 letters, digits, _ . - "
            "(it names a folder)",
        )
        _check(
            spec.method in registered_methods(),
            f"distill.students: {spec.name} has unknown method {str(spec.method)[:40]!r}; valid: "
            f"{', '.join(registered_methods())}",
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    _check(not dupes, f"distill.students: each name once, {', '.join(dupes)} given twice")
    for spec in specs:
        for key, v in spec.settings().items():
            ok = v > 0 if key == "temperature" else v >= 0
            if key == "uncertain_above":
                ok = 0 < v < 1
            _check(
                ok and math.isfinite(v), f"distill.students: {spec.name}.{key} out of range: {v}"
            )


def validate(cfg: ExperimentConfig) -> None:
    """Range checks that types alone cannot express; one clear message per problem."""
    d = cfg.distill
    for name in ("alpha", "beta", "gamma"):
        v = getattr(d, name)
        _check(v >= 0 and math.isfinite(v), f"distill.{name} must be >= 0 and finite, got {v}")
    _check(
        d.temperature > 0 and math.isfinite(d.temperature),
        f"distill.temperature must be > 0 and finite, got {d.temperature}",
    )
    if d.exit_mapping is not None:
        _check(all(m >= 0 for m in d.exit_mapping), "distill.exit_mapping must be >= 0")
    _check(
        d.method in registered_methods(),
        f"distill.method must be a registered method ({', '.join(registered_methods())}), "
        f"got {show_value(d.method)}",
    )
    if d.students is not None:
        check_students(d.students)
    _check(
        d.exit_mapping_by in ("depth", "cost"),
        f"distill.exit_mapping_by must be depth or cost, got {show_value(d.exit_mapping_by)}",
    )
    _check(
        d.uncertain_above is None or 0 < d.uncertain_above < 1,
        "distill.uncertain_above must be null (mistakes only) or a normalised entropy in (0, 1), "
        f"got {d.uncertain_above}",
    )
    _check(
        0 <= cfg.data.val_fraction < 1,
        f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}",
    )
    for name in ("image_size", "max_train"):
        v = getattr(cfg.data, name)
        _check(v is None or v >= 1, f"data.{name} must be >= 1 (or null), got {v}")
    _check(
        cfg.data.split_seed is None or 0 <= cfg.data.split_seed <= MAX_SEED,
        f"data.split_seed must be in [0, {MAX_SEED}] (or null), got {cfg.data.split_seed}",
    )
    _check(
        cfg.data.image_size is None or cfg.data.image_size <= MAX_IMAGE_SIDE,
        f"data.image_size must be <= {MAX_IMAGE_SIDE}, got {cfg.data.image_size}",
    )
    _check(0 <= cfg.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}], got {cfg.seed}")
    _check(
        _DEVICE.fullmatch(cfg.device) is not None,
        f"device must be auto, cpu, mps, cuda or cuda:N, got {show_value(cfg.device)}",
    )
    _check(cfg.data.batch_size >= 1, "data.batch_size must be >= 1")
    _check(
        cfg.data.crop_padding is None or 0 <= cfg.data.crop_padding <= 64,
        f"data.crop_padding must be in [0, 64] pixels (or null), got {cfg.data.crop_padding}",
    )
    _check(
        cfg.data.crop_padding_mode in CROP_PADDING_MODES,
        f"data.crop_padding_mode must be one of {', '.join(CROP_PADDING_MODES)}, "
        f"got {show_value(cfg.data.crop_padding_mode)}",
    )
    _check(cfg.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1")
    for section in ("teacher_train", "student_train"):
        t: TrainConfig = getattr(cfg, section)
        _check(t.epochs >= 1, f"{section}.epochs must be >= 1, got {t.epochs}")
        _check(
            0 < t.lr <= MAX_LR,  # False for nan; inf and 1e308 overflow the optimiser's update
            f"{section}.lr must be in (0, {MAX_LR:g}], got {t.lr}",
        )
        _check(0 <= t.momentum < 1, f"{section}.momentum must be in [0, 1), got {t.momentum}")
        _check(t.checkpoint_every_steps >= 0, f"{section}.checkpoint_every_steps must be >= 0")
        _check(
            0 < t.norm_bias_lr_scale <= 1000 and math.isfinite(t.norm_bias_lr_scale),
            f"{section}.norm_bias_lr_scale must be in (0, 1000], got {t.norm_bias_lr_scale}",
        )
        _check(
            t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1,
            f"{section}.max_steps_per_epoch must be >= 1 (or null), got {t.max_steps_per_epoch}",
        )
        _check(
            t.weight_decay >= 0 and math.isfinite(t.weight_decay),
            f"{section}.weight_decay must be >= 0 and finite",
        )
        _check(
            t.optimizer in ("sgd", "adamw"),
            f"{section}.optimizer must be sgd or adamw, got {show_value(t.optimizer)}",
        )
        _check(
            t.schedule in ("cosine", "linear", "constant"),
            f"{section}.schedule must be cosine, linear or constant, got {show_value(t.schedule)}",
        )
        _check(
            0 <= t.label_smoothing < 1,
            f"{section}.label_smoothing must be in [0, 1), got {t.label_smoothing}",
        )
        _check(
            t.warmup_epochs >= 0 and math.isfinite(t.warmup_epochs),
            f"{section}.warmup_epochs must be >= 0 and finite, got {t.warmup_epochs}",
        )
        if t.exit_weights is not None:
            _check(
                all(w >= 0 and math.isfinite(w) for w in t.exit_weights),
                f"{section}.exit_weights must be >= 0 and finite",
            )
            _check(
                sum(t.exit_weights) > 0,
                f"{section}.exit_weights are all 0: no exit would be trained",
            )
    for section in ("teacher", "student"):
        m: ModelConfig = getattr(cfg, section)
        _check(
            0 < m.width <= MAX_WIDTH and math.isfinite(m.width),
            f"{section}.width must be in (0, {MAX_WIDTH:g}], got {m.width}",
        )
        _check(0 <= m.head_dropout < 1, f"{section}.head_dropout must be in [0, 1)")
        _check(
            1 <= m.head_pool <= MAX_HEAD_POOL,
            f"{section}.head_pool must be in [1, {MAX_HEAD_POOL}], got {m.head_pool}",
        )
        _check(
            0 <= m.head_hidden <= MAX_HEAD_HIDDEN,
            f"{section}.head_hidden must be in [0, {MAX_HEAD_HIDDEN}], got {m.head_hidden}",
        )
        _check(0 <= m.dropout < 1, f"{section}.dropout must be in [0, 1)")
        _check(
            m.num_early_exits is None or m.num_early_exits >= 0,
            f"{section}.num_early_exits must be >= 0",
        )
        if m.exit_after is not None:
            _check(all(b >= 1 for b in m.exit_after), f"{section}.exit_after values must be >= 1")
        if m.exit_at_macs is not None:
            _check_exit_at_macs(section, m)
    e = cfg.evaluation
    _check(e.num_thresholds >= 2, "evaluation.num_thresholds must be >= 2")
    _check(0 <= e.tolerance < 1, "evaluation.tolerance must be in [0, 1)")
    _check(len(e.rules) >= 1, "evaluation.rules must name at least one rule")
    for rule in e.rules:
        _check(
            rule in registered_rules(),
            f"evaluation.rules: unknown rule {show_value(rule)} ({', '.join(registered_rules())})",
        )


def _check_exit_at_macs(section: str, m: ModelConfig) -> None:
    """Fractions in (0, 1), increasing, and not mixed with exit_after: caught before any training."""
    values = m.exit_at_macs or []
    _check(
        m.exit_after is None,
        f"{section}: give exit_after or exit_at_macs, not both (exit_after={m.exit_after}, "
        f"exit_at_macs={values})",
    )
    _check(
        all(0 < f < 1 for f in values),
        f"{section}.exit_at_macs values must be fractions of the backbone's MACs in (0, 1), "
        f"got {values}",
    )
    _check(
        all(a < b for a, b in itertools.pairwise(values)),
        f"{section}.exit_at_macs must be strictly increasing, got {values}",
    )
