"""MobileNetV2 (Sandler et al., 2018), CIFAR variant: inverted residual blocks, width multiplier.

The block table is the paper's (expansion t, channels c, repeats n, stride s).
On 32x32 images the stem and the second group keep stride 1 (as in common
CIFAR ports of MobileNetV2), so the network downsamples 8x instead of 32x:
32x32 -> 4x4 before the classifier. Any other input size runs as well (convs
are padded, pooling is adaptive); MACs scale with the input area.

Channels are the table's times ``width`` rounded to a multiple of 8 (the
paper's rule); the final 1x1 convolution keeps its 1280 channels for
``width <= 1``. That convolution belongs to the classifier, so ``blocks`` are
the 17 inverted residual blocks and an exit can follow any of them.
"""

from __future__ import annotations

import torch
from torch import nn

from erde.models.backbone import Backbone, ModelConfigError, check_dropout, init_weights

# (expansion t, output channels c, repeats n, stride s of the first block)
CIFAR_TABLE = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),  # stride 2 in the ImageNet table
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of ``divisor``, never more than 10% below ``value``."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
    """Conv (no bias) -> BN -> ReLU6, padded to keep the size at stride 1."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class InvertedResidual(nn.Module):
    """1x1 expand (t > 1) -> 3x3 depthwise (stride s) -> 1x1 linear projection, + identity.

    The identity is added only when the block keeps the shape (stride 1, same channels).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        expand = [conv_bn_relu6(in_ch, hidden, 1)] if expansion != 1 else []
        self.conv = nn.Sequential(
            *expand,
            conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, H, W) -> (B, Cout, H/s, W/s)
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(Backbone):
    """MobileNetV2 with ``multiplier`` (from the name, e.g. 0.5) times ``width`` (from the config).

    ``dropout`` is applied before the final linear layer (the paper's classifier
    has it; 0 turns it off).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        multiplier: float = 1.0,
        width: float = 1.0,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        scale = multiplier * width
        if not scale > 0:
            raise ModelConfigError(f"MobileNetV2 width multiplier must be > 0, got {scale}")
        self.arch, self.width, self.num_classes = "mobilenetv2", float(width), num_classes
        stem_ch = make_divisible(STEM_CHANNELS * scale)
        self.stem = conv_bn_relu6(in_channels, stem_ch, 3)
        self.blocks, self.block_channels = _stack(stem_ch, scale)
        last_ch = make_divisible(LAST_CHANNELS * max(1.0, scale))
        p = check_dropout(dropout)
        self.classifier = nn.Sequential(
            conv_bn_relu6(self.block_channels[-1], last_ch, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(p) if p > 0 else nn.Identity(),
            nn.Linear(last_ch, num_classes),
        )
        init_weights(self)


def _stack(in_ch: int, scale: float) -> tuple[nn.ModuleList, list[int]]:
    """All inverted residual blocks of the table in order, with their output channels."""
    blocks, channels = [], []
    for expansion, c, n, s in CIFAR_TABLE:
        out_ch = make_divisible(c * scale)
        for i in range(n):
            blocks.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, expansion))
            channels.append(out_ch)
            in_ch = out_ch
    return nn.ModuleList(blocks), channels
