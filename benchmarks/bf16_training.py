"""Does bf16 autocast training cost accuracy? One teacher trained in fp32 and in bf16, over seeds.

For every seed the teacher is trained twice with everything equal but
``teacher_train.amp`` (same initialisation, same batches, same augmentation
draws), and every exit is scored on the test split. The table gives each
precision's accuracy per seed, the paired difference bf16 - fp32 per seed with
its mean and two-sided paired-t p-value, and the seed-to-seed standard deviation
of fp32: a difference that is small against that spread, with a large p, is
"within seed noise".

    python benchmarks/bf16_training.py --seeds 3 --out /tmp/bf16       # digits, the default teacher
    python benchmarks/bf16_training.py --dataset cifar10 --data-dir ../shared/data/cifar10-jpeg.tar.gz \\
        --schedule fast --seeds 3 --device cuda --out /tmp/bf16-c10    # where bf16 is native

Runs are ordinary ``erde train-teacher`` folders under ``--out`` (``fp32/seed_S``,
``bf16/seed_S``): rerun the same command to resume or reuse them. On a CPU
without bf16 hardware (no AVX-512 BF16, no AMX) PyTorch emulates bf16: the
numbers are the same kind of rounding, but several times slower to get.
Writes ``bf16_training.json`` and ``bf16_training.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

try:  # run from a fresh clone without `pip install -e .` as well
    import erde  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from erde.checkpoints import load_checkpoint, model_from_checkpoint  # noqa: E402
from erde.cli import guarded  # noqa: E402
from erde.config import ExperimentConfig, load_config, preset_path  # noqa: E402
from erde.distributed import resolve_device  # noqa: E402
from erde.hardware import cpu_precision_summary  # noqa: E402
from erde.io import atomic_write_text, environment_info  # noqa: E402
from erde.report import markdown_table  # noqa: E402
from erde.reproduce import detect_loader, paired_p_value, reproduce_config  # noqa: E402
from erde.training import Job, evaluate_accuracy, load_splits, train  # noqa: E402

PRECISIONS = {"fp32": "false", "bf16": "true"}


def experiment(args: argparse.Namespace, precision: str, seed: int) -> ExperimentConfig:
    """The data set's settings (``--schedule`` for CIFAR/SVHN) with one precision and seed."""
    overrides = [
        *args.overrides,
        f"teacher_train.amp={PRECISIONS[precision]}",
        f"seed={seed}",
        f"device={args.device}",
    ]
    if args.dataset == "digits":
        return load_config(preset_path("digits"), overrides)
    cfg = reproduce_config(args.dataset, args.schedule, overrides=overrides)
    cfg.data.data_dir = args.data_dir
    cfg.data.name = detect_loader(args.dataset, args.data_dir)
    return cfg


def test_accuracy(checkpoint: Path, cfg: ExperimentConfig, splits) -> list[float]:
    """Accuracy of every exit on the test split (fractions)."""
    device = resolve_device(cfg.device)
    model = model_from_checkpoint(load_checkpoint(checkpoint)).to(device)
    return evaluate_accuracy(model, splits.test, splits, device, cfg.data.eval_batch_size)


def summarise(accuracy: dict[str, dict[int, list[float]]]) -> dict:
    """Per precision the last exit's mean and std; per seed and overall the paired difference."""
    seeds = sorted(accuracy["fp32"])
    last = {p: [accuracy[p][s][-1] for s in seeds] for p in PRECISIONS}
    diffs = [b - f for b, f in zip(last["bf16"], last["fp32"], strict=True)]
    spread = statistics.stdev if len(seeds) > 1 else (lambda _values: 0.0)
    return {
        "seeds": seeds,
        "last_exit": last,
        "mean": {p: statistics.fmean(v) for p, v in last.items()},
        "std": {p: spread(v) for p, v in last.items()},
        "diff_per_seed": diffs,
        "diff_mean": statistics.fmean(diffs),
        "diff_std": spread(diffs),
        "p_value": paired_p_value(diffs),
    }


def render(summary: dict, accuracy: dict[str, dict[int, list[float]]], what: str) -> str:
    rows = []
    for s, d in zip(summary["seeds"], summary["diff_per_seed"], strict=True):
        exits = {p: " / ".join(f"{100 * a:.2f}" for a in accuracy[p][s]) for p in PRECISIONS}
        rows.append([str(s), exits["fp32"], exits["bf16"], f"{100 * d:+.2f}"])
    p = summary["p_value"]
    lines = [
        f"Test accuracy per exit (%), {what}, fp32 against bf16 autocast training",
        "",
        *markdown_table(["Seed", "fp32", "bf16", "bf16 - fp32, last exit (points)"], rows),
        "",
        f"Last exit: fp32 {100 * summary['mean']['fp32']:.2f} ± {100 * summary['std']['fp32']:.2f} %, "
        f"bf16 {100 * summary['mean']['bf16']:.2f} ± {100 * summary['std']['bf16']:.2f} % "
        f"(mean ± sample std over seeds); paired difference {100 * summary['diff_mean']:+.2f} "
        f"± {100 * summary['diff_std']:.2f} points, p = {'n/a' if p is None else f'{p:.2g}'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", default="digits", help="digits (default), cifar10, cifar100, svhn")
    p.add_argument("--data-dir", help="the data set's files (not needed for digits)")
    p.add_argument("--schedule", default="fast", help="for cifar10/cifar100/svhn (default: fast)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default: 3)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--out", type=Path, required=True, help="run folders (reused on a rerun)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for both runs, repeatable")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.seeds < 2:
        p.error("--seeds must be >= 2: seed noise is what the difference is measured against")
    if args.dataset != "digits" and not args.data_dir:
        p.error(f"--data-dir is needed for {args.dataset}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(cpu_precision_summary() if args.device == "cpu" else f"device: {args.device}")
    accuracy: dict[str, dict[int, list[float]]] = {prec: {} for prec in PRECISIONS}
    for seed in range(args.seeds):
        for precision in PRECISIONS:
            cfg = experiment(args, precision, seed)
            splits = load_splits(cfg)
            out = args.out / precision / f"seed_{seed}"
            print(f"{precision}, seed {seed} -> {out}", flush=True)
            checkpoint = train(
                cfg, Job("teacher"), out, resume=True, progress=not args.no_progress, splits=splits
            )
            accuracy[precision][seed] = test_accuracy(checkpoint, cfg, splits)
    summary = summarise(accuracy)
    what = f"{cfg.teacher.arch} teacher on {args.dataset}, {cfg.teacher_train.epochs} epochs"
    record = {"what": what, "accuracy": accuracy, "summary": summary,
              "environment": environment_info()}  # fmt: skip
    atomic_write_text(args.out / "bf16_training.json", json.dumps(record, indent=1) + "\n")
    text = render(summary, accuracy, what)
    atomic_write_text(args.out / "bf16_training.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
