"""The deployment table: the deployed ERDE student against the teacher a user had.

    python benchmarks/deploy.py --teacher RUN/teacher --student RUN/student_erde
    python benchmarks/deploy.py                      # trains (or reuses) the digits pipeline first

Rows: teacher full network fp32, student full network fp32, student early exit
fp32 (PyTorch, ONNX Runtime) and int8 (ONNX Runtime), at the student's
thresholds calibrated on validation for at most --max-drop accuracy loss.
Columns: test accuracy, mean MACs, img/s at batch 1 and 256, measured speedup
over the teacher and the MAC-ideal speedup. Also prints the two targets of the
deployment: measured speedup / MAC-ideal speedup of the early-exit student
(target >= 0.9), and whether int8 early exit beats fp32 early exit at each
batch size with at most 0.5 points lost. Same as `erde bench --deploy`.
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
from erde.inference.deployment import deployment_table
from erde.io import environment_info  # noqa: E402
from erde.report.deployment import render_table  # noqa: E402


def bound(full: dict, early: dict, bs: int) -> str:
    """Split the early-exit student's ratio into its two factors, both measured.

    measured / MAC-ideal = (smaller network: student full network's speedup over
    the teacher / its MAC ratio) x (early exit: speedup over the student's own
    full network / the MACs it skips). The smaller factor is what bounds the
    ratio: e.g. a small network that runs fewer MACs per second than the teacher.
    """
    net = full[f"speedup_{bs}"] / full["mac_ideal_speedup"]
    exit_speedup = early[f"speedup_{bs}"] / full[f"speedup_{bs}"]
    exit_ideal = early["mac_ideal_speedup"] / full["mac_ideal_speedup"]
    return (
        f"bound: the smaller network turns {net:.2f} of its MAC ratio into time "
        f"({full[f'speedup_{bs}']:.2f}x for {full['mac_ideal_speedup']:.2f}x fewer MACs), "
        f"early exit {exit_speedup / exit_ideal:.2f} of its own "
        f"({exit_speedup:.2f}x for {exit_ideal:.2f}x fewer MACs)"
    )


def targets(result: dict) -> list[str]:
    """The deployment targets, each with the measured figure that meets or misses it."""
    rows = {r["row"]: r for r in result["rows"]}
    lines = []
    sizes = result["setup"]["batch_sizes"]
    for name in ("student, early exit, fp32 (PyTorch)", "student, early exit, fp32 (ONNX Runtime)"):
        if name in rows:
            r = rows[name]
            for bs in sizes:
                ratio = r[f"speedup_{bs}"] / r["mac_ideal_speedup"]
                lines.append(f"{name} @{bs}: measured / MAC-ideal = {ratio:.2f} "
                             f"({'meets' if ratio >= 0.9 else 'misses'} >= 0.9)")  # fmt: skip
                full = rows.get("student, full network, fp32 (PyTorch)")
                if ratio < 0.9 and full and name.endswith("(PyTorch)"):
                    lines.append("  " + bound(full, r, bs))
    q, f = (
        rows.get("student, early exit, int8 (ONNX Runtime)"),
        rows.get("student, early exit, fp32 (ONNX Runtime)"),
    )
    if q and f:
        lost = f["accuracy"] - q["accuracy"]
        for bs in sizes:
            faster = q[f"ips_{bs}"] / f[f"ips_{bs}"]
            ok = faster > 1 and lost <= 0.005
            lines.append(f"int8 vs fp32 early exit @{bs}: {faster:.2f}x the speed, "
                         f"{100 * lost:+.2f} points lost ({'meets' if ok else 'misses'} target)")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teacher", help="teacher run folder or checkpoint (default: train digits)")
    p.add_argument("--student", help="ERDE student run folder or checkpoint")
    p.add_argument("--out", default="runs/bench-deploy", help="where the default pipeline trains")
    p.add_argument("--max-drop", type=float, default=0.005,
                   help="accuracy the thresholds may lose on validation (default: 0.005)")  # fmt: skip
    timing = (
        ("--batch-sizes", str, "1,256", "comma-separated batch sizes"),
        ("--images", int, 256, "images per timed pass"),
        ("--repeats", int, 3, "timed passes per row, at least"),
        ("--min-time", float, 0.5, "seconds per row, at least"),
    )
    for flag, kind, default, text in timing:
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.teacher and args.student):
        from erde.config import load_config, load_yaml, preset_path
        from erde.pipeline import run_pipeline

        cfg = load_config(None, [], base=load_yaml(preset_path("digits")))
        run_pipeline(cfg, args.out, methods=("erde",), resume=True, progress=False)
        args.teacher, args.student = f"{args.out}/teacher", f"{args.out}/student_erde"
    print("environment:", json.dumps(environment_info()))
    result = deployment_table(
        args.teacher, args.student, max_drop=args.max_drop,
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")], images=args.images,
        repeats=args.repeats, min_time=args.min_time, log=print,
    )  # fmt: skip
    print("\n".join(["", *render_table(result), "", *targets(result)]))
    if args.json:
        Path(args.json).write_text(
            json.dumps({**result, "environment": environment_info()}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
