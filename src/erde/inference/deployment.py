"""The deployment table: how much faster the deployed ERDE student is than the teacher a user had.

One table for a teacher and its (ERDE) student, at the student's thresholds
calibrated on validation for at most ``max_drop`` accuracy loss against its own
last exit (int8: fitted again on the quantised model). Rows:

    teacher, full network, fp32 (PyTorch)         what the user had
    student, full network, fp32 (PyTorch)
    student, early exit, fp32 (PyTorch)           per-sample routing, inference copy
    student, early exit, fp32 (ONNX Runtime)      the staged graphs
    student, early exit, int8 (ONNX Runtime)      `erde export --int8`

Columns: test accuracy, mean MACs per image, images per second at each batch
size, the measured speedup over the teacher's row at that batch size, and the
MAC-ideal speedup (teacher MACs / mean MACs). Every PyTorch row runs on the
inference copy (BatchNorm folded, NHWC), the teacher's too, so the speedups
compare like with like. Timings are medians of interleaved turns.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from erde.calibration import calibrate, record_logits
from erde.checkpoints import check_compatible, load_checkpoint, model_from_checkpoint
from erde.config import config_from_dict
from erde.data import load_splits, prepare_batch
from erde.errors import ConfigError
from erde.inference.bench import batches_of, full_network_macs, time_interleaved
from erde.inference.fusion import inference_copy
from erde.inference.policy import ModelIdentity, model_fingerprint
from erde.inference.routing import EarlyExitRouter, plain_forward
from erde.models import measure_exit_costs

Log = Callable[[str], None]


def _routed_row(name: str, engine: Callable[[Tensor], Any], x: Tensor, labels: Tensor) -> dict:
    out = engine(x)
    return {
        "row": name,
        "accuracy": (out.classes.cpu() == labels).double().mean().item(),
        "mean_macs": out.macs.double().mean().item(),
    }


def deployment_table(
    teacher: str | Path,
    student: str | Path,
    *,
    max_drop: float = 0.005,
    batch_sizes: Sequence[int] = (1, 256),
    images: int = 256,
    repeats: int = 3,
    min_time: float = 0.5,
    onnx: bool = True,
    int8: bool = True,
    log: Log | None = None,
) -> dict[str, Any]:
    """Measure the table's rows (see the module docstring); returns {rows, setup}."""
    log = log or (lambda _m: None)
    if images < 1 or not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError("--images and every batch size must be >= 1")
    t_ckpt, s_ckpt = load_checkpoint(teacher), load_checkpoint(student)
    if t_ckpt.get("role") != "teacher":
        raise ConfigError(f"{t_ckpt['path']} is not a teacher checkpoint (--teacher)")
    cfg = config_from_dict(s_ckpt["config"])
    splits = load_splits(cfg)
    for ckpt, what in ((t_ckpt, "teacher"), (s_ckpt, "student")):
        check_compatible(ckpt, splits.num_classes, splits.image_shape, what)
    if len(splits.val) == 0:
        raise ConfigError("the student's data has no validation split to calibrate on")
    t_model = model_from_checkpoint(t_ckpt).eval()
    s_model = model_from_checkpoint(s_ckpt).eval()
    s_costs = measure_exit_costs(s_model, splits.image_shape)
    teacher_macs = full_network_macs(t_model, splits.image_shape)
    student_macs = full_network_macs(s_model, splits.image_shape)

    cpu = torch.device("cpu")
    val_logits, val_labels = record_logits(s_model, splits, "val", cpu, 512, False)
    fitted = calibrate(val_logits, val_labels, s_costs.macs_per_exit, max_drop=max_drop, warn=False)
    policy = fitted.policy
    log(f"student thresholds fitted on {len(val_labels)} validation images: "
        f"{[round(t, 4) for t in policy.thresholds]} ({policy.rule})")  # fmt: skip

    test_x = prepare_batch(splits.test.images, splits, train=False)
    labels = splits.test.labels
    t_fast, s_fast = inference_copy(t_model), inference_copy(s_model)
    router = EarlyExitRouter(s_model, policy, image_shape=splits.image_shape, optimize=True)
    nhwc = test_x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        t_acc = (plain_forward(t_fast, nhwc).argmax(-1) == labels).double().mean().item()
        s_acc = (plain_forward(s_fast, nhwc).argmax(-1) == labels).double().mean().item()
    rows = [
        {"row": "teacher, full network, fp32 (PyTorch)", "accuracy": t_acc,
         "mean_macs": float(teacher_macs)},
        {"row": "student, full network, fp32 (PyTorch)", "accuracy": s_acc,
         "mean_macs": float(student_macs)},
        _routed_row("student, early exit, fp32 (PyTorch)", router, test_x, labels),
    ]  # fmt: skip
    pool = test_x[torch.arange(images) % len(test_x)].contiguous(memory_format=torch.channels_last)
    engines: dict[str, Callable[[Tensor], Any]] = {
        rows[0]["row"]: lambda x: plain_forward(t_fast, x),
        rows[1]["row"]: lambda x: plain_forward(s_fast, x),
        rows[2]["row"]: router,
    }
    with tempfile.TemporaryDirectory(prefix="erde-deploy-") as tmp:
        if onnx or int8:
            from erde.inference.export import OnnxEarlyExitRuntime, export_onnx, require_onnx_extra

            require_onnx_extra("the ONNX Runtime rows of the deployment table")
        if onnx:
            identity = ModelIdentity(
                s_ckpt["name"], model_fingerprint(s_ckpt["model"]), splits.num_classes,
                s_model.num_exits,
            )  # fmt: skip
            export_onnx(s_model, Path(tmp) / "fp32", splits.image_shape, identity=identity,
                        mean=splits.mean, std=splits.std)  # fmt: skip
            ort_fp32 = OnnxEarlyExitRuntime(Path(tmp) / "fp32", policy)
            rows.append(_routed_row("student, early exit, fp32 (ONNX Runtime)", ort_fp32,
                                    test_x, labels))  # fmt: skip
            engines[rows[-1]["row"]] = ort_fp32
        if int8:
            from erde.inference.quantize import quantize_checkpoint

            log("quantising the student to int8 (calibrated on validation images)")
            q = quantize_checkpoint(student, Path(tmp) / "int8", max_drop=max_drop, warn=False)
            ort_int8 = OnnxEarlyExitRuntime(q.directory)
            rows.append(_routed_row("student, early exit, int8 (ONNX Runtime)", ort_int8,
                                    test_x, labels))  # fmt: skip
            rows[-1]["int8_warning"] = q.warning
            engines[rows[-1]["row"]] = ort_int8
        log(f"timing {len(engines)} rows at {len(batch_sizes)} batch sizes: "
            f"{len(engines) * len(batch_sizes)} candidates of {images} images per pass, each for "
            f"at least {repeats} timed passes and {min_time:g} s")  # fmt: skip
        for bs in batch_sizes:
            chunks = batches_of(pool, bs)
            log(f"timing batch size {bs}: {len(engines)} rows, {images} images per pass")
            seconds = time_interleaved(
                {name: (lambda e=e, c=chunks: [e(x) for x in c]) for name, e in engines.items()},
                repeats=repeats, min_time=min_time,
            )  # fmt: skip
            base = seconds[rows[0]["row"]]
            for row in rows:
                row[f"ips_{bs}"] = images / seconds[row["row"]]
                row[f"speedup_{bs}"] = base / seconds[row["row"]]
    for row in rows:
        row["mac_ideal_speedup"] = teacher_macs / row["mean_macs"]
    advice = [a for bs in batch_sizes if (a := serving_advice(rows, bs))]
    for line in advice:
        log(line)
    return {
        "rows": rows,
        "advice": advice,
        "setup": {
            "teacher": t_ckpt["path"], "student": s_ckpt["path"], "dataset": splits.name,
            "test_images": int(labels.numel()), "timed_images": images,
            "batch_sizes": list(batch_sizes), "max_drop": max_drop,
            "thresholds": list(policy.thresholds), "rule": policy.rule,
            "threads": torch.get_num_threads(),
        },
    }  # fmt: skip


def serving_advice(rows: Sequence[dict[str, Any]], batch_size: int) -> str | None:
    """When the student's full network serves more images per second than every early-exit
    row at ``batch_size``, a line that says so and recommends serving it without routing."""
    full = next(r for r in rows if r["row"].startswith("student, full network"))
    early = [r for r in rows if "early exit" in r["row"]]
    key = f"ips_{batch_size}"
    best = max(early, key=lambda r: r[key], default=None)
    if best is None or best[key] >= full[key]:
        return None
    return (
        f"at batch {batch_size} the student's full network without exits is faster "
        f"({full[key]:.0f} img/s) than its early exit (at best {best[key]:.0f} img/s, "
        f"{best['row']}): serve it without routing at this batch size"
    )


__all__ = ["deployment_table", "serving_advice"]
