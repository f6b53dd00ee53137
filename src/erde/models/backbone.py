"""The backbone protocol every classifier follows, and the shared init and width helpers.

An early-exit network is cut out of a plain backbone, so each backbone exposes
its pieces (stem, residual blocks, classifier) instead of hiding them inside a
monolithic ``forward``; :class:`~erde.models.early_exit.EarlyExitNet` regroups
those very modules into stages without copying or changing them.
"""

from __future__ import annotations

import torch
from torch import nn

from erde.errors import ConfigError


class ModelConfigError(ConfigError, ValueError):
    """A bad model argument (depth, width, exit positions); also a ``ValueError``."""


class UnknownModelError(ConfigError, KeyError):
    """An architecture name nobody registered and no pattern parses; also a ``KeyError``."""

    def __str__(self) -> str:  # KeyError would print the message repr-quoted
        return str(self.args[0]) if self.args else ""


class Backbone(nn.Module):
    """A plain classifier split into ``stem -> blocks -> classifier``.

    ``block_channels[i]`` is the channel count of ``blocks[i]``'s output, so that
    exit heads can be sized without running the network.
    """

    stem: nn.Module
    blocks: nn.ModuleList
    classifier: nn.Module
    block_channels: list[int]
    num_classes: int
    arch: str
    width: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


def scaled(channels: int, width: float) -> int:
    """Channel count after the width multiplier, rounded and never below 1."""
    if width <= 0:
        raise ModelConfigError(f"width multiplier must be > 0, got {width}")
    return max(1, round(channels * width))


def check_dropout(p: float) -> float:
    """Reject dropout outside [0, 1) early, with the argument's name in the message."""
    if not 0.0 <= p < 1.0:
        raise ModelConfigError(f"dropout must be in [0, 1), got {p}")
    return float(p)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU), BN weight 1 / bias 0, FC bias 0.

    FC weights keep PyTorch's default uniform init, as in the reference CIFAR code.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 conv, padding 1, no bias (a BN always follows or precedes it)."""
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """1x1 projection conv, no bias."""
    return nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
