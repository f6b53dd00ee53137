"""CIFAR ResNets (He et al., 2016, Sec. 4.2): depth 6n+2, basic blocks, 3 stages.

Stages have 16/32/64 channels (times ``width``) and ``n`` blocks each; the first
block of stages 2 and 3 halves the resolution. Where a block changes shape, the
shortcut is either option "A" (strided identity plus zero-padded channels, no
parameters; what the paper used on CIFAR) or option "B" (1x1 conv + BN). We
default to "B": it is the more common choice in modern re-implementations and
distillation code, and costs only ~0.3% more parameters on resnet56.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from erde.models.backbone import (
    Backbone,
    ModelConfigError,
    check_dropout,
    conv1x1,
    conv3x3,
    init_weights,
    scaled,
)

SHORTCUTS = ("A", "B")


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by ``stride`` and zero-pad the new channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.extra = out_ch - in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H/s, W/s)
        x = x[:, :, :: self.stride, :: self.stride]
        before = self.extra // 2
        return F.pad(x, (0, 0, 0, 0, before, self.extra - before))


def make_shortcut(in_ch: int, out_ch: int, stride: int, kind: str) -> nn.Module:
    """Identity when the shape is kept, else option A padding or option B projection."""
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    if kind == "A":
        return PadShortcut(in_ch, out_ch, stride)
    return nn.Sequential(conv1x1(in_ch, out_ch, stride), nn.BatchNorm2d(out_ch))


class BasicBlock(nn.Module):
    """conv-BN-ReLU-(dropout)-conv-BN, plus shortcut, then ReLU (post-activation)."""

    def __init__(
        self, in_ch: int, out_ch: int, stride: int, shortcut: str, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = make_shortcut(in_ch, out_ch, stride, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H/s, W/s)
        out = self.dropout(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Backbone):
    """ResNet-(6n+2) for small images; ``blocks`` holds all 3n basic blocks in order."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        width: float = 1.0,
        shortcut: str = "B",
        dropout: float = 0.0,
        in_channels: int = 3,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ModelConfigError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, got {depth}")
        if shortcut not in SHORTCUTS:
            raise ModelConfigError(f"shortcut must be one of {SHORTCUTS}, got {shortcut!r}")
        n = (depth - 2) // 6
        widths = [scaled(c, width) for c in (16, 32, 64)]
        self.arch, self.width, self.num_classes = f"resnet{depth}", float(width), num_classes
        self.stem = nn.Sequential(
            conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        self.blocks, self.block_channels = _stack(widths, n, shortcut, check_dropout(dropout))
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], num_classes)
        )
        init_weights(self)
        if zero_init_residual:  # each block starts as identity (Goyal et al., 2017)
            for block in self.blocks:
                nn.init.zeros_(block.bn2.weight)


def _stack(
    widths: list[int], n: int, shortcut: str, dropout: float
) -> tuple[nn.ModuleList, list[int]]:
    """Three stages of ``n`` blocks; the first block of stages 2 and 3 has stride 2."""
    blocks, channels, in_ch = [], [], widths[0]
    for stage, out_ch in enumerate(widths):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(BasicBlock(in_ch, out_ch, stride, shortcut, dropout))
            channels.append(out_ch)
            in_ch = out_ch
    return nn.ModuleList(blocks), channels
