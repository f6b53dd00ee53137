"""The Python API: each CLI command as one call, with the same defaults.

    erde run                 erde.run(cfg, "runs/digits")
    erde train-teacher       erde.train_teacher(cfg, "runs/t")
    erde train-student       erde.train_student(cfg, "runs/s", method="erde", teacher="runs/t")
    erde evaluate            erde.evaluate(["runs/t", "runs/s"], "runs/report")
    erde calibrate           erde.calibrate("runs/s", budget=0.5)
      --confidence 0.9       erde.calibrate("runs/s", max_drop=0.02, confidence=0.9)
    erde evaluate --budgeted erde.evaluate_budgeted(["runs/s"], "runs/budgeted")
    erde predict             erde.load_predictor("runs/s").predict(uint8_images)
    erde export              erde.export_checkpoint("runs/s", "runs/s_onnx")
      --int8                 erde.quantize_checkpoint("runs/s", "runs/s_int8")
    erde reproduce           erde.reproduce("cifar10", "runs/r", data_dir=..., schedule="speed")
    erde verify              erde.verify("docs/results/cifar10-speed.json")
    --dataset/--config/--set erde.make_config("digits", ["student_train.epochs=5"])
    --threads                erde.set_threads(1)

Every call that reads data also takes ``splits=`` (from :func:`erde.load_data`
or :func:`erde.splits_from_tensors`), so models can be trained and calibrated
on images that are not in any built-in format. docs/API.md walks through it.
The CLI's commands call these functions, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from erde.calibration import Calibration, calibrate_checkpoint
from erde.calibration.guaranteed import GuaranteedCalibration, calibrate_checkpoint_guaranteed
from erde.checkpoints import load_checkpoint, model_from_checkpoint
from erde.config import ExperimentConfig, StudentSpec, load_config, load_yaml, preset_path
from erde.data import DataSplits
from erde.data.augment import normalize
from erde.distributed import resolve_device
from erde.errors import ConfigError
from erde.models import EarlyExitNet, measure_exit_costs
from erde.pipeline import evaluate_checkpoints, run_pipeline
from erde.training import EpochCallback, Job, train


def make_config(
    dataset: str = "digits",
    overrides: Sequence[str] = (),
    *,
    data_dir: str | Path | None = None,
    config_file: str | Path | None = None,
) -> ExperimentConfig:
    """The configuration ``erde ... --dataset D --config F --set K=V`` builds.

    Defaults < the data set's preset < ``config_file`` < ``overrides``
    (``"section.key=value"`` strings, as for ``--set``). Unknown keys and
    wrong types raise :class:`erde.errors.ConfigError`.

    >>> cfg = make_config("digits", ["student_train.epochs=5", "seed=1"])
    >>> cfg.data.name, cfg.teacher.arch, cfg.student_train.epochs, cfg.seed
    ('digits', 'resnet20', 5, 1)
    """
    preset = preset_path(dataset)
    base = load_yaml(preset) if preset.is_file() else {}
    flags = [f"data.name={dataset}"]
    if data_dir is not None:
        flags.append(f"data.data_dir={data_dir}")
    return load_config(config_file, [*flags, *overrides], base=base)


def _named_after(cfg: ExperimentConfig, splits: DataSplits | None) -> ExperimentConfig:
    """``cfg`` whose data set name is that of ``splits``, so the saved config says what was used."""
    if splits is None or splits.name == cfg.data.name:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, name=splits.name))


def train_teacher(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    splits: DataSplits | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    allow_config_change: bool = False,
    on_epoch: EpochCallback | None = None,
) -> Path:
    """Train an early-exit teacher (``cfg.teacher``, ``cfg.teacher_train``); returns checkpoint.pt.

    Without ``splits`` the data set of ``cfg.data`` is loaded. ``out_dir``
    receives checkpoint.pt, config.yaml and metrics.jsonl; a folder that
    already holds a checkpoint is refused unless ``resume`` (continue it, or
    reuse it if finished) or ``force`` (start over). With ``resume``, a
    checkpoint trained with another config is refused, the differing keys
    listed, unless ``allow_config_change``. ``progress`` shows bars.
    ``on_epoch(out_dir, record)`` sees each epoch's metrics record (e.g.
    :class:`erde.monitor.TensorBoardLogger`).
    """
    return train(
        _named_after(cfg, splits), Job("teacher"), out_dir, resume=resume, force=force,
        progress=progress, splits=splits, allow_config_change=allow_config_change,
        on_epoch=on_epoch,
    )  # fmt: skip


def train_student(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    method: str = "erde",
    teacher: str | Path | None = None,
    splits: DataSplits | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    allow_config_change: bool = False,
    on_epoch: EpochCallback | None = None,
) -> Path:
    """Train an early-exit student (``cfg.student``, ``cfg.student_train``) with ``method``.

    ``method``: ``ce`` (labels only), ``kd`` (exit-wise distillation),
    ``erde`` (KL where the teacher's exit is right, entropy where it is
    wrong; weights in ``cfg.distill``) or one registered with
    :func:`erde.losses.register_method`; another name raises
    :class:`erde.errors.ConfigError` before anything is written. ``kd`` and
    ``erde`` need the ``teacher`` checkpoint. ``resume``, ``force``,
    ``progress``, ``allow_config_change`` and ``on_epoch`` as for
    :func:`train_teacher`. Returns the student's checkpoint.pt.
    """
    return train(
        _named_after(cfg, splits), Job("student", method), out_dir, teacher_checkpoint=teacher,
        resume=resume, force=force, progress=progress, splits=splits,
        allow_config_change=allow_config_change, on_epoch=on_epoch,
    )  # fmt: skip


def run(
    cfg: ExperimentConfig,
    out_dir: str | Path,
    *,
    methods: Sequence[str | StudentSpec] | None = None,
    resume: bool = False,
    force: bool = False,
    progress: bool = True,
    allow_config_change: bool = False,
    on_epoch: EpochCallback | None = None,
    teacher: str | Path | None = None,
) -> dict[str, Path]:
    """``erde run``: teacher, the students side by side, evaluation and report.

    ``methods`` (``--students``): method names, ``NAME=METHOD:key=value``
    texts or :class:`~erde.config.StudentSpec` objects; default the config's
    ``distill.students`` (ce, kd, erde unless the config names others).
    ``teacher`` (``--teacher``): a finished teacher's folder (e.g. the released
    ``docs/results/cifar10-speed-teacher``) to distil from instead of training one.
    ``resume``, ``force``, ``progress``, ``allow_config_change`` and
    ``on_epoch`` as for :func:`train_teacher`. Returns the report's paths:
    ``json``, ``markdown``, ``html``, ``plot``, ``csv``, ... (empty on a
    non-zero rank under torchrun, where rank 0 evaluates).
    """
    return run_pipeline(
        cfg, out_dir, methods=methods, resume=resume, force=force, progress=progress,
        allow_config_change=allow_config_change, on_epoch=on_epoch, teacher=teacher,
    )  # fmt: skip


def evaluate(
    checkpoints: Sequence[str | Path],
    out_dir: str | Path,
    *,
    splits: DataSplits | None = None,
    cfg: ExperimentConfig | None = None,
    thresholds: Sequence[float] | None = None,
    progress: bool = True,
    names: Sequence[str] | None = None,
) -> dict[str, Path]:
    """``erde evaluate``: every exit's test logits once, threshold sweeps, the report.

    Writes report.json (the source of truth), report.md, report.html,
    tradeoff.png, reliability.png, sweep.csv and, when the checkpoints'
    folders hold their metrics, training.png to ``out_dir`` and returns their
    paths (``json``, ``markdown``, ``html``, ``plot``, ``reliability``, ``csv``,
    ``training``). ``names`` labels
    the models (default: each checkpoint's own, e.g. ``student_erde``; two
    ERDE students of different runs need names of their own).
    """
    return evaluate_checkpoints(
        checkpoints, out_dir, cfg=cfg, splits=splits, thresholds=thresholds, progress=progress,
        names=names,
    )  # fmt: skip


def calibrate(
    checkpoint: str | Path,
    *,
    budget: float | None = None,
    max_drop: float | None = None,
    rule: str = "entropy",
    per_exit: bool = False,
    temperature: bool = False,
    confidence: float | None = None,
    risk: str | None = None,
    splits: DataSplits | None = None,
    cfg: ExperimentConfig | None = None,
    out: str | Path | None = None,
    progress: bool = False,
) -> tuple[Calibration | GuaranteedCalibration, Path]:
    """``erde calibrate``: thresholds fitted on the validation split, never on test.

    Exactly one target: ``budget`` (mean MACs at most this fraction of the
    full network) or ``max_drop`` (validation accuracy at most this far
    below the last exit). With ``confidence`` (e.g. 0.9) and ``max_drop``,
    the thresholds come with a guarantee instead (docs/INFERENCE.md): with
    that probability over the draw of the validation images, the ``risk``
    (``drop``, the default: images wrong early but right at the last exit;
    or ``consistency``) on new images is at most ``max_drop``; the result is
    a :class:`~erde.calibration.guaranteed.GuaranteedCalibration`
    (``.guarantee()`` says it in words), and no thresholds file is written
    when the validation images cannot support it
    (:class:`erde.errors.CalibrationError`).

    Writes ``<checkpoint stem>.thresholds.json`` beside the checkpoint (or
    ``out``), which :func:`erde.load_predictor` and
    :func:`erde.export_checkpoint` then pick up, and returns the result
    (``.policy``, ``.validation``, ``.test``) and the path. The data set is
    the checkpoint's own unless ``splits`` or ``cfg`` say otherwise.
    """
    if confidence is None:
        if risk is not None:
            raise ConfigError(
                "risk goes with confidence (plain calibration bounds the accuracy drop)"
            )
        return calibrate_checkpoint(
            checkpoint, budget=budget, max_drop=max_drop, rule=rule, per_exit=per_exit,
            temperature=temperature, out=out, cfg=cfg, progress=progress, splits=splits,
        )  # fmt: skip
    if max_drop is None or budget is not None:
        raise ConfigError("confidence goes with max_drop (the risk to bound), not budget")
    if temperature:
        raise ConfigError(
            "temperature with confidence: temperatures fitted on the calibration images "
            "would void the guarantee"
        )
    return calibrate_checkpoint_guaranteed(
        checkpoint, max_risk=max_drop, confidence=confidence, risk=risk or "drop", rule=rule,
        per_exit=per_exit, out=out, cfg=cfg, progress=progress, splits=splits,
    )  # fmt: skip


@dataclass
class LoadedModel:
    """A checkpoint's model with everything needed to feed it: shape, normalisation, names."""

    model: EarlyExitNet  # in eval mode; model(x) -> list of E logits tensors (B, K)
    name: str  # teacher, student_ce, student_kd, student_erde
    image_shape: tuple[int, int, int]  # (C, H, W) the model was trained on
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units (training set)
    std: tuple[float, ...]
    class_names: list[str]
    macs_per_exit: list[int]  # MACs per image of answering at exit i (measured)
    config: dict[str, Any]  # the full configuration it was trained with
    path: Path

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) in [0, 255] -> the float input the model was trained on."""
        device = next(self.model.parameters()).device
        return normalize(images.to(device), self.mean, self.std)

    @torch.no_grad()
    def exit_logits(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Every exit's logits for uint8 images (B, C, H, W): E tensors (B, K), no routing."""
        return self.model(self.normalize(images))


