"""Staged ONNX export and a small ONNX Runtime runtime that really skips stages.

A single ONNX graph of an early-exit network computes every exit, whatever the
rule says. We export **one graph per stage** instead: ``stage_i.onnx`` maps the
stage's input (the image batch for stage 0, else the previous stage's
features) to that stage's features and its exit's logits. The runtime runs a
stage graph only on the images still in flight, with the same routing loop
(:func:`erde.inference.route_stages`) and the same exit rule as the PyTorch
router.

An export folder holds ``manifest.json`` (format, model identity, input shape,
normalisation, class names, MACs per exit and each stage file's SHA-256) and
the stage graphs; ``thresholds.json`` is copied in when the model has been
calibrated.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from erde.errors import ErdeError
from erde.inference.policy import ExitPolicy, ModelIdentity, load_thresholds, read_marked_json
from erde.inference.routing import Routed, StageWithExit, check_image_batch, route_stages
from erde.io import file_sha256
from erde.limits import (
    MAX_CLASSES,
    check_class_names,
    check_image_shape,
    check_int,
    check_ints_positive,
    check_stats,
)

MANIFEST = "manifest.json"
FORMAT = "erde-onnx"
VERSION = 1
DEFAULT_OPSET = 18
MIN_OPSET, MAX_OPSET = 7, 99  # what any ONNX Runtime could know of; the exporter narrows it
MAX_FEATURE_SIZE = 1 << 20  # channels or pixels per side of a stage's input or output


class ExportError(ErdeError):
    """An export cannot be written, or an export folder is incomplete, altered or foreign."""


def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(
            "ONNX Runtime is not installed; install the extra: pip install 'erde[onnx]'"
        ) from None
    return onnxruntime


ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")  # what the `onnx` extra installs


def missing_onnx_modules() -> list[str]:
    """The modules of the ``onnx`` extra that cannot be imported here (empty when all can)."""
    import importlib

    missing = []
    for name in ONNX_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_onnx_extra(what: str = "ONNX export") -> None:
    """One clear line naming the extra, instead of an ImportError deep inside the exporter."""
    missing = missing_onnx_modules()
    if missing:
        raise ExportError(
            f"{what} needs {', '.join(missing)}: install the extra with "
            'pip install -e ".[onnx]" (or pip install "erde[onnx]")'
        )


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter logs progress and optional-dependency notes; keep the CLI's output clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with (
            warnings.catch_warnings(),
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_stage(stage: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    """One stage graph with a dynamic batch dimension, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with _quiet_exporter():
            torch.onnx.export(
                stage, (example,), str(tmp), input_names=["input"],
                output_names=["features", "logits"], opset_version=opset, dynamo=True,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), external_data=False,
            )  # fmt: skip
    except Exception as exc:
        tmp.unlink(missing_ok=True)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"ONNX export of {path.name} failed: {first[:300]}") from exc
    written = _graph_opset(tmp)
    if written is not None and written != opset:
        tmp.unlink(missing_ok=True)
        raise ExportError(
            f"ONNX opset {opset} was asked for but torch {torch.__version__} wrote opset "
            f"{written}; use --opset {written} (the default is {DEFAULT_OPSET})"
        )
    os.replace(tmp, path)


def _graph_opset(path: Path) -> int | None:
    """The default-domain opset a graph file declares (None when the onnx package is absent)."""
    try:
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(path), load_external_data=False)
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    return versions[0] if versions else None


