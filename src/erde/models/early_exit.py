"""An early-exit network carved out of a plain backbone.

The backbone's blocks are regrouped into consecutive stages with an
:class:`~erde.exits.ExitHead` after each but the last stage; the last exit *is*
the backbone's own classifier, so the final path is the plain network,
unchanged. Stages are run one at a time by :meth:`EarlyExitNet.forward_stage`,
which is what per-sample routing and staged ONNX export build on.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from erde.exits import ExitHead
from erde.models.backbone import Backbone, ModelConfigError
from erde.models.costs import block_boundary_macs
from erde.models.custom import staged_backbone
from erde.models.zoo import build_backbone


def default_num_early_exits(num_blocks: int) -> int:
    """Two early exits for shallow nets (<= 9 blocks, e.g. resnet20), three for deeper ones."""
    return 2 if num_blocks <= 9 else 3


def evenly_spaced(num_blocks: int, num_early_exits: int) -> list[int]:
    """Block counts splitting ``num_blocks`` into ``num_early_exits + 1`` near-equal stages.

    Rounds half up with integer arithmetic, e.g. resnet20 (9 blocks, 2 exits) -> [3, 6],
    resnet56 (27 blocks, 3 exits) -> [7, 14, 20].
    """
    parts = num_early_exits + 1
    return [(2 * i * num_blocks + parts) // (2 * parts) for i in range(1, parts)]


def resolve_exit_after(
    num_blocks: int, exit_after: Sequence[int] | None, num_early_exits: int | None
) -> list[int]:
    """Validated 1-based block counts after which an early exit sits."""
    if exit_after is None:
        count = default_num_early_exits(num_blocks) if num_early_exits is None else num_early_exits
        if not 0 <= count <= num_blocks - 1:
            raise ModelConfigError(
                f"num_early_exits must be in [0, {num_blocks - 1}] for a backbone with "
                f"{num_blocks} blocks, got {count}"
            )
        return evenly_spaced(num_blocks, count)
    positions = list(exit_after)
    if any(isinstance(b, bool) or not isinstance(b, int) for b in positions):
        raise ModelConfigError(f"exit_after must be a list of integers, got {positions!r}")
    if any(not 1 <= b <= num_blocks - 1 for b in positions):
        raise ModelConfigError(
            f"exit_after values must be in [1, {num_blocks - 1}] (1-based block counts; the "
            f"backbone has {num_blocks} blocks and its classifier is the last exit), "
            f"got {positions}"
        )
    if any(a >= b for a, b in pairwise(positions)):
        raise ModelConfigError(f"exit_after must be strictly increasing, got {positions}")
    if num_early_exits is not None and num_early_exits != len(positions):
        raise ModelConfigError(
            f"num_early_exits={num_early_exits} disagrees with exit_after={positions}"
        )
    return positions


def exits_at_macs(fractions: Sequence[float], boundary_macs: Sequence[int]) -> list[int]:
    """Block counts whose boundary is nearest each fraction of the backbone's MACs.

    ``boundary_macs`` is :func:`~erde.models.costs.block_boundary_macs`: MACs up
    to each block boundary, then of the whole backbone. Only boundaries with a
    block after them qualify (the classifier is the last exit); the cheaper one
    wins a tie. Two fractions landing on one boundary are refused rather than
    merged, so the number of exits is always the number of fractions asked for.
    """
    values = list(fractions)
    if any(isinstance(f, bool) or not isinstance(f, (int, float)) for f in values):
        raise ModelConfigError(f"exit_at_macs must be a list of numbers, got {values!r}")
    if any(not (0.0 < f < 1.0) for f in values):  # also refuses NaN
        raise ModelConfigError(
            f"exit_at_macs values must be fractions of the backbone's MACs in (0, 1), got {values}"
        )
    if any(a >= b for a, b in pairwise(values)):
        raise ModelConfigError(f"exit_at_macs must be strictly increasing, got {values}")
    total = boundary_macs[-1]
    at = [m / total for m in boundary_macs[:-2]]  # after block b = 1 .. n-1
    if values and not at:
        raise ModelConfigError("exit_at_macs: a backbone with one block has no place for an exit")
    positions = [min(range(len(at)), key=lambda b: (abs(at[b] - f), b)) + 1 for f in values]
    for (fa, a), (fb, b) in pairwise(zip(values, positions, strict=True)):
        if a == b:
            raise ModelConfigError(
                f"exit_at_macs {fa} and {fb} both land after block {a} ({at[a - 1]:.1%} of the "
                f"MACs; neighbouring boundaries at {_neighbours(at, a)}): use fractions further "
                "apart, or exit_after"
            )
    return positions


def _neighbours(at: list[float], b: int) -> str:
    """The cost fractions of the boundaries around block ``b`` (1-based), for error messages."""
    return ", ".join(f"{at[i]:.1%}" for i in range(max(0, b - 2), min(len(at), b + 1)))


class EarlyExitNet(nn.Module):
    """Backbone split into ``num_exits`` stages, each followed by an exit.

    ``exits[-1]`` is the backbone's classifier; the others are ``ExitHead``s.
    The stages and the classifier are the backbone's own modules (not copies),
    so state-dict keys are ``stages.*`` and ``exits.*``.
    """

    def __init__(
        self,
        backbone: Backbone,
        exit_after: Sequence[int] | None = None,
        num_early_exits: int | None = None,
        head_pool: int = 2,
        head_dropout: float = 0.5,
        head_hidden: int = 0,
        *,
        exit_at_macs: Sequence[float] | None = None,
        input_shape: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        _check_head_args(head_pool, head_dropout, head_hidden)
        num_blocks = len(backbone.blocks)
        if exit_at_macs is not None:
            exit_after = _placed_by_cost(backbone, exit_at_macs, exit_after, input_shape)
            if num_early_exits is not None and num_early_exits != len(exit_after):
                raise ModelConfigError(
                    f"num_early_exits={num_early_exits} disagrees with exit_at_macs={list(exit_at_macs)}"
                )
        self.exit_after = resolve_exit_after(num_blocks, exit_after, num_early_exits)
        self.num_blocks = num_blocks
        self.num_classes = backbone.num_classes
        self.num_exits = len(self.exit_after) + 1
        self.arch = getattr(backbone, "arch", type(backbone).__name__)
        self.width = float(getattr(backbone, "width", 1.0))
        self.exit_channels = [backbone.block_channels[b - 1] for b in self.exit_after]
        self.exit_channels.append(backbone.block_channels[-1])
        self.stages = _split_stages(backbone, self.exit_after)
        scale = float(getattr(backbone, "head_logit_scale", 1.0))
        heads = [
            ExitHead(c, self.num_classes, head_pool, head_dropout, head_hidden, logit_scale=scale)
            for c in self.exit_channels[:-1]
        ]
        self.exits = nn.ModuleList([*heads, backbone.classifier])

    @classmethod
    def from_blocks(
        cls,
        stem: nn.Module,
        blocks: Sequence[nn.Module],
        classifier: nn.Module,
        *,
        input_shape: Sequence[int] = (3, 32, 32),
        num_classes: int | None = None,
        arch: str = "custom",
        **kwargs,
    ) -> EarlyExitNet:
        """Early-exit network from your own ``stem -> blocks -> classifier`` (modules not copied).

        ``blocks`` is an ordered list of modules, each mapping a (B, C, H, W)
        feature map to the next; an exit may follow any of them (``exit_after``,
        ``exit_at_macs`` or ``num_early_exits``, as for built-in backbones; other
        kwargs: ``head_pool``, ``head_dropout``, ``head_hidden``). One probe image
        of ``input_shape`` (C, H, W) checks that the parts chain and gives each
        block's channel count; ``num_classes``, when given, is checked against
        the classifier's output.
        """
        backbone = staged_backbone(
            stem, blocks, classifier, input_shape=input_shape, num_classes=num_classes, arch=arch
        )
        return cls(backbone, input_shape=input_shape, **kwargs)

    def forward_stage(self, i: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage ``i`` then exit ``i``: (features after stage i, logits (B, K) of exit i).

        ``h`` is the image batch for ``i == 0``, else the features stage ``i - 1`` returned.
        """
        h = self.stages[i](h)
        return h, self.exits[i](h)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # (B, C, H, W) -> [(B, K)] * E
        """Every exit's logits, in train and eval mode alike (routing lives elsewhere)."""
        logits = []
        h = x
        for i in range(self.num_exits):
            h, out = self.forward_stage(i, h)
            logits.append(out)
        return logits

    def describe(self) -> dict:
        """Plain-data summary for logs, checkpoints and the CLI."""
        return {
            "arch": self.arch,
            "width": self.width,
            "num_classes": self.num_classes,
            "num_blocks": self.num_blocks,
            "exit_after": list(self.exit_after),
            "num_exits": self.num_exits,
            "params": sum(p.numel() for p in self.parameters()),
        }


