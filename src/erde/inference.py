"""Per-sample early-exit routing: skipped MACs become skipped time.

After each stage the exit head runs only on the images still in flight; those
the exit rule lets go are answered and dropped, and the next stage runs on the
compacted batch. Answers are written back in input order. The rule is the one
in :mod:`erde.exits` (the evaluation sweep replays the same functions on
recorded logits), so routing gives exactly the exits the sweep predicts.

Also here: the exit policy (rule, thresholds, optional per-exit temperatures)
and its small JSON file, image loading for ``erde predict``, and the
throughput measurements behind ``erde bench`` and ``benchmarks/inference.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from erde import exits
from erde.errors import ErdeError

THRESHOLDS_FORMAT = "erde-thresholds"
THRESHOLDS_VERSION = 1
MAX_JSON_BYTES = 1 << 20  # thresholds files and manifests are a few kB; refuse anything huge

H = TypeVar("H")  # what flows between stages: a torch tensor, or a numpy array for ONNX Runtime


class ThresholdsFileError(ErdeError):
    """A thresholds file is unreadable, malformed, or was calibrated for another model."""


class ImageInputError(ErdeError):
    """Images of the wrong shape for the model, or an image file that cannot be used."""


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
        low, high = exits.rule_range(rule, num_classes)
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
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise error(f"{path} is too large to be {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not readable JSON ({exc})") from None
    except RecursionError:
        raise error(f"{path} is not {what} (nested too deeply to read)") from None
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


# --------------------------------------------------------------------------- routing


@dataclass
class Routed:
    """Answers for a batch, in input order. Every tensor lives where the batch did."""

    classes: Tensor  # (N,) int64, argmax of the answering exit
    probabilities: Tensor  # (N, K) float32, softmax of the answering exit (temperature-scaled)
    exit_index: Tensor  # (N,) int64, exit each image left at
    scores: Tensor  # (N,) float32, the rule's score at that exit
    macs: Tensor  # (N,) int64, MACs actually spent on the image (macs_per_exit[exit])

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def cpu(self) -> Routed:
        return Routed(*(t.cpu() for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.classes, self.probabilities, self.exit_index, self.scores, self.macs)

    @staticmethod
    def concat(parts: Sequence[Routed]) -> Routed:
        """Join per-batch answers into one."""
        return Routed(*(torch.cat(ts) for ts in zip(*(p._tensors() for p in parts), strict=True)))

    def records(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One plain dict per image: class, class_name, probability, exit, score, macs."""
        out = self.cpu()
        top = out.probabilities.gather(1, out.classes.unsqueeze(1)).squeeze(1)
        rows = []
        for c, p, e, s, m in zip(
            out.classes.tolist(), top.tolist(), out.exit_index.tolist(), out.scores.tolist(),
            out.macs.tolist(), strict=True,
        ):  # fmt: skip
            row: dict[str, Any] = {"class": c}
            if class_names is not None:
                row["class_name"] = class_names[c]
            row.update({"probability": p, "exit": e, "score": s, "macs": m})
            rows.append(row)
        return rows


def route_stages(
    run_stage: Callable[[int, H], tuple[H, Tensor]],
    select: Callable[[H, Tensor], H],
    x: H,
    n: int,
    policy: ExitPolicy,
    num_exits: int,
    macs_per_exit: Tensor,
    device: torch.device,
) -> Routed:
    """The routing loop shared by the PyTorch router and the ONNX Runtime runtime.

    ``run_stage(i, h)`` returns (features after stage i, logits (B, K) of exit i)
    for the in-flight batch ``h``; ``select(h, keep)`` keeps rows ``keep``
    (int64 positions, on ``device``) of ``h``. Every in-flight image's answer is
    written at every exit; an image that goes on is overwritten later, so the
    last write is the exit it left at. One host synchronisation per stage (to
    size the compacted batch), none per image.
    """
    classes = torch.empty(n, dtype=torch.long, device=device)
    exit_index = torch.empty(n, dtype=torch.long, device=device)
    scores = torch.empty(n, dtype=torch.float32, device=device)
    probabilities: Tensor | None = None
    where: Tensor | None = None  # input positions of in-flight images; None = all, in order
    h = x
    for i in range(num_exits):
        h, logits = run_stage(i, h)
        z = scale_logits(logits, policy.temperature(i))  # (B, K)
        score = exits.rule_score(z, policy.rule)  # (B,)
        if probabilities is None:
            probabilities = torch.empty(n, z.shape[-1], dtype=torch.float32, device=device)
        predicted, p = logits.float().argmax(dim=-1), F.softmax(z, dim=-1)  # (B,), (B, K)
        if where is None:
            classes.copy_(predicted)
            probabilities.copy_(p)
            scores.copy_(score)
            exit_index.fill_(i)
        else:
            classes.index_copy_(0, where, predicted)
            probabilities.index_copy_(0, where, p)
            scores.index_copy_(0, where, score)
            exit_index.index_fill_(0, where, i)
        if i == num_exits - 1:
            break
        keep = (~exits.may_exit(score, policy.thresholds[i], policy.rule)).nonzero().squeeze(1)
        remaining = keep.numel()  # the stage's one host synchronisation
        if remaining == 0:
            break
        if remaining < score.numel():
            h = select(h, keep)
            where = keep if where is None else where.index_select(0, keep)
    assert probabilities is not None
    return Routed(classes, probabilities, exit_index, scores, macs_per_exit[exit_index])


