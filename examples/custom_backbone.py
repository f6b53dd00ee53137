"""Bring your own network: a small CNN of your own as an early-exit teacher, and an ERDE student.

    python examples/custom_backbone.py               # teacher + ERDE student, 15 epochs each
    python examples/custom_backbone.py --epochs 1    # a quicker look

Measured with ``time python examples/custom_backbone.py`` on a 2-core AMD EPYC
VM (torch 2.13.0+cpu, Python 3.11.7) that other jobs kept busy (load average
about 11): 27 s of CPU time, 70 s wall-clock; an idle machine was not
available to time it. It runs on one thread: these small models gain nothing
from a second, and on a busy CPU two threads wait on each other (the same
run with two threads took 11 minutes there).

erde needs to see a network as an ordered list of stages: a ``stem``, ``blocks``
(an exit may follow any block) and a ``classifier`` (the last exit). A factory
marked with ``@backbone_factory`` returns such a network, and a config names it
by import path, here ``custom_backbone:small_cnn`` (this file; ``python
examples/custom_backbone.py`` puts its folder on ``sys.path``). The teacher's
exits are placed by cost (``exit_at_macs``); the student is the same CNN at
half width, trained with ERDE from the teacher. Everything else (training,
evaluation, report, checkpoints) is erde's ordinary pipeline.

The checkpoints record the import path, so other erde commands rebuild the
network as long as this module is importable and trusted (a checkpoint alone
may not make erde import code), e.g.
``PYTHONPATH=examples erde calibrate runs/custom_backbone/student_erde --budget 0.5
--trust-module custom_backbone``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch import nn

from erde.models import backbone_factory

MODULE = Path(__file__).stem  # "custom_backbone": the name erde imports this file by


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> nn.Sequential:
    """3x3 conv -> BN -> ReLU: (B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()
    )


class SmallCNN(nn.Module):
    """A plain CNN written the way erde reads it: stem, a list of blocks, classifier."""

    def __init__(self, num_classes: int, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        c = [max(4, round(n * width)) for n in (16, 32, 64)]
        self.stem = conv_bn_relu(in_channels, c[0])
        self.blocks = nn.ModuleList(
            [
                conv_bn_relu(c[0], c[0]),
                conv_bn_relu(c[0], c[1], stride=2),
                conv_bn_relu(c[1], c[1]),
                conv_bn_relu(c[1], c[2], stride=2),
                conv_bn_relu(c[2], c[2]),
            ]
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c[2], num_classes)
        )

    def forward(self, x):  # (B, C, H, W) -> (B, K): the plain network, for use outside erde
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


@backbone_factory
def small_cnn(num_classes: int, in_channels: int = 3, width: float = 1.0) -> SmallCNN:
    """What ``arch: custom_backbone:small_cnn`` builds; erde passes width and in_channels."""
    return SmallCNN(num_classes, in_channels, width)


def main(argv: list[str] | None = None) -> None:
    import erde  # the public API (docs/API.md), as a user's own script would use it

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/custom_backbone", help="output folder")
    parser.add_argument("--epochs", type=int, default=15, help="epochs for teacher and student")
    parser.add_argument("--max-steps", type=int, help="cut epochs short (smoke tests)")
    parser.add_argument("--force", action="store_true", help="replace an earlier run in --out")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    erde.set_threads(args.threads)

    overrides = [
        f"teacher.arch={MODULE}:small_cnn",
        "teacher.exit_at_macs=[0.3, 0.6]",  # exits where 30% and 60% of the MACs are spent
        f"student.arch={MODULE}:small_cnn",
        "student.width=0.5",
        "student.exit_at_macs=[0.3, 0.6]",
        "distill.exit_mapping_by=cost",  # pair exits by their share of the MACs
        "device=cpu",
    ]
    for section in ("teacher_train", "student_train"):
        overrides += [f"{section}.epochs={args.epochs}", f"{section}.warmup_epochs=0"]
        if args.max_steps:
            overrides.append(f"{section}.max_steps_per_epoch={args.max_steps}")
    cfg = erde.make_config("digits", overrides)
    paths = erde.run(cfg, args.out, methods=["erde"], force=args.force, progress=False)

    report = json.loads(Path(paths["json"]).read_text())
    for name, model in report["models"].items():
        exits = ", ".join(
            f"{100 * a:.1f}% at {m / 1e3:.0f}K MACs"
            for a, m in zip(model["exit_accuracy"], model["macs_per_exit"], strict=True)
        )
        print(f"{name}: {exits}")
    print(f"report: {paths['markdown']}")


if __name__ == "__main__":
    main()
