"""The commands that ship a trained model: release, export, predict and bench."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

from erde.cli.common import (
    CHECKPOINT_HELP,
    RAW,
    add_command,
    add_threads_arg,
    add_trust_arg,
    parse_numbers,
)
from erde.errors import ErdeError


def cmd_release(args: argparse.Namespace) -> int:
    from erde.checkpoints import load_checkpoint, release_checkpoint

    before = Path(load_checkpoint(args.checkpoint)["path"]).stat().st_size
    out = release_checkpoint(args.checkpoint, args.out, half=args.half)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (was {before / 2**20:.1f} MiB)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from erde.inference.export import export_checkpoint

    if args.int8:
        return _export_int8(args)
    manifest = export_checkpoint(
        args.checkpoint, args.out, thresholds_file=args.thresholds_file, opset=args.opset
    )
    print(f"ONNX export: {manifest.parent} ({manifest.name} + one stage_<i>.onnx per stage)")
    return 0


def _export_int8(args: argparse.Namespace) -> int:
    import warnings

    from erde import quantize_checkpoint

    if args.thresholds_file:
        raise ErdeError(
            "--int8 fits its own thresholds on the quantised model; drop --thresholds-file"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the result carries the warning: printed once below
        result = quantize_checkpoint(
            args.checkpoint,
            args.out,
            max_drop=args.max_drop,
            calibration_images=args.calibration_images,
            accuracy_budget=args.accuracy_budget,
            opset=args.opset,
            warn=False,
        )
    r = result.report
    print(
        f"int8 ONNX export: {result.directory} (manifest.json, stage_<i>.onnx, thresholds.json, "
        f"quantization.json); {r['calibration_images']} validation images calibrated it"
    )
    for i, (a, b) in enumerate(zip(r["exit_accuracy_fp32"], r["exit_accuracy_int8"], strict=True)):
        print(f"exit {i}: test accuracy fp32 {100 * a:.2f} % -> int8 {100 * b:.2f} %")
    test = r["thresholds"]["test"]
    print(
        f"thresholds fitted on the int8 model (max drop {args.max_drop:g} on validation): "
        f"test accuracy {100 * test['accuracy']:.2f} % at {test['macs_fraction']:.3f} of full MACs"
    )
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    return 0


def _policy_kwargs(args: argparse.Namespace) -> dict:
    values = parse_numbers(args.threshold, "--threshold")
    if args.threshold is not None and not values:
        raise ErdeError("--threshold needs at least one number")
    return {"thresholds": values, "rule": args.rule, "thresholds_file": args.thresholds_file}


def _thresholds_read(args: argparse.Namespace) -> list[Path]:
    """The thresholds files predict or bench may read: given, beside the checkpoint, exported."""
    from erde.inference import thresholds_path

    source = Path(getattr(args, "source", None) or args.checkpoint)
    found = [thresholds_path(source), source / "thresholds.json"] if source.is_dir() else []
    found += [thresholds_path(source)] if source.is_file() else []
    return [*found, *([Path(args.thresholds_file)] if args.thresholds_file else [])]


def _check_json_output(args: argparse.Namespace, models: list[str | None]) -> None:
    """bench's --json: checked before any timing, and never one of the files it reads."""
    from erde.outputs import check_output_file

    if args.json:
        check_output_file(args.json, [*models, *_thresholds_read(args), args.onnx])


