"""Backbones (CIFAR ResNets, WideResNets, MobileNetV2, VGG, your own), the early-exit wrapper and exit cost measurement."""

from erde.models.backbone import Backbone, ModelConfigError, UnknownModelError
from erde.models.costs import ExitCosts, block_boundary_macs, count_macs, measure_exit_costs
from erde.models.custom import backbone_factory, staged_backbone, trusted_modules
from erde.models.early_exit import EarlyExitNet, build_model
from erde.models.mobilenetv2 import MobileNetV2
from erde.models.resnet import CifarResNet
from erde.models.vgg import VGG
from erde.models.wrn import WideResNet
from erde.models.zoo import MODELS, PATTERNS, build_backbone, resolve

__all__ = [
    "MODELS",
    "PATTERNS",
    "VGG",
    "Backbone",
    "CifarResNet",
    "EarlyExitNet",
    "ExitCosts",
    "MobileNetV2",
    "ModelConfigError",
    "UnknownModelError",
    "WideResNet",
    "backbone_factory",
    "block_boundary_macs",
    "build_backbone",
    "build_model",
    "count_macs",
    "measure_exit_costs",
    "resolve",
    "staged_backbone",
    "trusted_modules",
]
