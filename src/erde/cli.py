"""Command line: parses arguments, calls the library, prints. Nothing else lives here."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from erde import __version__
from erde.config import ExperimentConfig, load_config, load_yaml, preset_path
from erde.errors import ConfigError, ErdeError
from erde.threads import DEFAULT_MAX_THREADS, ENV_VAR

if TYPE_CHECKING:
    from erde.training import EpochCallback

EPILOG_CONFIG = """\
configuration: defaults < preset for --dataset (erde/configs/<name>.yaml) < --config FILE
< --set section.key=value (repeatable), e.g. --set teacher.arch=resnet56 --set student_train.epochs=5.
Sections: data, teacher, student, teacher_train, student_train, distill, evaluation, seed, device.
The config actually used is saved as config.yaml next to every checkpoint and report."""


def _seed(text: str) -> int:
    """argparse type of --seed: an integer in [0, 2**32 - 1] (argparse names the option)."""
    from erde.config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}], got {text}")
    return value


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
    g.add_argument("--seed", type=_seed, help="random seed (split, init, augmentation)")
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument(
        "--no-progress", action="store_true",
        help="hide progress bars (shown only when stderr is a terminal); without them the "
        "training commands print a line per epoch",
    )  # fmt: skip
    _add_threads_arg(g)


def _add_threads_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--threads", type=int, metavar="N",
        help=f"CPU threads for PyTorch (default: ${ENV_VAR}, else $OMP_NUM_THREADS, else the idle "
        f"cores, at most {DEFAULT_MAX_THREADS}; 1 is fastest for small models on a busy machine)",
    )  # fmt: skip


def _module_name(text: str) -> str:
    """argparse type of --trust-module: a dotted Python module name."""
    import re

    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", text):
        raise argparse.ArgumentTypeError(
            f"must be a module name like mypackage.models, got {text!r}"
        )
    return text


def _add_trust_arg(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--trust-module", dest="trust_modules", action="append", default=[], type=_module_name,
        metavar="MODULE",
        help="let checkpoints of your own network import MODULE (and its submodules) to rebuild "
        "it (repeatable); modules named by the arch of --config or --set are trusted already. "
        "Without it a checkpoint naming a module:factory is refused: importing runs code",
    )  # fmt: skip


def _user_modules(args: argparse.Namespace) -> list[str]:
    """Modules the user named on this command line: --trust-module, and the arch of --config/--set.

    A checkpoint's own config (the fallback of evaluate and calibrate) does not count:
    a file must not decide on its own what is imported.
    """
    from erde.models.custom import module_of

    names = list(getattr(args, "trust_modules", None) or [])
    archs = []
    for override in getattr(args, "overrides", None) or []:
        key, _, value = override.partition("=")
        if key.strip().endswith(".arch"):
            archs.append(value.strip())
    if getattr(args, "config", None):
        data = load_yaml(args.config)
        for role in ("teacher", "student"):
            section = data.get(role) if isinstance(data, dict) else None
            archs.append(section.get("arch") if isinstance(section, dict) else None)
    return names + [m for a in archs if isinstance(a, str) and (m := module_of(a))]


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --out (or reuse it if finished)",
    )
    p.add_argument(
        "--force", action="store_true", help="start over even if --out already holds a checkpoint"
    )
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --resume: reuse or continue models whose saved config differs from this one",
    )
    p.add_argument(
        "--tensorboard", action="store_true",
        help="also write TensorBoard event files to <model folder>/tensorboard "
        '(needs pip install "erde[tb]")',
    )  # fmt: skip


def _epoch_callback(args: argparse.Namespace) -> EpochCallback | None:
    """What training calls after each epoch: a console line without bars, TensorBoard files."""
    from erde.monitor import TensorBoardLogger, combine, epoch_line

    def console(_out_dir: Path, record: dict) -> None:
        print(epoch_line(record), flush=True)

    return combine(
        console if args.no_progress else None,
        TensorBoardLogger() if getattr(args, "tensorboard", False) else None,
    )


def _named_dataset(args: argparse.Namespace) -> str | None:
    """The data set the command line names: --dataset, else the data.name of --config."""
    if args.dataset is None and args.config:
        return (load_yaml(args.config).get("data") or {}).get("name")
    return args.dataset


def build_config(
    args: argparse.Namespace, fallback: dict | None = None, data: dict | None = None
) -> ExperimentConfig:
    """Preset for the data set, then --config, then explicit flags and --set overrides.

    ``fallback`` (e.g. a checkpoint's own config) replaces the preset when
    neither --dataset nor --config names a data set. ``data`` (e.g. a teacher's data
    settings, :func:`teacher_data`) is laid over its data set's preset in that case.
    """
    dataset = _named_dataset(args)
    overrides = []
    if dataset is None and fallback is not None:
        base = fallback
    else:
        inherit = dataset is None and data is not None
        dataset = dataset or (data["name"] if inherit else "digits")
        preset = preset_path(dataset)
        base = load_yaml(preset) if preset.is_file() else {}
        if inherit:
            base["data"] = {**(base.get("data") or {}), **data}
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
        allow_config_change=args.allow_config_change,
        on_epoch=_epoch_callback(args),
    )
    print(f"teacher checkpoint: {path}")
    return 0


# A student learns from its teacher's answers on the same images: these data settings are
# taken from the teacher's checkpoint unless the command line gives them.
DATA_FROM_TEACHER = (
    "name", "data_dir", "image_size", "batch_size", "val_fraction", "split_seed", "max_train",
)  # fmt: skip


def teacher_data(args: argparse.Namespace) -> dict | None:
    """The teacher's ``DATA_FROM_TEACHER`` settings, or None when there is no --teacher or the
    command line names a data set (--dataset, --config with data.name, --set data.name=)."""
    if not args.teacher or _named_dataset(args) is not None:
        return None
    if any(o.split("=", 1)[0].strip() == "data.name" for o in args.overrides):
        return None
    from erde.checkpoints import load_checkpoint

    data = (load_checkpoint(args.teacher).get("config") or {}).get("data") or {}
    inherited = {k: data[k] for k in DATA_FROM_TEACHER if k in data}
    return inherited if inherited.get("name") else None


def data_origin_line(cfg: ExperimentConfig, args: argparse.Namespace, inherited: dict) -> str:
    """``data: imagefolder DIR from the teacher's checkpoint``, naming what the command line set."""
    own = {o.split("=", 1)[0].strip()[5:] for o in args.overrides if o.startswith("data.")}
    if args.data_dir:
        own.add("data_dir")
    own &= set(inherited)
    where = f" {cfg.data.data_dir}" if cfg.data.data_dir else ""
    extra = f" ({', '.join(sorted(own))} from the command line)" if own else ""
    return f"data: {cfg.data.name}{where} from the teacher's checkpoint{extra}"


def cmd_train_student(args: argparse.Namespace) -> int:
    from erde.training import Job, train

    inherited = teacher_data(args)
    cfg = build_config(args, data=inherited)
    if inherited:
        print(data_origin_line(cfg, args, inherited), flush=True)
    method = args.method or cfg.distill.method
    path = train(
        cfg, Job("student", method), args.out, teacher_checkpoint=args.teacher,
        resume=args.resume, force=args.force, progress=not args.no_progress,
        allow_config_change=args.allow_config_change,
        on_epoch=_epoch_callback(args),
    )  # fmt: skip
    print(f"student ({method}) checkpoint: {path}")
    return 0


def _parse_thresholds(text: str | None, option: str = "--thresholds") -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ErdeError(f"{option} must be comma-separated numbers, got {text!r}") from None


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
    from erde.checkpoints import load_checkpoint
    from erde.pipeline import evaluate_checkpoints

    # without --dataset/--config: the first checkpoint's own config, flags and --set on top
    cfg = build_config(args, fallback=load_checkpoint(args.checkpoints[0])["config"])
    if args.budgeted:
        return _evaluate_budgeted(args, cfg)
    paths = evaluate_checkpoints(
        args.checkpoints, args.out, cfg=cfg, thresholds=_parse_thresholds(args.thresholds),
        progress=not args.no_progress, names=_names(args),
    )  # fmt: skip
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = build_config(args)
    args.out = args.out or f"runs/{cfg.data.name}"
    return _locked(args, lambda a: _run_pipeline(a, cfg))


def _students(text: str | None) -> list | None:
    """``--methods`` / ``--students`` text -> student specs (None: the config's students)."""
    if text is None:
        return None
    from erde.config import parse_students

    return parse_students(text)


def _students_override(text: str | None) -> list[str]:
    """``--students`` as a ``distill.students=[...]`` override (JSON is YAML), recorded as such."""
    import json

    specs = _students(text)
    if specs is None:
        return []
    rows = [{k: v for k, v in vars(s).items() if v is not None} for s in specs]
    return [f"distill.students={json.dumps(rows, separators=(',', ':'))}"]


def _run_pipeline(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    from erde.pipeline import run_pipeline

    paths = run_pipeline(
        cfg, args.out, methods=_students(args.methods), resume=args.resume, force=args.force,
        progress=not args.no_progress, allow_config_change=args.allow_config_change,
        on_epoch=_epoch_callback(args),
    )  # fmt: skip
    if not paths:  # a non-zero rank under torchrun: rank 0 evaluates and prints
        return 0
    _print_summary(paths["json"])
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _print_summary(report_json: Path) -> None:
    from erde.report import untrained_text
    from erde.report.html import load_report

    report = load_report(report_json)
    print(
        "\nmodel           exit accuracy (%)               MACs at last exit   MAC reduction at equal acc."
    )
    untrained = report["reference"].get("untrained")
    for name, m in report["models"].items():
        accs = " ".join(f"{100 * a:5.1f}" for a in m["exit_accuracy"])
        red = m.get("mac_reduction")
        red_text = (
            f"{red['reduction']:.2f}x (acc {100 * red['accuracy']:.1f}%)"
            if red
            else "none: the reference is not trained"
            if untrained
            else "none within tolerance"
        )
        print(f"{name:15s} {accs:31s} {m['macs_per_exit'][-1]:>17,d}   {red_text}")
    if untrained:
        print(f"warning: {untrained_text(report['reference'])}")


def cmd_reproduce(args: argparse.Namespace) -> int:
    if not args.dataset:
        raise ErdeError("reproduce needs --dataset (cifar10, cifar100 or svhn)")
    args.out = args.out or f"runs/reproduce/{args.dataset}-{args.schedule}"
    return _locked(args, _reproduce)


def _locked(args: argparse.Namespace, func: Callable[[argparse.Namespace], int]) -> int:
    from erde.outputs import output_lock

    with output_lock(args.out, enabled=_writes_files()):
        return func(args)


def _reproduce(args: argparse.Namespace) -> int:
    from erde.errors import ReportError
    from erde.io import read_json
    from erde.report.html import MAX_REPORT_BYTES
    from erde.reproduce import reproduce, summary_lines

    flags = [f"seed={args.seed}"] if args.seed is not None else []
    flags += [f"device={args.device}"] if args.device else []
    paths = reproduce(
        args.dataset, args.out,
        data_dir=args.data_dir, seeds=args.seeds, teacher_seeds=args.teacher_seeds,
        schedule=args.schedule, config=args.config,
        overrides=[*flags, *_students_override(args.students), *args.overrides],
        download=args.download, docs_dir=args.docs, teacher=args.teacher,
        progress=not args.no_progress, log=print, on_epoch=_epoch_callback(args),
    )  # fmt: skip
    print()
    results = read_json(
        paths["results"], max_bytes=MAX_REPORT_BYTES, error=ReportError, what="a results file"
    )
    for line in summary_lines(results):
        print(line)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


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


def _policy_kwargs(args: argparse.Namespace) -> dict:
    values = _parse_thresholds(args.threshold, "--threshold")
    if args.threshold is not None and not values:
        raise ErdeError("--threshold needs at least one number")
    return {"thresholds": values, "rule": args.rule, "thresholds_file": args.thresholds_file}


def _fraction_list(text: str | None, what: str) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ErdeError(f"{what} must be comma-separated numbers, got {text!r}") from None


def _evaluate_budgeted(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    from erde.calibration import DEFAULT_BUDGETS
    from erde.report.budgeted import evaluate_budgeted

    budgets = _fraction_list(args.budgets, "--budgets") or list(DEFAULT_BUDGETS)
    paths = evaluate_budgeted(
        args.checkpoints, args.out, budgets=budgets, rule=args.rule, per_exit=args.per_exit,
        temperature=args.temperature, cfg=cfg, progress=not args.no_progress,
        names=_names(args),
    )  # fmt: skip
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
    with output_lock(target.parent, enabled=_writes_files()):
        return _calibrate(args)


def _calibrate(args: argparse.Namespace) -> int:
    import warnings

    from erde.calibration import CalibrationWarning, calibrate_checkpoint, resolution_note
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
        result, path = calibrate_checkpoint(
            args.checkpoint, budget=args.budget, max_drop=args.max_drop, rule=args.rule,
            per_exit=args.per_exit, temperature=args.temperature, out=args.out, cfg=cfg,
            progress=not args.no_progress,
        )  # fmt: skip
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
    from erde.risk_control import calibrate_checkpoint_guaranteed

    if args.max_drop is None:
        raise ErdeError("--confidence goes with --max-drop (the risk to bound), not --budget")
    if args.temperature:
        raise ErdeError(
            "--temperature with --confidence: temperatures fitted on the calibration images "
            "would void the guarantee"
        )
    risk = args.risk or "drop"
    result, path = calibrate_checkpoint_guaranteed(
        args.checkpoint, max_risk=args.max_drop, confidence=args.confidence, risk=risk,
        rule=args.rule, per_exit=args.per_exit, out=args.out, cfg=cfg,
        progress=not args.no_progress,
    )  # fmt: skip
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


def cmd_release(args: argparse.Namespace) -> int:
    from erde.checkpoints import load_checkpoint, release_checkpoint

    before = Path(load_checkpoint(args.checkpoint)["path"]).stat().st_size
    out = release_checkpoint(args.checkpoint, args.out)
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB (was {before / 2**20:.1f} MiB)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from erde.reproduce.evidence import verify_block

    checked, diffs = verify_block(Path(args.results))
    for line in diffs[:50]:
        print(line)
    if diffs:
        print(
            f"{len(diffs)} of {checked} numbers differ from what the records give", file=sys.stderr
        )
        return 1
    print(f"{args.results}: all {checked} numbers re-derived from the per-image records")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from erde.export import export_checkpoint

    if args.int8:
        return _export_int8(args)
    manifest = export_checkpoint(
        args.checkpoint, args.out, thresholds_file=args.thresholds_file, opset=args.opset
    )
    print(f"ONNX export: {manifest.parent} ({manifest.name} + one stage_<i>.onnx per stage)")
    return 0


def _bench_deploy(args: argparse.Namespace) -> int:
    from erde.deploy import deployment_table, render_table

    if not (args.deploy and args.teacher):
        raise ErdeError(
            "--deploy compares a student with its teacher: give both --deploy and --teacher"
        )
    if args.threshold is not None or args.thresholds_file:
        raise ErdeError("--deploy fits the student's thresholds on validation (--max-drop); "
                        "drop --threshold/--thresholds-file")  # fmt: skip
    batch_sizes = [int(b) for b in _fraction_list(args.batch_sizes, "--batch-sizes") or []]
    result = deployment_table(
        args.teacher, args.checkpoint, max_drop=args.max_drop, batch_sizes=batch_sizes,
        images=args.images, repeats=args.repeats, min_time=args.min_time, onnx=not args.no_onnx,
        int8=not args.no_onnx, log=print,
    )  # fmt: skip
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


def _export_int8(args: argparse.Namespace) -> int:
    import warnings

    from erde.quantize import quantize_checkpoint

    if args.thresholds_file:
        raise ErdeError(
            "--int8 fits its own thresholds on the quantised model; drop --thresholds-file"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the result carries the warning: printed once below
        result = quantize_checkpoint(
            args.checkpoint, args.out, max_drop=args.max_drop,
            calibration_images=args.calibration_images, accuracy_budget=args.accuracy_budget,
            opset=args.opset, warn=False,
        )  # fmt: skip
    r = result.report
    print(f"int8 ONNX export: {result.directory} (manifest.json, stage_<i>.onnx, thresholds.json, "
          f"quantization.json); {r['calibration_images']} validation images calibrated it")  # fmt: skip
    for i, (a, b) in enumerate(zip(r["exit_accuracy_fp32"], r["exit_accuracy_int8"], strict=True)):
        print(f"exit {i}: test accuracy fp32 {100 * a:.2f} % -> int8 {100 * b:.2f} %")
    test = r["thresholds"]["test"]
    print(f"thresholds fitted on the int8 model (max drop {args.max_drop:g} on validation): "
          f"test accuracy {100 * test['accuracy']:.2f} % at {test['macs_fraction']:.3f} of full MACs")  # fmt: skip
    if result.warning:
        print(f"warning: {result.warning}", file=sys.stderr)
    return 0


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
    import json

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
    import json

    from erde.inference import bench_checkpoint, load_predictor

    _check_json_output(args, [args.checkpoint, args.teacher])
    if args.deploy or args.teacher:
        return _bench_deploy(args)
    policy = load_predictor(args.checkpoint, **_policy_kwargs(args)).policy
    devices = (args.device or "cpu").split(",")
    batch_sizes = [int(b) for b in _fraction_list(args.batch_sizes, "--batch-sizes") or []]
    onnx = False if args.no_onnx else (args.onnx or True)
    records = bench_checkpoint(
        args.checkpoint, policy, batch_sizes=batch_sizes, images=args.images, devices=devices,
        onnx=onnx, repeats=args.repeats, min_time=args.min_time, compile=args.compile,
        channels_last=args.channels_last, fold_bn=args.fold_bn, log=print,
    )  # fmt: skip
    if args.json:
        from erde.io import atomic_write_json

        atomic_write_json(args.json, records)
        print(f"records: {json.dumps(str(args.json))}")
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
    parser.add_argument("--version", action="version", version=f"erde {__version__}")
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
        help="a registered student method: ce, kd, erde or one registered with "
        "erde.losses.register_method (default: distill.method, erde)",
    )
    p.add_argument(
        "--teacher",
        help="teacher checkpoint (required for kd and erde); the student trains on the teacher's "
        "data (data.name, data_dir, image_size, batch_size, val_fraction, split_seed, max_train "
        "from its checkpoint) unless --dataset, --data-dir, --config or --set data.* say otherwise",
    )
    _add_trust_arg(p)
    p.add_argument("--out", default="runs/student", help="output folder (default: runs/student)")
    p.set_defaults(func=cmd_train_student)

    p = sub.add_parser(
        "evaluate", help="sweep exit thresholds on the test set and write a report", epilog=EPILOG_CONFIG,
        formatter_class=fmt,
        description="Record every exit's test logits once per checkpoint, sweep thresholds of the entropy "
        "and max-softmax rules, and write report.json, report.md, report.html, sweep.csv, tradeoff.png and "
        "reliability.png (each exit's accuracy against its confidence) to --out, and training.png (the training curves) when the checkpoints' folders hold their "
        "metrics.jsonl. Without --dataset/--config the data set of the first checkpoint is used.",
    )  # fmt: skip
    p.add_argument(
        "checkpoints", nargs="+", help="checkpoint files (or folders holding checkpoint.pt)"
    )
    _add_config_args(p)
    p.add_argument("--thresholds", help="comma-separated thresholds instead of the default grid")
    p.add_argument(
        "--names", metavar="A,B,...",
        help="comma-separated names for the models in the report, one per checkpoint (default: "
        "each checkpoint's own, e.g. student_erde; students of the same method from different "
        "runs need names of their own)",
    )  # fmt: skip
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
    _add_trust_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "run", help="the whole pipeline: teacher, ce/kd/erde students, evaluation, report",
        epilog=EPILOG_CONFIG, formatter_class=fmt,
        description="Train the teacher, then one student per method from it, then evaluate all four and "
        "write the report. With no argument: the embedded digits data set, about a minute on an idle 2-core "
        "CPU (docs/USAGE.md: what to expect, and what varies between machines).",
    )  # fmt: skip
    _add_config_args(p)
    _add_train_args(p)
    p.add_argument(
        "--methods", metavar="STUDENTS", help="students to train side by side, comma-separated: "
        "a method (ce, kd, erde) or NAME=METHOD:key=value:... with its own alpha, beta, gamma, "
        "temperature or uncertain_above, e.g. 'kd,erde,erde_g2=erde:gamma=2' (default: "
        "distill.students, else ce,kd,erde)",
    )  # fmt: skip
    p.add_argument("--out", help="output folder (default: runs/<dataset>)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "reproduce", help="the paper's comparison over several seeds: table, plot, MAC reduction",
        epilog=EPILOG_CONFIG + "\nWith reproduce: preset < --schedule overlay < --config < --set. "
        "--seed is the first seed (default 0).", formatter_class=fmt,
        description="For each seed, train the teacher and the ce/kd/erde students side by side (finished "
        "runs in --out are reused, interrupted ones resumed) and evaluate them on a fixed threshold grid; "
        "then write results.json, results.md (accuracy mean ± std over seeds and mean MACs per "
        "threshold, MAC reduction at equal accuracy and for 0.5-5 points given up, ERDE vs KD at each threshold, anchors) and "
        "tradeoff.png (with spread bands), and training.png (validation accuracy per exit after each "
        "epoch, mean over seeds). --dataset cifar10 also reads an ImageFolder copy "
        "(train/<class>/*.jpg, test/<class>/*.jpg, folder or .tar.gz).",
    )  # fmt: skip
    _add_config_args(p)
    p.add_argument("--seeds", type=int, default=3, help="number of student seeds (default: 3)")
    p.add_argument(
        "--teacher-seeds", type=int, metavar="N",
        help="train N teachers (1 <= N <= --seeds) and let the student seeds share them in turn, "
        "as KD papers do (default: one teacher per seed). Shared-teacher students use their "
        "teacher's validation split",
    )  # fmt: skip
    p.add_argument(
        "--schedule", choices=("full", "reduced", "fast", "speed"), default="full",
        help="full: the preset (GPU, 200 epochs); fast: a few tens of epochs for a teacher near "
        "its trained accuracy (hours per seed on a 2-core CPU); reduced: 7 epochs, about an hour "
        "per seed on a 2-core CPU; speed: the fastnet family (CIFAR-10 only) with the fast-CIFAR "
        "recipe (batch 1024, look-ahead, whitened stem), 16 epochs",
    )  # fmt: skip
    p.add_argument(
        "--download", action="store_true",
        help="fetch the official files into --data-dir first (MD5-checked; mirror: env "
        "ERDE_DOWNLOAD_URL)",
    )  # fmt: skip
    p.add_argument(
        "--docs", metavar="DIR",
        help="also publish into DIR: results/<dataset>-<schedule>.json, .png and -training.png, "
        "and the block of that name in DIR/RESULTS.md; after every finished seed, marked "
        "partial until the last",
    )  # fmt: skip
    p.add_argument(
        "--teacher", metavar="DIR", help="a released teacher folder (checkpoint.pt, config.yaml; "
        "e.g. docs/results/cifar10-speed-teacher) that every seed shares instead of training one; "
        "needs --teacher-seeds 1. How seeds are added to a published block on another machine",
    )  # fmt: skip
    p.add_argument(
        "--students", metavar="STUDENTS", help="the students of every seed, comma-separated, "
        "trained side by side on the same batches with one teacher forward: a method (ce, kd, "
        "erde) or NAME=METHOD:key=value:... with its own alpha, beta, gamma, temperature or "
        "uncertain_above, e.g. 'ce,kd,erde,erde_g0.5=erde:gamma=0.5,erde_g2=erde:gamma=2' "
        "(default: ce,kd,erde). Each student beyond those three is compared with KD and ERDE",
    )  # fmt: skip
    p.add_argument("--out", help="output folder (default: runs/reproduce/<dataset>-<schedule>)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "calibrate", help="fit exit thresholds on the validation split for a MAC budget or accuracy drop",
        epilog=EPILOG_CONFIG, formatter_class=fmt,
        description="Record every exit's validation logits once, choose the thresholds that meet the target "
        "(never looking at the test set), report what they give on validation and test, and write them to "
        "<checkpoint stem>.thresholds.json beside the checkpoint (used by predict, export and bench). An "
        "unreachable target is a warning and the nearest feasible setting.",
    )  # fmt: skip
    p.add_argument("checkpoint", help="checkpoint file (or folder holding checkpoint.pt)")
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
        help="with --confidence: drop: wrong where the last exit is right (bounds the accuracy drop); "
        "consistency: answer differs from the last exit's (default: drop)",
    )
    p.add_argument("--out", help="thresholds file to write (default: beside the checkpoint)")
    _add_config_args(p)
    _add_trust_arg(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "report-html", help="(re)write report.html from a report.json, marking calibrated thresholds",
        formatter_class=fmt,
        description="Render report.json as report.html beside it: accuracy-vs-MACs curves and a threshold "
        "slider per model, one self-contained file. Thresholds files written by `erde calibrate` beside a "
        "model's checkpoint (and newer than it) are marked. `erde run` and `erde evaluate` write it already.",
    )  # fmt: skip
    p.add_argument("report", help="a report.json written by erde run, evaluate or reproduce")
    p.add_argument("--out", help="folder to write report.html to (default: beside the report)")
    p.set_defaults(func=cmd_report_html)

    p = sub.add_parser(
        "status", help="where a (long) run stands: each model's epoch, accuracy, time left",
        formatter_class=fmt,
        description="Read the checkpoints and metrics.jsonl below a run folder (up to 3 levels: run / "
        "seed / model) without touching them, and print one line per model: finished, or its epoch and "
        "step, the last validation accuracy per exit, how long ago its checkpoint was written and about "
        "how long is left; then whether an erde process holds the folder now (running) or not (stopped: "
        "the same command with --resume, or erde reproduce as it was, continues it). With --plot, also draw "
        "each model's validation accuracy per exit over its finished epochs into a PNG.",
    )  # fmt: skip
    p.add_argument("folder", help="a run folder (erde run / reproduce --out) or one model's folder")
    p.add_argument(
        "--plot", metavar="PNG",
        help="also write the training curves (validation accuracy per exit per epoch, one panel per "
        "model) to this PNG file; models with no finished epoch yet are named and left out",
    )  # fmt: skip
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "release", help="a finished checkpoint without its resume state, to share a trained model",
        formatter_class=fmt,
        description="Write a copy of a finished checkpoint without what only resuming needs (optimizer "
        "momentum, scheduler and RNG states): about half the size. It loads wherever a checkpoint does "
        "(--teacher of train-student, evaluate, export, predict), and a run folder holding it counts as "
        "finished, so erde run / reproduce reuse it instead of training that model again. A checkpoint "
        "whose training has not finished is refused (the copy could not resume).",
    )  # fmt: skip
    p.add_argument("checkpoint", help="checkpoint file (or folder holding checkpoint.pt)")
    p.add_argument("--out", required=True, help="file to write (e.g. DIR/checkpoint.pt)")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser(
        "verify", help="recompute a published results block's tables from its per-image records",
        formatter_class=fmt,
        description="Read RESULTS.json (written by erde reproduce, e.g. docs/results/cifar10-speed.json) "
        "and its per-image records (<stem>-records.npz beside it, or records.npz in a run folder), check "
        "that they belong together (sha256, image count, classes), then recompute every model's accuracy "
        "and MACs per threshold and seed, their means and spreads, the curves and every paired comparison "
        "(differences, confidence intervals, p-values) from the records alone, and compare each number "
        "with the published one. Exit 0 when all agree, 1 listing what differs. Seconds, no checkpoints "
        "or data needed.",
    )  # fmt: skip
    p.add_argument("results", help="a results JSON of erde reproduce")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "export", help="export to ONNX, one graph per stage, for the early-exit runtime",
        description="Write stage_<i>.onnx (stage input -> stage features + exit logits, dynamic batch) for "
        "every stage and a manifest.json; the checkpoint's thresholds file is checked and copied in. Each "
        "graph is compared with PyTorch on ONNX Runtime before the manifest is written.",
    )  # fmt: skip
    p.add_argument("checkpoint", help="checkpoint file (or folder holding checkpoint.pt)")
    p.add_argument("--out", required=True, help="export folder")
    p.add_argument(
        "--thresholds-file", help="thresholds to ship (default: the one beside the checkpoint)"
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default: 18)")
    q = p.add_argument_group("int8 (post-training static quantisation with ONNX Runtime)")
    q.add_argument(
        "--int8", action="store_true",
        help="quantise every stage to int8, calibrated on validation images, and fit the "
        "thresholds again on the quantised model (its scores differ from fp32)",
    )  # fmt: skip
    q.add_argument(
        "--calibration-images", type=int, default=512,
        help="validation images that calibrate the activation ranges (default: 512)",
    )  # fmt: skip
    q.add_argument(
        "--max-drop", type=float, default=0.005,
        help="threshold target: accuracy drop on validation vs the int8 last exit (default 0.005)",
    )  # fmt: skip
    q.add_argument(
        "--accuracy-budget", type=float, default=0.005,
        help="warn when any exit loses more test accuracy than this to int8 (default 0.005)",
    )  # fmt: skip
    _add_threads_arg(p)
    _add_trust_arg(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "predict", help="classify image files with early exit; one JSON line per image",
        description="Route image files (or every image in the folders given) through a checkpoint (PyTorch) "
        "or an export folder (ONNX Runtime). Each line: file, class, class_name, probability, exit, score "
        "(the rule's) and macs (spent on that image). Images are converted to the model's channels and, "
        "unless --no-resize, resized bilinearly to its input size. A bad file gives {file, error} and the "
        "others go on; the exit status is then 1.",
    )  # fmt: skip
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
    _add_threads_arg(p)
    _add_trust_arg(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "bench", help="measure full-network vs early-exit throughput on the checkpoint's test images",
        description="For each batch size: full-network and early-exit images/s (PyTorch per-sample routing, "
        "batch-level routing, ONNX Runtime), the measured speedup, the ideal speedup (full MACs / mean MACs "
        "spent) and their ratio. See benchmarks/inference.py for the full benchmark. It takes minutes: "
        "at the defaults it times 15 candidates (5 ways to serve x 3 batch sizes) of 512 images, each "
        "at least 5 times and 1 s; the digits student took 8 minutes on a 2-core CPU. It prints its "
        "own estimate first; fewer --batch-sizes, --images or --repeats make it shorter. Where early "
        "exit is slower than the full network at a batch size, it says so and which to serve.",
    )  # fmt: skip
    p.add_argument("checkpoint", help="checkpoint file (or folder holding checkpoint.pt)")
    _add_policy_args(p)
    d = p.add_argument_group("deployment table (--deploy): the student against its teacher")
    d.add_argument(
        "--deploy", action="store_true",
        help="rows teacher full fp32, student full fp32, student early exit fp32 (PyTorch, ONNX "
        "Runtime) and int8 (ONNX Runtime); accuracy, mean MACs, img/s, speedup over the teacher",
    )  # fmt: skip
    d.add_argument("--teacher", help="the teacher checkpoint the student is compared with")
    d.add_argument(
        "--max-drop", type=float, default=0.005,
        help="the student's thresholds: at most this accuracy drop on validation (default 0.005)",
    )  # fmt: skip
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
        "--channels-last", action=argparse.BooleanOptionalAction, default=True,
        help="run full network and early exit alike in NHWC (default: on; faster on CPU)",
    )  # fmt: skip
    p.add_argument(
        "--fold-bn", action=argparse.BooleanOptionalAction, default=True,
        help="run full network and early exit alike with BatchNorm folded into the convolutions "
        "(default: on; the inference graph erde predict routes through)",
    )  # fmt: skip
    p.add_argument(
        "--onnx",
        help="existing export folder of this model (default: export to a temporary folder)",
    )
    p.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    p.add_argument("--compile", action="store_true", help="torch.compile each stage")
    _add_threads_arg(p)
    p.add_argument("--json", help="write the records to this JSON file")
    _add_trust_arg(p)
    p.set_defaults(func=cmd_bench)
    return parser