def cmd_predict(args: argparse.Namespace) -> int:
    from erde.inference import list_image_files, load_predictor, predict_files
    from erde.outputs import atomic_text_output, check_output_file

    if args.batch_size < 1:  # every option is checked before anything is read or written
        raise ErdeError(f"--batch-size must be >= 1, got {args.batch_size}")
    files = list_image_files(args.inputs)
    if not files:
        raise ErdeError(f"no image files found in {', '.join(args.inputs)}")
    if args.output:
        check_output_file(args.output, [args.source, *files, *_thresholds_read(args)])
    predictor = load_predictor(args.source, device=args.device or "cpu", **_policy_kwargs(args))
    failed = 0
    with (
        atomic_text_output(args.output) if args.output else contextlib.nullcontext(sys.stdout)
    ) as out:
        for record in predict_files(
            predictor, files, resize=not args.no_resize, batch_size=args.batch_size
        ):
            failed += "error" in record
            out.write(json.dumps(record, allow_nan=False) + "\n")
            out.flush()
    if failed:
        print(f"erde: {failed} of {len(files)} images could not be used", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from erde.inference import bench_checkpoint, load_predictor

    _check_json_output(args, [args.checkpoint, args.teacher])
    if args.deploy or args.teacher:
        return _bench_deploy(args)
    policy = load_predictor(args.checkpoint, **_policy_kwargs(args)).policy
    devices = (args.device or "cpu").split(",")
    batch_sizes = [int(b) for b in parse_numbers(args.batch_sizes, "--batch-sizes") or []]
    onnx = False if args.no_onnx else (args.onnx or True)
    records = bench_checkpoint(
        args.checkpoint,
        policy,
        batch_sizes=batch_sizes,
        images=args.images,
        devices=devices,
        onnx=onnx,
        repeats=args.repeats,
        min_time=args.min_time,
        compile=args.compile,
        channels_last=args.channels_last,
        fold_bn=args.fold_bn,
        log=print,
    )
    if args.json:
        from erde.io import atomic_write_json

        atomic_write_json(args.json, records)
        print(f"records: {json.dumps(str(args.json))}")
    return 0


def _bench_deploy(args: argparse.Namespace) -> int:
    from erde.inference.deployment import deployment_table
    from erde.report.deployment import render_table

    if not (args.deploy and args.teacher):
        raise ErdeError(
            "--deploy compares a student with its teacher: give both --deploy and --teacher"
        )
    if args.threshold is not None or args.thresholds_file:
        raise ErdeError(
            "--deploy fits the student's thresholds on validation (--max-drop); "
            "drop --threshold/--thresholds-file"
        )
    batch_sizes = [int(b) for b in parse_numbers(args.batch_sizes, "--batch-sizes") or []]
    result = deployment_table(
        args.teacher,
        args.checkpoint,
        max_drop=args.max_drop,
        batch_sizes=batch_sizes,
        images=args.images,
        repeats=args.repeats,
        min_time=args.min_time,
        onnx=not args.no_onnx,
        int8=not args.no_onnx,
        log=print,
    )
    print()
    print("\n".join(render_table(result)))
    for row in result["rows"]:
        if row.get("int8_warning"):
            print(f"warning: {row['int8_warning']}", file=sys.stderr)
    if args.json:
        from erde.io import atomic_write_json

        atomic_write_json(args.json, result)
        print(f"records: {args.json}")
    return 0


# --------------------------------------------------------------------------- parsers


def _add_policy_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "exit policy (default: the thresholds file written by `erde calibrate`)"
    )
    g.add_argument(
        "--threshold", help="threshold(s): one value, or one per early exit, comma-separated"
    )
    g.add_argument(
        "--rule", help="rule for --threshold: entropy (default), max_softmax or a registered one"
    )
    g.add_argument("--thresholds-file", help="a thresholds JSON written by `erde calibrate`")


def add_release(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "release",
        cmd_release,
        help="a finished checkpoint without its resume state, to share a trained model",
        formatter_class=RAW,
        description="Write a copy of a finished checkpoint without what only resuming needs "
        "(optimizer momentum, scheduler and RNG states): about half the size. It loads wherever "
        "a checkpoint does (--teacher of train-student, evaluate, export, predict), and a run "
        "folder holding it counts as finished, so erde run / reproduce reuse it instead of "
        "training that model again. A checkpoint whose training has not finished is refused "
        "(the copy could not resume). --half stores the weights as float16, half the size "
        "again; they load back as float32.",
    )
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="file to write (e.g. DIR/checkpoint.pt)")
    p.add_argument(
        "--half",
        action="store_true",
        help="store float weights as float16 (a teacher to commit next to its results)",
    )


