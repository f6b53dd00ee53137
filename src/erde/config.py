"""Typed configuration: dataclasses loaded from YAML and overridable from the CLI.

One ``ExperimentConfig`` describes a whole experiment (data, teacher, student,
their training, distillation and evaluation); every command reads the parts it
needs, and the whole thing is saved next to every checkpoint and report.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from erde.errors import ConfigError
from erde.limits import MAX_HEAD_HIDDEN, MAX_HEAD_POOL, MAX_IMAGE_SIDE, MAX_WIDTH

MAX_YAML_BYTES = 1 << 20  # configs are a few kB; refuse anything huge
MAX_YAML_NODES = 100_000  # values in a config with its aliases expanded; real ones have hundreds
MAX_LR = 10.0  # learning rates in use are 1e-4 ... 1; far above, every step diverges
MAX_SEED = 2**32 - 1  # numpy and torch both accept seeds in [0, 2**32)
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | cifar100 | svhn | imagefolder
    data_dir: str | None = None  # folder holding the official files (not needed for digits)
    image_size: int | None = (
        None  # resize side in pixels; None = the data set's native size (digits: 16)
    )
    val_fraction: float = 0.1  # share of train held out for validation/calibration (never test)
    max_train: int | None = None  # keep at most this many training images (quick runs)
    split_seed: int | None = None  # seeds the validation split and max_train subset; None = seed
    batch_size: int = 128  # training batch size (per process)
    crop_padding: int | None = None  # random-translation padding in pixels; None = the data set's
    alternating_flip: bool = False  # mirror each image every other epoch instead of at random
    eval_batch_size: int = 512  # batch size for validation/test passes


@dataclass
class ModelConfig:
    arch: str = "resnet20"  # resnet<6n+2>, wrn<6n+4>_<k>, mobilenetv2[_x<m>], vgg<11|13|16|19>_bn, or package.module:factory
    width: float = 1.0  # channel width multiplier
    exit_after: list[int] | None = (
        None  # block counts after which early exits sit; None = evenly spaced
    )
    exit_at_macs: list[float] | None = (
        None  # instead of exit_after: fractions of the backbone's MACs, e.g. [0.15, 0.3, 0.5]
    )
    num_early_exits: int | None = (
        None  # with exit_after None: how many early exits (default 2 or 3 by depth)
    )
    head_pool: int = 2  # exit head: adaptive average pool to head_pool x head_pool
    head_dropout: float = 0.5  # exit head dropout probability
    head_hidden: int = 0  # exit head hidden FC width; 0 = a single FC layer as in the paper
    dropout: float = (
        0.0  # dropout inside WideResNet blocks; before the last layer of MobileNetV2/VGG
    )


@dataclass
class TrainConfig:
    epochs: int = 30  # passes over the training set
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD momentum (AdamW beta1)
    nesterov: bool = True  # Nesterov momentum for SGD
    weight_decay: float = 5e-4  # L2 weight decay (decoupled for AdamW)
    schedule: str = "cosine"  # cosine | linear | constant (per step, after warmup; to zero)
    warmup_epochs: float = 0.0  # linear warm-up length in epochs
    exit_weights: list[float] | None = None  # loss weight per exit; None = 1 for every exit
    label_smoothing: float = 0.0  # on the cross-entropy with labels (0 = off; not the KD targets)
    amp: bool | None = None  # bf16 autocast; None = on for CUDA and CPUs with bf16 hardware
    channels_last: bool = False  # NHWC memory format (faster convs on recent GPUs)
    compile: bool = False  # torch.compile the model
    whiten_init: bool = False  # set data-initialised layers (fastnet's stem) from training patches
    lookahead: bool = False  # pull the weights to their moving average every 5 steps (erde.recipe)
    norm_bias_lr_scale: float = 1.0  # BatchNorm biases learn at this multiple of lr (airbench: 64)
    checkpoint_every_steps: int = 0  # also checkpoint every N optimizer steps; 0 = once per epoch
    max_steps_per_epoch: int | None = None  # cut epochs short (smoke tests)


DEFAULT_STUDENTS = ("ce", "kd", "erde")  # the students of a run when distill.students is None
STUDENT_METHODS = DEFAULT_STUDENTS  # (older name)


def registered_rules() -> tuple[str, ...]:
    """Names of the exit rules registered in :mod:`erde.exits` (imported on first use)."""
    from erde.exits import RULES

    return tuple(RULES)


def registered_methods() -> tuple[str, ...]:
    """Names of the student methods registered in :mod:`erde.losses` (imported on first use:
    the config module itself stays free of torch, so ``--help`` answers at once)."""
    from erde.losses import METHODS

    return tuple(METHODS)


SPEC_SETTINGS = ("alpha", "beta", "gamma", "temperature", "uncertain_above")  # a spec may set these
MAX_STUDENTS = 32  # side by side in one loop: each holds a model and an optimizer in memory
_SPEC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class StudentSpec:
    """One student of a side-by-side run: a name, its method and the loss settings it changes.

    Settings left at None are ``distill``'s. The student trains into ``student_<name>``;
    e.g. ``StudentSpec("erde_g2", "erde", gamma=2.0)`` next to the default three makes a
    gamma ablation one loop with one teacher forward per batch.
    """

    name: str = "erde"  # folder student_<name> and the report's model name
    method: str = "erde"  # ce | kd | erde
    alpha: float | None = None
    beta: float | None = None
    gamma: float | None = None
    temperature: float | None = None
    uncertain_above: float | None = None  # sets the "uncertain or incorrect" mask (cannot unset it)

    def settings(self) -> dict[str, float]:
        """The loss settings this student changes: ``{field: value}`` for those not None."""
        return {k: getattr(self, k) for k in SPEC_SETTINGS if getattr(self, k) is not None}


@dataclass
class DistillConfig:
    method: str = "erde"  # a registered method: ce | kd | erde | yours (train-student's)
    alpha: float = 1.0  # weight of cross-entropy on labels
    beta: float = 1.0  # weight of the KL distillation term
    gamma: float = 1.0  # weight of the entropy term (erde only)
    temperature: float = 4.0  # KD temperature tau
    exit_mapping: list[int] | None = (
        None  # teacher exit for each student exit; None = by exit_mapping_by
    )
    teacher_amp: bool | None = None  # teacher forward in bf16; None = as student_train.amp
    exit_mapping_by: str = "depth"  # depth (exit index) | cost (share of MACs): for other families
    # erde: a teacher exit that is right but unsure (normalised entropy H / log K above this) also
    # gets the entropy term instead of KL, the "uncertain or incorrect" reading; None = incorrect only
    uncertain_above: float | None = None
    # the students trained side by side by `erde run` / `erde reproduce`; None = ce, kd and erde
    students: list[StudentSpec] | None = None


def student_specs(d: DistillConfig) -> list[StudentSpec]:
    """The students of a side-by-side run (``d.students``, or one per method by default)."""
    if d.students is None:
        return [StudentSpec(m, m) for m in DEFAULT_STUDENTS]
    return list(d.students)


def spec_distill(d: DistillConfig, spec: StudentSpec) -> DistillConfig:
    """``d`` as the student of ``spec`` trains with it: its method and its own settings."""
    return dataclasses.replace(d, method=spec.method, students=None, **spec.settings())


def parse_student(text: str) -> StudentSpec:
    """``NAME[=METHOD][:key=value]...`` -> StudentSpec, e.g. ``erde_g2=erde:gamma=2`` or ``kd``.

    Without ``=METHOD`` the name is the method. Keys: alpha, beta, gamma, temperature,
    uncertain_above.
    """
    head, *pairs = text.strip().split(":")
    name, sep, method = head.partition("=")
    fields: dict[str, Any] = {"name": name.strip(), "method": (method if sep else name).strip()}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or key not in SPEC_SETTINGS:
            raise ConfigError(
                f"student {text!r}: {pair!r} must be key=value with key one of "
                f"{', '.join(SPEC_SETTINGS)}"
            )
        if key in fields:
            raise ConfigError(f"student {text!r}: {key} given twice")
        try:
            fields[key] = float(value)
        except ValueError:
            raise ConfigError(f"student {text!r}: {key} must be a number, got {value!r}") from None
    return StudentSpec(**fields)


def parse_students(text: str) -> list[StudentSpec]:
    """A comma-separated list of :func:`parse_student` items, checked as a whole."""
    specs = [parse_student(item) for item in text.split(",") if item.strip()]
    check_students(specs)
    return specs


def check_students(specs: list[StudentSpec]) -> None:
    """Known methods, folder-safe unique names, settings in their ranges: one line per problem."""
    _check(len(specs) >= 1, "distill.students: name at least one student")
    _check(
        len(specs) <= MAX_STUDENTS,
        f"distill.students: at most {MAX_STUDENTS} students side by side, got {len(specs)}",
    )
    names = [s.name for s in specs]
    for spec in specs:
        _check(
            isinstance(spec.name, str) and _SPEC_NAME.fullmatch(spec.name) is not None,
            f"distill.students: name {str(spec.name)[:80]!r} must be 1-64 letters, digits, _ . - "
            "(it names a folder)",
        )
        _check(
            spec.method in registered_methods(),
            f"distill.students: {spec.name} has unknown method {str(spec.method)[:40]!r}; valid: "
            f"{', '.join(registered_methods())}",
        )
    dupes = sorted({n for n in names if names.count(n) > 1})
    _check(not dupes, f"distill.students: each name once, {', '.join(dupes)} given twice")
    for spec in specs:
        for key, v in spec.settings().items():
            ok = v > 0 if key == "temperature" else v >= 0
            if key == "uncertain_above":
                ok = 0 < v < 1
            _check(
                ok and math.isfinite(v), f"distill.students: {spec.name}.{key} out of range: {v}"
            )


@dataclass
class EvalConfig:
    num_thresholds: int = 41  # grid size of the threshold sweep
    rules: list[str] = field(default_factory=lambda: ["entropy", "max_softmax"])  # exit rules swept
    tolerance: float = 0.005  # accuracy drop allowed for "equal accuracy" (0.005 = 0.5 points)


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=ModelConfig)
    student: ModelConfig = field(default_factory=lambda: ModelConfig(arch="resnet8"))
    teacher_train: TrainConfig = field(default_factory=TrainConfig)
    student_train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0  # seeds data split, initialisation and augmentation
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- loading and validation ----------------------------------------------------------------


# PyYAML follows YAML 1.1, where "1e-3" (no dot) is a string; accept it for float fields.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _show(value: Any, limit: int = 80) -> str:
    """``repr`` cut to ``limit`` characters: an error names a value, it does not print it all."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text):,} characters)"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int/float/bool/str, lists, optionals, dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {_show(value)}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{where}: unsupported type {tp}")
    raise ConfigError(
        f"{where}: expected {_type_name(tp)}, got {_show(value)} ({type(value).__name__})"
    )


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {_show(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + (k if isinstance(k, str) and len(k) <= 60 else _show(k)) for k in unknown[:10])}"
            f"{', ...' if len(unknown) > 10 else ''}; "
            f"valid keys{' of ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _field_type(parts: list[str]) -> Any:
    """Annotation of the config field at ``parts`` (``["data", "data_dir"]``), or None."""
    tp: Any = ExperimentConfig
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def _is_text_field(tp: Any) -> bool:
    """``str`` or ``str | None``: values are taken verbatim, not parsed as YAML."""
    if tp is str:
        return True
    args = set(typing.get_args(tp)) if typing.get_origin(tp) in (Union, types.UnionType) else ()
    return args == {str, type(None)}


