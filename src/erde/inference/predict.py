"""Images in, answers out: image files, the predictor of a checkpoint or an ONNX export."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from erde.errors import ErdeError
from erde.inference.policy import (
    ExitPolicy,
    ModelIdentity,
    model_fingerprint,
    resolve_policy,
    thresholds_path,
)
from erde.inference.routing import EarlyExitRouter, ImageInputError, Routed, check_image_batch

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
        if isinstance(images, np.ndarray):  # numpy's uint8 is not torch's: compare as tensors
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, Tensor):
            raise ImageInputError(
                f"predict takes a uint8 tensor or numpy array (B, C, H, W), got "
                f"{type(images).__name__}"
            )
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
    trust_modules: Sequence[str] = (),
) -> Predictor:
    """A checkpoint (file, or folder with checkpoint.pt) -> PyTorch router; else an ONNX export folder.

    A checkpoint routes through its inference copy (``optimize``: BatchNorm
    folded, NHWC; see :mod:`erde.inference.fusion`), whose answers equal the training
    graph's up to float round-off.

    Thresholds: given values, else ``thresholds_file``, else the file ``erde
    calibrate`` wrote (beside the checkpoint, or thresholds.json in the export).
    ``trust_modules``: modules a checkpoint of your own network may import (see
    :func:`erde.trusted_modules`).
    """
    source = Path(source)
    if source.is_dir() and not (source / "checkpoint.pt").is_file():
        from erde.inference.export import OnnxEarlyExitRuntime, read_manifest

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
    model = model_from_checkpoint(ckpt, trust_modules=trust_modules).to(dev)
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
