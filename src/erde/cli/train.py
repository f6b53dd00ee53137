"""The training commands: train-teacher, train-student, run and reproduce."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from erde.cli.common import (
    EPILOG_CONFIG,
    RAW,
    add_command,
    add_config_args,
    add_trust_arg,
    build_config,
    locked,
    named_dataset,
)
from erde.config import ExperimentConfig
from erde.errors import ErdeError

if TYPE_CHECKING:
    from erde.training import EpochCallback


def _epoch_callback(args: argparse.Namespace) -> EpochCallback | None:
    """What training calls after each epoch: a console line without bars, TensorBoard files."""
    from erde.monitor import TensorBoardLogger, combine, epoch_line

    def console(_out_dir: Path, record: dict) -> None:
        print(epoch_line(record), flush=True)

    return combine(
        console if args.no_progress else None,
        TensorBoardLogger() if getattr(args, "tensorboard", False) else None,
    )


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from erde.api import train_teacher

    cfg = build_config(args)
    path = train_teacher(
        cfg,
        args.out,
        resume=args.resume,
        force=args.force,
        progress=not args.no_progress,
        allow_config_change=args.allow_config_change,
        on_epoch=_epoch_callback(args),
    )
    print(f"teacher checkpoint: {path}")
    return 0


def teacher_config(args: argparse.Namespace) -> dict | None:
    """The --teacher checkpoint's whole saved config, the base of the students' (data, student,
    student_train, distill: the released speed teacher brings the speed schedule), or None when
    there is no --teacher or the command line names a data set (--dataset, --config with
    data.name, --set data.name=): then the data set's preset is the base, as without --teacher.
    --config without a data set, --data-dir and --set are laid over it."""
    if not args.teacher or named_dataset(args) is not None:
        return None
    if any(o.split("=", 1)[0].strip() == "data.name" for o in args.overrides):
        return None
    from erde.checkpoints import load_checkpoint

    config = load_checkpoint(args.teacher).get("config") or {}
    return config if (config.get("data") or {}).get("name") else None


def origin_lines(cfg: ExperimentConfig, args: argparse.Namespace, base: dict) -> str:
    """What a student took from its teacher's config: ``data: imagefolder DIR from the
    teacher's checkpoint`` (naming what the command line set) and the recipe line."""
    own = {o.split("=", 1)[0].strip()[5:] for o in args.overrides if o.startswith("data.")}
    if args.data_dir:
        own.add("data_dir")
    own &= set(base.get("data") or {})
    where = f" {cfg.data.data_dir}" if cfg.data.data_dir else ""
    extra = f" ({', '.join(sorted(own))} from the command line)" if own else ""
    st = cfg.student
    recipe = (
        f"recipe: student {st.arch} x{st.width:g}, {cfg.student_train.epochs} epochs at lr "
        f"{cfg.student_train.lr:g}, from the teacher's config"
        + (f" with {args.config} over it" if args.config else "")
        + " (--dataset or a --config naming data.name for a preset's)"
    )
    return f"data: {cfg.data.name}{where} from the teacher's checkpoint{extra}\n{recipe}"


