"""Training throughput: our ERDE student step against our KD step and a naive loop.

Prints images per second, on the same models, batch size and data, of

  (a) erde  -- ``erde.training.train`` on an ERDE student, teacher forward included;
  (b) kd    -- the same with the KD loss (the ratio a/b prices the entropy term);
  (c) naive -- the same ERDE step written the common way: a Dataset that
               augments one PIL image at a time (torchvision's CIFAR10 with
               RandomCrop(padding), RandomHorizontalFlip, ToTensor, Normalize,
               op for op) behind a DataLoader with 2 workers, NCHW fp32,
               teacher under no_grad, no compile, ``loss.item()`` every step;

and the ratios (a)/(b) and (a)/(c). (a) and (b) are timed from inside the real
training loop (its ``on_step`` hook), after warm-up steps, so model building,
checkpoints and validation are left out of every figure. The three are run in
interleaved rounds and each one's fastest round is reported (the round least
disturbed by other work on the machine); every round is printed and saved.

The data are random uint8 images of the chosen size (speed does not depend on
pixel values), so the script runs from a fresh clone with no download.

    python benchmarks/training.py                        # CPU: the digits preset's models
    python benchmarks/training.py --json training.json   # also write the figures as JSON
    python benchmarks/training.py --preset cifar --epoch-time   # on a GPU: ResNet-56 -> ResNet-20

``--epoch-time`` also trains the teacher and the ERDE student for one full
epoch of CIFAR-10-sized data (45,000 training images) and reports the seconds
of each epoch. Commands are in docs/PERFORMANCE.md, dated results in docs/LOG.md.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

try:  # run from a fresh clone without `pip install -e .` as well
    import erde  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from erde.checkpoints import load_checkpoint, model_from_checkpoint  # noqa: E402
from erde.cli import guarded  # noqa: E402
from erde.config import load_config  # noqa: E402
from erde.data import AugmentSpec, DataSplits, ImageSet  # noqa: E402
from erde.distributed import resolve_device  # noqa: E402
from erde.io import environment_info  # noqa: E402
from erde.losses import exit_mapping, student_loss  # noqa: E402
from erde.models import build_model  # noqa: E402
from erde.training import Job, build_optimizer, build_scheduler, train  # noqa: E402

PRESETS = {
    # the digits preset (`erde run` on a laptop CPU): 16x16 images, batch 64
    "cpu": {"teacher": "resnet20", "student": "resnet8", "width": 0.5, "size": 16, "batch": 64},
    # CIFAR-10 (configs/cifar10.yaml): 32x32 images, batch 128
    "cifar": {"teacher": "resnet56", "student": "resnet20", "width": 1.0, "size": 32, "batch": 128},
    # the speed schedule (configs/schedules/speed.yaml): FastNet -> half-width FastNet, batch 1024
    "speed": {"teacher": "fastnet", "student": "fastnet", "width": 0.5, "size": 32, "batch": 1024},
}
# options recorded with the figures
SETTINGS = ("preset", "steps", "warmup", "rounds", "channels_last", "compile", "amp", "threads")
CIFAR10_TRAIN = 45_000  # CIFAR-10's 50,000 training images less the 10% validation hold-out


def synthetic_splits(n_train: int, size: int, num_classes: int = 10, seed: int = 0) -> DataSplits:
    """Random uint8 images with CIFAR's augmentation (crop with padding size/8, flip)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_train, 3, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, num_classes, (n_train,), generator=g)
    train_set = ImageSet(images, labels)
    empty = ImageSet(images[:0], labels[:0])
    return DataSplits(
        name="synthetic", train=train_set, val=empty, test=empty, num_classes=num_classes,
        class_names=[str(i) for i in range(num_classes)], mean=(0.5,) * 3, std=(0.25,) * 3,
        augment=AugmentSpec(crop_padding=max(1, size // 8), flip=True),
    )  # fmt: skip


def experiment(args: argparse.Namespace, steps_per_epoch: int | None, epochs: int = 1):
    p = PRESETS[args.preset]
    sets = [
        f"device={args.device}", f"data.batch_size={args.batch_size}",
        f"teacher.arch={p['teacher']}", f"student.arch={p['student']}", f"student.width={p['width']}",
    ]  # fmt: skip
    for section in ("teacher_train", "student_train"):
        sets += [
            f"{section}.epochs={epochs}", f"{section}.max_steps_per_epoch={steps_per_epoch or 'null'}",
            f"{section}.channels_last={str(args.channels_last).lower()}",
            f"{section}.compile={str(args.compile).lower()}",
            f"{section}.amp={'null' if args.amp is None else str(args.amp).lower()}",
        ]  # fmt: skip
    return load_config(None, sets)


class StepClock:
    """``on_step`` hook: time from the end of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int, last: int, device: torch.device) -> None:
        self.warmup, self.last, self.device = warmup, last, device
        self.start = self.end = 0.0

    def __call__(self, step: int) -> None:
        if step in (self.warmup, self.last):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            self.start, self.end = (now, self.end) if step == self.warmup else (self.start, now)


def ours(method: str, args, splits, teacher: Path, work: Path) -> float:
    """Images/s of erde.training.train for ``method``, timed inside the loop."""
    total = args.warmup + args.steps
    cfg = experiment(args, total)
    clock = StepClock(args.warmup, total, args.device_obj)
    train(
        cfg, Job("student", method), work / method, teacher_checkpoint=teacher, force=True,
        progress=False, splits=splits, on_step=clock,
    )  # fmt: skip
    return args.steps * args.batch_size / (clock.end - clock.start)


class PerImageDataset(torch.utils.data.Dataset):
    """The common way, as torchvision's CIFAR10 dataset and transforms do it, one image at a time.

    (torchvision is not a dependency of erde, so its PIL operations are spelled out.)
    """

    def __init__(self, data: ImageSet, splits: DataSplits) -> None:
        self.images = data.images.permute(0, 2, 3, 1).numpy()  # (N, H, W, C) uint8, like CIFAR10
        self.labels = data.labels.tolist()
        self.mean = torch.tensor(splits.mean).view(-1, 1, 1)
        self.std = torch.tensor(splits.std).view(-1, 1, 1)
        self.pad, self.flip = splits.augment.crop_padding, splits.augment.flip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = Image.fromarray(self.images[i])
        w, h = image.size
        if self.pad:  # RandomCrop(size, padding)
            image = ImageOps.expand(image, border=self.pad, fill=0)
            top, left = random.randint(0, 2 * self.pad), random.randint(0, 2 * self.pad)
            image = image.crop((left, top, left + w, top + h))
        if self.flip and random.random() < 0.5:  # RandomHorizontalFlip
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)  # ToTensor
        return (x - self.mean) / self.std, self.labels[i]  # Normalize


def naive(args, splits, teacher_path: Path) -> float:
    """Images/s of the same ERDE step written the way most training scripts are."""
    cfg = experiment(args, None)
    device = args.device_obj
    teacher = model_from_checkpoint(load_checkpoint(teacher_path)).to(device).eval()
    torch.manual_seed(cfg.seed)
    student = build_model(
        num_classes=splits.num_classes, arch=cfg.student.arch, width=cfg.student.width
    )
    student.to(device).train()
    optimizer = build_optimizer(student, cfg.student_train)
    scheduler = build_scheduler(optimizer, cfg.student_train, args.warmup + args.steps)
    mapping = exit_mapping(student.num_exits, teacher.num_exits)
    weights = [1.0] * student.num_exits
    loader = torch.utils.data.DataLoader(
        PerImageDataset(splits.train, splits), batch_size=args.batch_size, shuffle=True,
        drop_last=True, num_workers=args.naive_workers, pin_memory=device.type == "cuda",
    )  # fmt: skip
    d, running = cfg.distill, 0.0
    for step, (x, y) in enumerate(loader, start=1):
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            teacher_logits = teacher(x)
        terms = student_loss(
            "erde", student(x), teacher_logits, y, weights, mapping,
            alpha=d.alpha, beta=d.beta, gamma=d.gamma, tau=d.temperature,
        )  # fmt: skip
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        scheduler.step()
        running += terms["total"].item()
        if step == args.warmup:
            start = time.perf_counter()
        if step == args.warmup + args.steps:
            return args.steps * args.batch_size / (time.perf_counter() - start)
    raise SystemExit("training set too small for --warmup + --steps batches")


def epoch_seconds(args, work: Path) -> dict[str, float]:
    """One full epoch of CIFAR-10-sized data: the teacher, then the ERDE student from it."""
    splits = synthetic_splits(args.epoch_images, PRESETS[args.preset]["size"], seed=1)
    cfg = experiment(args, None)
    out = {}
    teacher = train(
        cfg, Job("teacher"), work / "epoch_teacher", force=True, progress=False, splits=splits
    )
    student = train(
        cfg, Job("student", "erde"), work / "epoch_student", teacher_checkpoint=teacher,
        force=True, progress=False, splits=splits,
    )  # fmt: skip
    for name, path in (("teacher", teacher), ("student_erde", student)):
        (record,) = load_checkpoint(path)["history"]
        out[f"{name}_epoch_seconds"] = record["seconds"]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS), help="default: cifar on CUDA, else cpu"
    )
    parser.add_argument("--batch-size", type=int, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed steps before each round (at least 1: the clock starts "
                        "at the end of the last one)")  # fmt: skip
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds; fastest reported"
    )
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                        help="NHWC for our loop (default: on CUDA only; no gain on CPU)")  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="torch.compile our models")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision (default: bf16 on CUDA, off on CPU)")  # fmt: skip
    parser.add_argument("--naive-workers", type=int, default=2,
                        help="DataLoader workers of the naive loop (PyTorch's CIFAR tutorial: 2)")  # fmt: skip
    parser.add_argument("--epoch-time", action="store_true",
                        help="also time one CIFAR-10-sized epoch of teacher and ERDE student")  # fmt: skip
    parser.add_argument("--epoch-images", type=int, default=CIFAR10_TRAIN,
                        help="training images in the --epoch-time epoch (default: CIFAR-10's 45,000)")  # fmt: skip
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup, --steps and --rounds must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device_obj = resolve_device(args.device)
    args.device = str(args.device_obj)
    args.preset = args.preset or ("cifar" if args.device_obj.type == "cuda" else "cpu")
    args.batch_size = args.batch_size or PRESETS[args.preset]["batch"]
    if args.channels_last is None:
        args.channels_last = args.device_obj.type == "cuda"
    p = PRESETS[args.preset]
    model = (
        f"student {p['student']} (width {p['width']}) <- teacher {p['teacher']}, "
        f"{p['size']}x{p['size']} images"
    )
    env = environment_info()
    print(f"device {args.device} ({env['cuda_device'] or env['platform']}), torch {env['torch']}, "
          f"{env['torch_threads']} threads; {model}; batch {args.batch_size}; "
          f"channels_last={args.channels_last} compile={args.compile} amp={args.amp}")  # fmt: skip

    n_train = (args.warmup + args.steps) * args.batch_size
    splits = synthetic_splits(n_train, p["size"])
    rounds = {"erde": [], "kd": [], "naive": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        teacher_cfg = experiment(args, 1)
        teacher = train(
            teacher_cfg, Job("teacher"), work / "teacher", progress=False, splits=splits
        )
        for r in range(args.rounds):
            rounds["erde"].append(ours("erde", args, splits, teacher, work))
            rounds["kd"].append(ours("kd", args, splits, teacher, work))
            rounds["naive"].append(naive(args, splits, teacher))
            print(
                f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:8.1f} img/s" for k, v in rounds.items())
            )
        extra = epoch_seconds(args, work) if args.epoch_time else {}

    ips = {k: max(v) for k, v in rounds.items()}
    result = {
        "erde_ips": ips["erde"],
        "kd_ips": ips["kd"],
        "naive_ips": ips["naive"],
        "erde_vs_kd": ips["erde"] / ips["kd"],
        "erde_vs_naive": ips["erde"] / ips["naive"],
        "model": model,
        "batch_size": args.batch_size,
        "device": args.device,
        **extra,
        "rounds": rounds,
        "settings": {k: getattr(args, k) for k in (*SETTINGS, "naive_workers")},
        "environment": env,
        "command": " ".join(["python", "benchmarks/training.py", *(argv or sys.argv[1:])]),
    }
    print(f"(a) erde  {ips['erde']:8.1f} img/s   ERDE student step, teacher forward included")
    print(f"(b) kd    {ips['kd']:8.1f} img/s   KD student step")
    print(f"(c) naive {ips['naive']:8.1f} img/s   per-image DataLoader, NCHW fp32, no compile")
    print(f"(a)/(b) = {result['erde_vs_kd']:.3f}   (a)/(c) = {result['erde_vs_naive']:.2f}")
    for key, value in extra.items():
        print(f"{key}: {value:.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