def _check_head_args(pool: int, dropout: float, hidden: int) -> None:
    """Fail at construction, with the argument's name, rather than deep inside a forward."""
    if pool < 1:
        raise ModelConfigError(f"head_pool must be >= 1, got {pool}")
    if not 0.0 <= dropout < 1.0:
        raise ModelConfigError(f"head_dropout must be in [0, 1), got {dropout}")
    if hidden < 0:
        raise ModelConfigError(f"head_hidden must be >= 0 (0 = no hidden layer), got {hidden}")


def _placed_by_cost(
    backbone: Backbone,
    fractions: Sequence[float],
    exit_after: Sequence[int] | None,
    input_shape: Sequence[int] | None,
) -> list[int]:
    """Block counts for ``exit_at_macs``, measured on one image of ``input_shape``."""
    if exit_after is not None:
        raise ModelConfigError("give exit_after or exit_at_macs, not both")
    if input_shape is None:
        raise ModelConfigError("exit_at_macs needs input_shape (C, H, W) to measure the backbone")
    return exits_at_macs(fractions, block_boundary_macs(backbone, tuple(input_shape)))


def _split_stages(backbone: Backbone, exit_after: list[int]) -> nn.ModuleList:
    """Stage 0 = stem + blocks up to the first exit; then one stage per gap between exits."""
    bounds = [0, *exit_after, len(backbone.blocks)]
    stages = []
    for i, (start, end) in enumerate(pairwise(bounds)):
        stem = [backbone.stem] if i == 0 else []
        stages.append(nn.Sequential(*stem, *backbone.blocks[start:end]))
    return nn.ModuleList(stages)