def parse_override(text: str) -> dict[str, Any]:
    """``"student_train.epochs=5"`` -> ``{"student_train": {"epochs": 5}}``.

    Values are parsed as YAML, except for text fields (paths, names), which keep the
    text as written so that ``data.data_dir=2024`` or ``data.data_dir=/data/run #2`` are
    paths rather than a number or a truncated comment; ``null`` (or nothing) still
    means None and a quoted value is unquoted.
    """
    key, sep, raw = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(parts):
        raise ConfigError(f"override {_show(text)} must look like section.key=value")
    raw = raw.strip()
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if _is_text_field(_field_type(parts)) and not quoted and raw not in ("", "null", "~"):
        value: Any = raw
    else:
        try:
            value = _safe_load(raw) if raw else None
        except (yaml.YAMLError, ConfigError) as exc:
            raise ConfigError(f"override {_show(text)}: cannot parse value: {exc}") from None
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a (possibly partial) nested dict over the defaults."""
    merged = _merge(ExperimentConfig().to_dict(), data or {})
    cfg = _from_dict(ExperimentConfig, merged, "")
    validate(cfg)
    return cfg


def explicit_split_seed(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict with ``data.split_seed`` set to the seed it stands for.

    ``split_seed: null`` means "the run's seed", so a seed-0 run saved with null and a run asked
    for with ``split_seed: 0`` hold out the same images: comparisons of settings (reuse, resume)
    must see them as equal.
    """
    data = dict(config.get("data") or {})
    if data.get("split_seed") is None:
        data["split_seed"] = config.get("seed")
    return {**config, "data": data}


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses a key given twice in one mapping (YAML lets the last win)
    and a document whose aliases expand to more than :data:`MAX_YAML_NODES` nodes.

    Aliases share one Python object, so loading such a document is cheap, but anything
    that walks the value (type checks, an error message printing it) pays for every
    expanded copy: a few hundred bytes of nested aliases stand for billions of nodes.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _check_expanded_size(node)
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise ConfigError(
                    f"duplicate key {_show(key)} at line {line} (first at line {seen[key]}); "
                    "give each key once"
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node) -> None:
    """Count the nodes ``root`` stands for with every alias expanded, stopping at the budget."""
    sizes: dict[int, int] = {}  # node id -> expanded size; each distinct node is counted once

    def size(node: yaml.Node, open_: set[int]) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise ConfigError(f"line {node.start_mark.line + 1}: an alias refers to itself")
        open_.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total += size(child, open_)
            if total > MAX_YAML_NODES:
                raise ConfigError(
                    f"aliases expand to more than {MAX_YAML_NODES:,} values (from line "
                    f"{node.start_mark.line + 1}); a config needs a few hundred"
                )
        open_.discard(key)
        sizes[key] = total
        return total

    size(root, set())


