"""Command line: parses arguments, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from erde.config import ExperimentConfig, load_config, load_yaml, preset_path
from erde.errors import ErdeError

EPILOG_CONFIG = """\
configuration: defaults < preset for --dataset (erde/configs/<name>.yaml) < --config FILE
< --set section.key=value (repeatable), e.g. --set teacher.arch=resnet56 --set student_train.epochs=5.
Sections: data, teacher, student, teacher_train, student_train, distill, evaluation, seed, device.
The config actually used is saved as config.yaml next to every checkpoint and report."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and configuration")
    g.add_argument(
        "--dataset", help="digits (default, embedded), cifar10, cifar100, svhn or imagefolder"
    )
    g.add_argument("--data-dir", help="folder holding the data set's official files")
    g.add_argument("--config", help="YAML file with any subset of the config sections")
    g.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. distill.gamma=0.5 (repeatable)",
    )  # fmt: skip
    g.add_argument("--seed", type=int, help="random seed (split, init, augmentation)")
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out (or reuse it if finished)",
    )
    p.add_argument(
        "--force", action="store_true", help="start over even if --out already holds a checkpoint"
    )


def build_config(args: argparse.Namespace, fallback: dict | None = None) -> ExperimentConfig:
    """Preset for the data set, then --config, then explicit flags and --set overrides.

    ``fallback`` (e.g. a checkpoint's own config) replaces the preset when
    neither --dataset nor --config names a data set.
    """
    dataset = args.dataset
    if dataset is None and args.config:
        dataset = (load_yaml(args.config).get("data") or {}).get("name")
    overrides = []
    if dataset is None and fallback is not None:
        base = fallback
    else:
        dataset = dataset or "digits"
        preset = preset_path(dataset)
        base = load_yaml(preset) if preset.is_file() else {}
        overrides.append(f"data.name={dataset}")
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device:
        overrides.append(f"device={args.device}")
    return load_config(args.config, [*overrides, *args.overrides], base=base)


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from erde.training import Job, train

    cfg = build_config(args)
    path = train(
        cfg,
        Job("teacher"),
        args.out,
        resume=args.resume,
        force=args.force,
        progress=not args.no_progress,
    )
    print(f"teacher checkpoint: {path}")
    return 0


def cmd_train_student(args: argparse.Namespace) -> int:
    from erde.training import Job, train

    cfg = build_config(args)
    method = args.method or cfg.distill.method
    path = train(
        cfg, Job("student", method), args.out, teacher_checkpoint=args.teacher,
        resume=args.resume, force=args.force, progress=not args.no_progress,
    )  # fmt: skip
    print(f"student ({method}) checkpoint: {path}")
    return 0


