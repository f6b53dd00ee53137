"""How often do calibrated thresholds overshoot their accuracy-drop target on new data?

Guaranteed (Learn-then-Test, `erde calibrate --max-drop EPS --confidence 1-DELTA`)
against plain (`erde calibrate --max-drop EPS`) calibration, by simulation: the
validation and test images of each checkpoint are pooled (their every exit's
logits recorded once); many times over, a random part of the pool calibrates and
the rest measures the accuracy drop against the last exit. Prints, per model,
the share of draws whose test drop exceeds EPS (the guarantee says: at most
DELTA, up to binomial noise) and the mean test MACs as a fraction of the full
network's, for both methods, as a Markdown table; and the same on a synthetic
pool with known structure.

    python benchmarks/guarantee.py runs/digits/teacher runs/digits/student_erde --max-drop 0.02

Every run prints the machine, versions and settings it ran with.
"""

from __future__ import annotations

import argparse
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
    p.add_argument("checkpoints", nargs="*", help="checkpoint files or folders")
    p.add_argument("--max-drop", type=float, default=0.02, help="ε (default: 0.02)")
    p.add_argument("--confidence", type=float, default=0.9, help="1 - δ (default: 0.9)")
    p.add_argument("--risk", choices=("drop", "consistency"), default="drop",
                   help="drop: accuracy lost; consistency: answers changed (default: drop)")  # fmt: skip
    p.add_argument("--draws", type=int, default=500, help="random splits (default: 500)")
    p.add_argument(
        "--calibration-fraction", type=float, default=0.5,
        help="share of the pool that calibrates in each draw (default: 0.5)",
    )  # fmt: skip
    p.add_argument("--per-exit", action="store_true", help="per-exit thresholds")
    p.add_argument(
        "--synthetic-images", type=int, default=4000,
        help="size of the synthetic pool, 0 to skip it (default: 4000)",
    )  # fmt: skip
    p.add_argument("--json", help="also write the rows to this JSON file")
    return p.parse_args(argv)


def checkpoint_pool(path: str) -> tuple[str, torch.Tensor, torch.Tensor, list[float]]:
    """Name, pooled validation + test logits (E, N, K), labels (N,) and MACs per exit."""
    from erde.calibration import open_checkpoint, record_logits

    ckpt, cfg, splits, model, costs, device = open_checkpoint(path, None, "cpu")
    bs = cfg.data.eval_batch_size
    val = record_logits(model, splits, "val", device, bs, False)
    test = record_logits(model, splits, "test", device, bs, False)
    logits, labels = torch.cat([val[0], test[0]], dim=1), torch.cat([val[1], test[1]])
    return f"{splits.name} {ckpt['name']}", logits, labels, list(costs.macs_per_exit)


def synthetic_pool(n: int, seed: int = 0) -> tuple[str, torch.Tensor, torch.Tensor, list]:
    """Three exits that get sharper and more often right with depth; easy images are right
    (and sure) early, so an early mistake is always one the last exit gets right."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)
    difficulty = torch.rand(n, generator=g)
    logits = []
    for depth, skill in enumerate((0.45, 0.7, 0.9)):
        noise = torch.randn(n, 10, generator=g)
        target = torch.where(difficulty < skill, labels, (labels + 1 + depth) % 10)
        strength = 1.0 + 4.0 * (1 - difficulty) * (1 + depth)
        logits.append(noise + strength.unsqueeze(1) * torch.nn.functional.one_hot(target, 10))
    return "synthetic (3 exits)", torch.stack(logits), labels, [100.0, 250.0, 400.0]


def main(argv: list[str] | None = None) -> int:
    from erde import io
    from erde.calibration.simulation import simulate_guarantee

    args = parse_args(argv)
    env = io.environment_info()
    print(f"# {env['platform']}, {env['cpu_count']} CPUs, torch {env['torch']}, "
          f"python {env['python']}, {torch.get_num_threads()} torch threads")  # fmt: skip
    print(f"# ε = {args.max_drop}, 1 - δ = {args.confidence}, risk {args.risk}, "
          f"{args.draws} draws, per-exit {args.per_exit}")  # fmt: skip
    pools = [checkpoint_pool(c) for c in args.checkpoints]
    if args.synthetic_images:
        pools.append(synthetic_pool(args.synthetic_images))
    rows = []
    print("\n| pool | images (cal / test) | violations: guaranteed | plain | "
          "MACs saved: guaranteed | plain | seconds |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, logits, labels, macs in pools:
        started = time.perf_counter()
        r = simulate_guarantee(
            logits, labels, macs, max_risk=args.max_drop, confidence=args.confidence,
            calibration_images=round(args.calibration_fraction * labels.numel()),
            draws=args.draws, risk=args.risk, per_exit=args.per_exit,
        )  # fmt: skip
        r["pool"], r["seconds"] = name, time.perf_counter() - started
        rows.append(r)
        print(
            f"| {name} | {r['calibration_images']} / {r['test_images']} "
            f"| {100 * r['guaranteed_violation_rate']:.1f}% (± {100 * r['noise']:.1f}) "
            f"| {100 * r['plain_violation_rate']:.1f}% "
            f"| {100 * (1 - r['guaranteed_macs_fraction']):.1f}% "
            f"| {100 * (1 - r['plain_macs_fraction']):.1f}% | {r['seconds']:.0f} |",
            flush=True,
        )
    if args.json:
        io.atomic_write_json(args.json, {"environment": env, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
