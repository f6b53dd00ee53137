"""int8 early exit: post-training static quantisation of the staged ONNX graphs.

:func:`quantize_checkpoint` exports a checkpoint's stages (fp32), quantises each
with ONNX Runtime's static quantiser (QDQ, int8 weights per output channel in
a 7-bit range, uint8 activations), calibrated on **validation** images (never test): stage
``i``'s activation ranges come from the fp32 stages before it, so every stage
sees the inputs it will see in deployment. Quantisation moves the exit scores,
so the thresholds are fitted again on the quantised model's validation logits;
the folder's manifest and thresholds say ``int8``, and a thresholds file fitted
on the fp32 model is refused by the runtime. Per-exit test accuracy before and
after, and what the new thresholds give on test, go to ``quantization.json``;
a warning is raised when any exit loses more than ``accuracy_budget``.

Why 7-bit weights (``reduce_range``): on x86 CPUs without VNNI (AVX2, plain
AVX-512) ONNX Runtime multiplies uint8 activations by int8 weights with an
instruction that adds pairs of products into a saturating int16, and full-range
weights overflow it. On a 2-core AVX2 EPYC that cost a digits ResNet-8 x0.5
student 9-11 points at every exit; with 7-bit weights the loss was 0.28 points
at exit 0 and none at the others (docs/LOG.md). The exported folder
may run on any CPU, so the safe range is always used.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from erde.calibration import calibrate, open_checkpoint
from erde.errors import ConfigError
from erde.inference.export import ExportError, OnnxEarlyExitRuntime, export_onnx
from erde.inference.policy import ModelIdentity, model_fingerprint, save_thresholds
from erde.io import atomic_write_json, file_sha256

INT8_SUFFIX = ":int8"  # appended to the fp32 weights' fingerprint: another model for thresholds
MIN_CALIBRATION_IMAGES = 16


class QuantizationWarning(UserWarning):
    """Quantisation cost more accuracy than the stated budget."""


@dataclass
class QuantizeResult:
    directory: Path
    report: dict[str, Any]
    warning: str | None


def _require_quantization() -> Any:
    try:
        from onnxruntime import quantization
    except ImportError:
        raise ExportError('int8 export needs ONNX Runtime: pip install -e ".[onnx]"') from None
    return quantization


def check_calibration_images(images: Tensor, image_shape: tuple[int, ...]) -> None:
    """Refuse a calibration set of the wrong shape or too small to estimate ranges."""
    if images.dim() != 4 or tuple(images.shape[1:]) != tuple(image_shape):
        raise ConfigError(
            f"calibration images must be (N, {', '.join(map(str, image_shape))}), "
            f"got {tuple(images.shape)}"
        )
    if images.shape[0] < MIN_CALIBRATION_IMAGES:
        raise ConfigError(
            f"quantisation needs at least {MIN_CALIBRATION_IMAGES} calibration images to "
            f"estimate activation ranges, got {images.shape[0]}"
        )


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over one stage's inputs, in batches."""

    def __init__(self, inputs: np.ndarray, batch_size: int = 64) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {"input": batch}


