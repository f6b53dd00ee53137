"""Wide ResNets (Zagoruyko & Komodakis, 2016): depth 6n+4, widen factor k, pre-activation.

Stages have 16k/32k/64k channels (times ``width``) after a 16-channel stem conv.
Blocks are BN-ReLU-conv-BN-ReLU-dropout-conv; a block that changes shape
projects its pre-activated input with a 1x1 conv, as in the reference code.
Because block outputs are not activated, the classifier starts with BN-ReLU.
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


class WideBlock(nn.Module):
    """Pre-activation basic block with optional dropout between the two convs."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = conv3x3(in_ch, out_ch, stride)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_ch, out_ch)
        same = stride == 1 and in_ch == out_ch
        self.shortcut = None if same else conv1x1(in_ch, out_ch, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H/s, W/s)
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


class WideResNet(Backbone):
    """WRN-(6n+4)-k; ``blocks`` holds all 3n pre-activation blocks in order."""

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        *,
        width: float = 1.0,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ModelConfigError(f"WideResNet depth must be 6n+4 with n >= 1, got {depth}")
        if widen_factor < 1:
            raise ModelConfigError(f"WideResNet widen factor must be >= 1, got {widen_factor}")
        n, k = (depth - 4) // 6, widen_factor
        stem_ch = scaled(16, width)
        widths = [scaled(c * k, width) for c in (16, 32, 64)]
        self.arch, self.width, self.num_classes = f"wrn{depth}_{k}", float(width), num_classes
        self.stem = conv3x3(in_channels, stem_ch)
        self.blocks, self.block_channels = _stack(stem_ch, widths, n, check_dropout(dropout))
        self.classifier = nn.Sequential(
            nn.BatchNorm2d(widths[-1]),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(widths[-1], num_classes),
        )
        init_weights(self)


def _stack(
    in_ch: int, widths: list[int], n: int, dropout: float
) -> tuple[nn.ModuleList, list[int]]:
    """Three stages of ``n`` blocks; the first block of stages 2 and 3 has stride 2."""
    blocks, channels = [], []
    for stage, out_ch in enumerate(widths):
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(WideBlock(in_ch, out_ch, stride, dropout))
            channels.append(out_ch)
            in_ch = out_ch
    return nn.ModuleList(blocks), channels
