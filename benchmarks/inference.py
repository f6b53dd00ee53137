"""Does early exit save wall-clock time? Measured speedup against the ideal, per batch size.

Loads a trained early-exit checkpoint given with --checkpoint, or by default
trains a ResNet-56-sized early-exit network on 32x32 inputs (the embedded
digits upscaled, or CIFAR-10 with --data-dir) for a few epochs, so that compute
rather than Python overhead dominates. It fits the threshold that gives about
half the full MACs on the validation split, then, for each batch size, on CPU
(and CUDA when present), prints:

- full-network throughput (all stages, last exit only: the plain network),
- early-exit throughput with per-sample routing (PyTorch and ONNX Runtime),
- measured speedup, ideal speedup (full MACs / mean MACs actually spent per
  image) and their ratio,
- the same ratio for batch-level routing (the whole batch leaves together).

    python benchmarks/inference.py --json runs/bench-inference/inference.json

Every run prints the machine, versions and settings it ran with.
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

from erde.cli import guarded  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", help="trained early-exit checkpoint (default: train one)")
    p.add_argument(
        "--data-dir", help="CIFAR-10 folder for the default model (default: digits at 32x32)"
    )
    p.add_argument(
        "--out", default="runs/bench-inference", help="folder for the trained model and ONNX export"
    )
    p.add_argument(
        "--arch", default="resnet56", help="backbone of the default model (default: resnet56)"
    )
    p.add_argument(
        "--epochs", type=int, default=4, help="training epochs of the default model (default: 4)"
    )
    p.add_argument(
        "--budget",
        type=float,
        default=0.5,
        help="target mean MACs, fraction of full (default: 0.5)",
    )
    p.add_argument("--batch-sizes", default="1,32,256", help="comma-separated (default: 1,32,256)")
    p.add_argument(
        "--images",
        type=int,
        default=512,
        help="images per timed pass, test set cycled (default: 512)",
    )
    p.add_argument(
        "--repeats", type=int, default=5, help="timed passes per candidate, at least (default: 5)"
    )
    p.add_argument(
        "--min-time", type=float, default=2.0, help="seconds per candidate, at least (default: 2)"
    )
    p.add_argument(
        "--threads", type=int, help="CPU threads for PyTorch and ONNX Runtime (default: all cores)"
    )
    p.add_argument(
        "--devices", default="auto", help="cpu, cuda, or auto = cpu and cuda when present"
    )
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime measurements")
    p.add_argument(
        "--compile", action="store_true", help="torch.compile each stage for the PyTorch path"
    )
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run full network and early exit alike in NHWC (default: on)",
    )
    p.add_argument(
        "--fold-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run both on the inference copy, BatchNorm folded into the convolutions (default: on)",
    )
    p.add_argument("--json", help="also write the records as JSON to this path")
    return p.parse_args(argv)


def default_checkpoint(args: argparse.Namespace, device: str) -> Path:
    """Train (or reuse) the default early-exit network: a few epochs, every exit trained."""
    from erde.config import load_config, load_yaml, preset_path
    from erde.training import Job, train

    dataset = "cifar10" if args.data_dir else "digits"
    preset = preset_path(dataset)
    overrides = [
        f"data.name={dataset}", f"teacher.arch={args.arch}", f"teacher_train.epochs={args.epochs}",
        "teacher_train.lr=0.05", "teacher_train.warmup_epochs=0.5", "data.batch_size=64", f"device={device}",
    ]  # fmt: skip
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    else:
        overrides.append("data.image_size=32")  # digits upscaled so that convolutions dominate
    cfg = load_config(None, overrides, base=load_yaml(preset) if preset.is_file() else {})
    start = time.perf_counter()
    path = train(cfg, Job("teacher"), Path(args.out) / "model", resume=True, progress=False)
    print(f"model: {path} ({time.perf_counter() - start:.0f} s to train or reuse)")
    return path


def stage_shares(model: torch.nn.Module, x: torch.Tensor, repeats: int = 3) -> list[float]:
    """Share of the full network's time spent in each stage (with its head), on batch ``x``.

    Convolutions with few channels on large maps do fewer MACs per second than
    wide ones on small maps, so early stages cost more time than their MAC
    share: this is what bounds the ratio below 1 even with zero routing overhead.
    """
    from erde.inference import StageWithExit, time_interleaved

    with torch.inference_mode():
        inputs, h = [], x
        for i in range(model.num_exits):
            inputs.append(h)
            h = model.stages[i](h)
        stages = {i: StageWithExit(model, i) for i in range(model.num_exits)}
        seconds = time_interleaved(
            {str(i): (lambda s=s, h=inputs[i]: s(h)) for i, s in stages.items()},
            repeats=repeats, min_time=0.2,
        )  # fmt: skip
    total = sum(seconds.values())
    return [seconds[str(i)] / total for i in range(model.num_exits)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from erde.calibration import calibrate, threshold_near_macs
    from erde.checkpoints import check_compatible, load_checkpoint, model_from_checkpoint
    from erde.config import config_from_dict
    from erde.data import iterate_batches, load_splits, prepare_batch
    from erde.evaluation import collect_exit_logits, simulate
    from erde.inference import bench_checkpoint
    from erde.io import environment_info
    from erde.models import measure_exit_costs

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.devices == "auto" else args.devices.split(",")
    devices = [d for d in devices if d != "cuda" or torch.cuda.is_available()]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    print("environment:", json.dumps(environment_info()))
    print(
        "command: python benchmarks/inference.py", " ".join(sys.argv[1:] if argv is None else argv)
    )

    path = Path(args.checkpoint) if args.checkpoint else default_checkpoint(args, devices[-1])
    ckpt = load_checkpoint(path)
    splits = load_splits(config_from_dict(ckpt["config"]))
    check_compatible(ckpt, splits.num_classes, splits.image_shape, "checkpoint")
    model = model_from_checkpoint(ckpt).eval()
    costs = measure_exit_costs(model, splits.image_shape)
    print(
        f"model: {ckpt['model_config']['arch']}, exits after blocks {model.exit_after}, "
        f"MACs per exit {costs.macs_per_exit}, input {list(splits.image_shape)}"
    )

    def record(split):  # every exit's logits, one pass
        batches = (
            (prepare_batch(x, splits, train=False), y) for x, y in iterate_batches(split, 256)
        )
        return collect_exit_logits(model, batches)

    val, test = record(splits.val), record(splits.test)
    policy = threshold_near_macs(*val, costs.macs_per_exit, args.budget)
    on_val = simulate(*val, costs.macs_per_exit, list(policy.thresholds), policy.rule)
    on_test = simulate(*test, costs.macs_per_exit, list(policy.thresholds), policy.rule)
    full = costs.macs_per_exit[-1]
    print(
        f"threshold nearest {args.budget:.2f} x full MACs on validation: {policy.rule} "
        f"{policy.thresholds[0]:.6g} -> val {on_val.mean_macs / full:.3f} x MACs; test "
        f"accuracy {100 * on_test.accuracy:.2f}% at {on_test.mean_macs / full:.3f} x MACs, exit "
        f"fractions {[round(f, 3) for f in on_test.exit_fractions]}"
    )
    best = calibrate(
        *val,
        costs.macs_per_exit,
        budget=args.budget,
        test_logits=test[0],
        test_labels=test[1],
        warn=False,
    )
    print(
        f"(for reference, the most accurate setting within that budget on validation: test "
        f"accuracy {100 * best.test['accuracy']:.2f}% at {best.test['macs_fraction']:.3f} x MACs; "
        f"last exit {100 * best.test['last_exit_accuracy']:.2f}%)"
    )
    x = prepare_batch(splits.test.images[:256], splits, train=False)
    if args.channels_last:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    shares = stage_shares(model, x)
    stage_macs = [s + h for s, h in zip(costs.stage_macs, costs.head_macs, strict=True)]
    print(
        "share of full time per stage (CPU, batch 256):",
        [round(s, 3) for s in shares],
        "share of MACs:",
        [round(m / sum(stage_macs), 3) for m in stage_macs],
    )
    # With zero routing overhead, an image leaving at exit i costs the time of stages 0..i:
    # the exit fractions and these time shares bound the ratio reachable at batch 256.
    cumulative = torch.tensor(shares).cumsum(0)
    time_bound = 1 / float((torch.tensor(on_test.exit_fractions) * cumulative).sum())
    ideal = full / on_test.mean_macs
    print(
        f"bound from the time shares at batch 256: speedup <= {time_bound:.2f}x, "
        f"ratio <= {time_bound / ideal:.2f} (ideal by MACs {ideal:.2f}x)"
    )

    print()
    records = bench_checkpoint(
        path, policy, batch_sizes=batch_sizes, images=args.images, devices=devices,
        onnx=not args.no_onnx, repeats=args.repeats, min_time=args.min_time,
        compile=args.compile, channels_last=args.channels_last, fold_bn=args.fold_bn, log=print,
    )  # fmt: skip
    if args.json:
        keys = ("backend", "batch_size", "full_ips", "early_exit_ips", "measured_speedup")
        keys += ("ideal_speedup", "ratio", "device")
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps([{k: r[k] for k in keys} for r in records], indent=2) + "\n")
        print(f"\nrecords: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