def export_onnx(
    model: nn.Module,
    out_dir: str | Path,
    image_shape: Sequence[int],
    *,
    identity: ModelIdentity,
    mean: Sequence[float],
    std: Sequence[float],
    class_names: Sequence[str] | None = None,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
) -> Path:
    """Export ``model`` as one ONNX graph per stage into ``out_dir``; returns the manifest path.

    Each graph: ``input`` (B, C_i, H_i, W_i) float32 -> ``features`` (the next
    stage's input) and ``logits`` (B, K). With ``check`` every graph is run
    once with ONNX Runtime and compared with PyTorch before the manifest is
    written (the manifest comes last: a folder without one is not an export).
    """
    from erde.models import measure_exit_costs

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"ONNX opset must be in [{MIN_OPSET}, {MAX_OPSET}], got {opset}")
    require_onnx_extra()
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model stays where it is
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    costs = measure_exit_costs(model, tuple(image_shape))
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(2, *image_shape, generator=generator)  # batch 2: the batch axis stays dynamic
    stages = []
    for i in range(model.num_exits):
        stage = StageWithExit(model, i).eval()
        path = out / f"stage_{i}.onnx"
        _export_stage(stage, h, path, opset)
        with torch.inference_mode():
            features, logits = stage(h)
        if check:
            _check_stage(path, h, features, logits)
        stages.append(
            {
                "file": path.name,
                "input_shape": list(h.shape[1:]),
                "feature_shape": list(features.shape[1:]),
                "sha256": file_sha256(path),
            }
        )
        h = features
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": identity.to_dict(),
        "image_shape": [int(s) for s in image_shape],
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "class_names": list(class_names) if class_names is not None else None,
        "macs_per_exit": [int(m) for m in costs.macs_per_exit],
        "opset": opset,
        "torch": torch.__version__,
        "stages": stages,
    }
    from erde.io import atomic_write_json

    atomic_write_json(out / MANIFEST, manifest)
    return out / MANIFEST


