"""The exit policy (rule, thresholds, optional per-exit temperatures) and its small JSON file.

Below both routing and export: the router, the ONNX Runtime runtime and
calibration all read and write policies through this module.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from erde import exits
from erde.errors import ErdeError
from erde.io import read_json

THRESHOLDS_FORMAT = "erde-thresholds"
THRESHOLDS_VERSION = 1
MAX_JSON_BYTES = 1 << 20  # thresholds files and manifests are a few kB; refuse anything huge


class ThresholdsFileError(ErdeError):
    """A thresholds file is unreadable, malformed, or was calibrated for another model."""


# --------------------------------------------------------------------------- policy


def float32_within(value: float, low: float = -math.inf, high: float = math.inf) -> float:
    """The float32 value nearest ``value`` that lies in [low, high], as a Python float.

    Thresholds and temperatures are kept float32-representable so that comparing
    or dividing float32 scores and logits by them gives the same bits whether
    the value travels as a Python float or as a float32 tensor. Rounding may step
    just outside the range (float32(log 10) > log 10); it is stepped back in.
    """
    f = np.float32(value)
    if float(f) > high:  # compare as Python floats: NumPy would compare in float32
        f = np.nextafter(f, np.float32(-np.inf))
    if float(f) < low:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


@dataclass(frozen=True)
class ExitPolicy:
    """When an image may leave: rule, one threshold per early exit, optional temperatures.

    ``temperatures`` (one per exit, > 0) divide that exit's logits before the
    rule's score and the probabilities are computed (temperature scaling fitted
    on validation data, see :mod:`erde.calibration`); None means 1 everywhere.
    """

    rule: str
    thresholds: tuple[float, ...]  # E-1 values
    temperatures: tuple[float, ...] | None = None  # E values, or None

    @classmethod
    def create(
        cls,
        thresholds: float | Sequence[float],
        rule: str,
        num_classes: int,
        num_exits: int,
        temperatures: Sequence[float] | None = None,
    ) -> ExitPolicy:
        """Validated policy; raises ``ValueError`` naming the rule's range or the bad count."""
        if rule not in exits.RULES:
            raise ValueError(f"unknown exit rule {rule!r}; valid rules: {', '.join(exits.RULES)}")
        values = exits.check_thresholds(thresholds, rule, num_classes, num_exits)
        low, high = exits.threshold_bounds(rule, num_classes)
        temps = None
        if temperatures is not None:
            temps = [float(t) for t in temperatures]
            if len(temps) != num_exits:
                raise ValueError(
                    f"expected {num_exits} temperatures (one per exit), got {len(temps)}"
                )
            if not all(math.isfinite(t) and t > 0 for t in temps):
                raise ValueError(f"temperatures must be finite and > 0, got {temps}")
            temps = tuple(float32_within(t, low=np.finfo(np.float32).tiny) for t in temps)
        return cls(rule, tuple(float32_within(t, low, high) for t in values), temps)

    def temperature(self, i: int) -> float | None:
        return None if self.temperatures is None else self.temperatures[i]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "thresholds": list(self.thresholds),
            "temperatures": None if self.temperatures is None else list(self.temperatures),
        }


def scale_logits(logits: Tensor, temperature: float | None) -> Tensor:
    """Float32 logits divided by the exit's temperature: (..., K) -> (..., K).

    The one place temperature scaling happens, for recorded logits and for the
    router alike, so both compute the same bits.
    """
    logits = logits.float()
    return logits if temperature is None else logits / temperature


def apply_temperatures(exit_logits: Tensor, policy: ExitPolicy) -> Tensor:
    """Recorded logits (E, N, K) as the router sees them under ``policy``."""
    if policy.temperatures is None:
        return exit_logits.float()
    return torch.stack(
        [scale_logits(z, t) for z, t in zip(exit_logits, policy.temperatures, strict=True)]
    )


def model_fingerprint(state_dict: Mapping[str, Tensor]) -> str:
    """Short hash of a model's weights: a thresholds file or ONNX export names the model it fits."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        value = state_dict[key]
        if not isinstance(value, Tensor):
            continue
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def thresholds_path(checkpoint: str | Path) -> Path:
    """Where ``erde calibrate`` puts a checkpoint's thresholds: ``<stem>.thresholds.json`` beside it."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / "checkpoint.pt"
    return checkpoint.with_name(f"{checkpoint.stem}.thresholds.json")


@dataclass(frozen=True)
class ModelIdentity:
    """What a thresholds file must match: the model's weights, classes and exits."""

    name: str
    fingerprint: str
    num_classes: int
    num_exits: int

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelIdentity:
        """From a manifest's ``model`` entry (already checked to be a dict)."""
        try:
            return cls(str(data.get("name")), str(data.get("fingerprint")),
                       int(data["num_classes"]), int(data["num_exits"]))  # fmt: skip
        except (KeyError, TypeError, ValueError):
            raise ThresholdsFileError(f"malformed model identity {dict(data)!r}") from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "num_classes": self.num_classes,
            "num_exits": self.num_exits,
        }


