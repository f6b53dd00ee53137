"""VGG with BatchNorm (Simonyan & Zisserman, 2015; BN as in Ioffe & Szegedy), CIFAR variant.

Each 3x3 convolution is conv-BN-ReLU; a 2x2 max-pool follows the last conv of
each of the five groups. The first conv is the stem and every later conv
(with the pool that follows it, if any) is one block, so an exit can follow
any conv. The classifier is global average pooling and one linear layer, as
in the CIFAR VGGs of distillation code (on 32x32 the five pools leave 1x1, so
the pooling changes nothing there). Pools use ``ceil_mode`` so that inputs
smaller than 32x32 still run (an odd side rounds up; even sides, CIFAR's
included, are unaffected). Convs have no bias (BN follows).
"""

from __future__ import annotations

from torch import nn

from erde.models.backbone import (
    Backbone,
    ModelConfigError,
    check_dropout,
    conv3x3,
    init_weights,
    scaled,
)

POOL = "M"
CONFIGS: dict[int, tuple[int | str, ...]] = {
    11: (64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    13: (64, 64, POOL, 128, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512, POOL),
    16: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL,
         512, 512, 512, POOL),
    19: (64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
         512, 512, 512, 512, POOL),
}  # fmt: skip


class VGGBlock(nn.Sequential):
    """conv3x3 -> BN -> ReLU, then a 2x2 max-pool when the block ends a group."""

    def __init__(self, in_ch: int, out_ch: int, pool: bool) -> None:
        layers: list[nn.Module] = [conv3x3(in_ch, out_ch), nn.BatchNorm2d(out_ch), nn.ReLU(True)]
        if pool:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        super().__init__(*layers)


class VGG(Backbone):
    """VGG-``depth`` with BN; ``stem`` is the first conv block, ``blocks`` the other convs."""

    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        width: float = 1.0,
        dropout: float = 0.0,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if depth not in CONFIGS:
            raise ModelConfigError(f"VGG depth must be one of {sorted(CONFIGS)}, got {depth}")
        self.arch, self.width, self.num_classes = f"vgg{depth}_bn", float(width), num_classes
        convs = _conv_list(CONFIGS[depth], width)
        layers, in_ch = [], in_channels
        for out_ch, pool in convs:
            layers.append(VGGBlock(in_ch, out_ch, pool))
            in_ch = out_ch
        self.stem = layers[0]
        self.blocks = nn.ModuleList(layers[1:])
        self.block_channels = [c for c, _ in convs[1:]]
        p = check_dropout(dropout)
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(p) if p > 0 else nn.Identity(),
            nn.Linear(in_ch, num_classes),
        )
        init_weights(self)


def _conv_list(config: tuple[int | str, ...], width: float) -> list[tuple[int, bool]]:
    """(channels, followed by a pool) for each conv of a VGG table."""
    convs: list[tuple[int, bool]] = []
    for item in config:
        if item == POOL:
            convs[-1] = (convs[-1][0], True)
        else:
            convs.append((scaled(int(item), width), False))
    return convs
