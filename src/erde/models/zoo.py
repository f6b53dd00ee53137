"""Backbones by name: a registry of the usual models plus patterns for any valid size.

``MODELS`` lists the names people expect to find (and that configs and docs
use); :func:`build_backbone` also parses ``resnet<6n+2>``, ``wrn<6n+4>_<k>`` and
``mobilenetv2_x<multiplier>`` so the registry is a catalogue, not a limit, and
builds a user's own network from ``package.module:factory`` (see
:mod:`erde.models.custom`; the module is imported only when a name says so).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from functools import partial

from erde.limits import MAX_DEPTH, MAX_WIDEN_FACTOR
from erde.models.backbone import Backbone, UnknownModelError
from erde.models.custom import build_custom_backbone, is_import_path
from erde.models.fastnet import FastNet
from erde.models.mobilenetv2 import MobileNetV2
from erde.models.resnet import CifarResNet
from erde.models.vgg import CONFIGS as VGG_CONFIGS
from erde.models.vgg import VGG
from erde.models.wrn import WideResNet
from erde.registry import Registry

MODELS: Registry[Backbone] = Registry("model")
PATTERNS = (
    "resnet<depth> (depth = 6n+2, e.g. resnet32)",
    "wrn<depth>_<k> (depth = 6n+4, e.g. wrn16_4)",
    "mobilenetv2_x<multiplier> (e.g. mobilenetv2_x0.35)",
    "package.module:factory (your own network, see erde.models.backbone_factory)",
)

RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
WRN_CONFIGS = ((16, 1), (16, 2), (16, 4), (16, 8), (22, 4), (28, 10), (40, 1), (40, 2))
MOBILENETV2_MULTIPLIERS = ("0.25", "0.5", "0.75", "1.4")

_RESNET = re.compile(r"resnet(\d+)")
_WRN = re.compile(r"wrn(\d+)_(\d+)")
_MOBILENETV2 = re.compile(r"mobilenetv2_x(\d+(?:\.\d+)?)")


def resnet(depth: int, num_classes: int, **kwargs) -> Backbone:
    """CIFAR ResNet of ``depth``; kwargs: width, shortcut ("A"/"B"), dropout, in_channels."""
    return CifarResNet(depth, num_classes, **kwargs)


def wrn(depth: int, widen_factor: int, num_classes: int, **kwargs) -> Backbone:
    """WideResNet ``depth``-``widen_factor``; kwargs: width, dropout, in_channels."""
    return WideResNet(depth, widen_factor, num_classes, **kwargs)


def mobilenetv2(multiplier: float, num_classes: int, **kwargs) -> Backbone:
    """MobileNetV2 with width ``multiplier`` (times kwargs' width); kwargs: width, dropout, in_channels."""
    return MobileNetV2(num_classes, multiplier=multiplier, **kwargs)


def fastnet(num_classes: int, **kwargs) -> Backbone:
    """FastNet (airbench-like, widths 64/256/256 times kwargs' width); kwargs: width, in_channels."""
    return FastNet(num_classes, **kwargs)


def vgg(depth: int, num_classes: int, **kwargs) -> Backbone:
    """VGG-``depth`` with BatchNorm; kwargs: width, dropout (before the last layer), in_channels."""
    return VGG(depth, num_classes, **kwargs)


for _depth in RESNET_DEPTHS:
    MODELS.add(f"resnet{_depth}", partial(resnet, _depth))
for _depth, _k in WRN_CONFIGS:
    MODELS.add(f"wrn{_depth}_{_k}", partial(wrn, _depth, _k))
MODELS.add("mobilenetv2", partial(mobilenetv2, 1.0))
for _mult in MOBILENETV2_MULTIPLIERS:
    MODELS.add(f"mobilenetv2_x{_mult}", partial(mobilenetv2, float(_mult)))
for _depth in VGG_CONFIGS:
    MODELS.add(f"vgg{_depth}_bn", partial(vgg, _depth))
MODELS.add("fastnet", fastnet)


def _unknown(name: str, why: str = "") -> UnknownModelError:
    reason = f" ({why})" if why else ""
    return UnknownModelError(
        f"unknown model {name!r}{reason}; registered names: {', '.join(MODELS.names())}; "
        f"patterns: {'; '.join(PATTERNS)}"
    )


def resolve(name: str) -> Callable[..., Backbone]:
    """Factory ``(num_classes, **kwargs) -> Backbone`` for a registered or pattern name."""
    if name in MODELS:
        return MODELS.get(name)
    if match := _RESNET.fullmatch(name):
        depth = int(match[1])
        if depth < 8 or (depth - 2) % 6 or depth > MAX_DEPTH:
            raise _unknown(name, f"ResNet depth must be 6n+2, n >= 1, at most {MAX_DEPTH}")
        return partial(resnet, depth)
    if match := _WRN.fullmatch(name):
        depth, k = int(match[1]), int(match[2])
        if depth < 10 or (depth - 4) % 6 or depth > MAX_DEPTH or not 1 <= k <= MAX_WIDEN_FACTOR:
            raise _unknown(
                name,
                f"WideResNet depth must be 6n+4, n >= 1, at most {MAX_DEPTH}, "
                f"and 1 <= k <= {MAX_WIDEN_FACTOR}",
            )
        return partial(wrn, depth, k)
    if match := _MOBILENETV2.fullmatch(name):
        multiplier = float(match[1])
        if multiplier <= 0:
            raise _unknown(name, "MobileNetV2 multiplier must be > 0")
        return partial(mobilenetv2, multiplier)
    raise _unknown(name)


def build_backbone(
    name: str, num_classes: int, *, input_shape: Sequence[int] | None = None, **kwargs
) -> Backbone:
    """Build the plain backbone ``name``; raises ``KeyError`` listing valid names/patterns.

    ``input_shape`` (C, H, W) is only used for a user's network (``package.module:factory``),
    to check it on one probe image; erde's own backbones take any input size.
    """
    if is_import_path(name):
        return build_custom_backbone(name, num_classes, input_shape=input_shape, **kwargs)
    model = resolve(name)(num_classes, **kwargs)
    model.arch = name
    return model