class StageWithExit(nn.Module):
    """Stage ``i`` followed by exit ``i``: what one ONNX graph or one compiled unit holds."""

    def __init__(self, model: nn.Module, i: int) -> None:
        super().__init__()
        self.stage = model.stages[i]
        self.exit = model.exits[i]

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:  # -> (features, logits (B, K))
        h = self.stage(h)
        return h, self.exit(h)


class EarlyExitRouter:
    """Routes each image through an :class:`~erde.models.EarlyExitNet` only as far as it needs.

    ``image_shape`` (C, H, W), when given, is checked on every batch (a clear
    :class:`ImageInputError` instead of a shape error deep in a conv).
    ``optimize=True`` routes through :func:`erde.fusion.inference_copy` of the
    model (BatchNorm folded into the convolutions, NHWC, ``dtype`` weights)
    instead of the training graph. ``compile=True`` wraps each stage (with its
    exit head) in ``torch.compile`` with dynamic batch sizes. The model is put
    in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: ExitPolicy,
        *,
        image_shape: Sequence[int] | None = None,
        compile: bool = False,
        optimize: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if len(policy.thresholds) != model.num_exits - 1:
            raise ValueError(
                f"policy has {len(policy.thresholds)} thresholds, the model has "
                f"{model.num_exits - 1} early exits"
            )
        self.model = model.eval()
        self.policy = policy
        self.num_exits = model.num_exits
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.dtype = dtype if dtype not in (None, torch.float32) else None
        self.channels_last = optimize
        graph = model
        if optimize or self.dtype is not None:
            from erde.fusion import check_precision, inference_copy

            device = next(model.parameters()).device
            check_precision(self.dtype, device)
            graph = inference_copy(
                model, fold_bn=optimize, channels_last=optimize, dtype=self.dtype
            )
        self.graph = graph
        stages = [StageWithExit(graph, i).eval() for i in range(self.num_exits)]
        if compile:
            stages = [torch.compile(s, dynamic=True) for s in stages]
        self._stages = stages
        self._macs: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def macs_per_exit(self, image_shape: Sequence[int], device: torch.device) -> Tensor:
        """Measured cumulative MACs per exit (int64 (E,) on ``device``), cached per input shape."""
        key = (tuple(image_shape), device)
        if key not in self._macs:
            from erde.models import measure_exit_costs

            costs = measure_exit_costs(self.model, tuple(image_shape))
            self._macs[key] = torch.tensor(costs.macs_per_exit, dtype=torch.long, device=device)
        return self._macs[key]

    def __call__(self, x: Tensor) -> Routed:
        """Route a normalised float batch (B, C, H, W); answers come back in input order."""
        check_image_batch(x.shape, self.image_shape)
        macs = self.macs_per_exit(x.shape[1:], x.device)
        if self.dtype is not None:
            x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)

        def run(i: int, h: Tensor) -> tuple[Tensor, Tensor]:
            h, logits = self._stages[i](h)
            return h, logits.float()  # scores and probabilities in fp32 whatever the graph's dtype

        with torch.inference_mode():
            out = route_stages(
                run, compact_rows, x, x.shape[0], self.policy, self.num_exits, macs, x.device
            )
        return Routed(*(t.clone() for t in out._tensors()))  # ordinary tensors for the caller


def compact_rows(h: Tensor, keep: Tensor) -> Tensor:
    """Rows ``keep`` of ``h``, in the memory format ``h`` had (NHWC stays NHWC)."""
    rows = h.index_select(0, keep)
    if (
        h.dim() == 4
        and not h.is_contiguous()
        and h.is_contiguous(memory_format=torch.channels_last)
    ):
        rows = rows.contiguous(memory_format=torch.channels_last)
    return rows


def check_image_batch(shape: Sequence[int], image_shape: Sequence[int] | None) -> None:
    """A batch must be (B, C, H, W) with the model's (C, H, W) when that is known."""
    if len(shape) != 4:
        raise ImageInputError(f"expected a batch of images (B, C, H, W), got shape {tuple(shape)}")
    if image_shape is not None and tuple(shape[1:]) != tuple(image_shape):
        c, h, w = image_shape
        raise ImageInputError(
            f"images are {shape[1]}x{shape[2]}x{shape[3]} (C x H x W) but the model expects "
            f"{c}x{h}x{w}; resize them first (see load_image)"
        )


