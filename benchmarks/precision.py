"""Does a bf16 forward change a trained model's answers, and is it faster? Per exit, on validation.

For a checkpoint (typically the teacher of a student run), runs the validation
split once in fp32 and once under bf16 autocast and prints, per exit, the share
of images with the same predicted class, the share whose right/wrong verdict
is unchanged (what splits ERDE's KL and entropy terms, so it decides whether
``distill.teacher_amp=true`` changes the student's loss), the largest logit
difference, and the images per second of both passes (fastest of ``--rounds``).

    python benchmarks/precision.py runs/c10/teacher               # data from the checkpoint's config
    python benchmarks/precision.py CKPT --data-dir DIR --json precision.json

bf16 is only faster on CPUs with bf16 hardware (AVX-512 BF16 or AMX) and on
GPUs; elsewhere it is emulated, and the speed column says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

try:  # run from a fresh clone without `pip install -e .` as well
    import erde  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from erde.checkpoints import load_checkpoint, model_from_checkpoint  # noqa: E402
from erde.cli import guarded  # noqa: E402
from erde.config import config_from_dict  # noqa: E402
from erde.data import (  # noqa: E402
    iterate_batches,
    load_splits,  # noqa: E402
    prepare_batch,
)
from erde.distributed import resolve_device  # noqa: E402
from erde.evaluation import collect_exit_logits, precision_agreement  # noqa: E402
from erde.hardware import cpu_precision_summary  # noqa: E402
from erde.io import environment_info  # noqa: E402


def timed_logits(model, data, splits, device, batch_size: int, dtype, rounds: int):
    """Exit logits (E, N, K) under ``dtype`` autocast (None = fp32), and the best img/s."""
    best, logits, labels = 0.0, None, None
    for _ in range(rounds):
        batches = (
            (prepare_batch(x, splits, train=False), y)
            for x, y in iterate_batches(data, batch_size, device=device)
        )
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits, labels = collect_exit_logits(model, batches, device=device)
        best = max(best, len(data) / (time.perf_counter() - start))
    return logits, labels, best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--data-dir", help="data folder (default: the checkpoint's own config)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward (default: 256)")
    p.add_argument("--rounds", type=int, default=2, help="timed passes per precision (default 2)")
    p.add_argument("--max-images", type=int, help="use only the first N validation images")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(ckpt["config"])
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    device = resolve_device(args.device)
    splits = load_splits(cfg)
    data = splits.val if len(splits.val) else splits.test
    if args.max_images:
        data = data.subset(torch.arange(min(args.max_images, len(data))))
    model = model_from_checkpoint(ckpt).to(device).eval()
    fp32, labels, fp32_speed = timed_logits(
        model, data, splits, device, args.batch_size, None, args.rounds
    )
    bf16, _, bf16_speed = timed_logits(
        model, data, splits, device, args.batch_size, torch.bfloat16, args.rounds
    )
    agreement = precision_agreement(fp32, bf16, labels)
    print(f"{ckpt['name']} ({ckpt['model_config']['arch']}), {len(data)} images on {device}; "
          f"{cpu_precision_summary() if device.type == 'cpu' else torch.cuda.get_device_name(device)}")  # fmt: skip
    for i in range(fp32.shape[0]):
        print(f"exit {i}: same class {100 * agreement['same_class'][i]:.2f} %, same right/wrong "
              f"{100 * agreement['same_correctness'][i]:.2f} %, max |logit diff| "
              f"{agreement['max_abs_diff'][i]:.3g}")  # fmt: skip
    print(
        f"img/s: fp32 {fp32_speed:.0f}, bf16 {bf16_speed:.0f} (ratio {bf16_speed / fp32_speed:.2f})"
    )
    if args.json:
        record = {"checkpoint": str(args.checkpoint), "images": len(data), "device": str(device),
                  "agreement": agreement, "images_per_second": {"fp32": fp32_speed, "bf16": bf16_speed},
                  "environment": environment_info()}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
