"""What several commands share: the configuration options and how they become a config,
the thread and trust options, comma-separated numbers, and the output lock."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from erde.config import ExperimentConfig, load_config, load_yaml, preset_path
from erde.errors import ErdeError
from erde.threads import DEFAULT_MAX_THREADS, ENV_VAR

EPILOG_CONFIG = """\
configuration: defaults < preset for --dataset (erde/configs/<name>.yaml) < --config FILE
< --set section.key=value (repeatable), e.g. --set teacher.arch=resnet56 --set student_train.epochs=5.
Sections: data, teacher, student, teacher_train, student_train, distill, evaluation, seed, device.
The config actually used is saved as config.yaml next to every checkpoint and report."""

CHECKPOINT_HELP = "checkpoint file (or folder holding checkpoint.pt)"
RAW = argparse.RawDescriptionHelpFormatter  # descriptions and epilogs printed as written
Command = Callable[[argparse.Namespace], int]


def add_command(
    sub: argparse._SubParsersAction,
    name: str,
    func: Command,
    *,
    help: str,
    description: str,
    epilog: str | None = None,
    formatter_class: type[argparse.HelpFormatter] = argparse.HelpFormatter,
) -> argparse.ArgumentParser:
    """The parser of the command ``name``, which ``main`` answers by calling ``func(args)``."""
    p = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=formatter_class,
    )
    p.set_defaults(func=func)
    return p


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


def add_config_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and configuration")
    g.add_argument(
        "--dataset", help="digits (default, embedded), cifar10, cifar100, svhn or imagefolder"
    )
    g.add_argument("--data-dir", help="folder holding the data set's official files")
    g.add_argument("--config", help="YAML file with any subset of the config sections")
    g.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config value, e.g. distill.gamma=0.5 (repeatable)",
    )
    g.add_argument("--seed", type=_seed, help="random seed (split, init, augmentation)")
    g.add_argument("--device", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument(
        "--no-progress",
        action="store_true",
        help="hide progress bars (shown only when stderr is a terminal); without them the "
        "training commands print a line per epoch",
    )
    add_threads_arg(g)


def add_threads_arg(g: argparse._ActionsContainer) -> None:
    g.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"CPU threads for PyTorch (default: ${ENV_VAR}, else $OMP_NUM_THREADS, else the idle "
        f"cores, at most {DEFAULT_MAX_THREADS}; 1 is fastest for small models on a busy machine)",
    )


def _module_name(text: str) -> str:
    """argparse type of --trust-module: a dotted Python module name."""
    import re

    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", text):
        raise argparse.ArgumentTypeError(
            f"must be a module name like mypackage.models, got {text!r}"
        )
    return text


def add_trust_arg(p: argparse._ActionsContainer) -> None:
    p.add_argument(
        "--trust-module",
        dest="trust_modules",
        action="append",
        default=[],
        type=_module_name,
        metavar="MODULE",
        help="let checkpoints of your own network import MODULE (and its submodules) to rebuild "
        "it (repeatable); modules named by the arch of --config or --set are trusted already. "
        "Without it a checkpoint naming a module:factory is refused: importing runs code",
    )


def user_modules(args: argparse.Namespace) -> list[str]:
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


def named_dataset(args: argparse.Namespace) -> str | None:
    """The data set the command line names: --dataset, else the data.name of --config."""
    if args.dataset is None and args.config:
        return (load_yaml(args.config).get("data") or {}).get("name")
    return args.dataset


def build_config(args: argparse.Namespace, fallback: dict | None = None) -> ExperimentConfig:
    """Preset for the data set, then --config, then explicit flags and --set overrides.

    ``fallback`` (a checkpoint's own config: evaluate's and calibrate's model, the --teacher
    of train-student and run, :func:`erde.cli.train.teacher_config`) replaces the preset when
    neither --dataset nor --config names a data set.
    """
    dataset = named_dataset(args)
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
    cfg = load_config(args.config, [*overrides, *args.overrides], base=base)
    from erde.data.layout import cifar10_copy_loader  # imports torch: not at --help time

    loader = cifar10_copy_loader(cfg.data.name, cfg.data.data_dir)
    if loader != cfg.data.name:  # the JPEG ImageFolder copy of CIFAR-10, as erde reproduce reads it
        print(f"{cfg.data.data_dir}: {cfg.data.name} in {loader} layout, read with the {loader} "
              "loader", file=sys.stderr)  # fmt: skip
        cfg.data.name = loader
    return cfg


def parse_numbers(text: str | None, option: str) -> list[float] | None:
    """``option``'s comma-separated numbers (e.g. --thresholds, --budgets), or None without it."""
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ErdeError(f"{option} must be comma-separated numbers, got {text!r}") from None


def writes_files() -> bool:
    """Under torchrun only rank 0 writes, so only rank 0 takes the output lock."""
    return os.environ.get("RANK", "0") == "0"


def locked(args: argparse.Namespace, func: Command) -> int:
    """``func(args)`` as the one writer of the folder ``args.out`` (see erde.outputs)."""
    from erde.outputs import output_lock

    with output_lock(args.out, enabled=writes_files()):
        return func(args)
