"""Ablation of a schedule's ingredients: teacher accuracy at a fixed number of epochs.

Each variant is the schedule (``--schedule fast`` or ``speed``:
``configs/schedules/<name>.yaml`` over the data set's preset) with one ingredient
changed, trained for the same ``--epochs`` with the same seed; the table gives every
exit's **validation** accuracy after the last epoch (the decision is made on
validation images, never on test images), the wall time and the final training
loss. Runs are ordinary ``erde train-teacher`` folders under ``--out``: rerun the
same command to resume an interrupted variant and reuse finished ones.

    python benchmarks/recipe_ablation.py --data-dir ../shared/data/cifar10-jpeg.tar.gz \\
        --epochs 15 --out /work/erde-runs/ablation            # every variant
    python benchmarks/recipe_ablation.py ... --variants fast linear   # a subset
    # the speed schedule's switches at a proxy scale: a half-width teacher, 10 epochs
    python benchmarks/recipe_ablation.py --schedule speed --data-dir DATA --epochs 10 \\
        --set teacher.width=0.5 --set teacher_train.warmup_epochs=2.3 --out RUNS/speed-ablation

Writes ``ablation.json`` and ``ablation.md`` into ``--out`` after every variant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

try:  # run from a fresh clone without `pip install -e .` as well
    import erde  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from erde.cli import guarded  # noqa: E402
from erde.io import atomic_write_text, environment_info  # noqa: E402
from erde.report import markdown_table  # noqa: E402
from erde.reproduce import detect_loader, reproduce_config  # noqa: E402
from erde.training import Job, load_splits, train  # noqa: E402

# name -> (what changes, config overrides on top of the schedule), per schedule
FAST_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "fast": ("the fast schedule as shipped (cosine, lr 0.1, batch 128, Nesterov)", []),
    "linear": ("linear anneal to zero instead of cosine", ["teacher_train.schedule=linear"]),
    "batch256": ("batch 256 with lr scaled to 0.2", ["data.batch_size=256", "teacher_train.lr=0.2"]),
    "lr0.2": ("peak lr 0.2", ["teacher_train.lr=0.2"]),
    "no_nesterov": ("plain momentum", ["teacher_train.nesterov=false"]),
    "wd1e-4": ("weight decay 1e-4 instead of 5e-4", ["teacher_train.weight_decay=1e-4"]),
    "label_smoothing": ("label smoothing 0.1 (teacher quality only)", ["teacher_train.label_smoothing=0.1"]),
    "exit_weights": (
        "early exits weighted 0.5, the last 1",
        ["teacher_train.exit_weights=[0.5, 0.5, 0.5, 1.0]"],
    ),
}  # fmt: skip
SPEED_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "speed": ("the speed schedule as shipped (FastNet, the fast-CIFAR recipe)", []),
    "no_whiten": ("stem learnt from a random start, not set from training patches",
                  ["teacher_train.whiten_init=false"]),
    "no_lookahead": ("no look-ahead averaging of the weights", ["teacher_train.lookahead=false"]),
    "random_flip": ("flips drawn at random instead of alternating", ["data.alternating_flip=false"]),
    "bias_lr_1": ("BatchNorm biases at the weights' learning rate, not 64x",
                  ["teacher_train.norm_bias_lr_scale=1"]),
    "exits_1": ("early exits weighted 1 like the last, not 0.3",
                ["teacher_train.exit_weights=[1, 1, 1]"]),
}  # fmt: skip
VARIANTS = {"fast": FAST_VARIANTS, "speed": SPEED_VARIANTS}


def variant_config(args: argparse.Namespace, name: str):
    overrides = [
        *VARIANTS[args.schedule][name][1],
        f"teacher_train.epochs={args.epochs}",
        f"seed={args.seed}",
        *args.overrides,
    ]
    cfg = reproduce_config(args.dataset, args.schedule, overrides=overrides)
    cfg.data.data_dir = args.data_dir
    cfg.data.name = detect_loader(args.dataset, args.data_dir)
    return cfg


def row(name: str, out: Path, variants: dict[str, tuple[str, list[str]]]) -> dict:
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = history[-1]
    return {
        "variant": name,
        "change": variants[name][0],
        "overrides": variants[name][1],
        "epochs": last["epoch"],
        "val_exit_accuracy": last["val_exit_accuracy"],
        "train_loss": last["train_loss"],
        "seconds": sum(r["seconds"] for r in history),
    }


def render(rows: list[dict], epochs: int, schedule: str = "fast") -> str:
    lines = [
        f"Teacher validation accuracy after {epochs} epochs, per variant of the {schedule} schedule",
        "",
    ]
    body = [
        [
            r["variant"],
            r["change"],
            " / ".join(f"{100 * a:.2f}" for a in r["val_exit_accuracy"]),
            f"{100 * r['val_exit_accuracy'][-1]:.2f}",
            f"{r['train_loss']:.3f}",
            f"{r['seconds'] / 60:.0f}",
        ]
        for r in rows
    ]
    header = ["Variant", "Change", "Exit accuracies (%)", "Last exit (%)", "Train loss", "Minutes"]
    return "\n".join(lines + markdown_table(header, body)) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="cifar10", help="cifar10 (default), cifar100, svhn")
    p.add_argument("--schedule", choices=list(VARIANTS), default="fast",
                   help="whose ingredients: fast (ResNet, default) or speed (FastNet)")  # fmt: skip
    p.add_argument("--data-dir", required=True, help="the data set's files")
    p.add_argument("--out", type=Path, required=True, help="one run folder per variant (reused)")
    p.add_argument("--epochs", type=int, default=15, help="epochs of every variant (default: 15)")
    p.add_argument("--seed", type=int, default=0, help="seed of every variant (default: 0)")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help="which variants to train (default: all of the schedule's): "
                   + "; ".join(f"{k}: {', '.join(v)}" for k, v in VARIANTS.items()))  # fmt: skip
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every variant, repeatable")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.epochs < 1:
        p.error("--epochs must be >= 1")
    variants = VARIANTS[args.schedule]
    args.variants = args.variants or list(variants)
    unknown = [v for v in args.variants if v not in variants]
    if unknown:
        p.error(f"no variant {', '.join(unknown)} in the {args.schedule} schedule; "
                f"choose from {', '.join(variants)}")  # fmt: skip
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = load_splits(variant_config(args, args.variants[0]))  # the same split for all
    rows = []
    for name in args.variants:
        out = args.out / name
        print(f"{name}: {variants[name][0]} -> {out}", flush=True)
        cfg = variant_config(args, name)
        train(cfg, Job("teacher"), out, resume=True, progress=not args.no_progress, splits=splits)
        rows.append(row(name, out, variants))
        record = {"epochs": args.epochs, "dataset": args.dataset, "schedule": args.schedule,
                  "overrides": args.overrides, "rows": rows,
                  "environment": environment_info()}  # fmt: skip
        atomic_write_text(args.out / "ablation.json", json.dumps(record, indent=1) + "\n")
        atomic_write_text(args.out / "ablation.md", render(rows, args.epochs, args.schedule))
    print(render(rows, args.epochs, args.schedule))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