def plain_forward(model: nn.Module, x: Tensor) -> Tensor:
    """The full network without early heads (stages, then the last exit): (B, K) logits.

    The baseline an early-exit deployment competes with.
    """
    with torch.inference_mode():
        h = x
        for stage in model.stages:
            h = stage(h)
        return model.exits[-1](h)


def route_whole_batch(
    model: nn.Module, x: Tensor, policy: ExitPolicy, macs_per_exit: Tensor
) -> Routed:
    """Batch-level routing, for comparison: the batch stops only where every image may leave.

    What a toolkit that routes a batch by its hardest image does; with batch
    size 1 it equals per-sample routing.
    """
    with torch.inference_mode():
        h = x
        for i in range(model.num_exits):
            h, logits = model.forward_stage(i, h)
            z = scale_logits(logits, policy.temperature(i))
            score = exits.rule_score(z, policy.rule)
            last = i == model.num_exits - 1
            if last or bool(exits.may_exit(score, policy.thresholds[i], policy.rule).all()):
                index = torch.full_like(score, i, dtype=torch.long)
                return Routed(
                    logits.float().argmax(-1), F.softmax(z, -1), index, score, macs_per_exit[index]
                )
    raise AssertionError("unreachable: the last exit always answers")


# --------------------------------------------------------------------------- images


def load_image(path: str | Path, image_shape: Sequence[int], resize: bool = True) -> Tensor:
    """One image file -> uint8 (C, H, W) for a model expecting ``image_shape``.

    Mode: converted to RGB (3 channels) or greyscale (1 channel); alpha is
    dropped, palettes expanded. Size: with ``resize`` a different size is
    resized bilinearly to H x W (aspect ratio not kept); without, it is an
    :class:`ImageInputError`. Any unreadable file is an ``ImageInputError``.
    """
    from PIL import Image

    c, height, width = (int(v) for v in image_shape)
    if Path(path).exists() and not Path(path).is_file():  # a fifo or device never ends
        raise ImageInputError(f"{path}: not a regular file")
    if c not in (1, 3):
        raise ImageInputError(f"image files can feed 1- or 3-channel models, this one has {c}")
    from erde.data.pixels import read_errors, read_image

    try:
        img = read_image(path, "RGB" if c == 3 else "L")
    except read_errors() as exc:  # truncated, foreign, huge or rangeless files
        raise ImageInputError(f"{path}: cannot read image ({type(exc).__name__}: {exc})") from None
    if img.size != (width, height):
        if not resize:
            raise ImageInputError(
                f"{path}: image is {img.size[0]}x{img.size[1]} (W x H), the model "
                f"expects {width}x{height}; allow resizing or resize it first"
            )
        img = img.resize((width, height), Image.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.transpose(2, 0, 1).copy())  # (C, H, W)


