"""The commands that measure and read results: evaluate, calibrate, report-html, status, verify."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from erde.cli.common import (
    CHECKPOINT_HELP,
    EPILOG_CONFIG,
    RAW,
    add_command,
    add_config_args,
    add_trust_arg,
    build_config,
    parse_numbers,
    writes_files,
)
from erde.config import ExperimentConfig
from erde.errors import ConfigError, ErdeError


def _names(args: argparse.Namespace) -> list[str] | None:
    """--names as a list, or None; the count is checked against the checkpoints before any work."""
    if not args.names:
        return None
    names = [n.strip() for n in args.names.split(",")]
    if len(names) != len(args.checkpoints) or not all(names) or len(set(names)) != len(names):
        raise ConfigError(
            f"--names needs {len(args.checkpoints)} different non-empty names, one per checkpoint, "
            f"got {args.names!r}"
        )
    return names


def cmd_evaluate(args: argparse.Namespace) -> int:
    from erde.api import evaluate
    from erde.checkpoints import load_checkpoint

    # without --dataset/--config: the first checkpoint's own config, flags and --set on top
    cfg = build_config(args, fallback=load_checkpoint(args.checkpoints[0])["config"])
    if args.budgeted:
        return _evaluate_budgeted(args, cfg)
    paths = evaluate(
        args.checkpoints,
        args.out,
        cfg=cfg,
        thresholds=parse_numbers(args.thresholds, "--thresholds"),
        progress=not args.no_progress,
        names=_names(args),
    )
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _evaluate_budgeted(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    from erde import evaluate_budgeted
    from erde.calibration import DEFAULT_BUDGETS

    budgets = parse_numbers(args.budgets, "--budgets") or list(DEFAULT_BUDGETS)
    paths = evaluate_budgeted(
        args.checkpoints,
        args.out,
        budgets=budgets,
        rule=args.rule,
        per_exit=args.per_exit,
        temperature=args.temperature,
        cfg=cfg,
        progress=not args.no_progress,
        names=_names(args),
    )
    print(Path(paths["markdown"]).read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """One writer per thresholds folder: a second calibrate into it stops at once, naming the
    first (two writing one file would each report success while one result is lost)."""
    from erde.calibration import check_thresholds_output
    from erde.outputs import output_lock

    target = check_thresholds_output(args.checkpoint, args.out)
    with output_lock(target.parent, enabled=writes_files()):
        return _calibrate(args)


def _calibrate(args: argparse.Namespace) -> int:
    import warnings

    from erde.api import calibrate
    from erde.calibration import CalibrationWarning, resolution_note
    from erde.checkpoints import load_checkpoint

    cfg = build_config(args, fallback=load_checkpoint(args.checkpoint)["config"])
    if args.confidence is not None:
        return _calibrate_guaranteed(args, cfg)
    if args.risk is not None:
        raise ErdeError(
            "--risk goes with --confidence (plain calibration bounds the accuracy drop)"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)  # printed below, once
        result, path = calibrate(
            args.checkpoint,
            budget=args.budget,
            max_drop=args.max_drop,
            rule=args.rule,
            per_exit=args.per_exit,
            temperature=args.temperature,
            out=args.out,
            cfg=cfg,
            progress=not args.no_progress,
        )
    if result.warning:
        print(f"erde: warning: {result.warning}", file=sys.stderr)
    note = resolution_note(result)
    if note:
        print(f"erde: note: {note}", file=sys.stderr)
    thresholds = ", ".join(f"{t:.6g}" for t in result.policy.thresholds)
    print(f"{result.policy.rule} thresholds: {thresholds}")
    if result.policy.temperatures:
        print(f"temperatures: {', '.join(f'{t:.4g}' for t in result.policy.temperatures)}")
    for split, r in (("validation", result.validation), ("test", result.test)):
        if r is not None:
            exits = " ".join(f"{100 * f:.1f}" for f in r["exit_fractions"])
            print(
                f"{split:10s} accuracy {100 * r['accuracy']:.2f}% (last exit "
                f"{100 * r['last_exit_accuracy']:.2f}%), MACs {r['macs_fraction']:.3f} x full, "
                f"exits (%) {exits}"
            )
    print(f"thresholds: {path}")
    return 0


def _calibrate_guaranteed(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    from erde.api import calibrate

    if args.max_drop is None:
        raise ErdeError("--confidence goes with --max-drop (the risk to bound), not --budget")
    if args.temperature:
        raise ErdeError(
            "--temperature with --confidence: temperatures fitted on the calibration images "
            "would void the guarantee"
        )
    risk = args.risk or "drop"
    result, path = calibrate(
        args.checkpoint,
        max_drop=args.max_drop,
        confidence=args.confidence,
        risk=risk,
        rule=args.rule,
        per_exit=args.per_exit,
        out=args.out,
        cfg=cfg,
        progress=not args.no_progress,
    )
    thresholds = ", ".join(f"{t:.6g}" for t in result.policy.thresholds)
    print(f"{result.policy.rule} thresholds: {thresholds}")
    print(result.guarantee())
    for split, r in (("validation", result.validation), ("test", result.test)):
        if r is not None:
            print(
                f"{split:10s} {risk} rate {r['risk']:.4f} (bound {args.max_drop:g}), accuracy "
                f"{100 * r['accuracy']:.2f}% (last exit {100 * r['last_exit_accuracy']:.2f}%), "
                f"MACs {r['macs_fraction']:.3f} x full"
            )
    print(f"thresholds: {path}")
    return 0


def cmd_report_html(args: argparse.Namespace) -> int:
    from erde.report.html import load_report, write_report_html

    report = load_report(args.report)
    out = Path(args.out) if args.out else Path(args.report).parent
    print(f"html: {write_report_html(out, report)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from erde.status import status_lines, write_status_plot

    for line in status_lines(args.folder):
        print(line)
    if args.plot:
        for line in write_status_plot(args.folder, args.plot):
            print(line)
        print(f"training curves: {args.plot}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from erde.reproduce.evidence import verify_block
    from erde.reproduce.seedfiles import check_seed_files

    checked, diffs = verify_block(Path(args.results))
    diffs += check_seed_files(Path(args.results))
    for line in diffs[:50]:
        print(line)
    if diffs:
        print(
            f"{len(diffs)} of {checked} numbers differ from what the records give", file=sys.stderr
        )
        return 1
    print(f"{args.results}: all {checked} numbers re-derived from the per-image records")
    return 0


# --------------------------------------------------------------------------- parsers


def _add_fit_args(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--rule",
        default="entropy",
        help="a registered exit rule: entropy (default), max_softmax, or one registered with "
        "erde.exits.register_rule",
    )
    g.add_argument(
        "--per-exit",
        action="store_true",
        help="fit one threshold per early exit (default: one shared)",
    )
    g.add_argument(
        "--temperature",
        action="store_true",
        help="fit a softmax temperature per exit on validation first",
    )


def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "evaluate",
        cmd_evaluate,
        help="sweep exit thresholds on the test set and write a report",
        epilog=EPILOG_CONFIG,
        formatter_class=RAW,
        description="Record every exit's test logits once per checkpoint, sweep thresholds of the "
        "entropy and max-softmax rules, and write report.json, report.md, report.html, sweep.csv, "
        "tradeoff.png and reliability.png (each exit's accuracy against its confidence) to --out, "
        "and training.png (the training curves) when the checkpoints' folders hold their "
        "metrics.jsonl. Without --dataset/--config the data set of the first checkpoint is used.",
    )
    p.add_argument(
        "checkpoints", nargs="+", help="checkpoint files (or folders holding checkpoint.pt)"
    )
    add_config_args(p)
    p.add_argument("--thresholds", help="comma-separated thresholds instead of the default grid")
    p.add_argument(
        "--names",
        metavar="A,B,...",
        help="comma-separated names for the models in the report, one per checkpoint (default: "
        "each checkpoint's own, e.g. student_erde; students of the same method from different "
        "runs need names of their own)",
    )
    p.add_argument("--out", default="runs/report", help="output folder (default: runs/report)")
    g = p.add_argument_group(
        "budgeted mode (MSDNet protocol): test accuracy against test MACs, each point's thresholds "
        "fitted on the validation split for one MAC budget; writes budgeted.json/.md/.png"
    )
    g.add_argument(
        "--budgeted", action="store_true", help="run the budgeted evaluation instead of the sweep"
    )
    g.add_argument(
        "--budgets", help="comma-separated fractions of the full MACs (default: 0.2,0.3,...,1.0)"
    )
    _add_fit_args(g)
    add_trust_arg(p)


def add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "calibrate",
        cmd_calibrate,
        help="fit exit thresholds on the validation split for a MAC budget or accuracy drop",
        epilog=EPILOG_CONFIG,
        formatter_class=RAW,
        description="Record every exit's validation logits once, choose the thresholds that meet "
        "the target (never looking at the test set), report what they give on validation and "
        "test, and write them to <checkpoint stem>.thresholds.json beside the checkpoint (used by "
        "predict, export and bench). An unreachable target is a warning and the nearest feasible "
        "setting.",
    )
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--budget", type=float, help="mean MACs at most this fraction of the full network, e.g. 0.5"
    )
    target.add_argument(
        "--max-drop",
        type=float,
        help="accuracy at most this far below the last exit, e.g. 0.01 (1 point)",
    )
    _add_fit_args(p)
    g = p.add_argument_group(
        "guarantee (Learn-then-Test; see docs/INFERENCE.md)",
        "With --confidence 1-δ and --max-drop ε: thresholds whose risk on new data is at most ε "
        "with probability at least 1-δ over the draw of the validation images.",
    )
    g.add_argument("--confidence", type=float, help="1 - δ, e.g. 0.9 (needs --max-drop)")
    g.add_argument(
        "--risk",
        choices=("drop", "consistency"),
        help="with --confidence: drop: wrong where the last exit is right (bounds the accuracy "
        "drop); consistency: answer differs from the last exit's (default: drop)",
    )
    p.add_argument("--out", help="thresholds file to write (default: beside the checkpoint)")
    add_config_args(p)
    add_trust_arg(p)


def add_report_html(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "report-html",
        cmd_report_html,
        help="(re)write report.html from a report.json, marking calibrated thresholds",
        formatter_class=RAW,
        description="Render report.json as report.html beside it: accuracy-vs-MACs curves and a "
        "threshold slider per model, one self-contained file. Thresholds files written by `erde "
        "calibrate` beside a model's checkpoint (and newer than it) are marked. `erde run` and "
        "`erde evaluate` write it already.",
    )
    p.add_argument("report", help="a report.json written by erde run, evaluate or reproduce")
    p.add_argument("--out", help="folder to write report.html to (default: beside the report)")


def add_status(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "status",
        cmd_status,
        help="where a (long) run stands: each model's epoch, accuracy, time left",
        formatter_class=RAW,
        description="Read the checkpoints and metrics.jsonl below a run folder (up to 3 levels: "
        "run / seed / model) without touching them, and print one line per model: finished, or "
        "its epoch and step, the last validation accuracy per exit, how long ago its checkpoint "
        "was written and about how long is left (in an erde reproduce folder, also each "
        "student a seed has not started and another seed holds); then whether an erde process "
        "holds the folder "
        "now (running) or not (stopped: the same command with --resume, or erde reproduce as it "
        "was, continues it). With --plot, also draw each model's validation accuracy per exit "
        "over its finished epochs into a PNG.",
    )
    p.add_argument("folder", help="a run folder (erde run / reproduce --out) or one model's folder")
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="also write the training curves (validation accuracy per exit per epoch, one panel "
        "per model) to this PNG file; models with no finished epoch yet are named and left out",
    )


def add_verify(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "verify",
        cmd_verify,
        help="recompute a published results block's tables from its per-image records",
        formatter_class=RAW,
        description="Read RESULTS.json (written by erde reproduce, e.g. "
        "docs/results/cifar10-speed.json) and its per-image records (<stem>-records.npz beside "
        "it, or records.npz in a run folder), check that they belong together (sha256, image "
        "count, classes), then recompute every model's accuracy and MACs per threshold and seed, "
        "their means and spreads, the curves and every paired comparison (differences, "
        "confidence intervals, p-values) from the records alone, and compare each number with "
        "the published one. Exit 0 when all agree, 1 listing what differs. Seconds, no "
        "checkpoints or data needed.",
    )
    p.add_argument("results", help="a results JSON of erde reproduce")