def _check_stage(path: Path, x: Tensor, features: Tensor, logits: Tensor) -> None:
    ort = _require_onnxruntime()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got_features, got_logits = session.run(None, {"input": x.numpy()})
    for name, want, got in (("features", features, got_features), ("logits", logits, got_logits)):
        scale = max(1.0, want.abs().max().item())
        err = float(np.abs(got - want.numpy()).max())
        if err > 1e-3 * scale:
            raise ExportError(f"{path.name}: ONNX Runtime {name} differ from PyTorch by {err:.3g}")


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    thresholds_file: str | Path | None = None,
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export a checkpoint; its thresholds file (given, or the one beside it) is validated and copied in."""
    from erde.checkpoints import load_checkpoint, model_from_checkpoint
    from erde.inference.policy import model_fingerprint, thresholds_path
    from erde.outputs import check_out_folder

    check_out_folder(out_dir, [checkpoint])  # the export would mix into the model's own folder
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt)
    identity = ModelIdentity(
        ckpt["name"], model_fingerprint(ckpt["model"]), int(ckpt["num_classes"]), model.num_exits
    )
    source = Path(thresholds_file) if thresholds_file else thresholds_path(ckpt["path"])
    policy_text = None
    if thresholds_file or source.is_file():
        load_thresholds(source, identity)  # refuses a file made for another model
        policy_text = source.read_text(encoding="utf-8")
    manifest = export_onnx(
        model, out_dir, tuple(ckpt["image_shape"]), identity=identity,
        mean=ckpt.get("mean") or (0.0,) * ckpt["image_shape"][0],
        std=ckpt.get("std") or (1.0,) * ckpt["image_shape"][0],
        class_names=ckpt.get("class_names"), opset=opset,
    )  # fmt: skip
    target = Path(out_dir) / "thresholds.json"
    if policy_text is not None:
        from erde.io import atomic_write_text

        atomic_write_text(target, policy_text)
    else:
        target.unlink(missing_ok=True)  # a stale file from an earlier export would not fit
    return manifest


# --------------------------------------------------------------------------- runtime


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The export folder's manifest (untrusted JSON), checked for shape and completeness."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ExportError(f"ONNX export folder not found: {directory}")
    if not path.is_file():
        raise ExportError(
            f"{directory} is not an erde ONNX export (no {MANIFEST}); run `erde export`"
        )
    manifest = read_marked_json(path, FORMAT, VERSION, ExportError, "an erde ONNX manifest")
    stages, model = manifest.get("stages"), manifest.get("model")
    shape, names = manifest.get("image_shape"), manifest.get("class_names")
    ok = (
        isinstance(stages, list) and stages and isinstance(model, dict)
        and all(isinstance(s, dict) and isinstance(s.get("file"), str) for s in stages)
        and model.get("num_exits") == len(stages) and _ints(model.get("num_classes"), 1)
        and _ints(manifest.get("macs_per_exit"), len(stages)) and _ints(shape, 3)
        and _numbers(manifest.get("mean"), shape[0]) and _numbers(manifest.get("std"), shape[0])
        and (names is None or (isinstance(names, list) and len(names) == model["num_classes"]))
    )  # fmt: skip
    if not ok:
        raise ExportError(
            f"{path} is malformed (stages, model, macs_per_exit, image_shape, mean, std or "
            "class_names); export again"
        )
    where = str(path)
    check_int(model["num_classes"], "model.num_classes", 1, MAX_CLASSES, where, ExportError)
    check_image_shape(shape, where, ExportError)
    check_stats(manifest["mean"], manifest["std"], shape[0], where, ExportError)
    check_class_names(names, model["num_classes"], where, ExportError)
    _check_stage_shapes(stages, shape, where)
    check_ints_positive(manifest["macs_per_exit"], "macs_per_exit", where, ExportError)
    for i, stage in enumerate(stages):
        name = stage["file"]
        if name != f"stage_{i}.onnx":
            raise ExportError(f"{path}: stage {i} must be stage_{i}.onnx, got {name!r}")
        file = directory / name
        if not file.is_file():
            raise ExportError(
                f"{directory} lacks {name} (the manifest lists {len(stages)} stages); export again"
            )
        if stage.get("sha256") != file_sha256(file):
            raise ExportError(
                f"{file} does not match the manifest (altered, or from another export)"
            )
    return manifest


def _check_stage_shapes(stages: list[dict[str, Any]], image_shape: list[int], where: str) -> None:
    """Each stage's input is the previous stage's features (the image for stage 0), all bounded."""
    previous = list(image_shape)
    for i, stage in enumerate(stages):
        for key in ("input_shape", "feature_shape"):
            dims = stage.get(key)
            if not isinstance(dims, list) or not 1 <= len(dims) <= 4:
                raise ExportError(f"{where}: stages[{i}].{key} must be a list of sizes")
            for j, v in enumerate(dims):
                check_int(v, f"stages[{i}].{key}[{j}]", 1, MAX_FEATURE_SIZE, where, ExportError)
        if stage["input_shape"] != previous:
            raise ExportError(
                f"{where}: stages[{i}].input_shape {stage['input_shape']} is not the output "
                f"{previous} of the stage before it"
            )
        previous = stage["feature_shape"]


def _check_graph(session: Any, stage: dict[str, Any], num_classes: int, where: str) -> None:
    """The graph ONNX Runtime loaded has the inputs and outputs the manifest describes.

    A stage file from another model, with its checksum updated in the manifest,
    stops here instead of failing (or answering) mid-run.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    want = {
        "input": [None, *stage["input_shape"]],
        "features": [None, *stage["feature_shape"]],
        "logits": [None, num_classes],
    }
    got = {x.name: list(x.shape) for x in [*inputs, *outputs]}
    for name, dims in want.items():
        found = got.get(name)
        fixed = None if found is None else [d if isinstance(d, int) else None for d in found[1:]]
        if found is None or len(found) != len(dims) or fixed != dims[1:]:
            raise ExportError(
                f"{where}: {stage['file']} does not fit the manifest ({name} is {found}, the "
                f"manifest says {['batch', *dims[1:]]}); it is from another model or export"
            )


def _check_finite_weights(path: Path) -> None:
    """Refuse a stage graph with a nan or inf among its float weights, naming the tensor.

    Such a graph answers with non-finite probabilities for every image. Needs
    the ``onnx`` package (part of the ``onnx`` extra); a deployment with only
    ``onnxruntime`` installed skips the scan, and ``erde predict`` still refuses
    non-finite answers one by one.
    """
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return
    graph = onnx.load(str(path), load_external_data=False).graph
    for tensor in graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ExportError(
                f"{path}: weight {tensor.name!r} holds nan or inf values; the export is damaged "
                "(export the checkpoint again)"
            )