def list_image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Files given, plus image files found (recursively, sorted) in folders given."""
    from erde.data.imagefolder import IMAGE_SUFFIXES

    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files.extend(
                sorted(
                    f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                )
            )
        else:
            files.append(p)  # missing or unreadable files are reported per file later
    return files


class Engine(Protocol):
    """Anything that routes a normalised float batch: the PyTorch router or the ONNX runtime."""

    def __call__(self, x: Tensor) -> Routed: ...


@dataclass
class Predictor:
    """An engine and what its inputs must look like: from a checkpoint or an ONNX export."""

    engine: Engine
    name: str
    image_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    class_names: list[str] | None
    policy: ExitPolicy
    device: torch.device

    def predict(self, images: Tensor) -> Routed:
        """Route uint8 images (B, C, H, W), normalised here with the training set's mean and std.

        Images must already have the model's shape (``image_shape``);
        :func:`load_image` reads and resizes files to it.
        """
        if images.dtype != torch.uint8:
            raise ImageInputError(
                f"predict takes uint8 pixels (B, C, H, W), got {images.dtype}; call "
                "engine(x) directly for images that are already normalised"
            )
        check_image_batch(images.shape, self.image_shape)
        return self.engine(normalize_images(images.to(self.device), self.mean, self.std))


def load_predictor(
    source: str | Path,
    *,
    thresholds: Sequence[float] | None = None,
    rule: str | None = None,
    thresholds_file: str | Path | None = None,
    device: str | torch.device = "cpu",
    compile: bool = False,
    optimize: bool = True,
) -> Predictor:
    """A checkpoint (file, or folder with checkpoint.pt) -> PyTorch router; else an ONNX export folder.

    A checkpoint routes through its inference copy (``optimize``: BatchNorm
    folded, NHWC; see :mod:`erde.fusion`), whose answers equal the training
    graph's up to float round-off.

    Thresholds: given values, else ``thresholds_file``, else the file ``erde
    calibrate`` wrote (beside the checkpoint, or thresholds.json in the export).
    """
    source = Path(source)
    if source.is_dir() and not (source / "checkpoint.pt").is_file():
        from erde.export import OnnxEarlyExitRuntime, read_manifest

        identity = ModelIdentity.from_dict(read_manifest(source)["model"])
        policy = resolve_policy(
            identity, thresholds=thresholds, rule=rule, thresholds_file=thresholds_file,
            default_file=source / "thresholds.json",
        )  # fmt: skip
        runtime = OnnxEarlyExitRuntime(source, policy)
        return Predictor(
            runtime, identity.name, runtime.image_shape, list(runtime.mean), list(runtime.std),
            runtime.class_names, policy, torch.device("cpu"),
        )  # fmt: skip
    from erde.checkpoints import load_checkpoint, model_from_checkpoint
    from erde.distributed import resolve_device

    ckpt = load_checkpoint(source)
    dev = resolve_device(str(device))  # a clear error when CUDA is asked for but absent
    model = model_from_checkpoint(ckpt).to(dev)
    identity = ModelIdentity(
        ckpt["name"], model_fingerprint(ckpt["model"]), int(ckpt["num_classes"]), model.num_exits
    )
    policy = resolve_policy(
        identity, thresholds=thresholds, rule=rule, thresholds_file=thresholds_file,
        default_file=thresholds_path(ckpt["path"]),
    )  # fmt: skip
    image_shape = tuple(int(s) for s in ckpt["image_shape"])
    router = EarlyExitRouter(
        model, policy, image_shape=image_shape, compile=compile, optimize=optimize
    )
    c = image_shape[0]
    return Predictor(
        router, ckpt["name"], image_shape, list(ckpt.get("mean") or [0.0] * c),
        list(ckpt.get("std") or [1.0] * c), ckpt.get("class_names"), policy, dev,
    )  # fmt: skip


def normalize_images(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 (B, C, H, W) -> the float input the model was trained on."""
    from erde.data.augment import normalize

    return normalize(images, mean, std)