def load_model(
    checkpoint: str | Path, device: str = "cpu", *, trust_modules: Sequence[str] = ()
) -> LoadedModel:
    """A checkpoint (file, or folder holding checkpoint.pt) as a ready-to-use model.

    Loaded with ``torch.load(..., weights_only=True)``: a checkpoint never runs code.
    A checkpoint of your own network (``arch`` ``module:factory``) imports its
    module only when ``trust_modules`` names it (or a package above it).
    """
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, trust_modules=trust_modules)
    model = model.to(resolve_device(device)).eval()
    shape = tuple(int(s) for s in ckpt["image_shape"])
    c = shape[0]
    names = ckpt.get("class_names") or [str(k) for k in range(int(ckpt["num_classes"]))]
    return LoadedModel(
        model=model, name=ckpt["name"], image_shape=shape,  # type: ignore[arg-type]
        mean=tuple(ckpt.get("mean") or (0.0,) * c), std=tuple(ckpt.get("std") or (1.0,) * c),
        class_names=list(names), macs_per_exit=list(measure_exit_costs(model, shape).macs_per_exit),
        config=ckpt["config"], path=Path(ckpt["path"]),
    )  # fmt: skip


def verify(results: str | Path) -> list[str]:
    """``erde verify``: every number of a published results block that its per-image
    records do not give back (an empty list: all of them re-derived).

    ``results`` is a results JSON of ``erde reproduce``; its records file
    (``<stem>-records.npz`` beside it, or ``records.npz`` in a run folder) must
    be the one the JSON names (sha256, image count, classes), else a
    :class:`~erde.records.RecordsError` says why.
    """
    from erde.reproduce.evidence import verify_block

    if not isinstance(results, (str, Path)):
        raise TypeError(f"results must be a path to a results JSON, got {type(results).__name__}")
    _, differences = verify_block(Path(results))
    return differences
