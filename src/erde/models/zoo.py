"""Backbones by name: a registry of the usual depths plus patterns for any valid depth.

``MODELS`` lists the names people expect to find (and that configs and docs
use); :func:`build_backbone` also parses ``resnet<6n+2>`` and ``wrn<6n+4>_<k>``
so the registry is a catalogue, not a limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import partial

from erde.limits import MAX_DEPTH, MAX_WIDEN_FACTOR
from erde.models.backbone import Backbone, UnknownModelError
from erde.models.resnet import CifarResNet
from erde.models.wrn import WideResNet
from erde.registry import Registry

MODELS: Registry[Backbone] = Registry("model")
PATTERNS = (
    "resnet<depth> (depth = 6n+2, e.g. resnet32)",
    "wrn<depth>_<k> (depth = 6n+4, e.g. wrn16_4)",
)

RESNET_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
WRN_CONFIGS = ((16, 1), (16, 2), (16, 4), (16, 8), (22, 4), (28, 10), (40, 1), (40, 2))

_RESNET = re.compile(r"resnet(\d+)")
_WRN = re.compile(r"wrn(\d+)_(\d+)")


def resnet(depth: int, num_classes: int, **kwargs) -> Backbone:
    """CIFAR ResNet of ``depth``; kwargs: width, shortcut ("A"/"B"), dropout, in_channels."""
    return CifarResNet(depth, num_classes, **kwargs)


def wrn(depth: int, widen_factor: int, num_classes: int, **kwargs) -> Backbone:
    """WideResNet ``depth``-``widen_factor``; kwargs: width, dropout, in_channels."""
    return WideResNet(depth, widen_factor, num_classes, **kwargs)


for _depth in RESNET_DEPTHS:
    MODELS.add(f"resnet{_depth}", partial(resnet, _depth))
for _depth, _k in WRN_CONFIGS:
    MODELS.add(f"wrn{_depth}_{_k}", partial(wrn, _depth, _k))


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
    raise _unknown(name)


def build_backbone(name: str, num_classes: int, **kwargs) -> Backbone:
    """Build the plain backbone ``name``; raises ``KeyError`` listing valid names/patterns."""
    model = resolve(name)(num_classes, **kwargs)
    model.arch = name
    return model