def add_export(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "export",
        cmd_export,
        help="export to ONNX, one graph per stage, for the early-exit runtime",
        description="Write stage_<i>.onnx (stage input -> stage features + exit logits, dynamic "
        "batch) for every stage and a manifest.json; the checkpoint's thresholds file is checked "
        "and copied in. Each graph is compared with PyTorch on ONNX Runtime before the manifest "
        "is written.",
    )
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument(
        "--thresholds-file", help="thresholds to ship (default: the one beside the checkpoint)"
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    q = p.add_argument_group("int8 (post-training static quantisation with ONNX Runtime)")
    q.add_argument(
        "--int8",
        action="store_true",
        help="quantise every stage to int8, calibrated on validation images, and fit the "
        "thresholds again on the quantised model (its scores differ from fp32)",
    )
    q.add_argument(
        "--calibration-images",
        type=int,
        default=512,
        help="validation images that calibrate the activation ranges (default: 512)",
    )
    q.add_argument(
        "--max-drop",
        type=float,
        default=0.005,
        help="threshold target: accuracy drop on validation vs the int8 last exit (default 0.005)",
    )
    q.add_argument(
        "--accuracy-budget",
        type=float,
        default=0.005,
        help="warn when any exit loses more test accuracy than this to int8 (default 0.005)",
    )
    add_threads_arg(p)
    add_trust_arg(p)


def add_predict(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "predict",
        cmd_predict,
        help="classify image files with early exit; one JSON line per image",
        description="Route image files (or every image in the folders given) through a "
        "checkpoint (PyTorch) or an export folder (ONNX Runtime). Each line: file, class, "
        "class_name, probability, exit, score (the rule's) and macs (spent on that image). Images "
        "are converted to the model's channels and, unless --no-resize, resized bilinearly to "
        "its input size. A bad file gives {file, error} and the others go on; the exit status is "
        "then 1.",
    )
    p.add_argument("source", help="checkpoint file/folder, or an `erde export` folder")
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    _add_policy_args(p)
    p.add_argument(
        "--no-resize", action="store_true", help="refuse images whose size differs from the model's"
    )
    p.add_argument(
        "--batch-size", type=int, default=64, help="images routed together (default: 64)"
    )
    p.add_argument("--device", help="cpu (default) or cuda[:N], for checkpoints")
    p.add_argument("--output", help="write the JSON lines here instead of stdout")
    add_threads_arg(p)
    add_trust_arg(p)


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "bench",
        cmd_bench,
        help="measure full-network vs early-exit throughput on the checkpoint's test images",
        description="For each batch size: full-network and early-exit images/s (PyTorch "
        "per-sample routing, batch-level routing, ONNX Runtime), the measured speedup, the ideal "
        "speedup (full MACs / mean MACs spent) and their ratio. See benchmarks/inference.py for "
        "the full benchmark. It takes minutes: at the defaults it times 15 candidates (5 ways to "
        "serve x 3 batch sizes) of 512 images, each at least 5 times and 1 s; the digits student "
        "took 8 minutes on a 2-core CPU. It prints its own estimate first; fewer --batch-sizes, "
        "--images or --repeats make it shorter. Where early exit is slower than the full network "
        "at a batch size, it says so and which to serve.",
    )
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    _add_policy_args(p)
    d = p.add_argument_group("deployment table (--deploy): the student against its teacher")
    d.add_argument(
        "--deploy",
        action="store_true",
        help="rows teacher full fp32, student full fp32, student early exit fp32 (PyTorch, ONNX "
        "Runtime) and int8 (ONNX Runtime); accuracy, mean MACs, img/s, speedup over the teacher",
    )
    d.add_argument("--teacher", help="the teacher checkpoint the student is compared with")
    d.add_argument(
        "--max-drop",
        type=float,
        default=0.005,
        help="the student's thresholds: at most this accuracy drop on validation (default 0.005)",
    )
    p.add_argument("--batch-sizes", default="1,32,256", help="comma-separated (default: 1,32,256)")
    p.add_argument("--images", type=int, default=512, help="images per timed pass (default: 512)")
    p.add_argument(
        "--repeats", type=int, default=5, help="timed passes per candidate, at least (default: 5)"
    )
    p.add_argument(
        "--min-time", type=float, default=1.0, help="seconds per candidate, at least (default: 1)"
    )
    p.add_argument("--device", help="cpu (default), cuda, or both: cpu,cuda")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run full network and early exit alike in NHWC (default: on; faster on CPU)",
    )
    p.add_argument(
        "--fold-bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run full network and early exit alike with BatchNorm folded into the convolutions "
        "(default: on; the inference graph erde predict routes through)",
    )
    p.add_argument(
        "--onnx",
        help="existing export folder of this model (default: export to a temporary folder)",
    )
    p.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    p.add_argument("--compile", action="store_true", help="torch.compile each stage")
    add_threads_arg(p)
    p.add_argument("--json", help="write the records to this JSON file")
    add_trust_arg(p)
