"""MACs and parameters per exit of each backbone family, measured, as the tables of docs/BACKBONES.md.

For every architecture: its blocks, where its early exits sit (default: evenly
spaced by block count; or ``--exit-at-macs``, placed by share of the MACs),
and for each exit the cumulative MACs of one image leaving there (heads on the
way included), that cost as a share of the last exit's, and the parameters
needed to answer there. Nothing is trained: costs depend on shapes only.

    python benchmarks/backbone_costs.py                          # default exits, 32x32, 10 classes
    python benchmarks/backbone_costs.py --exit-at-macs 0.15 0.3 0.45 0.6 0.75 0.9   # SDN's placement
    python benchmarks/backbone_costs.py --pair resnet56 mobilenetv2   # exit pairs, depth vs cost

Prints Markdown, headed by the machine and versions it ran with.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch

from erde.cli import guarded
from erde.losses import exit_mapping, exit_mapping_by_cost
from erde.models import build_model, measure_exit_costs

ARCHS = (
    "resnet20", "resnet56", "resnet110", "wrn16_4", "wrn28_10",
    "mobilenetv2", "mobilenetv2_x0.5", "vgg11_bn", "vgg16_bn",
)  # fmt: skip


def _m(value: float) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}K"


def cost_rows(
    arch: str, size: int, num_classes: int, exit_at_macs: list[float] | None, width: float = 1.0
) -> list[str]:
    """One Markdown row per exit of ``arch`` (at ``width``) on (3, size, size) images."""
    model = build_model(
        arch, num_classes, width=width, exit_at_macs=exit_at_macs, input_shape=(3, size, size)
    )
    label = arch if width == 1.0 else f"{arch} x{width:g}"
    costs = measure_exit_costs(model, (3, size, size))
    bounds = [*model.exit_after, model.num_blocks]
    full = costs.macs_per_exit[-1]
    return [
        f"| {label} | {i} | {b} / {model.num_blocks} | {_m(macs)} | {100 * macs / full:.0f}% "
        f"| {_m(params)} |"
        for i, (b, macs, params) in enumerate(
            zip(bounds, costs.macs_per_exit, costs.params_per_exit, strict=True)
        )
    ]


def render(
    archs: list[str],
    size: int,
    num_classes: int,
    exit_at_macs: list[float] | None,
    widths: list[float] | None = None,
) -> str:
    """The whole Markdown table, with the settings and machine it was measured with."""
    widths = widths or [1.0]
    placement = f"exit_at_macs={exit_at_macs}" if exit_at_macs else "default exits"
    lines = [
        f"Measured by `python benchmarks/backbone_costs.py"
        f"{' --archs ' + ' '.join(archs) if list(archs) != list(ARCHS) else ''}"
        f"{' --widths ' + ' '.join(f'{w:g}' for w in widths) if widths != [1.0] else ''}"
        f"{' --exit-at-macs ' + ' '.join(map(str, exit_at_macs)) if exit_at_macs else ''}`: "
        f"{placement}, 3x{size}x{size} images, {num_classes} classes; torch {torch.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}.",
        "",
        "| arch | exit | after block | MACs | share of last exit | params |",
        "|---|---|---|---|---|---|",
    ]
    for arch in archs:
        for width in widths:
            lines += cost_rows(arch, size, num_classes, exit_at_macs, width)
    return "\n".join(lines)


def pairing(
    teacher: str, student: str, size: int, num_classes: int, exit_at_macs: list[float] | None
) -> str:
    """Which teacher exit each student exit learns from, by relative depth and by relative cost."""
    shape = (3, size, size)
    t_model = build_model(teacher, num_classes, input_shape=shape)
    s_model = build_model(student, num_classes, exit_at_macs=exit_at_macs, input_shape=shape)
    t_macs = measure_exit_costs(t_model, shape).macs_per_exit
    s_macs = measure_exit_costs(s_model, shape).macs_per_exit
    by_depth = exit_mapping(s_model.num_exits, t_model.num_exits)
    by_cost = exit_mapping_by_cost(s_macs, t_macs)
    lines = [
        f"Teacher {teacher} (default exits), student {student} "
        f"({f'exit_at_macs={exit_at_macs}' if exit_at_macs else 'default exits'}), "
        f"3x{size}x{size}: `python benchmarks/backbone_costs.py --pair {teacher} {student}"
        f"{' --exit-at-macs ' + ' '.join(map(str, exit_at_macs)) if exit_at_macs else ''}`",
        "",
        "| student exit | its share of MACs | teacher exit by depth | by cost (its share) |",
        "|---|---|---|---|",
    ]
    for i, (macs, d, c) in enumerate(zip(s_macs, by_depth, by_cost, strict=True)):
        lines.append(
            f"| {i} | {100 * macs / s_macs[-1]:.0f}% | {d} ({100 * t_macs[d] / t_macs[-1]:.0f}%) "
            f"| {c} ({100 * t_macs[c] / t_macs[-1]:.0f}%) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), help="architectures to measure")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--num-classes", type=int, default=10, help="classes (default: 10)")
    parser.add_argument(
        "--exit-at-macs", nargs="+", type=float, help="place exits at these shares of the MACs"
    )
    parser.add_argument(
        "--widths", nargs="+", type=float, default=[1.0],
        help="width multipliers to measure each architecture at (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--pair", nargs=2, metavar=("TEACHER", "STUDENT"), help="print exit pairs instead"
    )
    args = parser.parse_args(argv)
    if args.pair:
        print(pairing(*args.pair, args.size, args.num_classes, args.exit_at_macs))
    else:
        print(render(args.archs, args.size, args.num_classes, args.exit_at_macs, args.widths))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
