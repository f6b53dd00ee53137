"""erde: early-exit image classifiers and entropy-regularized distillation (ERDE).

The names below are the public Python API (docs/API.md walks through it);
each CLI command is one of these calls. They are imported on first use, so
``import erde`` (and ``erde --version``) stay instant.

>>> import erde
>>> model = erde.build_model("resnet8", num_classes=10, width=0.5)
>>> model.num_exits
3
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from erde.version import __version__

# public name -> module that defines it
_API = {
    # configuration and machine
    "ExperimentConfig": "erde.config",
    "StudentSpec": "erde.config",
    "make_config": "erde.api",
    "set_threads": "erde.threads",
    "ErdeError": "erde.errors",
    # data
    "load_data": "erde.data",
    "splits_from_tensors": "erde.data",
    "DataSplits": "erde.data",
    "AugmentSpec": "erde.data",
    # models
    "build_model": "erde.models",
    "measure_exit_costs": "erde.models",
    "trusted_modules": "erde.models",
    # extension points: a student method, an exit rule
    "register_method": "erde.losses",
    "register_rule": "erde.exits",
    # training, evaluation, calibration
    "train_teacher": "erde.api",
    "train_student": "erde.api",
    "run": "erde.api",
    "evaluate": "erde.api",
    "evaluate_budgeted": "erde.report.budgeted",
    "calibrate": "erde.api",
    "reproduce": "erde.reproduce",
    "verify": "erde.api",
    "TensorBoardLogger": "erde.monitor",
    # using a trained model
    "load_model": "erde.api",
    "LoadedModel": "erde.api",
    "load_predictor": "erde.inference",
    "load_image": "erde.inference",
    "Predictor": "erde.inference",
    "ExitPolicy": "erde.inference",
    "EarlyExitRouter": "erde.inference",
    "Routed": "erde.inference",
    "export_checkpoint": "erde.inference.export",
    "quantize_checkpoint": "erde.inference.quantize",
    "OnnxEarlyExitRuntime": "erde.inference.export",
    "release_checkpoint": "erde.checkpoints",
}

__all__ = [  # the keys of _API (a test keeps them equal)
    "__version__",
    "ExperimentConfig",
    "StudentSpec",
    "make_config",
    "set_threads",
    "ErdeError",
    "load_data",
    "splits_from_tensors",
    "DataSplits",
    "AugmentSpec",
    "build_model",
    "measure_exit_costs",
    "trusted_modules",
    "register_method",
    "register_rule",
    "train_teacher",
    "train_student",
    "run",
    "evaluate",
    "evaluate_budgeted",
    "calibrate",
    "reproduce",
    "verify",
    "TensorBoardLogger",
    "load_model",
    "LoadedModel",
    "load_predictor",
    "load_image",
    "Predictor",
    "ExitPolicy",
    "EarlyExitRouter",
    "Routed",
    "export_checkpoint",
    "quantize_checkpoint",
    "OnnxEarlyExitRuntime",
    "release_checkpoint",
]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'erde' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


if TYPE_CHECKING:  # for editors and type checkers; at run time __getattr__ imports lazily
    from erde.api import (
        LoadedModel,
        calibrate,
        evaluate,
        load_model,
        make_config,
        run,
        train_student,
        train_teacher,
        verify,
    )
    from erde.checkpoints import release_checkpoint
    from erde.config import ExperimentConfig, StudentSpec
    from erde.data import AugmentSpec, DataSplits, load_data, splits_from_tensors
    from erde.errors import ErdeError
    from erde.exits import register_rule
    from erde.inference import (
        EarlyExitRouter,
        ExitPolicy,
        Predictor,
        Routed,
        load_image,
        load_predictor,
    )
    from erde.inference.export import OnnxEarlyExitRuntime, export_checkpoint
    from erde.inference.quantize import quantize_checkpoint
    from erde.losses import register_method
    from erde.models import build_model, measure_exit_costs, trusted_modules
    from erde.monitor import TensorBoardLogger
    from erde.report.budgeted import evaluate_budgeted
    from erde.reproduce import reproduce
    from erde.threads import set_threads
