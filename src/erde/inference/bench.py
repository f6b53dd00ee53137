"""Throughput of early exit against the full network: behind ``erde bench`` and the benchmarks."""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from erde.inference.policy import ExitPolicy, ModelIdentity, model_fingerprint
from erde.inference.routing import EarlyExitRouter, plain_forward, route_whole_batch

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


def estimate_seconds(
    pass_seconds: float, candidates: int, repeats: int, min_time: float, warmup: int = 1
) -> float:
    """Rough wall time of :func:`time_turns` for one batch size, from one full-network pass.

    Each candidate runs ``warmup`` passes, then turns until it has ``repeats`` passes and
    ``min_time`` seconds; early-exit passes are taken to cost about a full pass (they are
    rarely much cheaper on a CPU, and sometimes dearer).
    """
    timed = max(repeats, math.ceil(min_time / pass_seconds) if pass_seconds > 0 else repeats)
    return candidates * (warmup + timed) * pass_seconds


def fmt_duration(seconds: float) -> str:
    """``45 s``, ``7 min``, ``1.5 h``: a duration as a person reads an estimate."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan_line(
    device: str, candidates: Sequence[str], pass_seconds: Mapping[int, float], images: int,
    repeats: int, min_time: float,
) -> str:  # fmt: skip
    """What the benchmark is about to time and about how long it will take, printed first: a
    default run times 15 candidates and took 8 minutes for the digits student on 2 cores."""
    total = sum(
        estimate_seconds(t, len(candidates), repeats, min_time) for t in pass_seconds.values()
    )
    per_pass = ", ".join(f"{t:.2g} s at batch {bs}" for bs, t in pass_seconds.items())
    return (
        f"{device}: timing {len(candidates)} ways to serve ({', '.join(candidates)}) at "
        f"{len(pass_seconds)} batch size{'s' * (len(pass_seconds) != 1)}: "
        f"{len(candidates) * len(pass_seconds)} candidates of {images} images per pass, each for "
        f"at least {repeats} timed passes and {min_time:g} s; estimate about "
        f"{fmt_duration(total)} (one full-network pass: {per_pass})"
    )


def serving_advice(records: Sequence[Mapping[str, Any]]) -> str | None:
    """At one batch size: when early exit is slower than the full network with every backend,
    a line that says so and to serve the full network without routing; else None."""
    if not records or any(r["measured_speedup"] >= 1.0 for r in records):
        return None
    best = max(records, key=lambda r: r["measured_speedup"])
    return (
        f"at batch {best['batch_size']} on {best['device']} the full network without exits is "
        f"faster than early exit ({best['full_ips']:.0f} img/s against at best "
        f"{best['early_exit_ips']:.0f} img/s with {best['backend']}, {best['measured_speedup']:.2f}x): "
        "serve it without routing at this batch size"
    )


def batches_of(images: Tensor, batch_size: int) -> list[Tensor]:
    """``images`` cut into consecutive batches of ``batch_size`` (the last one may be smaller)."""
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)]


def _full_pass_seconds(
    model: nn.Module, images: Tensor, batch_sizes: Sequence[int], sync: Callable[[], None]
) -> dict[int, float]:
    """Seconds of one full-network pass over ``images`` at each batch size (for the estimate)."""
    seconds = {}
    for bs in batch_sizes:
        chunks = batches_of(images, bs)
        seconds[bs] = _time_pass(lambda c=chunks: [plain_forward(model, x) for x in c], sync)
    return seconds


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
    ``fold_bn`` runs both on :func:`erde.inference.fusion.inference_copy` (BatchNorm
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
        from erde.inference.fusion import inference_copy

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
    candidates = ["full", "torch", *(["torch-batch-routing"] * batch_routing),
                  *(["onnx-full", "onnxruntime"] if onnx_runtime is not None else [])]  # fmt: skip
    if log is not None:  # one full pass per batch size, for the estimate (and as a warm-up)
        pass_seconds = _full_pass_seconds(model, images, batch_sizes, sync)
        log(plan_line(device.type, candidates, pass_seconds, n, repeats, min_time))
    for bs in batch_sizes:
        chunks = batches_of(images, bs)
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
        first = len(records)
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
        advice = serving_advice(records[first:])
        for record in records[first:]:
            record["full_network_faster"] = advice is not None
        if advice and log is not None:
            log(advice)
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
    from erde.data import load_splits, prepare_batch

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
        from erde.inference.export import missing_onnx_modules

        if missing := missing_onnx_modules():
            if log is not None:
                log(f"ONNX Runtime rows skipped: {', '.join(missing)} not installed "
                    '(pip install -e ".[onnx]")')  # fmt: skip
            onnx = False
    with tempfile.TemporaryDirectory(prefix="erde-onnx-") as tmp:
        runtime = None
        if onnx is not False:
            from erde.inference.export import ExportError, OnnxEarlyExitRuntime, export_onnx

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
    "RATIO_WARNING",
    "SPREAD_WARNING",
    "bench_checkpoint",
    "benchmark_routing",
    "estimate_seconds",
    "fmt_duration",
    "format_record",
    "full_network_macs",
    "plan_line",
    "serving_advice",
    "speedup_spread",
    "time_interleaved",
    "time_turns",
    "timing_warning",
]
