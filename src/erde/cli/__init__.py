"""Command line: parses arguments, calls the library, prints. Nothing else lives here.

One module per group of commands, each holding its commands' parsers and ``cmd_*``
functions: :mod:`erde.cli.train` (train-teacher, train-student, run, reproduce),
:mod:`erde.cli.evaluate` (evaluate, calibrate, report-html, status, verify) and
:mod:`erde.cli.deploy` (release, export, predict, bench); :mod:`erde.cli.common` holds
the options they share. Here: the top-level parser and :func:`main`, which turns
errors, interruptions and warnings into one line each.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from erde import __version__
from erde.cli import deploy, evaluate, train
from erde.cli.common import Command, build_config, locked, user_modules
from erde.errors import ErdeError

__all__ = ["build_config", "build_parser", "guarded", "main"]

# each command's parser, in the order `erde --help` lists them
PARSERS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    train.add_train_teacher,
    train.add_train_student,
    evaluate.add_evaluate,
    train.add_run,
    train.add_reproduce,
    evaluate.add_calibrate,
    evaluate.add_report_html,
    evaluate.add_status,
    deploy.add_release,
    evaluate.add_verify,
    deploy.add_export,
    deploy.add_predict,
    deploy.add_bench,
)


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
    for add_parser in PARSERS:
        add_parser(sub)
    return parser


# commands whose --out is a folder they write into: one writer at a time (see erde.outputs)
LOCKED_COMMANDS = ("train-teacher", "train-student", "evaluate", "export", "run", "reproduce")


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

    func: Command = args.func
    with trusted_modules(user_modules(args)):
        # reproduce --only-seeds locks each seed folder it trains, not the --out they share
        one_writer = getattr(args, "only_seeds", None) is None
        if (
            args.command in LOCKED_COMMANDS
            and getattr(args, "out", None) is not None
            and one_writer
        ):
            return locked(args, func)
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


def guarded(
    run: Callable[[], int | None],
    prog: str = "erde",
    interrupted: Callable[[], str] | None = None,
) -> int | None:
    """Call ``run`` and turn what it raises into one ``PROG: error:`` line and an exit status.

    Shared by :func:`main` and the scripts under ``benchmarks/``, so that a missing
    checkpoint or a bad file reads the same everywhere: one line, status 2, no traceback.
    Warnings print as one line each while ``run`` runs. ``interrupted`` words Ctrl-C.
    """
    import warnings

    shown, warnings.showwarning = warnings.showwarning, _one_line_warning
    try:
        return run()
    except (ErdeError, ValueError) as exc:  # ValueError: thresholds out of range and similar
        print(f"{prog}: error: {_bounded(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`erde status DIR | head -1`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 141  # 128 + SIGPIPE, as a shell reports a tool stopped by a closed pipe
    except OSError as exc:  # a file system refusal not anticipated above: still one line
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{prog}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(interrupted() if interrupted else f"{prog}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


def main(argv: Sequence[str] | None = None) -> int | None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "no_progress" in vars(args) and not _stderr_is_terminal():
        args.no_progress = True  # bars redrawn with \r are for a terminal; a log gets epoch lines

    def run() -> int:
        if "threads" in vars(args):
            from erde.threads import set_threads

            set_threads(args.threads, "--threads")
        return _run(args)

    return guarded(run, interrupted=lambda: _interrupted_message(args))
