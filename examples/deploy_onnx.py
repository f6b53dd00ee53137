"""Deploy a trained student with ONNX Runtime: calibrate, export, classify image files.

    python examples/deploy_onnx.py runs/digits/student_erde images/*.png --budget 0.5

Calibrates the checkpoint for a MAC budget on its validation split (unless it
already has a thresholds file), exports one ONNX graph per stage, then routes
the images through ONNX Runtime and prints one JSON line per image: class,
exit taken and MACs spent, then how many answers the PyTorch router shares.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import erde
from erde.inference import thresholds_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="checkpoint file, or folder holding checkpoint.pt")
    parser.add_argument("images", nargs="+", help="image files to classify")
    parser.add_argument("--out", help="export folder (default: <checkpoint folder>_onnx)")
    parser.add_argument("--budget", type=float, default=0.5, help="MAC budget to calibrate for")
    parser.add_argument("--threads", type=int, help="CPU threads (default: as the CLI)")
    args = parser.parse_args()

    erde.set_threads(args.threads)
    checkpoint = Path(args.checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "checkpoint.pt"
    if not thresholds_path(checkpoint).is_file():
        result, path = erde.calibrate(checkpoint, budget=args.budget)
        print(
            f"calibrated: {result.policy.rule} thresholds {list(result.policy.thresholds)} -> {path}"
        )
    out = Path(args.out or f"{checkpoint.parent}_onnx")
    erde.export_checkpoint(checkpoint, out)

    onnx_predictor = erde.load_predictor(out)  # ONNX Runtime, thresholds shipped in the export
    torch_predictor = erde.load_predictor(checkpoint)
    batch = torch.stack([erde.load_image(f, onnx_predictor.image_shape) for f in args.images])
    answers = onnx_predictor.predict(batch)
    reference = torch_predictor.predict(batch)
    for file, record in zip(args.images, answers.records(onnx_predictor.class_names), strict=True):
        print(json.dumps({"file": file, **record}))
    # equal but for an image whose score sits within float rounding of a threshold
    same = int((answers.classes == reference.classes).sum())
    print(f"ONNX Runtime and PyTorch agree on {same} of {len(batch)} images")


if __name__ == "__main__":
    main()
