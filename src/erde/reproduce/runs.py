"""Running the seeds: schedules, configs, data layout, training and evaluating each seed."""

from __future__ import annotations

import copy
import dataclasses
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from erde.config import (
    ExperimentConfig,
    config_from_dict,
    explicit_split_seed,
    load_config,
    load_yaml,
    preset_path,
    student_specs,
)
from erde.data.layout import detect_loader
from erde.errors import ConfigError, ErdeError, ReportError
from erde.io import read_json
from erde.outputs import output_lock
from erde.pipeline import evaluate_checkpoints, place_teacher
from erde.records import RecordsError, load_records
from erde.report.curves import folder_curves, mean_curve, read_metrics
from erde.report.html import MAX_REPORT_BYTES, load_report
from erde.reproduce.diagnostics import block_diagnostics
from erde.reproduce.evidence import gather
from erde.reproduce.publish import publish, results_name
from erde.reproduce.render import write_results
from erde.reproduce.seedfiles import (
    SEEDS_FILE,
    is_restored,
    pack_seed_files,
    restore_seeds,
    restored_teacher_without_weights,
)
from erde.reproduce.stats import RULE, aggregate, threshold_grid, training_time
from erde.reproduce.tradeoff import block_tradeoff
from erde.training import (
    PERFORMANCE_ONLY,
    EpochCallback,
    Job,
    load_splits,
    train,
    train_students,
)

SCHEDULES = ("full", "reduced", "fast", "speed")
RECORDS_FILE = "records.npz"  # per seed folder: every model's per-image records

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
    cfg = load_config(config, list(overrides), base=base)
    check_schedule_fits(schedule, cfg)
    return cfg


SPEED_FAMILIES = ("fastnet",)  # the families the speed schedule's recipe was made for


def check_schedule_fits(schedule: str, cfg: ExperimentConfig) -> None:
    """Refuse the speed schedule's recipe (lr 1.5, whitened stem) on a family it was not made for."""
    if schedule != "speed":
        return
    for section in ("teacher", "student"):
        arch = getattr(cfg, section).arch
        if arch not in SPEED_FAMILIES:
            raise ConfigError(
                f"--schedule speed is made for {', '.join(SPEED_FAMILIES)} only, but {section}.arch "
                f"is {arch!r}; use --schedule fast or reduced for other families"
            )


def reproduce_command(
    dataset: str,
    data_dir: str | Path | None,
    seeds: int,
    schedule: str,
    overrides: Sequence[str] = (),
    *,
    teacher_seeds: int | None = None,
    block: str | None = None,
    teacher: str | Path | None = None,
) -> str:
    """The ``erde reproduce`` command line that produces these results (for the record)."""
    parts = ["erde", "reproduce", "--dataset", dataset]
    if data_dir is not None:
        parts += ["--data-dir", str(data_dir)]
    parts += ["--seeds", str(seeds)]
    if teacher_seeds is not None and teacher_seeds != seeds:
        parts += ["--teacher-seeds", str(teacher_seeds)]
    parts += ["--schedule", schedule]
    for text in overrides:
        parts += ["--set", text]
    if teacher is not None:
        parts += ["--teacher", str(teacher)]
    if block is not None:
        parts += ["--block", block]
    return shlex.join(parts)


BLOCK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def check_block_name(block: str | None) -> None:
    """A block name becomes a file name under docs/results and a marker in RESULTS.md."""
    if block is not None and (not BLOCK_NAME.fullmatch(block) or ".." in block):
        raise ConfigError(
            f"--block {block!r}: use 1-100 letters, digits, '_', '.' or '-', starting with a "
            "letter or digit (it names files under docs/results)"
        )


# --------------------------------------------------------------------------- one seed


def _training_view(config: Mapping[str, Any], role: str) -> dict[str, Any]:
    """The parts of a config that change what training ``role`` (teacher | student) produces.

    The config is first completed with today's defaults, so a folder written
    before a field existed compares equal when it used that field's default.
    A teacher depends on its data, model, schedule and seed only; a student on
    everything (its teacher included). Speed-only switches (NHWC, compile,
    checkpoint frequency) are left out: a run may resume with another.
    """
    view = explicit_split_seed(config_from_dict(copy.deepcopy(dict(config))).to_dict())
    for key in ("device", "evaluation"):
        view.pop(key, None)
    distill = dict(view.get("distill") or {})
    for key in ("method", "students"):  # the folder names the student; its settings compare
        distill.pop(key, None)
    view["distill"] = distill
    data = dict(view.get("data") or {})
    for key in ("data_dir", "eval_batch_size"):
        data.pop(key, None)
    view["data"] = data
    for section in ("teacher_train", "student_train"):
        train = dict(view.get(section) or {})
        for key in PERFORMANCE_ONLY:
            train.pop(key, None)
        view[section] = train
    if role == "teacher":
        view = {k: view[k] for k in ("data", "teacher", "teacher_train", "seed")}
    return view


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def model_names(cfg: ExperimentConfig) -> list[str]:
    """``teacher`` and ``student_<name>`` for each student of ``distill.students``."""
    return ["teacher", *(f"student_{spec.name}" for spec in student_specs(cfg.distill))]


