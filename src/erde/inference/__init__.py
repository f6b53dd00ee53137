"""Early exit at inference: the exit policy, per-sample routing, prediction, benchmarks.

One module per concern, imports running one way (policy -> routing -> predict
-> bench; the ONNX export imports policy and routing only):

- :mod:`~erde.inference.policy`: the exit policy (rule, thresholds, optional
  per-exit temperatures), the model identity and the thresholds file;
- :mod:`~erde.inference.routing`: per-sample routing with batch compaction
  (skipped MACs become skipped time), the same loop for PyTorch and ONNX Runtime;
- :mod:`~erde.inference.predict`: image files, and the predictor of a
  checkpoint or an ONNX export behind ``erde predict``;
- :mod:`~erde.inference.bench`: throughput of early exit against the full
  network behind ``erde bench`` and ``benchmarks/inference.py``.

Everything is re-exported here, so ``from erde.inference import X`` works for all of it.
"""

from erde.inference.bench import (
    RATIO_WARNING,
    SPREAD_WARNING,
    batches_of,
    bench_checkpoint,
    benchmark_routing,
    estimate_seconds,
    fmt_duration,
    format_record,
    full_network_macs,
    plan_line,
    serving_advice,
    speedup_spread,
    time_interleaved,
    time_turns,
    timing_warning,
)
from erde.inference.policy import (
    MAX_JSON_BYTES,
    THRESHOLDS_FORMAT,
    THRESHOLDS_VERSION,
    ExitPolicy,
    ModelIdentity,
    ThresholdsFileError,
    apply_temperatures,
    float32_within,
    load_thresholds,
    model_fingerprint,
    read_marked_json,
    resolve_policy,
    save_thresholds,
    scale_logits,
    thresholds_path,
)
from erde.inference.predict import (
    Engine,
    Predictor,
    list_image_files,
    load_image,
    load_predictor,
    normalize_images,
    predict_files,
)
from erde.inference.routing import (
    EarlyExitRouter,
    ImageInputError,
    Routed,
    StageWithExit,
    check_image_batch,
    compact_rows,
    plain_forward,
    route_stages,
    route_whole_batch,
)

__all__ = [
    "MAX_JSON_BYTES",
    "RATIO_WARNING",
    "SPREAD_WARNING",
    "THRESHOLDS_FORMAT",
    "THRESHOLDS_VERSION",
    "EarlyExitRouter",
    "Engine",
    "ExitPolicy",
    "ImageInputError",
    "ModelIdentity",
    "Predictor",
    "Routed",
    "StageWithExit",
    "ThresholdsFileError",
    "batches_of",
    "apply_temperatures",
    "bench_checkpoint",
    "benchmark_routing",
    "check_image_batch",
    "compact_rows",
    "estimate_seconds",
    "float32_within",
    "fmt_duration",
    "format_record",
    "full_network_macs",
    "list_image_files",
    "load_image",
    "load_predictor",
    "load_thresholds",
    "plan_line",
    "model_fingerprint",
    "normalize_images",
    "plain_forward",
    "predict_files",
    "read_marked_json",
    "resolve_policy",
    "route_stages",
    "route_whole_batch",
    "save_thresholds",
    "scale_logits",
    "serving_advice",
    "speedup_spread",
    "thresholds_path",
    "time_interleaved",
    "time_turns",
    "timing_warning",
]
