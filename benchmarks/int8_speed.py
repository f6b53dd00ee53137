"""Is int8 faster than fp32 on this CPU, and for which network sizes? ONNX Runtime, whole network.

For each ``--arch``: builds the early-exit network (untrained, seed 0: speed does
not need trained weights), exports its stages in fp32 (``erde export``'s
exporter), quantises them exactly as ``erde export --int8`` does
(:func:`erde.inference.quantize.quantize_stages`, calibrated on ``--calibration`` random
images), and times both folders end to end (every stage and exit, no early
exit) with :class:`erde.inference.export.OnnxEarlyExitRuntime`, in turns so that both see
the same machine load. Prints img/s of each and the int8 / fp32 speed ratio (median
and interquartile range of the per-turn ratios), per batch size.

Accuracy is not measured here (the weights are untrained): the deployment
table (``benchmarks/deploy.py``) measures int8 accuracy on a trained student.

    python benchmarks/int8_speed.py --arch resnet56 resnet20 resnet8:0.5 --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

try:  # run from a fresh clone without `pip install -e .` as well
    import erde  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from erde.cli import guarded  # noqa: E402
from erde.inference import ExitPolicy, ModelIdentity  # noqa: E402
from erde.inference.bench import speedup_spread, time_turns  # noqa: E402
from erde.inference.export import (  # noqa: E402
    OnnxEarlyExitRuntime,
    export_onnx,
    read_manifest,
    require_onnx_extra,
)
from erde.inference.quantize import quantize_stages  # noqa: E402
from erde.io import atomic_write_json, environment_info  # noqa: E402
from erde.models import build_model  # noqa: E402
from erde.threads import set_threads  # noqa: E402


def parse_arch(spec: str) -> tuple[str, float]:
    """``resnet20`` or ``resnet8:0.5`` (width multiplier after the colon)."""
    name, _, width = spec.partition(":")
    return name, float(width) if width else 1.0


def export_pair(spec: str, image_size: int, calibration: int, root: Path) -> tuple[Path, Path]:
    """fp32 and int8 export folders of an untrained ``spec`` network under ``root``."""
    arch, width = parse_arch(spec)
    torch.manual_seed(0)
    shape = (3, image_size, image_size)
    model = build_model(arch, 10, width=width, input_shape=shape).eval()
    identity = ModelIdentity(spec, "untrained", 10, model.num_exits)
    fp32, int8 = root / "fp32", root / "int8"
    export_onnx(model, fp32, shape, identity=identity, mean=[0.0] * 3, std=[1.0] * 3)
    int8.mkdir()
    stages = quantize_stages(fp32, int8, torch.randn(calibration, *shape))
    atomic_write_json(
        int8 / "manifest.json", {**read_manifest(fp32), "stages": stages, "precision": "int8"}
    )
    return fp32, int8


def measure(spec: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="erde-int8-") as tmp:
        fp32, int8 = export_pair(spec, args.image_size, args.calibration, Path(tmp))
        num_exits = read_manifest(fp32)["model"]["num_exits"]
        policy = ExitPolicy.create(0.0, "entropy", 10, num_exits)
        runtimes = {
            name: OnnxEarlyExitRuntime(folder, policy, threads=args.threads)
            for name, folder in (("fp32", fp32), ("int8", int8))
        }
        rows = []
        for batch in args.batch_sizes:
            x = torch.randn(batch, 3, args.image_size, args.image_size).numpy()
            passes = {name: (lambda r=r, x=x: r.run_all(x)) for name, r in runtimes.items()}
            times = time_turns(passes, repeats=args.repeats, min_time=args.min_time)
            med = {name: statistics.median(t) for name, t in times.items()}
            q1, q3 = speedup_spread(times["fp32"], times["int8"])
            rows.append({
                "batch_size": batch,
                "fp32_img_s": batch / med["fp32"],
                "int8_img_s": batch / med["int8"],
                "int8_over_fp32": statistics.median(
                    f / i for f, i in zip(times["fp32"], times["int8"], strict=True)
                ),
                "ratio_q1": q1,
                "ratio_q3": q3,
            })  # fmt: skip
            r = rows[-1]
            print(
                f"{spec:14s} batch {batch:4d}: fp32 {r['fp32_img_s']:8.0f} img/s, int8 "
                f"{r['int8_img_s']:8.0f} img/s, int8/fp32 {r['int8_over_fp32']:.2f}x "
                f"(IQR {q1:.2f}-{q3:.2f}) -> int8 {'faster' if q1 > 1 else 'not faster'}",
                flush=True,
            )
    return {"arch": spec, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--arch",
        nargs="+",
        default=["resnet56", "resnet20", "resnet8:0.5"],
        help="registry names, optionally :width (default: %(default)s)",
    )
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: 32)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 256], help="default: 1 256")
    p.add_argument("--calibration", type=int, default=64, help="random calibration images")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: erde's)")
    p.add_argument("--repeats", type=int, default=5, help="timed turns, at least")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per candidate, at least")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)  # fmt: skip
    require_onnx_extra("the int8 benchmark")
    args.threads = set_threads(args.threads)
    print(f"environment: {json.dumps(environment_info())}", flush=True)
    results = [measure(spec, args) for spec in args.arch]
    if args.json:
        atomic_write_json(args.json, {"environment": environment_info(), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
