"""Train an early-exit teacher and an ERDE student on images you hold as arrays.

    python examples/train_on_tensors.py --data my_data.npz --out runs/tensors

``my_data.npz`` holds ``x_train`` and ``x_test`` (uint8, (N, 3, H, W) or
(N, H, W, 3)) and ``y_train`` and ``y_test`` (integer class indices). Without
``--data`` scikit-learn's 8x8 digits stand in. ``--quick`` trains tiny
models for 2 epochs (a smoke test, as CI runs it).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

import erde


def load_arrays(path: str | None) -> tuple[np.ndarray, ...]:
    """(x_train, y_train, x_test, y_test) with images as uint8 (N, 3, H, W)."""
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = np.repeat((digits.images * 16).clip(0, 255).astype(np.uint8)[:, None], 3, axis=1)
        return x[:1500], digits.target[:1500], x[1500:], digits.target[1500:]
    with np.load(path, allow_pickle=False) as data:  # never unpickle a data file
        arrays = [data[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    for i in (0, 2):  # channels last (N, H, W, 3) -> (N, 3, H, W)
        if arrays[i].ndim == 4 and arrays[i].shape[-1] == 3 and arrays[i].shape[1] != 3:
            arrays[i] = arrays[i].transpose(0, 3, 1, 2)
    return tuple(arrays)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help=".npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--out", default="runs/tensors", help="output folder")
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 epochs")
    parser.add_argument("--threads", type=int, help="CPU threads (default: as the CLI)")
    args = parser.parse_args()

    erde.set_threads(args.threads)
    x_train, y_train, x_test, y_test = load_arrays(args.data)
    splits = erde.splits_from_tensors(
        torch.from_numpy(np.ascontiguousarray(x_train)),
        torch.from_numpy(y_train.astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(x_test)),
        torch.from_numpy(y_test.astype(np.int64)),
        val_fraction=0.2,
    )
    quick = ["teacher.arch=resnet8", "teacher.width=0.5", "student.width=0.25"]
    quick += ["teacher_train.epochs=2", "student_train.epochs=2"]
    cfg = erde.make_config("digits", quick if args.quick else [])

    teacher = erde.train_teacher(cfg, f"{args.out}/teacher", splits=splits, force=True)
    student = erde.train_student(
        cfg, f"{args.out}/student_erde", method="erde", teacher=teacher, splits=splits, force=True
    )
    paths = erde.evaluate([teacher, student], f"{args.out}/report", splits=splits)
    report = json.loads(paths["json"].read_text())
    for name, model in report["models"].items():
        accuracies = " / ".join(f"{100 * a:.1f}" for a in model["exit_accuracy"])
        print(f"{name}: exit accuracies {accuracies} %, full MACs {model['macs_per_exit'][-1]:,}")
    print(f"report: {paths['markdown']}")


if __name__ == "__main__":
    main()