def _safe_load(text: str) -> Any:
    """Safe YAML with unique keys; nesting too deep to parse is a YAML error like any other."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise yaml.YAMLError("nested too deeply") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise ConfigError(f"{path} is too large to be a config file (over {MAX_YAML_BYTES} bytes)")
    try:
        data = _safe_load(path.read_text(encoding="utf-8"))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def preset_path(name: str) -> Path:
    """A config shipped with the package, e.g. ``digits`` -> ``erde/configs/digits.yaml``."""
    return Path(__file__).parent / "configs" / f"{name}.yaml"


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    base: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Defaults < ``base`` < YAML file < ``section.key=value`` overrides, validated."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data = _merge(data, load_yaml(path))
    for text in overrides:
        data = _merge(data, parse_override(text))
    return config_from_dict(data)


def save_config(cfg: ExperimentConfig, path: str | Path) -> None:
    from erde.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: ExperimentConfig) -> None:
    """Range checks that types alone cannot express; one clear message per problem."""
    d = cfg.distill
    for name in ("alpha", "beta", "gamma"):
        v = getattr(d, name)
        _check(v >= 0 and math.isfinite(v), f"distill.{name} must be >= 0 and finite, got {v}")
    _check(
        d.temperature > 0 and math.isfinite(d.temperature),
        f"distill.temperature must be > 0 and finite, got {d.temperature}",
    )
    if d.exit_mapping is not None:
        _check(all(m >= 0 for m in d.exit_mapping), "distill.exit_mapping must be >= 0")
    _check(
        d.method in registered_methods(),
        f"distill.method must be a registered method ({', '.join(registered_methods())}), "
        f"got {_show(d.method)}",
    )
    if d.students is not None:
        check_students(d.students)
    _check(
        d.exit_mapping_by in ("depth", "cost"),
        f"distill.exit_mapping_by must be depth or cost, got {_show(d.exit_mapping_by)}",
    )
    _check(
        d.uncertain_above is None or 0 < d.uncertain_above < 1,
        "distill.uncertain_above must be null (mistakes only) or a normalised entropy in (0, 1), "
        f"got {d.uncertain_above}",
    )
    _check(
        0 <= cfg.data.val_fraction < 1,
        f"data.val_fraction must be in [0, 1), got {cfg.data.val_fraction}",
    )
    for name in ("image_size", "max_train"):
        v = getattr(cfg.data, name)
        _check(v is None or v >= 1, f"data.{name} must be >= 1 (or null), got {v}")
    _check(
        cfg.data.split_seed is None or 0 <= cfg.data.split_seed <= MAX_SEED,
        f"data.split_seed must be in [0, {MAX_SEED}] (or null), got {cfg.data.split_seed}",
    )
    _check(
        cfg.data.image_size is None or cfg.data.image_size <= MAX_IMAGE_SIDE,
        f"data.image_size must be <= {MAX_IMAGE_SIDE}, got {cfg.data.image_size}",
    )
    _check(0 <= cfg.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}], got {cfg.seed}")
    _check(
        _DEVICE.fullmatch(cfg.device) is not None,
        f"device must be auto, cpu, mps, cuda or cuda:N, got {_show(cfg.device)}",
    )
    _check(cfg.data.batch_size >= 1, "data.batch_size must be >= 1")
    _check(
        cfg.data.crop_padding is None or 0 <= cfg.data.crop_padding <= 64,
        f"data.crop_padding must be in [0, 64] pixels (or null), got {cfg.data.crop_padding}",
    )
    _check(cfg.data.eval_batch_size >= 1, "data.eval_batch_size must be >= 1")
    for section in ("teacher_train", "student_train"):
        t: TrainConfig = getattr(cfg, section)
        _check(t.epochs >= 1, f"{section}.epochs must be >= 1, got {t.epochs}")
        _check(
            0 < t.lr <= MAX_LR,  # False for nan; inf and 1e308 overflow the optimiser's update
            f"{section}.lr must be in (0, {MAX_LR:g}], got {t.lr}",
        )
        _check(0 <= t.momentum < 1, f"{section}.momentum must be in [0, 1), got {t.momentum}")
        _check(t.checkpoint_every_steps >= 0, f"{section}.checkpoint_every_steps must be >= 0")
        _check(
            0 < t.norm_bias_lr_scale <= 1000 and math.isfinite(t.norm_bias_lr_scale),
            f"{section}.norm_bias_lr_scale must be in (0, 1000], got {t.norm_bias_lr_scale}",
        )
        _check(
            t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1,
            f"{section}.max_steps_per_epoch must be >= 1 (or null), got {t.max_steps_per_epoch}",
        )
        _check(
            t.weight_decay >= 0 and math.isfinite(t.weight_decay),
            f"{section}.weight_decay must be >= 0 and finite",
        )
        _check(
            t.optimizer in ("sgd", "adamw"),
            f"{section}.optimizer must be sgd or adamw, got {_show(t.optimizer)}",
        )
        _check(
            t.schedule in ("cosine", "linear", "constant"),
            f"{section}.schedule must be cosine, linear or constant, got {_show(t.schedule)}",
        )
        _check(
            0 <= t.label_smoothing < 1,
            f"{section}.label_smoothing must be in [0, 1), got {t.label_smoothing}",
        )
        _check(
            t.warmup_epochs >= 0 and math.isfinite(t.warmup_epochs),
            f"{section}.warmup_epochs must be >= 0 and finite, got {t.warmup_epochs}",
        )
        if t.exit_weights is not None:
            _check(
                all(w >= 0 and math.isfinite(w) for w in t.exit_weights),
                f"{section}.exit_weights must be >= 0 and finite",
            )
            _check(
                sum(t.exit_weights) > 0,
                f"{section}.exit_weights are all 0: no exit would be trained",
            )
    for section in ("teacher", "student"):
        m: ModelConfig = getattr(cfg, section)
        _check(
            0 < m.width <= MAX_WIDTH and math.isfinite(m.width),
            f"{section}.width must be in (0, {MAX_WIDTH:g}], got {m.width}",
        )
        _check(0 <= m.head_dropout < 1, f"{section}.head_dropout must be in [0, 1)")
        _check(
            1 <= m.head_pool <= MAX_HEAD_POOL,
            f"{section}.head_pool must be in [1, {MAX_HEAD_POOL}], got {m.head_pool}",
        )
        _check(
            0 <= m.head_hidden <= MAX_HEAD_HIDDEN,
            f"{section}.head_hidden must be in [0, {MAX_HEAD_HIDDEN}], got {m.head_hidden}",
        )
        _check(0 <= m.dropout < 1, f"{section}.dropout must be in [0, 1)")
        _check(
            m.num_early_exits is None or m.num_early_exits >= 0,
            f"{section}.num_early_exits must be >= 0",
        )
        if m.exit_after is not None:
            _check(all(b >= 1 for b in m.exit_after), f"{section}.exit_after values must be >= 1")
        if m.exit_at_macs is not None:
            _check_exit_at_macs(section, m)
    e = cfg.evaluation
    _check(e.num_thresholds >= 2, "evaluation.num_thresholds must be >= 2")
    _check(0 <= e.tolerance < 1, "evaluation.tolerance must be in [0, 1)")
    _check(len(e.rules) >= 1, "evaluation.rules must name at least one rule")
    for rule in e.rules:
        _check(
            rule in registered_rules(),
            f"evaluation.rules: unknown rule {_show(rule)} ({', '.join(registered_rules())})",
        )


def _check_exit_at_macs(section: str, m: ModelConfig) -> None:
    """Fractions in (0, 1), increasing, and not mixed with exit_after: caught before any training."""
    values = m.exit_at_macs or []
    _check(
        m.exit_after is None,
        f"{section}: give exit_after or exit_at_macs, not both (exit_after={m.exit_after}, "
        f"exit_at_macs={values})",
    )
    _check(
        all(0 < f < 1 for f in values),
        f"{section}.exit_at_macs values must be fractions of the backbone's MACs in (0, 1), "
        f"got {values}",
    )
    _check(
        all(a < b for a, b in itertools.pairwise(values)),
        f"{section}.exit_at_macs must be strictly increasing, got {values}",
    )