def save_thresholds(
    path: str | Path,
    policy: ExitPolicy,
    model: ModelIdentity,
    details: Mapping[str, Any] | None = None,
) -> Path:
    """Write the policy as a small JSON file (see docs/INFERENCE.md for the format)."""
    from erde.io import atomic_write_json

    data = {
        "format": THRESHOLDS_FORMAT,
        "version": THRESHOLDS_VERSION,
        **policy.to_dict(),
        "model": model.to_dict(),
        "calibration": dict(details or {}),
    }
    atomic_write_json(path, data)
    return Path(path)


def read_marked_json(
    path: Path, marker: str, version: int, error: type[ErdeError], what: str
) -> dict[str, Any]:
    """A small JSON file erde wrote (untrusted): size-capped, a dict with our marker and a known version."""
    data = read_json(path, max_bytes=MAX_JSON_BYTES, error=error, what=what)
    if not isinstance(data, dict) or data.get("format") != marker:
        raise error(f"{path} is not {what} (no '{marker}' marker)")
    found = data.get("version")
    if not isinstance(found, int) or found > version:
        raise error(f"{path} has version {found!r}; this erde reads <= {version}")
    return data


def load_thresholds(path: str | Path, model: ModelIdentity) -> ExitPolicy:
    """Read a thresholds file (untrusted JSON) and check it was made for ``model``."""
    path = Path(path)
    data = read_marked_json(
        path, THRESHOLDS_FORMAT, THRESHOLDS_VERSION, ThresholdsFileError, "an erde thresholds file"
    )
    made_for = data.get("model")
    if not isinstance(made_for, dict):
        raise ThresholdsFileError(f"{path} does not say which model it was calibrated for")
    for key, want in (("num_classes", model.num_classes), ("num_exits", model.num_exits)):
        if made_for.get(key) != want:
            raise ThresholdsFileError(
                f"{path} was calibrated for a model with {key}={made_for.get(key)!r}, this one has "
                f"{want}; run `erde calibrate` on this model"
            )
    if made_for.get("fingerprint") != model.fingerprint:
        if model.fingerprint == f"{made_for.get('fingerprint')}:int8":
            raise ThresholdsFileError(
                f"{path} was fitted on the fp32 model, but this export is int8 and its scores "
                "differ; use the thresholds that `erde export --int8` fitted on it"
            )
        raise ThresholdsFileError(
            f"{path} was calibrated for another model ({made_for.get('name')!r}, weights "
            f"{made_for.get('fingerprint')!r}), not for {model.name!r} (weights {model.fingerprint}); "
            "run `erde calibrate` on this model"
        )
    rule, thresholds, temperatures = (
        data.get("rule"),
        data.get("thresholds"),
        data.get("temperatures"),
    )
    if not isinstance(rule, str):
        raise ThresholdsFileError(f"{path}: 'rule' must be one of {', '.join(exits.RULES)}")
    if not isinstance(thresholds, list) or not all(_is_number(t) for t in thresholds):
        raise ThresholdsFileError(f"{path}: 'thresholds' must be a list of numbers")
    if temperatures is not None and (
        not isinstance(temperatures, list) or not all(_is_number(t) for t in temperatures)
    ):
        raise ThresholdsFileError(f"{path}: 'temperatures' must be null or a list of numbers")
    try:
        return ExitPolicy.create(thresholds, rule, model.num_classes, model.num_exits, temperatures)
    except ValueError as exc:
        raise ThresholdsFileError(f"{path}: {exc}") from None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def resolve_policy(
    model: ModelIdentity,
    *,
    thresholds: Sequence[float] | None = None,
    rule: str | None = None,
    thresholds_file: str | Path | None = None,
    default_file: str | Path | None = None,
) -> ExitPolicy:
    """The policy a command uses: explicit thresholds, else a file, else the default file."""
    if thresholds is not None and thresholds_file is not None:
        raise ThresholdsFileError("give either threshold values or a thresholds file, not both")
    if thresholds is not None:
        values = thresholds[0] if len(thresholds) == 1 else thresholds  # one value: every exit
        return ExitPolicy.create(values, rule or "entropy", model.num_classes, model.num_exits)
    path = thresholds_file or (
        default_file if default_file and Path(default_file).is_file() else None
    )
    if path is None:
        raise ThresholdsFileError(
            f"no thresholds for {model.name!r}: run `erde calibrate` first "
            f"(expected {default_file}) or pass --threshold / --thresholds-file"
        )
    policy = load_thresholds(path, model)
    if rule is not None and rule != policy.rule:
        raise ThresholdsFileError(f"{path} holds {policy.rule} thresholds, not {rule}")
    return policy
