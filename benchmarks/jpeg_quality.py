"""How much a JPEG copy's compression costs: the same model trained and tested on re-encodings.

The CIFAR-10 copy erde is measured on is a JPEG re-encoding (quality about 75, chroma at
half resolution: 4:2:0), and the fast-CIFAR papers report on the original pixels. There is
no clean copy here to compare with, so this measures the slope instead: it re-encodes the
copy's train and test images once more at each ``--qualities`` level (Pillow, 4:2:0 like
the copy), trains the same model on each version with the same seeds, and tabulates test
accuracy per exit beside how far each version's pixels moved from the copy (PSNR). If
another pass at quality 50 costs little, the copy's own pass is unlikely to be worth
points; if it costs a point or more, the copy's is a candidate for a gap to published
figures.

    python benchmarks/jpeg_quality.py --data-dir DATA --out RUNS/jpeg \\
        --qualities 50 30 --seeds 2 --set teacher.width=0.5 --set teacher_train.epochs=10

``--data-dir`` is an unpacked image folder (train/<class>/*.jpg, test/<class>/*.jpg) or its
.tar.gz. The models are ``erde train-teacher`` runs of the ``--schedule`` (default: speed)
under ``--out``, reused on a rerun; the re-encoded copies go to ``--out``/data-qNN. Writes
``jpeg_quality.json`` and ``jpeg_quality.md`` into ``--out`` after every run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

try:  # run from a fresh clone without `pip install -e .` as well
    import erde  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from erde.checkpoints import load_checkpoint, model_from_checkpoint  # noqa: E402
from erde.cli import guarded  # noqa: E402
from erde.data.imagefolder import SPLITS, decode_image, find_root, list_images  # noqa: E402
from erde.distributed import resolve_device  # noqa: E402
from erde.io import atomic_write_text, environment_info  # noqa: E402
from erde.report import markdown_table  # noqa: E402
from erde.reproduce import reproduce_config  # noqa: E402
from erde.training import Job, evaluate_accuracy, load_splits, train  # noqa: E402

COPY = "copy"  # the data as given, without another pass
SUBSAMPLING_420 = 2  # Pillow's code for 4:2:0 chroma, as in the CIFAR-10 JPEG copy


def squared_error(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of squared differences of two uint8 arrays of one shape."""
    return float(np.sum((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def psnr(squared: float, values: int) -> float:
    """Peak signal-to-noise ratio in dB of a pooled squared error (inf if nothing moved)."""
    return math.inf if squared == 0 else 10 * math.log10(255**2 * values / squared)


def reencode(src: Path, dst: Path, quality: int) -> dict:
    """Write every image of ``src``/{train,test} to ``dst`` as JPEG at ``quality`` (once).

    Returns the test images' PSNR against the source (pooled over all their pixels, so
    images that survive exactly do not make it infinite) and the bytes written; a
    finished copy (marked by ``dst``/done.json) is reused, a half-written one redone.
    """
    from PIL import Image

    done = dst / "done.json"
    if done.is_file():
        return json.loads(done.read_text())
    squared, values, size = 0.0, 0, 0
    for split in SPLITS:
        files, _ = list_images(src / split)
        for f in files:
            pixels = decode_image(f, None)
            out = dst / split / f.parent.name / f"{f.stem}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(out, quality=quality, subsampling=SUBSAMPLING_420)
            size += out.stat().st_size
            if split == "test":
                squared += squared_error(pixels, decode_image(out, None))
                values += pixels.size
    info = {"quality": quality, "psnr_db": psnr(squared, values), "bytes": size}
    atomic_write_text(done, json.dumps(info) + "\n")
    return info


def run_config(args: argparse.Namespace, data_dir: Path, seed: int):
    """The schedule's teacher settings on one version of the data, at one seed."""
    cfg = reproduce_config(args.dataset, args.schedule, overrides=[*args.overrides, f"seed={seed}"])
    cfg.data.data_dir = str(data_dir)
    cfg.data.name = "imagefolder"
    return cfg


def test_accuracy(checkpoint: Path, cfg, splits) -> list[float]:
    """Accuracy of every exit on the test split (fractions)."""
    device = resolve_device(cfg.device)
    model = model_from_checkpoint(load_checkpoint(checkpoint)).to(device)
    return evaluate_accuracy(model, splits.test, splits, device, cfg.data.eval_batch_size)


def summary_rows(results: dict[str, dict]) -> list[dict]:
    """Per version: mean and sample std over seeds of each exit, and the last exit's loss."""
    rows, base = [], results.get(COPY)
    for version, r in results.items():
        seeds = sorted(r["accuracy"])
        per_exit = list(zip(*(r["accuracy"][s] for s in seeds), strict=True))
        last = [r["accuracy"][s][-1] for s in seeds]
        paired = None
        if base and version != COPY and all(s in base["accuracy"] for s in seeds):
            paired = statistics.fmean(
                a - base["accuracy"][s][-1] for s, a in zip(seeds, last, strict=True)
            )
        rows.append({
            "version": version,
            "psnr_db": r["psnr_db"],
            "seeds": seeds,
            "mean": [statistics.fmean(e) for e in per_exit],
            "std": [statistics.stdev(e) if len(e) > 1 else 0.0 for e in per_exit],
            "last_exit_vs_copy": paired,
        })  # fmt: skip
    return rows


def render(rows: list[dict], what: str) -> str:
    body = [
        [
            r["version"] if r["version"] == COPY else f"copy + quality {r['version']}",
            "—" if r["psnr_db"] is None else f"{r['psnr_db']:.1f}",
            str(len(r["seeds"])),
            " / ".join(f"{100 * m:.2f}" for m in r["mean"]),
            f"± {100 * r['std'][-1]:.2f}",
            "" if r["last_exit_vs_copy"] is None else f"{100 * r['last_exit_vs_copy']:+.2f}",
        ]
        for r in rows
    ]
    header = ["Data", "PSNR to the copy (dB)", "Seeds", "Test accuracy per exit (%)",
              "Last exit, std", "Last exit vs copy (points, paired)"]  # fmt: skip
    return (
        "\n".join([f"Test accuracy by JPEG re-encoding, {what}", "", *markdown_table(header, body)])
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", required=True, help="image folder (train/, test/) or its .tar.gz")
    p.add_argument(
        "--dataset", default="cifar10", help="preset the schedule lays over (default: cifar10)"
    )
    p.add_argument("--schedule", default="speed", help="training schedule (default: speed)")
    p.add_argument("--qualities", type=int, nargs="+", default=[50, 30],
                   help="JPEG qualities of the extra pass, 1-95 (default: 50 30)")  # fmt: skip
    p.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 per version (default: 2)")
    p.add_argument("--out", type=Path, required=True, help="copies and run folders (reused)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run, repeatable")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    bad = [q for q in args.qualities if not 1 <= q <= 95]
    if bad:
        p.error(f"--qualities must lie in 1-95 (Pillow's useful range), got {bad}")
    if args.threads:
        torch.set_num_threads(args.threads)
    source = find_root(args.data_dir)
    versions: dict[str, tuple[Path, float | None]] = {COPY: (source, None)}
    for q in args.qualities:
        print(f"re-encoding {source} at JPEG quality {q} -> {args.out / f'data-q{q}'}", flush=True)
        info = reencode(source, args.out / f"data-q{q}", q)
        versions[str(q)] = (args.out / f"data-q{q}", info["psnr_db"])
    results: dict[str, dict] = {}
    what = ""
    for seed in range(args.seeds):
        for version, (data_dir, db) in versions.items():
            cfg = run_config(args, data_dir, seed)
            splits = load_splits(cfg)
            out = args.out / f"{version}-seed{seed}"
            print(f"{version}, seed {seed} -> {out}", flush=True)
            ckpt = train(cfg, Job("teacher"), out, resume=True, progress=not args.no_progress,
                         splits=splits)  # fmt: skip
            entry = results.setdefault(version, {"psnr_db": db, "accuracy": {}})
            entry["accuracy"][seed] = test_accuracy(ckpt, cfg, splits)
            what = (f"{cfg.teacher.arch} x{cfg.teacher.width} ({args.schedule} schedule, "
                    f"{cfg.teacher_train.epochs} epochs)")  # fmt: skip
            rows = summary_rows(results)
            record = {"what": what, "results": results, "rows": rows,
                      "environment": environment_info()}  # fmt: skip
            atomic_write_text(args.out / "jpeg_quality.json", json.dumps(record, indent=1) + "\n")
            atomic_write_text(args.out / "jpeg_quality.md", render(rows, what))
    print(render(summary_rows(results), what))
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