def _ints(value: Any, count: int) -> bool:
    """``value`` is ``count`` positive ints (one int when ``count`` is 1 and it is not a list)."""
    items = value if isinstance(value, list) else [value]
    return len(items) == count and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items
    )


def _numbers(value: Any, count: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


class OnnxEarlyExitRuntime:
    """Per-sample early exit on ONNX Runtime with the staged graphs of :func:`export_onnx`.

    ``policy`` None reads ``thresholds.json`` from the folder (checked against
    the manifest's model). ``threads`` sets ONNX Runtime's intra-op threads
    (default: as many as PyTorch uses). Every stage is its own session with its
    own thread pool; ``spin=False`` (the default) stops idle pools from
    busy-waiting, so the pools of the stages not running do not take the cores
    from the one that is.
    """

    def __init__(
        self,
        directory: str | Path,
        policy: ExitPolicy | None = None,
        *,
        threads: int | None = None,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        spin: bool = False,
    ) -> None:
        ort = _require_onnxruntime()
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.identity = ModelIdentity.from_dict(self.manifest["model"])
        self.num_exits = self.identity.num_exits
        self.image_shape = tuple(int(s) for s in self.manifest["image_shape"])
        self.class_names = self.manifest.get("class_names")
        self.mean, self.std = self.manifest["mean"], self.manifest["std"]
        self.macs = torch.tensor([int(v) for v in self.manifest["macs_per_exit"]], dtype=torch.long)
        if policy is None:
            policy = load_thresholds(self.directory / "thresholds.json", self.identity)
        if len(policy.thresholds) != self.num_exits - 1:
            raise ExportError(
                f"policy has {len(policy.thresholds)} thresholds, the export has "
                f"{self.num_exits - 1} early exits"
            )
        self.policy = policy
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        try:
            self.sessions = [
                ort.InferenceSession(
                    str(self.directory / s["file"]), options, providers=list(providers)
                )
                for s in self.manifest["stages"]
            ]
        except Exception as exc:  # corrupt graph: ONNX Runtime's own error types
            raise ExportError(
                f"{self.directory}: ONNX Runtime cannot load a stage ({exc})"
            ) from None
        for session, stage in zip(self.sessions, self.manifest["stages"], strict=True):
            _check_graph(session, stage, self.identity.num_classes, str(self.directory))
            _check_finite_weights(self.directory / stage["file"])

    def _run(self, i: int, h: np.ndarray) -> tuple[np.ndarray, Tensor]:
        features, logits = self.sessions[i].run(None, {"input": h})
        return features, torch.from_numpy(logits)

    def __call__(self, x: Tensor | np.ndarray) -> Routed:
        """Route a normalised float batch (B, C, H, W); answers (CPU tensors) in input order."""
        array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        check_image_batch(array.shape, self.image_shape)
        array = np.ascontiguousarray(array, dtype=np.float32)
        return route_stages(
            self._run, lambda h, keep: h[keep.numpy()], array, array.shape[0], self.policy,
            self.num_exits, self.macs, torch.device("cpu"),
        )  # fmt: skip

    def run_all(self, x: Tensor | np.ndarray) -> list[np.ndarray]:
        """Every exit's logits with no early exit (the stage graphs end to end): [(B, K)] * E."""
        h = (
            x.detach().cpu().numpy()
            if isinstance(x, Tensor)
            else np.ascontiguousarray(x, np.float32)
        )
        outs = []
        for session in self.sessions:
            h, logits = session.run(None, {"input": h})
            outs.append(logits)
        return outs


__all__ = [
    "ONNX_MODULES",
    "ExportError",
    "OnnxEarlyExitRuntime",
    "export_checkpoint",
    "export_onnx",
    "missing_onnx_modules",
    "read_manifest",
    "require_onnx_extra",
]
