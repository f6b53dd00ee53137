"""Wall-clock of the digits teacher at several CPU thread counts, in interleaved rounds.

    python benchmarks/threads.py --threads 1,2 --rounds 2

Trains the digits preset's teacher (ResNet-20, 3 exits, 16x16 images) for
``--epochs`` epochs once per thread count per round, in turns (1, 2, 1, 2 ...)
so every count sees the same machine load, and prints each run's seconds with
the 1-minute load average at its end. This is the measurement behind erde's
default thread count (erde/threads.py); results are in docs/LOG.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from erde.cli import guarded
from erde.config import load_config, load_yaml, preset_path
from erde.training import Job, load_splits, train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the thread counts")
    parser.add_argument("--epochs", type=int, default=2, help="teacher epochs per run")
    args = parser.parse_args(argv)

    overrides = [f"teacher_train.epochs={args.epochs}", "device=cpu"]
    cfg = load_config(None, overrides, base=load_yaml(preset_path("digits")))
    splits = load_splits(cfg)
    counts = [int(c) for c in args.threads.split(",")]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, digits teacher, {args.epochs} epochs")
    for r in range(args.rounds):
        for n in counts:
            torch.set_num_threads(n)
            with tempfile.TemporaryDirectory() as out:
                start = time.perf_counter()
                train(cfg, Job("teacher"), out, progress=False, splits=splits)
                seconds = time.perf_counter() - start
            load = os.getloadavg()[0]
            print(f"round {r} threads {n}: {seconds:.1f} s  load {load:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
