"""What test-time augmentation would add to a checkpoint's accuracy, per exit, on the test set.

Early-exit routing answers one view of an image, so erde never averages views; the
fast-CIFAR papers report their accuracy with such averaging. To compare with them,
this prints each exit's test accuracy for three levels (airbench's, Jordan 2024):

- 0: the image alone;
- 1: the mean of the logits of the image and its mirror image;
- 2: half of level 1, plus a quarter each of level 1 on the image translated by one
  pixel up-left and down-right (reflect padding).

    python benchmarks/tta.py docs/results/cifar10-speed-teacher --data-dir DATA
    python benchmarks/tta.py CKPT --json tta.json --amp     # bf16 autocast, as training
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # run from a fresh clone without `pip install -e .` as well
    import erde  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from erde.checkpoints import load_checkpoint, model_from_checkpoint  # noqa: E402
from erde.cli import guarded  # noqa: E402
from erde.config import config_from_dict  # noqa: E402
from erde.data import DataSplits, ImageSet, iterate_batches, load_splits, prepare_batch  # noqa: E402
from erde.distributed import resolve_device  # noqa: E402

Views = Callable[[torch.Tensor], list[torch.Tensor]]


def mirrored(model: torch.nn.Module) -> Views:
    """Level 1: per exit, the mean logits of the batch and its mirror image, (B, K) each."""

    def views(x: torch.Tensor) -> list[torch.Tensor]:
        return [0.5 * (a + b) for a, b in zip(model(x), model(x.flip(3)), strict=True)]

    return views


def translated(model: torch.nn.Module) -> Views:
    """Level 2: level 1 at weight 1/2, and at 1/4 each on 1-pixel shifts up-left and down-right."""
    mirror = mirrored(model)

    def views(x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [mirror(padded[:, :, :h, :w]), mirror(padded[:, :, 2 : h + 2, 2 : w + 2])]
        return [0.5 * a + 0.25 * (b + c) for a, b, c in zip(mirror(x), *shifted, strict=True)]

    return views


@torch.no_grad()
def tta_accuracy(
    model: torch.nn.Module, data: ImageSet, splits: DataSplits, device: torch.device,
    batch_size: int = 500, amp: bool = False,
) -> dict[int, list[float]]:  # fmt: skip
    """{level: accuracy per exit} over the uint8 images of ``data`` (N, C, H, W)."""
    levels: dict[int, Views] = {0: model, 1: mirrored(model), 2: translated(model)}
    hits: dict[int, torch.Tensor | None] = {level: None for level in levels}
    for images, y in iterate_batches(data, batch_size, device=device):
        x = prepare_batch(images, splits, train=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for level, views in levels.items():
                got = torch.stack([(out.argmax(1) == y).sum() for out in views(x)])
                hits[level] = got if hits[level] is None else hits[level] + got
    return {level: (h.double() / len(data)).tolist() for level, h in hits.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="checkpoint file or run folder")
    p.add_argument("--data-dir", help="data folder (default: the checkpoint's own config)")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=500, help="images per forward (default 500)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (default: fp32)")
    p.add_argument("--json", type=Path, help="also write the accuracies to this file")
    args = p.parse_args(argv)
    ckpt = load_checkpoint(args.checkpoint)
    cfg = config_from_dict(ckpt["config"])
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    device = resolve_device(args.device)
    splits = load_splits(cfg)
    model = model_from_checkpoint(ckpt).to(device).eval()
    acc = tta_accuracy(model, splits.test, splits, device, args.batch_size, args.amp)
    print(f"{ckpt['path']}: {len(splits.test)} test images on {device}, "
          f"{'bf16 autocast' if args.amp else 'fp32'}")  # fmt: skip
    names = {0: "one view", 1: "with its mirror", 2: "mirror and two 1-pixel shifts"}
    for level, per_exit in acc.items():
        print(
            f"level {level} ({names[level]}): "
            + " / ".join(f"{100 * a:.2f}" for a in per_exit)
            + " %"
        )
    if args.json:
        record = {"checkpoint": str(args.checkpoint), "images": len(splits.test),
                  "amp": args.amp, "accuracy_by_level": acc}  # fmt: skip
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
