"""Loading a configuration: YAML files (bounded, no duplicate keys), presets, ``--set`` overrides.

Defaults < base < YAML file < ``section.key=value`` overrides; values are
coerced to the dataclass field types, then :func:`erde.config.validation.validate`
checks their ranges.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from erde.config.schema import ExperimentConfig
from erde.config.validation import show_value, validate
from erde.errors import ConfigError

MAX_YAML_BYTES = 1 << 20  # configs are a few kB; refuse anything huge
MAX_YAML_NODES = 100_000  # values in a config with its aliases expanded; real ones have hundreds

# --- loading and validation ----------------------------------------------------------------


# PyYAML follows YAML 1.1, where "1e-3" (no dot) is a string; accept it for float fields.
_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


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
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {show_value(value)}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {show_value(value)}")
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
        f"{where}: expected {_type_name(tp)}, got {show_value(value)} ({type(value).__name__})"
    )


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {show_value(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key(s) {', '.join(prefix + (k if isinstance(k, str) and len(k) <= 60 else show_value(k)) for k in unknown[:10])}"
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
        raise ConfigError(f"override {show_value(text)} must look like section.key=value")
    raw = raw.strip()
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if _is_text_field(_field_type(parts)) and not quoted and raw not in ("", "null", "~"):
        value: Any = raw
    else:
        try:
            value = _safe_load(raw) if raw else None
        except (yaml.YAMLError, ConfigError) as exc:
            raise ConfigError(f"override {show_value(text)}: cannot parse value: {exc}") from None
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
                    f"duplicate key {show_value(key)} at line {line} (first at line {seen[key]}); "
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
    return Path(__file__).parents[1] / "configs" / f"{name}.yaml"


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