class _AxisWarningFilter(logging.Filter):
    """Drops the quantiser's "Axis 1 is out-of-range for weight ..." lines.

    ONNX Runtime logs one on the root logger for every 1-D weight (an exit head's
    BatchNorm scale) when quantising per channel; that weight is then quantised
    per tensor, as it should be, so the line only alarms a user.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "is out-of-range for weight" not in record.getMessage()


@contextmanager
def _quiet_axis_warnings() -> Iterator[None]:
    root = logging.getLogger()
    quiet = _AxisWarningFilter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _pre_process(q: Any, source: Path, prepared: Path) -> None:
    """Shape inference and graph optimisation, as ONNX Runtime's quantiser expects.

    ONNX Runtime's symbolic shape inference cannot follow the gather that an adaptive
    pool over an odd-sized map exports to (FastNet's exit heads on 15x15 and 7x7 maps);
    ONNX's own shape inference can, so it is the fallback.
    """
    try:
        q.shape_inference.quant_pre_process(str(source), str(prepared))
    except TypeError:
        q.shape_inference.quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)


def quantize_stages(
    fp32_dir: Path, out_dir: Path, calibration: Tensor, *, per_channel: bool = True
) -> list[dict[str, Any]]:
    """Quantise every stage of an fp32 export into ``out_dir``; returns the new stage entries.

    ``calibration``: normalised float images (N, C, H, W). Stage ``i`` is
    calibrated on the outputs of fp32 stages ``0 .. i-1`` for those images.
    """
    q = _require_quantization()
    import onnxruntime as ort

    manifest_stages = OnnxEarlyExitRuntime(fp32_dir, policy=_no_policy(fp32_dir)).manifest["stages"]
    h = np.ascontiguousarray(calibration.detach().cpu().numpy(), dtype=np.float32)
    stages = []
    for stage in manifest_stages:
        source = fp32_dir / stage["file"]
        target = out_dir / stage["file"]
        prepared = fp32_dir / f"prepared_{stage['file']}"
        _pre_process(q, source, prepared)
        with _quiet_axis_warnings():
            q.quantize_static(
                str(prepared), str(target), _Reader(h),
                quant_format=q.QuantFormat.QDQ, per_channel=per_channel, reduce_range=True,
                activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                calibrate_method=q.CalibrationMethod.MinMax,
            )  # fmt: skip
        session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
        h = session.run(["features"], {"input": h})[0]  # fp32 inputs of the next stage
        stages.append({**stage, "sha256": file_sha256(target)})
    return stages


def _no_policy(directory: Path):
    """A placeholder policy (everything to the last exit) to open an export for its graphs."""
    from erde.inference.export import read_manifest
    from erde.inference.policy import ExitPolicy

    model = read_manifest(directory)["model"]
    return ExitPolicy.create(0.0, "entropy", model["num_classes"], model["num_exits"])


def all_exit_logits(runtime: OnnxEarlyExitRuntime, images: Tensor) -> Tensor:
    """(E, N, K) logits of every exit on normalised ``images`` (N, C, H, W), in batches."""
    outs = [runtime.run_all(images[i : i + 256]) for i in range(0, len(images), 256)]
    return torch.stack([torch.from_numpy(np.concatenate(e)) for e in zip(*outs, strict=True)])


def quantize_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    max_drop: float = 0.005,
    rule: str = "entropy",
    calibration_images: int = 512,
    accuracy_budget: float = 0.005,
    opset: int = 18,
    warn: bool = True,
) -> QuantizeResult:
    """int8 export of a checkpoint with thresholds fitted on the quantised model.

    ``max_drop``: the thresholds' target (accuracy drop on validation against
    the int8 model's own last exit, as ``erde calibrate --max-drop``).
    ``calibration_images``: how many validation images calibrate the
    activation ranges. ``accuracy_budget``: the most test accuracy any exit may
    lose to quantisation before a :class:`QuantizationWarning`.
    """
    if not 0 <= accuracy_budget < 1:
        raise ConfigError(f"accuracy budget must be in [0, 1), got {accuracy_budget}")
    from erde.data import prepare_batch

    _require_quantization()  # before any work
    from erde.outputs import check_out_folder

    check_out_folder(out_dir, [checkpoint])
    ckpt, cfg, splits, model, costs, dev = open_checkpoint(checkpoint, None, "cpu")
    n_cal = min(calibration_images, len(splits.val))
    calib = prepare_batch(splits.val.images[:n_cal], splits, train=False)
    check_calibration_images(calib, tuple(splits.image_shape))
    fp32_identity = ModelIdentity(
        ckpt["name"], model_fingerprint(ckpt["model"]), splits.num_classes, model.num_exits
    )
    identity = ModelIdentity(
        ckpt["name"], fp32_identity.fingerprint + INT8_SUFFIX, splits.num_classes, model.num_exits
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="erde-fp32-") as tmp:
        fp32_dir = Path(tmp)
        export_onnx(
            model, fp32_dir, tuple(splits.image_shape), identity=fp32_identity,
            mean=list(splits.mean), std=list(splits.std), class_names=splits.class_names,
            opset=opset,
        )  # fmt: skip
        fp32_manifest = OnnxEarlyExitRuntime(fp32_dir, policy=_no_policy(fp32_dir)).manifest
        (out / "manifest.json").unlink(missing_ok=True)  # no manifest until the stages are in
        (out / "thresholds.json").unlink(missing_ok=True)
        stages = quantize_stages(fp32_dir, out, calib)
        fp32_runtime = OnnxEarlyExitRuntime(fp32_dir, policy=_no_policy(fp32_dir))
        test_x = prepare_batch(splits.test.images, splits, train=False)
        fp32_test = all_exit_logits(fp32_runtime, test_x)
    manifest = {
        **fp32_manifest,
        "model": identity.to_dict(),
        "stages": stages,
        "precision": "int8",
        "quantization": {
            "method": (
                "onnxruntime static, QDQ, int8 per-channel weights in a 7-bit range "
                "(reduce_range), uint8 activations, MinMax"
            ),
            "calibration_images": n_cal,
            "calibration_split": "validation",
            "source_fingerprint": fp32_identity.fingerprint,
        },
    }
    atomic_write_json(out / "manifest.json", manifest)

    runtime = OnnxEarlyExitRuntime(out, policy=_no_policy(out))
    val_x = prepare_batch(splits.val.images, splits, train=False)
    val_logits = all_exit_logits(runtime, val_x)
    test_logits = all_exit_logits(runtime, test_x)
    result = calibrate(
        val_logits, splits.val.labels, costs.macs_per_exit, max_drop=max_drop, rule=rule,
        test_logits=test_logits, test_labels=splits.test.labels, warn=warn,
    )  # fmt: skip
    labels = splits.test.labels
    acc_fp32 = (fp32_test.argmax(-1) == labels).double().mean(dim=1).tolist()
    acc_int8 = (test_logits.argmax(-1) == labels).double().mean(dim=1).tolist()
    drops = [a - b for a, b in zip(acc_fp32, acc_int8, strict=True)]
    report = {
        "checkpoint": ckpt["path"],
        "precision": "int8",
        "calibration_images": n_cal,
        "test_images": int(labels.numel()),
        "exit_accuracy_fp32": acc_fp32,
        "exit_accuracy_int8": acc_int8,
        "exit_accuracy_drop": drops,
        "accuracy_budget": accuracy_budget,
        "thresholds": result.to_dict(),
        "macs_per_exit": list(costs.macs_per_exit),
    }
    save_thresholds(
        out / "thresholds.json", result.policy, identity,
        {**result.to_dict(), "checkpoint": ckpt["path"], "dataset": splits.name,
         "macs_per_exit": list(costs.macs_per_exit), "precision": "int8"},
    )  # fmt: skip
    atomic_write_json(out / "quantization.json", report)
    worst = max(range(len(drops)), key=lambda i: drops[i])
    warning = None
    if drops[worst] > accuracy_budget:
        warning = (
            f"int8 costs exit {worst} {100 * drops[worst]:.2f} points of test accuracy "
            f"({100 * acc_fp32[worst]:.2f} -> {100 * acc_int8[worst]:.2f} %), more than the "
            f"budget of {100 * accuracy_budget:.2f}"
        )
        if warn:
            warnings.warn(warning, QuantizationWarning, stacklevel=2)
    return QuantizeResult(out, report, warning)


__all__ = [
    "QuantizationWarning",
    "QuantizeResult",
    "all_exit_logits",
    "check_calibration_images",
    "quantize_checkpoint",
    "quantize_stages",
]