def build_model(
    arch: str,
    num_classes: int,
    *,
    width: float = 1.0,
    exit_after: Sequence[int] | None = None,
    exit_at_macs: Sequence[float] | None = None,
    num_early_exits: int | None = None,
    head_pool: int = 2,
    head_dropout: float = 0.5,
    head_hidden: int = 0,
    dropout: float = 0.0,
    in_channels: int = 3,
    input_shape: Sequence[int] | None = None,
    **backbone_kwargs,
) -> EarlyExitNet:
    """Build backbone ``arch`` and wrap it as an early-exit network.

    ``backbone_kwargs`` reach the backbone (e.g. ``shortcut="A"`` or
    ``zero_init_residual=True`` for ResNets). ``input_shape`` (C, H, W; default
    ``in_channels`` x 32 x 32) is the image size ``exit_at_macs`` is measured on
    and a user network is probed with; pass the data's size so that a
    checkpoint rebuilds the same exits.
    """
    shape = tuple(input_shape) if input_shape is not None else (in_channels, 32, 32)
    backbone = build_backbone(
        arch, num_classes, width=width, dropout=dropout, in_channels=in_channels,
        input_shape=shape, **backbone_kwargs,
    )  # fmt: skip
    min_side = int(getattr(backbone, "min_input_side", 1))
    if min(shape[1:]) < min_side:
        raise ModelConfigError(
            f"{arch} needs images of at least {min_side}x{min_side} pixels, got "
            f"{shape[1]}x{shape[2]}; set data.image_size={min_side} or more"
        )
    return EarlyExitNet(
        backbone, exit_after, num_early_exits, head_pool, head_dropout, head_hidden,
        exit_at_macs=exit_at_macs, input_shape=shape,
    )  # fmt: skip