def _job_config(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """The config model ``name`` trains with (a student's own distill settings)."""
    if name == "teacher":
        return cfg
    spec = next((s for s in student_specs(cfg.distill) if f"student_{s.name}" == name), None)
    return Job.student(spec).config(cfg) if spec is not None else cfg


def check_reusable(
    seed_dir: Path, cfg: ExperimentConfig, names: Sequence[str] | None = None
) -> None:
    """Refuse to reuse runs in ``seed_dir`` that were trained with another config.

    Training resumes or reuses whatever checkpoint it finds, so a folder left by
    another schedule, architecture or teacher design would silently enter the
    statistics.
    """
    for name in model_names(cfg) if names is None else names:
        saved = seed_dir / name / "config.yaml"
        if not saved.is_file():
            continue
        role = "teacher" if name == "teacher" else "student"
        want = _flatten(_training_view(_job_config(cfg, name).to_dict(), role))
        try:
            have = _flatten(_training_view(load_yaml(saved), role))
        except ConfigError as exc:
            raise ConfigError(f"{saved}: cannot be compared with this run ({exc})") from None
        differing = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        if differing:
            shown = ", ".join(
                f"{k} ({have.get(k)!r} there, {want.get(k)!r} now)" for k in differing[:4]
            )
            raise ConfigError(
                f"{saved.parent} was trained with another config: {shown}"
                f"{' ...' if len(differing) > 4 else ''}; use another --out or delete that folder"
            )


def _report_is_current(
    report: Path, checkpoints: Sequence[Path], grid: Sequence[float], names: Sequence[str]
) -> bool:
    """A seed report newer than its checkpoints, covering every model, threshold and measure.

    A report written before a measure existed (``exit_ece``) is evaluated again: the
    checkpoints are kept, only the test pass is repeated.
    """
    if not report.is_file():
        return False
    written = report.stat().st_mtime_ns
    if any(Path(c).stat().st_mtime_ns > written for c in checkpoints):
        return False
    try:
        models = read_json(report, max_bytes=MAX_REPORT_BYTES, error=ReportError, what="a report")[
            "models"
        ]
    except (ReportError, KeyError, TypeError):
        return False
    if set(models) != set(names):
        return False
    wanted = set(grid)
    return all(
        wanted <= {p["threshold"] for p in m.get("sweep", []) if p.get("rule") == RULE}
        and m.get("exit_ece")
        for m in models.values()
    )


@dataclasses.dataclass(frozen=True)
class SeedPlan:
    """Which teacher a student seed learns from, and where each lives.

    With one teacher per seed (``teacher_seeds == seeds``) every seed is an
    independent replicate. With fewer teachers, as KD papers do, student seed
    ``s`` learns from the teacher of seed ``teacher_seed`` and uses that
    teacher's validation split (``data.split_seed``), so no student is
    calibrated on images its teacher trained on.
    """

    seed: int
    teacher_seed: int
    shared_teacher: bool

    def student_config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        data = dataclasses.replace(
            cfg.data, split_seed=self.teacher_seed if self.shared_teacher else None
        )
        return dataclasses.replace(cfg, seed=self.seed, data=data)

    def teacher_config(self, cfg: ExperimentConfig) -> ExperimentConfig:
        data = dataclasses.replace(cfg.data, split_seed=None)
        return dataclasses.replace(cfg, seed=self.teacher_seed, data=data)


def seed_plans(first_seed: int, seeds: int, teacher_seeds: int | None = None) -> list[SeedPlan]:
    """Student seeds ``first_seed .. first_seed + seeds - 1`` and their teachers, in order."""
    teacher_seeds = seeds if teacher_seeds is None else teacher_seeds
    if seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {seeds}")
    if not 1 <= teacher_seeds <= seeds:
        raise ConfigError(
            f"--teacher-seeds must be between 1 and --seeds ({seeds}), got {teacher_seeds}"
        )
    shared = teacher_seeds < seeds
    return [SeedPlan(first_seed + i, first_seed + i % teacher_seeds, shared) for i in range(seeds)]


def teacher_design(seeds: int, teacher_seeds: int) -> str:
    """The design in words, for tables and results.json."""
    if teacher_seeds == seeds:
        return "one teacher per seed (independent replicates)"
    return (
        f"{teacher_seeds} teacher{'s' * (teacher_seeds != 1)} shared by {seeds} student seeds "
        "(student seeds vary initialisation, augmentation and dropout; the data split is the "
        "teacher's)"
    )


def run_seed(
    cfg: ExperimentConfig,
    seed_dir: str | Path,
    *,
    progress: bool = True,
    plan: SeedPlan | None = None,
    teacher_dir: str | Path | None = None,
    on_epoch: EpochCallback | None = None,
) -> Path:
    """Teacher + ce/kd/erde students of one seed (reused when finished), then their report.

    ``plan`` (default: an independent seed ``cfg.seed``) says which teacher the
    students learn from; a shared teacher lives in ``teacher_dir`` (the folder
    of its own seed) and is trained there if it is not finished yet. The
    students train side by side. The evaluation runs once per model on
    :func:`threshold_grid` and is skipped when ``seed_dir/report.json`` is
    already newer than all four checkpoints. ``on_epoch`` is called after every
    epoch of every model (the CLI prints a line with it when bars are off).
    """
    seed_dir = Path(seed_dir)
    plan = plan or SeedPlan(cfg.seed, cfg.seed, False)
    teacher_dir = Path(teacher_dir) if teacher_dir is not None else seed_dir / "teacher"
    student_cfg, teacher_cfg = plan.student_config(cfg), plan.teacher_config(cfg)
    check_reusable(teacher_dir.parent, teacher_cfg, ["teacher"])
    names = model_names(cfg)
    check_reusable(seed_dir, student_cfg, names[1:])
    splits = load_splits(student_cfg)
    common = {"resume": True, "progress": progress, "splits": splits, "on_epoch": on_epoch}
    teacher = train(teacher_cfg, Job("teacher"), teacher_dir, **common)
    students = train_students(
        student_cfg, student_specs(cfg.distill), [seed_dir / n for n in names[1:]],
        teacher_checkpoint=teacher, **common,
    )  # fmt: skip
    checkpoints = [teacher, *students]
    grid = threshold_grid(splits.num_classes, cfg.evaluation.num_thresholds)
    report, records = seed_dir / "report.json", seed_dir / RECORDS_FILE
    current = _report_is_current(report, checkpoints, grid, names)
    if not current or not _records_are_current(records, report, names):
        eval_cfg = dataclasses.replace(
            student_cfg, evaluation=dataclasses.replace(cfg.evaluation, rules=[RULE])
        )
        evaluate_checkpoints(
            checkpoints, seed_dir, cfg=eval_cfg, splits=splits, thresholds=grid,
            progress=progress, records=records,
        )  # fmt: skip
    return report


def _records_are_current(records: Path, report: Path, names: Sequence[str]) -> bool:
    """Per-image records written with the report (a seed from before records existed: no)."""
    if not records.is_file() or records.stat().st_mtime_ns < report.stat().st_mtime_ns:
        return False
    try:
        _, held = load_records(records)
    except RecordsError:
        return False
    return set(held) == set(names)


def _training_time(model_dir: Path, batch_size: int) -> dict[str, Any] | None:
    """:func:`training_time` of the model trained in ``model_dir`` (None without metrics)."""
    try:
        return training_time(read_metrics(model_dir), batch_size)
    except ErdeError:
        return None


def derive_from_records(results: dict[str, Any], records_file: Path) -> None:
    """Add what only the per-image records give to ``results``: the entropy diagnostics
    (:mod:`erde.reproduce.diagnostics`) and the whole-curve comparisons
    (:mod:`erde.reproduce.tradeoff`)."""
    labels, held = load_records(records_file)
    results["entropy_diagnostics"] = block_diagnostics(results, labels, held)
    results["whole_curve"] = block_tradeoff(results, labels, held)


def training_curves(folders: Mapping[str, Sequence[Path]]) -> dict[str, dict[str, Any]]:
    """Per model (``{model: [its folder in each seed]}``), the mean training curve over seeds.

    A teacher shared by several student seeds is one run, counted once.
    """
    out = {}
    for model, paths in folders.items():
        distinct = list(dict.fromkeys(Path(p).resolve() for p in paths))
        mean = mean_curve(list(folder_curves({str(p): p for p in distinct}).values()))
        if mean is not None:
            out[model] = mean
    return out


def _chosen_plans(plans: Sequence[SeedPlan], only: Sequence[int] | None) -> list[SeedPlan]:
    """The plans of the seeds ``only`` names (all without it); a seed not planned is refused."""
    if only is None:
        return list(plans)
    planned = [p.seed for p in plans]
    unknown = [s for s in only if s not in planned]
    if unknown or not only:
        raise ConfigError(
            f"--only-seeds {','.join(map(str, only)) or '(none)'}: the plan's seeds are "
            f"{', '.join(map(str, planned))} (--seed, --seeds)"
        )
    return [p for p in plans if p.seed in set(only)]


def _check_teacher_finished(plan: SeedPlan, teacher_dir: Path) -> None:
    """A shared teacher is trained by its own seed's process, never by two at once."""
    from erde.checkpoints import load_checkpoint

    checkpoint = teacher_dir / "checkpoint.pt"
    if not checkpoint.is_file() or not load_checkpoint(checkpoint).get("finished"):
        raise ConfigError(
            f"seed {plan.seed} learns from the teacher of seed {plan.teacher_seed}, not finished "
            f"in {teacher_dir}: train that seed first (--only-seeds {plan.teacher_seed}) or give "
            "a released teacher with --teacher DIR"
        )


def _block_name(dataset: str, schedule: str, cfg: ExperimentConfig, block: str | None) -> str:
    """The name the results will be published under (as :func:`results_name` derives it)."""
    return results_name(
        {
            "dataset": {"name": dataset},
            "schedule": schedule,
            "config": cfg.to_dict(),
            "block": block,
        }
    )


def reproduce(
    dataset: str,
    out_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    seeds: int = 3,
    teacher_seeds: int | None = None,
    schedule: str = "full",
    config: str | Path | None = None,
    overrides: Sequence[str] = (),
    download: bool = False,
    docs_dir: str | Path | None = None,
    progress: bool = True,
    log: Log | None = None,
    on_epoch: EpochCallback | None = None,
    teacher: str | Path | None = None,
    block: str | None = None,
    only_seeds: Sequence[int] | None = None,
) -> dict[str, Path]:
    """Train and evaluate every seed (reusing finished runs), then aggregate and write.

    ``only_seeds``: train and evaluate just these seeds of the plan and stop there, with
    no aggregation (returns each one's report): several processes, one per core or GPU,
    fill one ``out_dir`` side by side, and a run without ``only_seeds`` then aggregates
    (and publishes) what they finished. A seed whose teacher is another seed's must find
    that teacher finished (or given as ``teacher``), never trained by two processes.

    ``block`` names the results in the docs (file stem and RESULTS.md block) instead of
    the name derived from the data set, schedule and models (:func:`results_name`), so
    that another design of the same models (several teachers, say) does not replace a
    published block.

    ``teacher``: a released teacher folder (``checkpoint.pt`` with its ``config.yaml``,
    e.g. ``docs/results/cifar10-speed-teacher``) that stands for the first seed's teacher
    instead of training one: copied into that seed's teacher folder (which must not hold
    another), checked against the config like any reused run. With one teacher every seed
    shares it; with several, the others are trained.

    Seeds are ``seed, seed + 1, ...`` from the config's ``seed`` (default 0).
    ``teacher_seeds`` (default: ``seeds``) is how many teachers are trained;
    with fewer teachers than seeds, student seeds share them in turn (see
    :class:`SeedPlan`). Every seed folder is checked against the config before
    anything trains. The results (and, with ``docs_dir``, the docs' block) are
    rewritten after every seed, so an interrupted run still leaves the
    statistics of the seeds it finished, marked partial.
    """
    log = log or (lambda _message: None)
    check_block_name(block)
    cfg = reproduce_config(dataset, schedule, config=config, overrides=overrides)
    plans = seed_plans(cfg.seed, seeds, teacher_seeds)
    teacher_seeds = len({p.teacher_seed for p in plans})
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
    design = teacher_design(seeds, teacher_seeds)
    command = reproduce_command(
        dataset, cfg.data.data_dir, seeds, schedule, overrides, teacher_seeds=teacher_seeds,
        block=block, teacher=None if teacher is None else Path(teacher).resolve(),
    )  # fmt: skip
    chosen = _chosen_plans(plans, only_seeds)
    if only_seeds is not None and docs_dir is not None:
        raise ConfigError(
            "--only-seeds trains seeds without aggregating them: publish with --docs from a "
            "run without --only-seeds over the same --out"
        )
    if docs_dir is not None:  # the published block's finished seeds, not trained again
        published = (
            Path(docs_dir) / "results" / f"{_block_name(dataset, schedule, cfg, block)}.json"
        )
        for seed in restore_seeds(out, published, [p.seed for p in plans], model_names(cfg)):
            log(f"seed {seed}: restored from {published} and its seed files (not trained again)")
    if teacher is not None:
        target = out / f"seed_{plans[0].teacher_seed}" / "teacher"
        if place_teacher(Path(teacher), target):
            whose = "shared by every seed" if teacher_seeds == 1 else "the first seed's"
            log(f"teacher: {teacher} copied into {target} ({whose}, not trained)")
    for plan in chosen:  # refuse a reused folder of another config or design before any training
        check_reusable(out / f"seed_{plan.teacher_seed}", plan.teacher_config(cfg), ["teacher"])
        students = model_names(cfg)[1:]
        check_reusable(out / f"seed_{plan.seed}", plan.student_config(cfg), students)
        teacher_dir = out / f"seed_{plan.teacher_seed}" / "teacher"
        if not is_restored(out / f"seed_{plan.seed}") and restored_teacher_without_weights(
            teacher_dir
        ):
            raise ConfigError(
                f"seed {plan.seed} learns from the teacher of seed {plan.teacher_seed}, restored "
                "from the published block without its weights: give the released teacher "
                "with --teacher DIR"
            )
        if only_seeds is not None and plan.teacher_seed != plan.seed:
            _check_teacher_finished(plan, teacher_dir)
    if only_seeds is not None:
        log(f"{schedule} schedule, {design}: seeds {', '.join(str(p.seed) for p in chosen)} only")
        finished = {}
        for plan in chosen:
            seed_dir = out / f"seed_{plan.seed}"
            log(f"seed {plan.seed} -> {seed_dir} (teacher: seed_{plan.teacher_seed}/teacher)")
            with output_lock(seed_dir):  # one process per seed folder
                finished[f"seed_{plan.seed}"] = run_seed(
                    cfg, seed_dir, progress=progress, plan=plan,
                    teacher_dir=out / f"seed_{plan.teacher_seed}" / "teacher", on_epoch=on_epoch,
                )  # fmt: skip
        return finished
    reports: dict[int, dict[str, Any]] = {}
    relative: dict[int, str] = {}
    times: dict[int, dict[str, dict[str, Any] | None]] = {}
    model_folders: dict[str, list[Path]] = {m: [] for m in model_names(cfg)}
    paths: dict[str, Path] = {}
    log(f"{schedule} schedule, {design}")
    done: list[tuple[int, int]] = []  # (student seed, teacher seed) of the finished seeds
    for i, plan in enumerate(plans):
        seed_dir = out / f"seed_{plan.seed}"
        teacher_dir = out / f"seed_{plan.teacher_seed}" / "teacher"
        if is_restored(seed_dir):  # its report and records as published; no weights to train
            report = seed_dir / "report.json"
        else:
            log(f"seed {plan.seed} ({i + 1}/{seeds}) -> {seed_dir} (teacher: {teacher_dir})")
            with output_lock(seed_dir):  # not while an --only-seeds process trains it
                report = run_seed(
                    cfg, seed_dir, progress=progress, plan=plan, teacher_dir=teacher_dir,
                    on_epoch=on_epoch,
                )  # fmt: skip
        reports[plan.seed] = load_report(report)
        relative[plan.seed] = str(report.relative_to(out))
        folders = {m: teacher_dir if m == "teacher" else seed_dir / m for m in model_names(cfg)}
        times[plan.seed] = {m: _training_time(d, cfg.data.batch_size) for m, d in folders.items()}
        for m, d in folders.items():
            model_folders[m].append(d)
        results = aggregate(
            reports, dataset=dataset, schedule=schedule, loader=loader, command=command,
            seed_reports=relative, teacher_seeds=teacher_seeds, design=design, training=times,
            curves=training_curves(model_folders), planned_seeds=seeds,
        )  # fmt: skip
        if block is not None:
            results["block"] = block
        done.append((plan.seed, plan.teacher_seed))
        results["records"] = gather(out, done, model_names(cfg), out / RECORDS_FILE)
        derive_from_records(results, out / RECORDS_FILE)
        pack_seed_files(out, done, model_names(cfg), out / SEEDS_FILE, results["records"]["sha256"])
        paths = write_results(out, results)
        paths["records"], paths["seed_files"] = out / RECORDS_FILE, out / SEEDS_FILE
        if docs_dir is not None:  # after every seed: a long run shows what it has so far
            paths.update(
                publish(results, docs_dir, records=out / RECORDS_FILE, seed_files=out / SEEDS_FILE)
            )
    return paths