def _parse_thresholds(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ErdeError(f"--thresholds must be comma-separated numbers, got {text!r}") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from erde.checkpoints import load_checkpoint
    from erde.pipeline import evaluate_checkpoints

    # without --dataset/--config: the first checkpoint's own config, flags and --set on top
    cfg = build_config(args, fallback=load_checkpoint(args.checkpoints[0])["config"])
    paths = evaluate_checkpoints(
        args.checkpoints, args.out, cfg=cfg, thresholds=_parse_thresholds(args.thresholds),
        progress=not args.no_progress,
    )  # fmt: skip
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from erde.pipeline import run_pipeline

    cfg = build_config(args)
    paths = run_pipeline(
        cfg, args.out or f"runs/{cfg.data.name}", methods=[m.strip() for m in args.methods.split(",") if m.strip()], resume=args.resume, force=args.force,
        progress=not args.no_progress,
    )  # fmt: skip
    _print_summary(paths["json"])
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _print_summary(report_json: Path) -> None:
    import json

    report = json.loads(Path(report_json).read_text())
    print(
        "\nmodel           exit accuracy (%)               MACs at last exit   MAC reduction at equal acc."
    )
    for name, m in report["models"].items():
        accs = " ".join(f"{100 * a:5.1f}" for a in m["exit_accuracy"])
        red = m.get("mac_reduction")
        red_text = (
            f"{red['reduction']:.2f}x (acc {100 * red['accuracy']:.1f}%)"
            if red
            else "none within tolerance"
        )
        print(f"{name:15s} {accs:31s} {m['macs_per_exit'][-1]:>17,d}   {red_text}")


def cmd_reproduce(args: argparse.Namespace) -> int:
    import json

    from erde.reproduce import reproduce, summary_lines

    if not args.dataset:
        raise ErdeError("reproduce needs --dataset (cifar10, cifar100 or svhn)")
    flags = [f"seed={args.seed}"] if args.seed is not None else []
    flags += [f"device={args.device}"] if args.device else []
    paths = reproduce(
        args.dataset, args.out or f"runs/reproduce/{args.dataset}-{args.schedule}",
        data_dir=args.data_dir, seeds=args.seeds, schedule=args.schedule, config=args.config,
        overrides=[*flags, *args.overrides], download=args.download, docs_dir=args.docs,
        progress=not args.no_progress, log=print,
    )  # fmt: skip
    print()
    for line in summary_lines(json.loads(paths["results"].read_text())):
        print(line)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="erde",
        description="Early-exit classifiers and entropy-regularized distillation (ERDE). "
        "Train an early-exit teacher, distill ce/kd/erde early-exit students from it, and measure "
        "the accuracy-vs-MACs trade-off of the entropy exit rule.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `erde COMMAND --help` for each command. `erde run` with no argument runs the "
        "whole pipeline on the embedded digits data set.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser(
        "train-teacher", help="train an early-exit teacher on all exits", epilog=EPILOG_CONFIG, formatter_class=fmt,
        description="Train the teacher (section `teacher`, schedule `teacher_train`) with cross-entropy on "
        "every exit, L_T = sum_i w_i CE(z_i, y). Writes checkpoint.pt, config.yaml and metrics.jsonl to --out.",
    )  # fmt: skip
    _add_config_args(p)
    _add_train_args(p)
    p.add_argument("--out", default="runs/teacher", help="output folder (default: runs/teacher)")
    p.set_defaults(func=cmd_train_teacher)

    p = sub.add_parser(
        "train-student", help="train an early-exit student (ce, kd or erde)", epilog=EPILOG_CONFIG,
        formatter_class=fmt,
        description="Train the student (section `student`, schedule `student_train`) exit by exit. "
        "ce: labels only; kd: classic exit-wise distillation; erde: KL on images the teacher's exit gets "
        "right and an entropy loss on those it gets wrong (weights distill.alpha/beta/gamma, "
        "distill.temperature).",
    )  # fmt: skip
    _add_config_args(p)
    _add_train_args(p)
    p.add_argument(
        "--method",
        choices=("ce", "kd", "erde"),
        help="training method (default: distill.method, erde)",
    )
    p.add_argument("--teacher", help="teacher checkpoint (required for kd and erde)")
    p.add_argument("--out", default="runs/student", help="output folder (default: runs/student)")
    p.set_defaults(func=cmd_train_student)

    p = sub.add_parser(
        "evaluate", help="sweep exit thresholds on the test set and write a report", epilog=EPILOG_CONFIG,
        formatter_class=fmt,
        description="Record every exit's test logits once per checkpoint, sweep thresholds of the entropy "
        "and max-softmax rules, and write report.json, report.md and tradeoff.png to --out. Without "
        "--dataset/--config the data set of the first checkpoint is used.",
    )  # fmt: skip
    p.add_argument(
        "checkpoints", nargs="+", help="checkpoint files (or folders holding checkpoint.pt)"
    )
    _add_config_args(p)
    p.add_argument("--thresholds", help="comma-separated thresholds instead of the default grid")
    p.add_argument("--out", default="runs/report", help="output folder (default: runs/report)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "run", help="the whole pipeline: teacher, ce/kd/erde students, evaluation, report",
        epilog=EPILOG_CONFIG, formatter_class=fmt,
        description="Train the teacher, then one student per method from it, then evaluate all four and "
        "write the report. With no argument: the embedded digits data set, a few minutes on a laptop CPU.",
    )  # fmt: skip
    _add_config_args(p)
    _add_train_args(p)
    p.add_argument(
        "--methods", default="ce,kd,erde", help="student methods to train (default: ce,kd,erde)"
    )
    p.add_argument("--out", help="output folder (default: runs/<dataset>)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "reproduce", help="the paper's comparison over several seeds: table, plot, MAC reduction",
        epilog=EPILOG_CONFIG + "\nWith reproduce: preset < --schedule overlay < --config < --set. "
        "--seed is the first seed (default 0).", formatter_class=fmt,
        description="For each seed, train the teacher and the ce/kd/erde students (finished runs in "
        "--out are reused, interrupted ones resumed) and evaluate them on a fixed threshold grid; "
        "then write results.json, results.md (accuracy mean ± std over seeds and mean MACs per "
        "threshold, MAC reduction at equal accuracy, ERDE vs KD at each threshold, anchors) and "
        "tradeoff.png (with spread bands). --dataset cifar10 also reads an ImageFolder copy "
        "(train/<class>/*.jpg, test/<class>/*.jpg, folder or .tar.gz).",
    )  # fmt: skip
    _add_config_args(p)
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (default: 3)")
    p.add_argument(
        "--schedule", choices=("full", "reduced"), default="full",
        help="full: the preset (GPU, 200 epochs); reduced: about an hour per seed on a 2-core CPU",
    )  # fmt: skip
    p.add_argument(
        "--download", action="store_true",
        help="fetch the official files into --data-dir first (MD5-checked; mirror: env "
        "ERDE_DOWNLOAD_URL)",
    )  # fmt: skip
    p.add_argument(
        "--docs", metavar="DIR",
        help="also publish into DIR: results/<dataset>.json and .png, and the data set's block "
        "of DIR/RESULTS.md",
    )  # fmt: skip
    p.add_argument("--out", help="output folder (default: runs/reproduce/<dataset>-<schedule>)")
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ErdeError as exc:
        print(f"erde: error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # thresholds out of range and similar argument errors
        print(f"erde: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("erde: interrupted; the last checkpoint is kept (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