def cmd_train_student(args: argparse.Namespace) -> int:
    from erde.api import train_student

    base = teacher_config(args)
    cfg = build_config(args, fallback=base)
    if base:
        print(origin_lines(cfg, args, base), flush=True)
    method = args.method or cfg.distill.method
    path = train_student(
        cfg,
        args.out,
        method=method,
        teacher=args.teacher,
        resume=args.resume,
        force=args.force,
        progress=not args.no_progress,
        allow_config_change=args.allow_config_change,
        on_epoch=_epoch_callback(args),
    )
    print(f"student ({method}) checkpoint: {path}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    base = teacher_config(args)
    cfg = build_config(args, fallback=base)
    if base:
        print(origin_lines(cfg, args, base), flush=True)
    args.out = args.out or f"runs/{cfg.data.name}"
    return locked(args, lambda a: _run_pipeline(a, cfg))


def _students(text: str | None) -> list | None:
    """``--methods`` / ``--students`` text -> student specs (None: the config's students)."""
    if text is None:
        return None
    from erde.config import parse_students

    return parse_students(text)


def _students_override(text: str | None) -> list[str]:
    """``--students`` as a ``distill.students=[...]`` override (JSON is YAML), recorded as such."""
    specs = _students(text)
    if specs is None:
        return []
    rows = [{k: v for k, v in vars(s).items() if v is not None} for s in specs]
    return [f"distill.students={json.dumps(rows, separators=(',', ':'))}"]


def _run_pipeline(args: argparse.Namespace, cfg: ExperimentConfig) -> int:
    from erde.api import run

    paths = run(
        cfg,
        args.out,
        methods=_students(args.methods),
        resume=args.resume,
        force=args.force,
        progress=not args.no_progress,
        allow_config_change=args.allow_config_change,
        on_epoch=_epoch_callback(args),
        teacher=args.teacher,
    )
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
    if args.only_seeds is not None:  # each seed folder is locked instead of the whole --out
        return _reproduce(args)
    return locked(args, _reproduce)


def _seed_list(text: str | None) -> list[int] | None:
    """``"1,3"`` -> [1, 3] (None stays None); anything else is one line."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ErdeError(
            f"--only-seeds {text!r}: seed numbers separated by commas, e.g. 1,3"
        ) from None


def _reproduce(args: argparse.Namespace) -> int:
    from erde.errors import ReportError
    from erde.io import read_json
    from erde.report.html import MAX_REPORT_BYTES
    from erde.reproduce import reproduce, summary_lines

    flags = [f"seed={args.seed}"] if args.seed is not None else []
    flags += [f"device={args.device}"] if args.device else []
    paths = reproduce(
        args.dataset,
        args.out,
        data_dir=args.data_dir,
        seeds=args.seeds,
        teacher_seeds=args.teacher_seeds,
        schedule=args.schedule,
        config=args.config,
        overrides=[*flags, *_students_override(args.students), *args.overrides],
        download=args.download,
        docs_dir=args.docs,
        teacher=args.teacher,
        block=args.block,
        only_seeds=_seed_list(args.only_seeds),
        progress=not args.no_progress,
        log=print,
        on_epoch=_epoch_callback(args),
    )
    print()
    if args.only_seeds is not None:
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        print("to aggregate: the same command without --only-seeds (it reuses these seeds)")
        return 0
    results = read_json(
        paths["results"], max_bytes=MAX_REPORT_BYTES, error=ReportError, what="a results file"
    )
    for line in summary_lines(results):
        print(line)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


# --------------------------------------------------------------------------- parsers


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
        "--tensorboard",
        action="store_true",
        help="also write TensorBoard event files to <model folder>/tensorboard "
        '(needs pip install "erde[tb]")',
    )


def add_train_teacher(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "train-teacher",
        cmd_train_teacher,
        help="train an early-exit teacher on all exits",
        epilog=EPILOG_CONFIG,
        formatter_class=RAW,
        description="Train the teacher (section `teacher`, schedule `teacher_train`) with "
        "cross-entropy on every exit, L_T = sum_i w_i CE(z_i, y). Writes checkpoint.pt, "
        "config.yaml and metrics.jsonl to --out.",
    )
    add_config_args(p)
    _add_train_args(p)
    p.add_argument("--out", default="runs/teacher", help="output folder (default: runs/teacher)")


def add_train_student(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "train-student",
        cmd_train_student,
        help="train an early-exit student (ce, kd or erde)",
        epilog=EPILOG_CONFIG,
        formatter_class=RAW,
        description="Train the student (section `student`, schedule `student_train`) exit by "
        "exit. ce: labels only; kd: classic exit-wise distillation; erde: KL on images the "
        "teacher's exit gets right and an entropy loss on those it gets wrong (weights "
        "distill.alpha/beta/gamma, distill.temperature).",
    )
    add_config_args(p)
    _add_train_args(p)
    p.add_argument(
        "--method",
        help="a registered student method: ce, kd, erde or one registered with "
        "erde.losses.register_method (default: distill.method, erde)",
    )
    p.add_argument(
        "--teacher",
        help="teacher checkpoint (required for kd and erde); its saved config is the student's "
        "(data, student, student_train, distill), with --config, --data-dir and --set laid "
        "over it, unless --dataset, a --config naming data.name or --set data.name= choose a "
        "data set's preset instead",
    )
    add_trust_arg(p)
    p.add_argument("--out", default="runs/student", help="output folder (default: runs/student)")


def add_run(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "run",
        cmd_run,
        help="the whole pipeline: teacher, students (ce/kd/erde), evaluation, report",
        epilog=EPILOG_CONFIG,
        formatter_class=RAW,
        description="Train the teacher, then its students side by side (ce, kd and erde unless "
        "--students names others), then evaluate them all and write the report. With no "
        "argument: the embedded digits data set, about a minute on an idle 2-core CPU "
        "(docs/USAGE.md: what to expect, and what varies between machines).",
    )
    add_config_args(p)
    _add_train_args(p)
    p.add_argument(
        "--students",
        "--methods",
        dest="methods",
        metavar="STUDENTS",
        help="students to train side by side (as erde reproduce --students; --methods is "
        "the same option), comma-separated: "
        "a method (ce, kd, erde) or NAME=METHOD:key=value:... with its own alpha, beta, gamma, "
        "temperature or uncertain_above, e.g. 'kd,erde,erde_g2=erde:gamma=2' (default: "
        "distill.students, else ce,kd,erde)",
    )
    p.add_argument(
        "--teacher",
        metavar="DIR",
        help="a finished teacher's folder (checkpoint.pt, config.yaml; e.g. the released "
        "docs/results/cifar10-speed-teacher) to distil the students from instead of training "
        "one; copied into <out>/teacher. Its saved config is the students' (data and recipe: the "
        "released speed teacher brings the speed schedule), with --config, --data-dir and --set "
        "laid over it, unless --dataset, a --config naming data.name or --set data.name= choose "
        "a data set's preset instead",
    )
    p.add_argument("--out", help="output folder (default: runs/<dataset>)")


def add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub,
        "reproduce",
        cmd_reproduce,
        help="the paper's comparison over several seeds: table, plot, MAC reduction",
        epilog=EPILOG_CONFIG + "\nWith reproduce: preset < --schedule overlay < --config < --set. "
        "--seed is the first seed (default 0).",
        formatter_class=RAW,
        description="For each seed, train the teacher and the ce/kd/erde students side by side "
        "(finished runs in --out are reused, interrupted ones resumed) and evaluate them on a "
        "fixed threshold grid; then write results.json, results.md (accuracy mean ± std over "
        "seeds and mean MACs per threshold, MAC reduction at equal accuracy and for 0.5-5 points "
        "given up, ERDE vs KD at each threshold and at equal MACs with 95 % intervals, and once "
        "over the whole accuracy-MACs curve, what the entropy term changed against KD, "
        "anchors), records.npz (every model's per-image records, from which `erde verify` "
        "re-derives the tables), tradeoff.png (with spread bands), difference.png (each "
        "student minus KD, per threshold and along the MAC axis) and training.png (validation "
        "accuracy per exit after each epoch, mean over seeds). "
        "--dataset cifar10 also reads an ImageFolder copy (train/<class>/*.jpg, "
        "test/<class>/*.jpg, folder or .tar.gz).",
    )
    add_config_args(p)
    p.add_argument("--seeds", type=int, default=3, help="number of student seeds (default: 3)")
    p.add_argument(
        "--teacher-seeds",
        type=int,
        metavar="N",
        help="train N teachers (1 <= N <= --seeds) and let the student seeds share them in turn, "
        "as KD papers do (default: one teacher per seed). Shared-teacher students use their "
        "teacher's validation split",
    )
    p.add_argument(
        "--schedule",
        choices=("full", "reduced", "fast", "speed"),
        default="full",
        help="full: the preset (GPU, 200 epochs); fast: a few tens of epochs for a teacher near "
        "its trained accuracy (hours per seed on a 2-core CPU); reduced: 7 epochs, about an hour "
        "per seed on a 2-core CPU; speed: the fastnet family (CIFAR-10 only) with the fast-CIFAR "
        "recipe (batch 1024, look-ahead, whitened stem), 16 epochs",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch the official files into --data-dir first (MD5-checked; mirror: env "
        "ERDE_DOWNLOAD_URL)",
    )
    p.add_argument(
        "--docs",
        metavar="DIR",
        help="also publish into DIR: results/<dataset>-<schedule>.json, .png and -training.png, "
        "the per-image records (-records.npz), the finished seeds' reports and training logs "
        "(-seeds.json.gz) and the block of that name in DIR/RESULTS.md; after every finished "
        "seed, marked partial until the last. Seeds that block already holds are restored "
        "from those files into --out instead of being trained again, so a block continues "
        "on another machine",
    )
    p.add_argument(
        "--block",
        metavar="NAME",
        help="with --docs: publish as results/NAME.json and the block NAME of RESULTS.md "
        "instead of the name made of data set, schedule and models; for another design of "
        "the same models (e.g. --teacher-seeds 3 beside a one-teacher block), which would "
        "otherwise replace the published one",
    )
    p.add_argument(
        "--teacher",
        metavar="DIR",
        help="a released teacher folder (checkpoint.pt, config.yaml; "
        "e.g. docs/results/cifar10-speed-teacher) used as the first seed's teacher instead of "
        "training one: with --teacher-seeds 1 every seed shares it (how seeds are added to a "
        "published block on another machine), with more the other teachers are trained",
    )
    p.add_argument(
        "--students",
        metavar="STUDENTS",
        help="the students of every seed, comma-separated, "
        "trained side by side on the same batches with one teacher forward: a method (ce, kd, "
        "erde) or NAME=METHOD:key=value:... with its own alpha, beta, gamma, temperature or "
        "uncertain_above, e.g. 'ce,kd,erde,erde_g0.5=erde:gamma=0.5,erde_g2=erde:gamma=2' "
        "(default: ce,kd,erde). Each student beyond those three is compared with KD and ERDE",
    )
    p.add_argument(
        "--only-seeds",
        metavar="S[,S...]",
        help="train and evaluate only these seeds of the plan (--seed, --seeds, --teacher-seeds), "
        "without aggregating: one process per core or GPU, each with its own seeds, fill one "
        "--out side by side; the same command without --only-seeds then aggregates what they "
        "finished (and publishes it with --docs). A seed that shares another seed's teacher "
        "needs that teacher finished first, or --teacher",
    )
    p.add_argument("--out", help="output folder (default: runs/reproduce/<dataset>-<schedule>)")