def predict_files(
    predictor: Predictor, files: Sequence[str | Path], *, resize: bool = True, batch_size: int = 64
) -> Iterator[dict[str, Any]]:
    """One record per file, in order: the answer, or ``{"file", "error"}`` for a bad file.

    Files are read with :func:`load_image` (mode converted; size resized when
    ``resize``, else an error) and routed ``batch_size`` at a time. A bad file
    never stops the others.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        loaded: list[tuple[int, Tensor]] = []
        errors: dict[int, str] = {}
        for j, f in enumerate(chunk):
            try:
                loaded.append((j, load_image(f, predictor.image_shape, resize)))
            except ImageInputError as exc:
                errors[j] = str(exc)
        answers: dict[int, dict[str, Any]] = {}
        if loaded:
            batch = torch.stack([img for _, img in loaded]).to(predictor.device)  # (B, C, H, W)
            x = normalize_images(batch, predictor.mean, predictor.std)
            records = predictor.engine(x).records(predictor.class_names)
            _check_finite(records, [str(chunk[j]) for j, _ in loaded])
            answers = {j: r for (j, _), r in zip(loaded, records, strict=True)}
        for j, f in enumerate(chunk):
            yield (
                {"file": str(f), "error": errors[j]}
                if j in errors
                else {"file": str(f), **answers[j]}
            )


def _check_finite(records: Sequence[Mapping[str, Any]], files: Sequence[str]) -> None:
    """A NaN or infinite answer is a broken model, never a result (nor valid JSON)."""
    for record, f in zip(records, files, strict=True):
        if not all(math.isfinite(record[k]) for k in ("probability", "score")):
            raise ErdeError(
                f"the model answered NaN or infinity for {f}: its weights or normalisation "
                "are not finite; re-export or retrain it"
            )


# --------------------------------------------------------------------------- benchmark


def _time_pass(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def time_turns(
    passes: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 5,
    min_time: float = 1.0,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, list[float]]:
    """Seconds of every timed call of each function, measured in turns.

    Turns (A, B, C, A, B, C, ...) let every candidate see the same machine load;
    at least ``repeats`` turns, and more until each candidate has run ``min_time``.
    Entry ``k`` of every list comes from the same turn.
    """
    for fn in passes.values():
        for _ in range(warmup):
            fn()
        sync()
    times: dict[str, list[float]] = {name: [] for name in passes}
    while True:
        for name, fn in passes.items():
            times[name].append(_time_pass(fn, sync))
        if all(len(t) >= repeats and sum(t) >= min_time for t in times.values()):
            break
    return times


def time_interleaved(
    passes: Mapping[str, Callable[[], Any]],
    *,
    repeats: int = 5,
    min_time: float = 1.0,
    warmup: int = 1,
    sync: Callable[[], None] = lambda: None,
) -> dict[str, float]:
    """Median seconds of one call of each function, measured in turns (see :func:`time_turns`)."""
    times = time_turns(passes, repeats=repeats, min_time=min_time, warmup=warmup, sync=sync)
    return {name: statistics.median(t) for name, t in times.items()}


SPREAD_WARNING = 0.2  # warn when the per-turn speedups' interquartile range exceeds 20 % of it
RATIO_WARNING = 1.25  # warn when early exit looks faster than the MACs it skips allow


def speedup_spread(base: Sequence[float], candidate: Sequence[float]) -> tuple[float, float]:
    """25th and 75th percentile of the per-turn speedups base[k] / candidate[k]."""
    speedups = sorted(b / c for b, c in zip(base, candidate, strict=True))
    if len(speedups) < 2:
        return speedups[0], speedups[0]
    q1, _, q3 = statistics.quantiles(speedups, n=4, method="inclusive")
    return q1, q3


def timing_warning(record: Mapping[str, Any]) -> str | None:
    """Why a benchmark record should not be trusted, or None.

    A ratio well above 1 (measured speedup above full MACs / spent MACs) is
    not something skipped work can give: the full-network passes were slowed
    by something else. A wide spread of the per-turn speedups says the same.
    """
    low, high = record["speedup_quartiles"]
    spread = (high - low) / record["measured_speedup"]
    problems = []
    if record["ratio"] > RATIO_WARNING:
        problems.append(f"ratio {record['ratio']:.2f} is more than skipped MACs can explain")
    if spread > SPREAD_WARNING:
        problems.append(f"speedups varied by {100 * spread:.0f} % between turns")
    if not problems:
        return None
    return (
        f"warning: {record['backend']} batch {record['batch_size']}: {'; '.join(problems)}: "
        "the machine is busy or the passes are too short; rerun with --threads 1, a larger "
        "--min-time, or on an idle machine"
    )


def _batches(images: Tensor, batch_size: int) -> list[Tensor]:
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


def full_network_macs(model: nn.Module, image_shape: Sequence[int]) -> int:
    """MACs of the plain network (every stage, then the last exit): the full-network baseline."""
    from erde.models import measure_exit_costs

    costs = measure_exit_costs(model, tuple(image_shape))
    return sum(costs.stage_macs) + costs.head_macs[-1]


def benchmark_routing(
    model: nn.Module,
    images: Tensor,
    policy: ExitPolicy,
    batch_sizes: Sequence[int] = (1, 32, 256),
    *,
    onnx_runtime: Any | None = None,
    batch_routing: bool = True,
    repeats: int = 5,
    min_time: float = 1.0,
    compile: bool = False,
    channels_last: bool = False,
    fold_bn: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Throughput of the full network and of early exit on ``images``, per batch size.

    ``channels_last`` runs both the full network and early exit in NHWC, which
    on CPU speeds up the wide-map, few-channel first stages the most.
    ``fold_bn`` runs both on :func:`erde.fusion.inference_copy` (BatchNorm
    folded into the convolutions), so the ratio compares like with like.

    ``images``: normalised float (N, C, H, W) on the device to measure. One
    record per (backend, batch size) with full_ips and early_exit_ips (images
    per second), measured_speedup (their ratio), ideal_speedup (full-network
    MACs / mean MACs actually spent per image) and ratio = measured / ideal.
    Backends: ``torch`` (per-sample routing), ``torch-batch-routing`` (the batch
    leaves together) and ``onnxruntime`` (per-stage graphs, when given; its
    baseline is the stage graphs run end to end).
    """
    device = images.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model = model.eval()
    if fold_bn:
        from erde.fusion import inference_copy

        model = inference_copy(model, channels_last=channels_last)
    elif channels_last:  # on a copy: the caller's model keeps its layout
        model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    router = EarlyExitRouter(model, policy, compile=compile)
    macs = router.macs_per_exit(images.shape[1:], device)
    full_macs = full_network_macs(model, images.shape[1:])
    spent = router(images).macs  # per-sample exits do not depend on the batch size
    ideal = full_macs / spent.double().mean().item()
    n = len(images)
    records = []
    for bs in batch_sizes:
        chunks = _batches(images, bs)
        passes: dict[str, Callable[[], Any]] = {
            "full": lambda c=chunks: [plain_forward(model, x) for x in c],
            "torch": lambda c=chunks: [router(x) for x in c],
        }
        if batch_routing:
            passes["torch-batch-routing"] = lambda c=chunks: [
                route_whole_batch(model, x, policy, macs) for x in c
            ]
        if onnx_runtime is not None:
            arrays = [x.detach().cpu().numpy() for x in chunks]
            passes["onnx-full"] = lambda a=arrays: [onnx_runtime.run_all(x) for x in a]
            passes["onnxruntime"] = lambda a=arrays: [onnx_runtime(x) for x in a]
        turns = time_turns(passes, repeats=repeats, min_time=min_time, sync=sync)
        seconds = {name: statistics.median(t) for name, t in turns.items()}
        for backend in ("torch", "torch-batch-routing", "onnxruntime"):
            if backend not in seconds:
                continue
            base_name = "onnx-full" if backend == "onnxruntime" else "full"
            base = seconds[base_name]
            measured = base / seconds[backend]
            record = {
                "backend": backend,
                "batch_size": bs,
                "device": device.type,
                "full_ips": n / base,
                "early_exit_ips": n / seconds[backend],
                "measured_speedup": measured,
                "speedup_quartiles": list(speedup_spread(turns[base_name], turns[backend])),
                "turns": len(turns[backend]),
                "ideal_speedup": ideal,
                "ratio": measured / ideal,
            }
            record["warning"] = timing_warning(record)
            records.append(record)
            if log is not None:
                log(format_record(record))
                if record["warning"]:
                    log(record["warning"])
    return records


