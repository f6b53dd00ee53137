"""The whole ERDE pipeline on your own image folder: teacher, CE/KD/ERDE students, report.

    python examples/train_on_image_folder.py my_images/ --out runs/my_images

``my_images/`` holds ``train/<class>/*`` and ``test/<class>/*`` (PNG or JPEG),
or is a ``.tar.gz`` of them. This is ``erde run --dataset imagefolder
--data-dir my_images/`` from Python, with a budget calibration of the ERDE
student added at the end. ``--quick`` trains tiny models briefly (a smoke
test, as CI runs it).
"""

from __future__ import annotations

import argparse

import erde


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "data_dir", help="folder (or .tar.gz) with train/<class>/ and test/<class>/"
    )
    parser.add_argument("--out", default="runs/imagefolder", help="output folder")
    parser.add_argument("--image-size", type=int, default=32, help="resize images to this side")
    parser.add_argument("--budget", type=float, default=0.5, help="MAC budget to calibrate for")
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 epochs")
    parser.add_argument("--threads", type=int, help="CPU threads (default: as the CLI)")
    args = parser.parse_args()

    erde.set_threads(args.threads)
    overrides = [f"data.image_size={args.image_size}"]
    if args.quick:
        overrides += ["teacher.arch=resnet8", "teacher.width=0.5", "student.width=0.25"]
        overrides += ["teacher_train.epochs=2", "student_train.epochs=2"]
    cfg = erde.make_config("imagefolder", overrides, data_dir=args.data_dir)

    paths = erde.run(cfg, args.out, force=True)
    print(f"report: {paths['markdown']}")
    result, thresholds = erde.calibrate(f"{args.out}/student_erde", budget=args.budget)
    if result.warning:
        print(f"warning: {result.warning}")
    r = result.test
    print(
        f"ERDE student at {args.budget:g} x MACs budget (fitted on validation): test accuracy "
        f"{100 * r['accuracy']:.1f} % at {r['macs_fraction']:.2f} x full MACs -> {thresholds}"
    )


if __name__ == "__main__":
    main()