# commands whose --out is a folder they write into: one writer at a time (see erde.outputs)
LOCKED_COMMANDS = ("train-teacher", "train-student", "evaluate", "export", "run", "reproduce")


def _writes_files() -> bool:
    """Under torchrun only rank 0 writes, so only rank 0 takes the output lock."""
    return os.environ.get("RANK", "0") == "0"


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as one ``erde: warning:`` line, like errors (no file and line of source)."""
    print(f"erde: warning: {message}", file=sys.stderr if file is None else file)


def _interrupted_message(args: argparse.Namespace) -> str:
    """What an interruption leaves: the last checkpoint if one was written, else nothing."""
    if args.command not in ("train-teacher", "train-student", "run", "reproduce"):
        return "erde: interrupted"
    default = f"runs/{args.dataset or 'digits'}" if args.command == "run" else None
    out = Path(getattr(args, "out", None) or default or ".")
    if out.is_dir() and any(out.rglob("checkpoint.pt")):
        return f"erde: interrupted; the last checkpoint in {out} is kept (use --resume)"
    return "erde: interrupted before the first checkpoint was written; nothing to resume"


def _run(args: argparse.Namespace) -> int:
    from erde.models.custom import trusted_modules

    func: Callable[[argparse.Namespace], int] = args.func
    with trusted_modules(_user_modules(args)):
        if args.command in LOCKED_COMMANDS and getattr(args, "out", None) is not None:
            return _locked(args, func)
        return func(args)


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # no stderr, or a closed one
        return False


MAX_MESSAGE = 2000  # characters of an error printed; a message quoting user input stays readable


def _bounded(exc: BaseException) -> str:
    """An error's message, cut: it may quote a value from a file of any size."""
    text = str(exc)
    if len(text) <= MAX_MESSAGE:
        return text
    return f"{text[:MAX_MESSAGE]}... ({len(text) - MAX_MESSAGE:,} more characters)"


def main(argv: Sequence[str] | None = None) -> int:
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    if "no_progress" in vars(args) and not _stderr_is_terminal():
        args.no_progress = True  # bars redrawn with \r are for a terminal; a log gets epoch lines
    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        if "threads" in vars(args):
            from erde.threads import set_threads

            set_threads(args.threads, "--threads")
        return _run(args)
    except ErdeError as exc:
        print(f"erde: error: {_bounded(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:  # thresholds out of range and similar argument errors
        print(f"erde: error: {_bounded(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`erde status DIR | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 141  # 128 + SIGPIPE, as a shell reports a tool stopped by a closed pipe
    except OSError as exc:  # a file system refusal not anticipated above: still one line
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"erde: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(_interrupted_message(args), file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


if __name__ == "__main__":
    sys.exit(main())