def bench_checkpoint(
    checkpoint: str | Path,
    policy: ExitPolicy,
    *,
    batch_sizes: Sequence[int] = (1, 32, 256),
    images: int = 512,
    devices: Sequence[str] = ("cpu",),
    onnx: bool | str | Path = True,
    repeats: int = 5,
    min_time: float = 1.0,
    compile: bool = False,
    channels_last: bool = False,
    fold_bn: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """:func:`benchmark_routing` on a checkpoint's own test images (cycled to ``images``).

    ``onnx``: True exports the staged graphs to a temporary folder, a path uses
    an existing export of the same model, False skips ONNX Runtime (CPU only).
    """
    import tempfile

    from erde.checkpoints import check_compatible, load_checkpoint, model_from_checkpoint
    from erde.config import config_from_dict
    from erde.data import prepare_batch
    from erde.training import load_splits

    if images < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ValueError("images and batch sizes must be >= 1")
    if repeats < 1 or not (math.isfinite(min_time) and min_time >= 0):
        raise ValueError(
            f"repeats must be >= 1 and min_time finite and >= 0, got {repeats}, {min_time}"
        )
    ckpt = load_checkpoint(checkpoint)
    splits = load_splits(config_from_dict(ckpt["config"]))
    check_compatible(ckpt, splits.num_classes, splits.image_shape, "checkpoint")
    model = model_from_checkpoint(ckpt).eval()
    index = torch.arange(images) % len(splits.test)
    pool = prepare_batch(splits.test.images[index], splits, train=False)  # (N, C, H, W)
    identity = ModelIdentity(
        ckpt["name"], model_fingerprint(ckpt["model"]), splits.num_classes, model.num_exits
    )
    if onnx is not False:
        from erde.export import missing_onnx_modules

        if missing := missing_onnx_modules():
            if log is not None:
                log(f"ONNX Runtime rows skipped: {', '.join(missing)} not installed "
                    '(pip install -e ".[onnx]")')  # fmt: skip
            onnx = False
    with tempfile.TemporaryDirectory(prefix="erde-onnx-") as tmp:
        runtime = None
        if onnx is not False:
            from erde.export import ExportError, OnnxEarlyExitRuntime, export_onnx

            folder = Path(tmp) if onnx is True else Path(onnx)
            if onnx is True:
                export_onnx(
                    model, folder, splits.image_shape, identity=identity, mean=splits.mean,
                    std=splits.std,
                )  # fmt: skip
            runtime = OnnxEarlyExitRuntime(folder, policy)
            if runtime.identity.fingerprint != identity.fingerprint:
                raise ExportError(f"{folder} is an export of another model than {checkpoint}")
        records = []
        for device in devices:
            dev = torch.device(device)
            if log is not None:
                log(f"{dev.type}: {images} images per pass, batch sizes {list(batch_sizes)}, "
                    f"{torch.get_num_threads()} CPU threads")  # fmt: skip
            records += benchmark_routing(
                model.to(dev), pool.to(dev), policy, batch_sizes,
                onnx_runtime=runtime if dev.type == "cpu" else None, repeats=repeats,
                min_time=min_time, compile=compile, channels_last=channels_last, fold_bn=fold_bn,
                log=log,
            )  # fmt: skip
    return records


def format_record(r: Mapping[str, Any]) -> str:
    return (
        f"{r['device']:4s} {r['backend']:20s} batch {r['batch_size']:4d}  full {r['full_ips']:9.1f} img/s"
        f"  early exit {r['early_exit_ips']:9.1f} img/s  speedup {r['measured_speedup']:5.2f}x"
        + (
            f" (quartiles over {r['turns']} turns {r['speedup_quartiles'][0]:.2f}-"
            f"{r['speedup_quartiles'][1]:.2f})"
            if "speedup_quartiles" in r
            else ""
        )
        + f"  ideal {r['ideal_speedup']:5.2f}x  ratio {r['ratio']:4.2f}"
    )


__all__ = [
    "EarlyExitRouter",
    "Engine",
    "ExitPolicy",
    "ImageInputError",
    "ModelIdentity",
    "Predictor",
    "Routed",
    "StageWithExit",
    "ThresholdsFileError",
    "apply_temperatures",
    "bench_checkpoint",
    "benchmark_routing",
    "check_image_batch",
    "float32_within",
    "full_network_macs",
    "list_image_files",
    "load_predictor",
    "load_image",
    "load_thresholds",
    "model_fingerprint",
    "plain_forward",
    "predict_files",
    "resolve_policy",
    "route_stages",
    "route_whole_batch",
    "save_thresholds",
    "scale_logits",
    "thresholds_path",
    "time_interleaved",
    "time_turns",
    "timing_warning",
]
