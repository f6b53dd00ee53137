"""Bounds on every size and statistic erde reads from a file it did not write itself.

A checkpoint or an ONNX manifest is untrusted input: its ``image_shape``,
``num_classes``, model widths and normalisation statistics decide how much
memory erde allocates and what it answers. Every such field is checked here,
before anything is built or allocated, and a bad one is named in one
``ErdeError``. The same bounds apply to configurations (see
:func:`erde.config.validate`), so what can be trained can always be loaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from erde.errors import ErdeError

if TYPE_CHECKING:  # torch is imported where a tensor is checked: `erde --help` needs none
    import torch

MAX_CHANNELS = 4  # image channels: grey, RGB, RGBA
MAX_IMAGE_SIDE = 1024  # pixels per side of a model input (CIFAR 32, ImageNet crops 224)
MAX_CLASSES = 100_000  # exit head outputs
MAX_WIDTH = 16.0  # channel width multiplier of a backbone (1.0 = the paper's widths)
MAX_HEAD_POOL = 64  # exit head pooled side
MAX_HEAD_HIDDEN = 65_536  # exit head hidden units
MAX_DEPTH = 2_000  # backbone depth in layers (ResNet-1202 is the deepest CIFAR ResNet published)
MAX_WIDEN_FACTOR = 64  # WideResNet k


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(
    value: Any, name: str, low: int, high: int, where: str, error: type[ErdeError]
) -> int:
    """``value`` is an int in [low, high], else ``error`` naming the field and the bounds."""
    if not _is_int(value) or not low <= value <= high:
        raise error(f"{where}: {name} must be an integer in [{low}, {high}], got {value!r}")
    return value


def check_image_shape(shape: Any, where: str, error: type[ErdeError]) -> tuple[int, int, int]:
    """[C, H, W] with 1 <= C <= MAX_CHANNELS and sides in [1, MAX_IMAGE_SIDE]."""
    if not isinstance(shape, (list, tuple)) or len(shape) != 3:
        raise error(f"{where}: image_shape must be [C, H, W], got {shape!r}")
    c = check_int(shape[0], "image_shape[0] (channels)", 1, MAX_CHANNELS, where, error)
    h = check_int(shape[1], "image_shape[1] (height)", 1, MAX_IMAGE_SIDE, where, error)
    w = check_int(shape[2], "image_shape[2] (width)", 1, MAX_IMAGE_SIDE, where, error)
    return c, h, w


def check_stats(mean: Any, std: Any, channels: int, where: str, error: type[ErdeError]) -> None:
    """Normalisation: ``channels`` finite means and finite stds > 0 (None: not stored)."""
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        ok = isinstance(values, (list, tuple)) and len(values) == channels
        if not ok or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
        ):
            raise error(f"{where}: {name} must be {channels} numbers, got {values!r}")
        if not all(math.isfinite(v) for v in values):
            raise error(f"{where}: {name} must be finite, got {list(values)}")
        if name == "std" and not all(v > 0 for v in values):
            raise error(f"{where}: std must be > 0 (it divides the pixels), got {list(values)}")


def check_class_names(names: Any, num_classes: int, where: str, error: type[ErdeError]) -> None:
    """None, or exactly ``num_classes`` strings: every class an exit can answer has a name."""
    if names is None:
        return
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise error(f"{where}: class_names must be a list of strings")
    if len(names) != num_classes:
        raise error(f"{where}: class_names has {len(names)} names but num_classes is {num_classes}")


def check_model_fields(mcfg: Mapping[str, Any], where: str, error: type[ErdeError]) -> None:
    """Size fields of a model configuration, before anything is built from it."""
    width = mcfg.get("width", 1.0)
    if (
        not isinstance(width, (int, float))
        or isinstance(width, bool)
        or not (math.isfinite(width) and 0 < width <= MAX_WIDTH)
    ):
        raise error(f"{where}: width must be a number in (0, {MAX_WIDTH:g}], got {width!r}")
    for name, low, high in (
        ("head_pool", 1, MAX_HEAD_POOL),
        ("head_hidden", 0, MAX_HEAD_HIDDEN),
    ):
        if name in mcfg:
            check_int(mcfg[name], name, low, high, where, error)
    exit_after = mcfg.get("exit_after")
    if exit_after is not None:
        if not isinstance(exit_after, list) or len(exit_after) > MAX_DEPTH:
            raise error(f"{where}: exit_after must be a short list of block counts")
        for i, v in enumerate(exit_after):
            check_int(v, f"exit_after[{i}]", 1, MAX_DEPTH, where, error)
    n = mcfg.get("num_early_exits")
    if n is not None:
        check_int(n, "num_early_exits", 0, MAX_DEPTH, where, error)


def check_finite_tensors(
    tensors: Mapping[str, torch.Tensor], where: str, error: type[ErdeError]
) -> None:
    """Every floating tensor finite: a NaN weight answers NaN for every image, silently."""
    import torch

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise error(f"{where}: weight {name!r} holds NaN or infinite values")


def check_ints_positive(
    values: Sequence[Any], name: str, where: str, error: type[ErdeError]
) -> None:
    """Counts such as MACs per exit: positive integers (and at most 2**62)."""
    for i, v in enumerate(values):
        check_int(v, f"{name}[{i}]", 1, 2**62, where, error)
