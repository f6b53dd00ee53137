"""Running the seeds: schedules, configs, data layout, training and evaluating each seed."""

from __future__ import annotations

import copy
import dataclasses
import json
import shlex
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from erde.config import ExperimentConfig, load_config, load_yaml, preset_path
from erde.data.formats import CIFAR10
from erde.errors import ConfigError, DataError
from erde.pipeline import STUDENT_METHODS, evaluate_checkpoints
from erde.reproduce.render import publish, write_results
from erde.reproduce.stats import MODELS, RULE, aggregate, threshold_grid
from erde.training import Job, load_splits, train

SCHEDULES = ("full", "reduced", "fast")

Log = Callable[[str], None]

# --------------------------------------------------------------------------- configuration


def schedule_path(schedule: str) -> Path | None:
    """The overlay file of ``schedule`` (None for ``full``, which is the preset itself)."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
    if schedule == "full":
        return None
    return Path(__file__).parents[1] / "configs" / "schedules" / f"{schedule}.yaml"


def reproduce_config(
    dataset: str,
    schedule: str = "full",
    *,
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> ExperimentConfig:
    """Defaults < preset ``dataset`` < ``schedule`` overlay < ``config`` file < ``overrides``."""
    overlay = schedule_path(schedule)
    preset = preset_path(dataset)
    if not preset.is_file():
        known = sorted(p.stem for p in preset.parent.glob("*.yaml"))
        raise ConfigError(f"no preset for dataset {dataset!r}; presets: {', '.join(known)}")
    base = load_yaml(preset)
    if overlay is not None:
        base = load_config(overlay, base=base).to_dict()
    return load_config(config, list(overrides), base=base)


def reproduce_command(
    dataset: str,
    data_dir: str | Path | None,
    seeds: int,
    schedule: str,
    overrides: Sequence[str] = (),
) -> str:
    """The ``erde reproduce`` command line that produces these results (for the record)."""
    parts = ["erde", "reproduce", "--dataset", dataset]
    if data_dir is not None:
        parts += ["--data-dir", str(data_dir)]
    parts += ["--seeds", str(seeds), "--schedule", schedule]
    for text in overrides:
        parts += ["--set", text]
    return shlex.join(parts)


def _archive_is_imagefolder(path: Path, members: int = 64) -> bool:
    """Whether the first members of a tar archive sit under train/ or test/."""
    try:
        with tarfile.open(path, "r|*") as tar:
            for i, member in enumerate(tar):
                top = member.name.replace("\\", "/").lstrip("./").split("/", 1)[0]
                if top in ("train", "test"):
                    return True
                if top == CIFAR10.folder or i + 1 >= members:
                    return False
    except (tarfile.TarError, OSError, EOFError):
        return False  # the loader reports the unreadable archive
    return False


def detect_loader(dataset: str, data_dir: str | Path | None) -> str:
    """The loader that reads ``data_dir``: ``imagefolder`` for a CIFAR-10 ImageFolder copy.

    CIFAR-10 is accepted in two layouts: the official python release (folder or
    ``cifar-10-python.tar.gz``) and an ImageFolder copy (``train/<class>/*.jpg``,
    ``test/<class>/*.jpg``, unpacked or as a .tar.gz). The official layout wins
    when both are present; a folder with neither is a ``DataError`` naming both.
    Every other data set keeps its own loader.
    """
    if dataset != "cifar10" or data_dir is None:
        return dataset
    root = Path(data_dir).expanduser()
    if root.is_file():
        if root.name != CIFAR10.archive and root.name.endswith((".tar.gz", ".tgz", ".tar")):
            return "imagefolder" if _archive_is_imagefolder(root) else dataset
        return dataset
    official = (
        (root / CIFAR10.folder).is_dir()
        or (root / CIFAR10.archive).is_file()
        or (root / CIFAR10.train_files[0]).is_file()
    )
    if official:
        return dataset
    if (root / "train").is_dir() and (root / "test").is_dir():
        return "imagefolder"
    raise DataError(
        f"CIFAR-10 not found in {root}: expected the official release ({CIFAR10.folder}/ or "
        f"{CIFAR10.archive}; --download fetches it) or an ImageFolder copy "
        "(train/<class>/*.jpg and test/<class>/*.jpg, as a folder or a .tar.gz given as --data-dir)"
    )


# --------------------------------------------------------------------------- one seed


def _training_view(config: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a config that change what training produces."""
    view = copy.deepcopy(dict(config))
    for key in ("device", "evaluation"):
        view.pop(key, None)
    data = dict(view.get("data") or {})
    for key in ("data_dir", "eval_batch_size"):
        data.pop(key, None)
    view["data"] = data
    return view


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_reusable(seed_dir: Path, cfg: ExperimentConfig) -> None:
    """Refuse to reuse runs in ``seed_dir`` that were trained with another config.

    Training resumes or reuses whatever checkpoint it finds, so a folder left by
    another schedule or architecture would silently enter the statistics.
    """
    want = _flatten(_training_view(cfg.to_dict()))
    for name in MODELS:
        saved = seed_dir / name / "config.yaml"
        if not saved.is_file():
            continue
        have = _flatten(_training_view(load_yaml(saved)))
        differing = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if differing:
            shown = ", ".join(
                f"{k} ({have.get(k)!r} there, {want.get(k)!r} now)" for k in differing[:4]
            )
            raise ConfigError(
                f"{saved.parent} was trained with another config: {shown}"
                f"{' ...' if len(differing) > 4 else ''}; use another --out or delete that folder"
            )


def _report_is_current(report: Path, checkpoints: Sequence[Path], grid: Sequence[float]) -> bool:
    """A seed report newer than its checkpoints, covering every model and threshold."""
    if not report.is_file():
        return False
    written = report.stat().st_mtime_ns
    if any(Path(c).stat().st_mtime_ns > written for c in checkpoints):
        return False
    try:
        models = json.loads(report.read_text())["models"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if set(models) != set(MODELS):
        return False
    wanted = set(grid)
    return all(
        wanted <= {p["threshold"] for p in m.get("sweep", []) if p.get("rule") == RULE}
        for m in models.values()
    )


def run_seed(cfg: ExperimentConfig, seed_dir: str | Path, *, progress: bool = True) -> Path:
    """Teacher + ce/kd/erde students for ``cfg.seed`` (reused when finished), then their report.

    The evaluation runs once per model on :func:`threshold_grid` and is skipped
    when ``seed_dir/report.json`` is already newer than all four checkpoints.
    """
    seed_dir = Path(seed_dir)
    check_reusable(seed_dir, cfg)
    splits = load_splits(cfg)
    common = {"resume": True, "progress": progress, "splits": splits}
    teacher = train(cfg, Job("teacher"), seed_dir / "teacher", **common)
    checkpoints = [teacher]
    for method in STUDENT_METHODS:
        checkpoints.append(
            train(
                cfg, Job("student", method), seed_dir / f"student_{method}",
                teacher_checkpoint=teacher, **common,
            )
        )  # fmt: skip
    grid = threshold_grid(splits.num_classes, cfg.evaluation.num_thresholds)
    report = seed_dir / "report.json"
    if not _report_is_current(report, checkpoints, grid):
        eval_cfg = dataclasses.replace(
            cfg, evaluation=dataclasses.replace(cfg.evaluation, rules=[RULE])
        )
        evaluate_checkpoints(
            checkpoints, seed_dir, cfg=eval_cfg, splits=splits, thresholds=grid, progress=progress
        )
    return report


# --------------------------------------------------------------------------- the command


def reproduce(
    dataset: str,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    seeds: int = 3,
    schedule: str = "full",
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    download: bool = False,
    docs_dir: str | Path | None = None,
    progress: bool = True,
    log: Log | None = None,
) -> dict[str, Path]:
    """Train and evaluate every seed (reusing finished runs), then aggregate and write.

    Seeds are ``seed, seed + 1, ...`` from the config's ``seed`` (default 0).
    The results are rewritten after every seed, so an interrupted run still
    leaves the statistics of the seeds it finished.
    """
    log = log or (lambda _message: None)
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    cfg = reproduce_config(dataset, schedule, config=config, overrides=overrides)
    if data_dir is not None:
        cfg.data.data_dir = str(data_dir)
    if download:
        from erde.download import download_dataset

        if cfg.data.data_dir is None:
            raise ConfigError("--download needs --data-dir (where to put the files)")
        download_dataset(dataset, cfg.data.data_dir, progress=progress)
    loader = detect_loader(dataset, cfg.data.data_dir)
    if loader != cfg.data.name:
        log(f"{cfg.data.data_dir}: {dataset} in {loader} layout, read with the {loader} loader")
        cfg.data.name = loader
    out = Path(out_dir)
    command = reproduce_command(dataset, cfg.data.data_dir, seeds, schedule, overrides)
    reports: dict[int, dict[str, Any]] = {}
    relative: dict[int, str] = {}
    paths: dict[str, Path] = {}
    for i, seed in enumerate(range(cfg.seed, cfg.seed + seeds)):
        seed_dir = out / f"seed_{seed}"
        log(f"seed {seed} ({i + 1}/{seeds}) -> {seed_dir}")
        report = run_seed(dataclasses.replace(cfg, seed=seed), seed_dir, progress=progress)
        reports[seed] = json.loads(report.read_text())
        relative[seed] = str(report.relative_to(out))
        results = aggregate(
            reports, dataset=dataset, schedule=schedule, loader=loader, command=command,
            seed_reports=relative,
        )  # fmt: skip
        paths = write_results(out, results)
    if docs_dir is not None:
        paths.update(publish(results, docs_dir))
    return paths
