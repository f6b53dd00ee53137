"""The students of a side-by-side run: ``NAME=METHOD:key=value`` specs, parsed and checked."""

from __future__ import annotations

import dataclasses
from typing import Any

from erde.config.schema import DEFAULT_STUDENTS, SPEC_SETTINGS, DistillConfig, StudentSpec
from erde.config.validation import check_students
from erde.errors import ConfigError


def student_specs(d: DistillConfig) -> list[StudentSpec]:
    """The students of a side-by-side run (``d.students``, or one per method by default)."""
    if d.students is None:
        return [StudentSpec(m, m) for m in DEFAULT_STUDENTS]
    return list(d.students)


def spec_distill(d: DistillConfig, spec: StudentSpec) -> DistillConfig:
    """``d`` as the student of ``spec`` trains with it: its method and its own settings."""
    return dataclasses.replace(d, method=spec.method, students=None, **spec.settings())


def parse_student(text: str) -> StudentSpec:
    """``NAME[=METHOD][:key=value]...`` -> StudentSpec, e.g. ``erde_g2=erde:gamma=2`` or ``kd``.

    Without ``=METHOD`` the name is the method. Keys: alpha, beta, gamma, temperature,
    uncertain_above.
    """
    head, *pairs = text.strip().split(":")
    name, sep, method = head.partition("=")
    fields: dict[str, Any] = {"name": name.strip(), "method": (method if sep else name).strip()}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or key not in SPEC_SETTINGS:
            raise ConfigError(
                f"student {text!r}: {pair!r} must be key=value with key one of "
                f"{', '.join(SPEC_SETTINGS)}"
            )
        if key in fields:
            raise ConfigError(f"student {text!r}: {key} given twice")
        try:
            fields[key] = float(value)
        except ValueError:
            raise ConfigError(f"student {text!r}: {key} must be a number, got {value!r}") from None
    return StudentSpec(**fields)


def parse_students(text: str) -> list[StudentSpec]:
    """A comma-separated list of :func:`parse_student` items, checked as a whole."""
    specs = [parse_student(item) for item in text.split(",") if item.strip()]
    check_students(specs)
    return specs
