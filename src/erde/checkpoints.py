"""Checkpoints: plain dicts of tensors and primitives, saved atomically, loaded with weights_only.

A checkpoint carries everything needed to rebuild its model (architecture,
classes, input shape, normalisation) and the full config that produced it, so
a checkpoint found on disk is self-describing and never executes code on load.
"""

from __future__ import annotations

import dataclasses
import pickle
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from erde.config import ModelConfig
from erde.errors import CheckpointError, ErdeError
from erde.io import atomic_torch_save
from erde.limits import (
    MAX_CLASSES,
    check_class_names,
    check_finite_tensors,
    check_image_shape,
    check_int,
    check_model_fields,
    check_stats,
)
from erde.outputs import check_not_input

FORMAT = "erde-checkpoint"
VERSION = 1
REQUIRED_KEYS = (
    "format",
    "version",
    "name",
    "model_config",
    "num_classes",
    "image_shape",
    "model",
    "config",
)


# Every top-level field erde writes (training, release); a file with others was not written by
# erde, and an unknown field is also where an oversized payload would hide.
KNOWN_KEYS = frozenset(
    {
        *REQUIRED_KEYS,
        "path",  # replaced on every load; kept by files re-saved from a loaded dict
        "role", "method", "dataset", "class_names", "mean", "std",
        "optimizer", "scheduler", "scaler", "rng", "running", "lookahead",
        "epoch", "step_in_epoch", "global_step", "finished", "history",
        "steps_per_epoch", "steady_seconds_per_step", "batch_size", "world_size",
        "exit_weights", "exit_mapping", "teacher_checkpoint", "teacher_sha256",
    }
)  # fmt: skip
# torch writes checkpoint records uncompressed: what they unpack to is bounded by the file's
# own size, plus slack for an archive re-packed with compression; more is a compression bomb.
UNPACK_RATIO, UNPACK_SLACK = 2, 64 << 20
MAX_RECORDS = 200_000


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write atomically: a crash mid-write leaves the previous good checkpoint in place."""
    atomic_torch_save({"format": FORMAT, "version": VERSION, **state}, path)


RESUME_ONLY_KEYS = ("optimizer", "scheduler", "scaler", "rng", "running", "lookahead")


def release_checkpoint(path: str | Path, out: str | Path, *, half: bool = False) -> Path:
    """A finished checkpoint without what only resuming needs, for sharing a trained model.

    The optimizer's momentum (as large as the weights), the schedulers' and RNG
    states go; weights, model description, config, class names, normalisation and
    the training history stay. With ``half`` the float weights are stored as
    float16 (half the size again); loading casts them back to float32, so every
    user of the file sees the same rounded weights. The result loads everywhere a
    checkpoint does (a teacher for ``erde train-student --teacher``, evaluate,
    export) and a run folder holding it counts as finished, so ``erde run``/``reproduce`` reuse it instead of
    training that model again. Refused for an unfinished run: it could not resume.
    """
    ckpt = load_checkpoint(path)
    if not ckpt.get("finished"):
        raise CheckpointError(
            f"{ckpt['path']} has not finished training; a released copy could not resume it"
        )
    released = {k: v for k, v in ckpt.items() if k not in (*RESUME_ONLY_KEYS, "path")}
    if half:
        released["model"] = {
            k: v.half() if v.is_floating_point() else v for k, v in ckpt["model"].items()
        }
    out = Path(out)
    if out.resolve() == Path(ckpt["path"]).resolve():
        raise CheckpointError(f"{out} is the checkpoint itself; write the release elsewhere")
    check_not_input(out, [ckpt["path"]], "--out")  # also a hard link to it
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(released, out)
    return out


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and sanity-check a checkpoint; any problem is one ``CheckpointError``."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_archive(path)
    try:
        # torch warns about foreign pickle protocols; the file is judged below instead
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only stopped at something: nothing ran
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = next((x for x in lines if "GLOBAL" in x or x.startswith("Unsupported")), "")
        raise CheckpointError(
            f"{path} is not a readable erde checkpoint: refused to unpickle it without running "
            "anything (corrupted, or it holds Python objects other than tensors"
            f"{'; ' + detail[:200] if detail else ''})"
        ) from None
    except Exception as exc:  # truncated zip, random bytes, empty file ...
        raise CheckpointError(
            f"{path} is not a readable erde checkpoint (truncated or corrupted? {_brief(exc)})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an erde checkpoint (no '{FORMAT}' marker)")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is missing {', '.join(missing)}")
    unknown = [k for k in ckpt if k not in KNOWN_KEYS]
    if unknown:
        shown = ", ".join(_short(k) for k in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise CheckpointError(
            f"{path} holds field(s) erde never writes ({shown}); not an erde checkpoint, or "
            "one altered by hand"
        )
    _check_fields(ckpt, path)
    ckpt["path"] = str(path)
    return ckpt


def _check_archive(path: Path) -> None:
    """Bound what the checkpoint's records unpack to, from the zip directory, before reading any.

    A small file can hold a deflated record of gigabytes that ``torch.load`` would
    inflate into memory whole; the sizes are declared in the zip directory, and
    the reader refuses a record that inflates to more than it declares.
    """
    if not zipfile.is_zipfile(path):
        return  # torch's legacy format: uncompressed, judged by torch.load below
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a readable erde checkpoint (truncated or corrupted? {_brief(exc)})"
        ) from None
    if len(records) > MAX_RECORDS:
        raise CheckpointError(f"{path} holds {len(records)} records; at most {MAX_RECORDS}")
    size = path.stat().st_size
    unpacked = sum(r.file_size for r in records)
    if unpacked > UNPACK_RATIO * size + UNPACK_SLACK:
        largest = max(records, key=lambda r: r.file_size)
        raise CheckpointError(
            f"{path}: its records unpack to {unpacked:,} bytes from a {size:,}-byte file "
            f"({_short(largest.filename)}: {largest.file_size:,} bytes); refused as a "
            "compression bomb (erde writes checkpoints uncompressed)"
        )


def _short(value: Any, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters: a crafted file's names may be of any length."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_fields(ckpt: dict[str, Any], path: Path) -> None:
    """Types of the fields erde reads, so a damaged or hand-edited file fails here, clearly."""
    version = ckpt["version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{path}: format version must be an integer, got {version!r}")
    if version > VERSION:
        raise CheckpointError(f"{path} has format version {version}; this erde reads <= {VERSION}")
    where = str(path)
    num_classes = check_int(
        ckpt["num_classes"], "num_classes", 1, MAX_CLASSES, where, CheckpointError
    )
    channels, _, _ = check_image_shape(ckpt["image_shape"], where, CheckpointError)
    check_stats(ckpt.get("mean"), ckpt.get("std"), channels, where, CheckpointError)
    check_class_names(ckpt.get("class_names"), num_classes, where, CheckpointError)
    for key in ("model_config", "config"):
        if not isinstance(ckpt[key], dict):
            raise CheckpointError(
                f"{path}: {key} must be a mapping, got {type(ckpt[key]).__name__}"
            )
    model = ckpt["model"]
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise CheckpointError(f"{path}: 'model' must map parameter names to tensors")
    check_model_fields(ckpt["model_config"], f"{where}: model_config", CheckpointError)
    check_finite_tensors(model, where, CheckpointError)


def model_from_checkpoint(
    ckpt: dict[str, Any], *, trust_modules: Sequence[str] = ()
) -> torch.nn.Module:
    """Rebuild the early-exit model a checkpoint describes and load its weights.

    A checkpoint of a user's own network names a ``module:factory``; that module
    is imported only if the user trusts it (``trust_modules``, or an enclosing
    :func:`erde.models.custom.trusted_modules` block): a file must not decide on
    its own to run code.
    """
    from erde.models.custom import check_trusted

    where = ckpt.get("path", "checkpoint")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    mcfg = {k: v for k, v in ckpt["model_config"].items() if k in fields}
    arch = mcfg.get("arch")
    if not isinstance(arch, str):
        raise CheckpointError(
            f"{where}: model_config.arch must be a string, got {type(arch).__name__}"
        )
    if isinstance(trust_modules, str):
        raise TypeError("trust_modules takes a list of module names, not one string")
    try:
        check_trusted(arch, str(where), trust_modules)
    except ErdeError as exc:
        raise CheckpointError(str(exc)) from None
    # Built on the meta device first (no memory): sizes the file claims are compared with the
    # weights it really holds before a single parameter is allocated.
    shell = _build(ckpt, mcfg, where, torch.device("meta"))
    weights = ckpt["model"]
    expected = shell.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    reshaped = [
        k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or reshaped:
        example = (missing or unexpected or reshaped)[0]
        raise CheckpointError(
            f"{where}: weights do not fit the model it describes ({len(missing)} missing, "
            f"{len(unexpected)} unexpected, {len(reshaped)} of another shape, e.g. {example!r})"
        )
    model = _build(ckpt, mcfg, where, torch.device("cpu"))
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(f"{where}: weights do not fit the model: {_brief(exc)}") from None
    return model


def _build(
    ckpt: dict[str, Any], mcfg: dict[str, Any], where: str, device: torch.device
) -> torch.nn.Module:
    from erde.models import build_model

    try:
        with device:
            return build_model(
                num_classes=int(ckpt["num_classes"]), input_shape=tuple(ckpt["image_shape"]), **mcfg
            )
    except (ErdeError, KeyError, ValueError, TypeError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{where} describes a model erde cannot build: {detail}") from None


def check_compatible(
    ckpt: dict[str, Any], num_classes: int, image_shape: tuple[int, ...], what: str
) -> None:
    """Refuse a checkpoint trained for another number of classes, channels or image size."""
    where = ckpt.get("path", "checkpoint")
    if int(ckpt["num_classes"]) != num_classes:
        raise CheckpointError(
            f"{what} {where} was trained for {ckpt['num_classes']} classes "
            f"but the data set has {num_classes}"
        )
    if tuple(ckpt["image_shape"])[0] != image_shape[0]:
        raise CheckpointError(
            f"{what} {where} expects {ckpt['image_shape'][0]}-channel images, the data has {image_shape[0]}"
        )
    trained, given = ckpt["image_shape"][1:], image_shape[1:]
    if [int(v) for v in trained] != [int(v) for v in given]:
        # Adaptive pooling would let any size run, but exit costs and accuracy would be
        # those of another input: refuse and say how to match it.
        raise CheckpointError(
            f"{what} {where} was trained on {_hw(trained)} images, the data has {_hw(given)}; "
            f"set data.image_size={trained[0]} (--set data.image_size={trained[0]}) "
            "to resize the data to match"
        )


def _hw(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def _brief(exc: BaseException) -> str:
    """The first sentence of an exception's first line: library messages run on for lines."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    first = text.splitlines()[0]
    end = first.find(". ")
    return (first[: end + 1] if 0 < end < 200 else first[:200]).rstrip()
