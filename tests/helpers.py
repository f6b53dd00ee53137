"""Helpers the tests share: the tiny experiment config and the benchmark-script loader.

Imported as ``from helpers import ...`` (fixtures live in conftest.py, which pytest
loads itself; helpers are plain functions and constants, imported like any module).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from erde.config import ExperimentConfig, load_config

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module, so a test can call its ``main(argv)``.

    The benchmarks are scripts, not a package: they are loaded from their files.
    """
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_OVERRIDES = (
    "data.name=digits",
    "data.image_size=8",
    "data.batch_size=64",
    "teacher.arch=resnet8",
    "teacher.width=0.5",
    "student.arch=resnet8",
    "student.width=0.25",
    "teacher_train.epochs=2",
    "teacher_train.max_steps_per_epoch=4",
    "student_train.epochs=1",
    "student_train.max_steps_per_epoch=4",
    "evaluation.num_thresholds=9",
    "device=cpu",
)


def tiny_config(*extra: str) -> ExperimentConfig:
    """The tiny experiment, with optional ``section.key=value`` overrides on top."""
    return load_config(None, [*TINY_OVERRIDES, *extra])
