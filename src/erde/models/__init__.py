"""Backbones (CIFAR ResNets, WideResNets), the early-exit wrapper and exit cost measurement."""

from erde.models.backbone import Backbone, ModelConfigError, UnknownModelError
from erde.models.costs import ExitCosts, count_macs, measure_exit_costs
from erde.models.early_exit import EarlyExitNet, build_model
from erde.models.resnet import CifarResNet
from erde.models.wrn import WideResNet
from erde.models.zoo import MODELS, PATTERNS, build_backbone, resolve

__all__ = [
    "MODELS",
    "PATTERNS",
    "Backbone",
    "CifarResNet",
    "EarlyExitNet",
    "ExitCosts",
    "ModelConfigError",
    "UnknownModelError",
    "WideResNet",
    "build_backbone",
    "build_model",
    "count_macs",
    "measure_exit_costs",
    "resolve",
]
