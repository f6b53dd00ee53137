"""`erde reproduce`: seeds, aggregation over seeds, reuse of finished runs, layouts, publishing.

End-to-end runs use small files generated in the official formats (CIFAR-100
pickles, SVHN .mat, a CIFAR-10 ImageFolder archive) and the tiny models of
``helpers.TINY_OVERRIDES``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import (
    CIFAR10_NAMES,
    make_tar_gz,
    write_cifar10,
    write_cifar100,
    write_imagefolder,
    write_svhn,
)
from helpers import TINY_OVERRIDES

from erde.checkpoints import load_checkpoint
from erde.cli import main
from erde.errors import ConfigError, DataError
from erde.reproduce import (
    MODELS,
    PUBLISHED_PLAIN,
    TABLE_LEVELS,
    aggregate,
    detect_loader,
    mean_std,
    paired_p_value,
    publish,
    render_markdown,
    replace_block,
    reproduce,
    reproduce_config,
    seed_plans,
    table_thresholds,
    threshold_grid,
    training_time,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"
SHARED_CIFAR10_JPEG = Path(
    os.environ.get("ERDE_CIFAR10_JPEG")
    or Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpeg.tar.gz"
)
# The tiny experiment on official-format files (32x32, read at 16x16): two steps per model.
TINY = (
    *(o for o in TINY_OVERRIDES if o.split("=")[0] not in ("data.name", "data.image_size")),
    "data.image_size=16",
    "data.val_fraction=0.2",
    "data.batch_size=32",
    "teacher_train.epochs=1",
    "teacher_train.max_steps_per_epoch=2",
    "student_train.max_steps_per_epoch=2",
)


@pytest.fixture(autouse=True)
def _user_cache_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERDE_CACHE_DIR", str(tmp_path / "cache"))


def _sets(overrides=TINY) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _svhn_argv(tmp_path: Path, *args: str) -> list[str]:
    """``erde reproduce`` argv for the tiny models on small SVHN .mat files written to tmp_path."""
    data = tmp_path / "svhn"
    write_svhn(data, n_train=60, n_test=30)
    return ["reproduce", "--dataset", "svhn", "--data-dir", str(data), "--no-progress",
            *args, *_sets()]  # fmt: skip


SIMPLE_MACS = {"teacher": 400.0, "student_ce": 100.0, "student_kd": 100.0, "student_erde": 100.0}
SIMPLE_ACC = {"teacher": 0.9, "student_ce": 0.8, "student_kd": 0.85, "student_erde": 0.88}


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    """A docs folder holding a copy of the repository's RESULTS.md, to publish into."""
    folder = tmp_path / "docs"
    folder.mkdir()
    shutil.copy(DOCS / "RESULTS.md", folder / "RESULTS.md")
    return folder


def _mtimes(out: Path) -> dict[str, int]:
    files = [*out.glob("seed_*/*/checkpoint.pt"), *out.glob("seed_*/report.json")]
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in files}


# --------------------------------------------------------------------------- end to end


def test_two_seeds_on_cifar100_files_table_is_mean_and_std_of_seed_reports_and_reruns_reuse(
    tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None
) -> None:
    data = tmp_path / "cifar100"
    write_cifar100(data, n_train=500, n_test=100)
    out = tmp_path / "out"
    argv = ["reproduce", "--dataset", "cifar100", "--data-dir", str(data), "--seeds", "2",
            "--schedule", "reduced", "--out", str(out), "--no-progress", *_sets(),
            "--threads", "1"]  # fmt: skip
    # --threads fixed: a report records its thread count, which by default follows the cores
    # idle at the time, and the re-evaluated report below is compared with the first whole

    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    seeds = {s: json.loads((out / f"seed_{s}" / "report.json").read_text()) for s in (0, 1)}
    assert all((out / f"seed_{s}" / "report.html").is_file() for s in (0, 1))  # beside each

    assert (results["seeds"], results["n_seeds"], results["schedule"]) == ([0, 1], 2, "reduced")
    assert results["dataset"]["name"] == "cifar100" and results["dataset"]["num_classes"] == 100
    assert list(results["models"]) == list(MODELS)
    for name, model in results["models"].items():
        assert len(model["thresholds"]) == len(TABLE_LEVELS)
        for row in model["thresholds"]:
            points = [
                next(
                    p
                    for p in seeds[s]["models"][name]["sweep"]
                    if p["threshold"] == row["threshold"]
                )
                for s in (0, 1)
            ]
            accs = [p["accuracy"] for p in points]
            assert row["accuracy_mean"] == pytest.approx(statistics.fmean(accs))
            assert row["accuracy_std"] == pytest.approx(statistics.stdev(accs))
            assert row["macs_mean"] == pytest.approx(
                statistics.fmean(p["mean_macs"] for p in points)
            )
            assert (row["n_seeds"], row["schedule"]) == (2, "reduced")
        last = [seeds[s]["models"][name]["exit_accuracy"][-1] for s in (0, 1)]
        assert model["exit_accuracy_mean"][-1] == pytest.approx(statistics.fmean(last))
        ece = [seeds[s]["models"][name]["exit_ece"] for s in (0, 1)]
        assert model["exit_ece_mean"] == pytest.approx(
            [statistics.fmean(e) for e in zip(*ece, strict=True)]
        )
        assert model["exit_ece_std"] == pytest.approx(
            [statistics.stdev(e) for e in zip(*ece, strict=True)]
        )
    erde_vs_kd = results["comparisons"][0]
    assert (erde_vs_kd["model"], erde_vs_kd["other"]) == ("student_erde", "student_kd")
    for i, row in enumerate(erde_vs_kd["per_threshold"]):
        erde = results["models"]["student_erde"]["thresholds"][i]["accuracy_per_seed"]
        kd = results["models"]["student_kd"]["thresholds"][i]["accuracy_per_seed"]
        assert row["accuracy_diff_mean"] == pytest.approx(
            statistics.fmean(e - k for e, k in zip(erde, kd, strict=True))
        )
        assert row["winner"] in ("student_erde", "student_kd", "tie")
        diffs = [e - k for e, k in zip(erde, kd, strict=True)]
        assert row["p_value"] == paired_p_value(diffs)
    markdown = (out / "results.md").read_text()
    assert "Accuracy (%) and mean MACs at fixed thresholds" in markdown and " ± " in markdown
    assert "| Seeds ahead | p | MACs ratio |" in markdown
    assert "## Single exits" in markdown
    assert "| Model | Exit | MACs | Accuracy (%) | ECE (%) |" in markdown
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # what training cost: every model, from its own metrics.jsonl, written into the page
    assert list(results["training_time"]) == list(MODELS)
    for name, cost in results["training_time"].items():
        per_seed = [
            training_time(
                [json.loads(line) for line in (out / f"seed_{s}" / name / "metrics.jsonl").open()],
                32,
            )
            for s in (0, 1)
        ]
        assert cost["epochs"] == 1 and cost["hours"] > 0
        assert cost["hours"] == pytest.approx(statistics.fmean(t["hours"] for t in per_seed))
    assert "Training time on the machine below (median epoch × epochs" in markdown
    # how training went: per model, the mean over seeds of its validation accuracy per exit
    assert list(results["training_curves"]) == list(MODELS)
    for name, curve in results["training_curves"].items():
        records = [
            json.loads((out / f"seed_{s}" / name / "metrics.jsonl").read_text()) for s in (0, 1)
        ]
        assert curve["epoch"] == [1] and curve["runs"] == 2
        expected = [
            statistics.fmean(col)
            for col in zip(*(r["val_exit_accuracy"] for r in records), strict=True)
        ]
        assert curve["val_exit_accuracy"][0] == pytest.approx(expected)
    assert (out / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training curves](training.png)" in markdown
    assert (
        f"Teacher 1 × {results['training_time']['teacher']['seconds_per_epoch']:.0f} s" in markdown
    )

    printed = capsys.readouterr().out  # without bars, a line per epoch of every model
    for name in MODELS:  # one epoch each, two seeds
        assert printed.count(f"{name}: epoch 1/1  loss ") == 2, name

    before = _mtimes(out)
    assert len(before) == 10  # 2 seeds x (4 checkpoints + report)
    assert main(argv) == 0
    assert _mtimes(out) == before  # nothing retrained, nothing re-evaluated
    again = json.loads((out / "results.json").read_text())
    assert again["models"] == results["models"]

    # a seed report written before a measure existed is evaluated again, nothing retrained
    old = json.loads((out / "seed_0" / "report.json").read_text())
    for model in old["models"].values():
        del model["exit_ece"]
    (out / "seed_0" / "report.json").write_text(json.dumps(old))
    before = _mtimes(out)
    assert main(argv) == 0
    after = _mtimes(out)
    assert after.pop("seed_0/report.json") != before.pop("seed_0/report.json")
    assert after == before  # every checkpoint and the other seed's report untouched
    assert json.loads((out / "seed_0" / "report.json").read_text()) == seeds[0] | {
        "created": json.loads((out / "seed_0" / "report.json").read_text())["created"]
    }
    before = _mtimes(out)

    changed = [*argv, "--set", "student.width=0.5"]
    assert main(changed) == 2
    assert "trained with another config" in capsys.readouterr().err
    assert _mtimes(out) == before


def test_one_teacher_shared_by_two_student_seeds_and_a_folder_of_another_design_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None
) -> None:
    out = tmp_path / "out"
    argv = _svhn_argv(tmp_path, "--seeds", "2", "--teacher-seeds", "1", "--out", str(out))

    assert main(argv) == 0
    assert (out / "seed_0" / "teacher" / "checkpoint.pt").is_file()
    assert not (out / "seed_1" / "teacher").exists()  # seed 1's students learn from seed 0's
    for method in ("ce", "kd", "erde"):
        ckpt = load_checkpoint(out / "seed_1" / f"student_{method}")
        assert ckpt["config"]["seed"] == 1 and ckpt["config"]["data"]["split_seed"] == 0
    kd = load_checkpoint(out / "seed_1" / "student_kd")
    assert Path(kd["teacher_checkpoint"]) == out / "seed_0" / "teacher" / "checkpoint.pt"
    results = json.loads((out / "results.json").read_text())
    assert results["teacher_seeds"] == 1 and "1 teacher shared by 2" in results["teacher_design"]
    assert "--teacher-seeds 1" in results["command"]
    teacher = results["models"]["teacher"]
    assert all(r["accuracy_std"] == 0.0 for r in teacher["thresholds"])  # the same teacher twice
    runs = {name: curve["runs"] for name, curve in results["training_curves"].items()}
    assert runs == {"teacher": 1, "student_ce": 2, "student_kd": 2, "student_erde": 2}
    assert "1 teacher shared by 2 student seeds" in (out / "results.md").read_text()

    before = _mtimes(out)
    capsys.readouterr()
    independent = [a for a in argv if a not in ("--teacher-seeds", "1")]
    assert main(independent) == 2
    err = capsys.readouterr().err
    assert "trained with another config" in err and "data.split_seed" in err
    assert len(err.strip().splitlines()) == 1
    assert _mtimes(out) == before  # nothing trained, nothing overwritten


def _cli(argv: list[str], **kw) -> subprocess.Popen:
    """``erde ARGV`` in a process of its own, one thread, output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ERDE_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "erde.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kw)  # fmt: skip


def test_two_processes_train_one_seed_each_into_one_out_and_a_plain_run_aggregates(
    tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None
) -> None:
    """--only-seeds: two real processes side by side, each trains its seed (teacher and
    students) into the same --out; the plain command then trains nothing and aggregates."""
    out = tmp_path / "out"
    argv = _svhn_argv(tmp_path, "--seeds", "2", "--out", str(out))
    lanes = [_cli([*argv, "--only-seeds", str(seed)]) for seed in (0, 1)]
    printed = [lane.communicate(timeout=600) for lane in lanes]
    for seed, (lane, (stdout, stderr)) in enumerate(zip(lanes, printed, strict=True)):
        assert lane.returncode == 0, stderr
        assert f"seeds {seed} only" in stdout and stdout.count("teacher: training") == 1
        assert f"seed_{seed}: " in stdout and "to aggregate" in stdout
        assert f"seed {seed} ->" in stdout and f"seed {1 - seed} ->" not in stdout
    assert not (out / "results.json").exists()  # a lane does not aggregate
    capsys.readouterr()
    assert main(argv) == 0
    aggregated = capsys.readouterr().out
    assert ": training" not in aggregated and "already finished" in aggregated  # both reused
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["teacher_seeds"] == 2


def test_only_seeds_refuses_what_it_cannot_do_alone_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None
) -> None:
    out = tmp_path / "out"
    shared = _svhn_argv(tmp_path, "--seeds", "2", "--teacher-seeds", "1", "--out", str(out))
    for extra, message in (
        (["--only-seeds", "5"], "the plan's seeds are 0, 1"),
        (["--only-seeds", "one"], "seed numbers separated by commas"),
        (["--only-seeds", "1"], "train that seed first (--only-seeds 0)"),
        (["--only-seeds", "0", "--docs", str(tmp_path / "docs")], "publish with --docs from"),
    ):
        capsys.readouterr()
        assert main([*shared, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(out.glob("seed_*/*/checkpoint.pt"))


def test_a_seed_folder_in_use_by_another_process_is_not_trained_twice(
    tmp_path: Path, one_thread: None
) -> None:
    """The lock is a real one between processes: while this process holds seed_0, a lane
    for seed 0 is refused in one line and the aggregating run too, before training it."""
    from erde.outputs import output_lock

    out = tmp_path / "out"
    argv = _svhn_argv(tmp_path, "--seeds", "1", "--out", str(out))
    with output_lock(out / "seed_0"):
        for extra in (["--only-seeds", "0"], []):
            stdout, stderr = (lane := _cli([*argv, *extra])).communicate(timeout=300)
            assert lane.returncode == 2 and "is in use by" in stderr, stderr
            assert len(stderr.strip().splitlines()) == 1
    assert not (out / "seed_0" / "teacher").exists()


def test_a_released_teacher_placed_in_a_new_folder_is_reused_not_trained(
    tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None
) -> None:
    """How a released teacher (made by erde release, copied from elsewhere) starts reproduce's runs elsewhere."""
    import shutil

    argv = _svhn_argv(tmp_path, "--seeds", "1")
    assert main([*argv, "--out", str(tmp_path / "first")]) == 0
    trained = tmp_path / "first" / "seed_0" / "teacher"
    shipped = tmp_path / "shipped"
    assert main(["release", str(trained), "--out", str(shipped / "checkpoint.pt")]) == 0
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(trained / name, shipped / name)

    new = tmp_path / "second"
    shutil.copytree(shipped, new / "seed_0" / "teacher")
    released = (new / "seed_0" / "teacher" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main([*argv, "--out", str(new)]) == 0
    assert f"teacher: already finished in {new / 'seed_0' / 'teacher'}" in capsys.readouterr().out
    assert (new / "seed_0" / "teacher" / "checkpoint.pt").read_bytes() == released
    first = json.loads((tmp_path / "first" / "results.json").read_text())["models"]["teacher"]
    second = json.loads((new / "results.json").read_text())["models"]["teacher"]
    assert second["thresholds"] == first["thresholds"]  # the same teacher, evaluated again


def test_docs_show_each_finished_seed_marked_partial_until_the_last(
    tmp_path: Path, docs: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None
) -> None:
    """A run of hours publishes after every seed; a crash leaves the finished seeds, marked."""
    import erde.reproduce.runs as runs

    argv = _svhn_argv(tmp_path, "--seeds", "2", "--teacher-seeds", "1",
                      "--out", str(tmp_path / "out"), "--docs", str(docs))  # fmt: skip
    real = runs.run_seed

    def crash_on_seed_1(cfg, seed_dir, **kwargs):  # the machine goes down during seed 1
        if Path(seed_dir).name == "seed_1":
            raise KeyboardInterrupt
        return real(cfg, seed_dir, **kwargs)

    monkeypatch.setattr(runs, "run_seed", crash_on_seed_1)
    assert main(argv) == 130  # interrupted, as after Ctrl-C

    def published() -> tuple[str, dict]:
        (path,) = (docs / "results").glob("svhn-full*.json")  # named by the tiny pair
        text = (docs / "RESULTS.md").read_text()
        block = text.split(f"<!-- erde-results:{path.stem}:begin -->")[1].split("<!-- erde")[0]
        return block, json.loads(path.read_text())

    partial, results = published()
    assert "svhn: full schedule, resnet8_x0.5 → resnet8_x0.25, 1 of 2 seeds" in partial
    assert "**Partial:** 1 of the 2 seeds of this command have finished" in partial
    assert "Seeds: 0." in partial and "one seed, so no spread" in partial
    assert (results["seeds"], results["planned_seeds"]) == ([0], 2)

    monkeypatch.setattr(runs, "run_seed", real)
    assert main(argv) == 0  # the same command resumes: seed 0 reused, seed 1 trained
    final, results = published()
    assert "svhn: full schedule, resnet8_x0.5 → resnet8_x0.25, 2 seeds" in final
    assert "Partial" not in final
    assert "Seeds: 0, 1." in final
    assert (results["seeds"], results["planned_seeds"]) == ([0, 1], 2)


def test_a_block_name_publishes_beside_the_derived_one_and_a_bad_name_is_refused(
    tmp_path: Path, docs: Path, capsys: pytest.CaptureFixture, one_thread: None
) -> None:
    """--block: another design of the same models gets files and a block of its own."""
    argv = _svhn_argv(tmp_path, "--seeds", "1", "--out", str(tmp_path / "out"),
                      "--docs", str(docs), "--block", "svhn-two-teachers")  # fmt: skip
    assert main(argv) == 0
    results = json.loads((docs / "results" / "svhn-two-teachers.json").read_text())
    assert results["block"] == "svhn-two-teachers"
    assert results["command"].endswith("--block svhn-two-teachers")
    assert "<!-- erde-results:svhn-two-teachers:begin -->" in (docs / "RESULTS.md").read_text()
    assert not list((docs / "results").glob("svhn-full*.json"))  # the derived name is left alone
    capsys.readouterr()

    bad = _svhn_argv(tmp_path, "--out", str(tmp_path / "bad"), "--docs", str(docs),
                     "--block", "../escape")  # fmt: skip
    assert main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("erde: error: --block '../escape'") and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("seeds", "teacher_seeds"), [("2", "3"), ("2", "0"), ("1", "-1")])
def test_teacher_seeds_out_of_range_is_one_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture, seeds: str, teacher_seeds: str
) -> None:
    out = tmp_path / "out"
    argv = ["reproduce", "--dataset", "svhn", "--data-dir", str(tmp_path), "--seeds", seeds,
            "--teacher-seeds", teacher_seeds, "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--teacher-seeds must be between 1 and --seeds" in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_seed_plans_share_teachers_in_turn() -> None:
    plans = seed_plans(5, 4, 2)
    assert [(p.seed, p.teacher_seed) for p in plans] == [(5, 5), (6, 6), (7, 5), (8, 6)]
    assert all(p.shared_teacher for p in plans)
    alone = seed_plans(0, 3)
    assert [(p.seed, p.teacher_seed, p.shared_teacher) for p in alone] == [
        (0, 0, False), (1, 1, False), (2, 2, False)
    ]  # fmt: skip
    with pytest.raises(ConfigError, match="--seeds must be >= 1"):
        seed_plans(0, 0)


def test_svhn_official_files_one_seed_has_zero_spread(tmp_path: Path, one_thread: None) -> None:
    data = tmp_path / "svhn"
    write_svhn(data, n_train=60, n_test=30)

    paths = reproduce(
        "svhn", tmp_path / "out", data_dir=data, seeds=1, overrides=TINY, progress=False
    )

    results = json.loads(paths["results"].read_text())
    assert results["n_seeds"] == 1 and results["dataset"]["loader"] == "svhn"
    rows = [r for m in results["models"].values() for r in m["thresholds"]]
    assert all(r["accuracy_std"] == 0.0 and r["n_seeds"] == 1 for r in rows)
    assert all(a["published_accuracy"] is None for a in results["anchors"])  # none for SVHN


def test_cifar10_imagefolder_archive_is_detected_and_trained_on(
    tmp_path: Path, one_thread: None
) -> None:
    folder = tmp_path / "jpeg"
    write_imagefolder(folder, classes=tuple(CIFAR10_NAMES), per_class=(5, 2), size=32)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    make_tar_gz(archive, {"train": folder / "train", "test": folder / "test"})

    paths = reproduce(
        "cifar10", tmp_path / "out", data_dir=archive, seeds=1, overrides=TINY, progress=False
    )

    results = json.loads(paths["results"].read_text())
    assert results["dataset"]["name"] == "cifar10"
    assert results["dataset"]["loader"] == "imagefolder"
    assert results["dataset"]["test_images"] == 20


# --------------------------------------------------------------------------- layouts and configs


def test_detect_loader_tells_official_cifar10_from_imagefolder(tmp_path: Path) -> None:
    imagefolder = tmp_path / "if"
    write_imagefolder(imagefolder, per_class=(1, 1))
    archive = tmp_path / "copy.tar.gz"
    make_tar_gz(archive, {"train": imagefolder / "train", "test": imagefolder / "test"})
    official = tmp_path / "official"
    write_cifar10(official, per_batch=2, n_test=2)
    official_archive = tmp_path / "cifar-10-python.tar.gz"
    make_tar_gz(official_archive, {"cifar-10-batches-py": official / "cifar-10-batches-py"})

    assert detect_loader("cifar10", imagefolder) == "imagefolder"
    assert detect_loader("cifar10", archive) == "imagefolder"
    assert detect_loader("cifar10", official) == "cifar10"
    assert detect_loader("cifar10", official_archive) == "cifar10"
    with pytest.raises(DataError, match="ImageFolder"):
        detect_loader("cifar10", tmp_path / "absent")
    assert detect_loader("cifar100", imagefolder) == "cifar100"  # only CIFAR-10 has a copy


@pytest.mark.skipif(not SHARED_CIFAR10_JPEG.is_file(), reason="shared CIFAR-10 JPEG copy absent")
def test_shared_cifar10_jpeg_archive_is_read_as_imagefolder() -> None:
    assert detect_loader("cifar10", SHARED_CIFAR10_JPEG) == "imagefolder"


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100", "svhn"])
def test_reduced_and_fast_schedules_keep_the_models_and_shorten_training(dataset: str) -> None:
    full = reproduce_config(dataset, "full")
    reduced = reproduce_config(dataset, "reduced")
    fast = reproduce_config(dataset, "fast")
    assert (fast.teacher, fast.student) == (full.teacher, full.student)
    for section in ("teacher_train", "student_train"):
        assert (
            getattr(reduced, section).epochs
            < getattr(fast, section).epochs
            < getattr(full, section).epochs
        )
    assert fast.teacher_train.label_smoothing == 0.0  # a smoothed teacher distils worse

    assert full.data.name == dataset
    assert (full.teacher.arch, full.student.arch) == ("resnet56", "resnet20")
    assert (reduced.teacher, reduced.student) == (full.teacher, full.student)
    assert (full.teacher_train.optimizer, full.teacher_train.schedule) == ("sgd", "cosine")
    for section in ("teacher_train", "student_train"):
        assert getattr(reduced, section).epochs < getattr(full, section).epochs
    assert reduced.data.max_train is not None
    overridden = reproduce_config(dataset, "reduced", overrides=["teacher_train.epochs=3"])
    assert overridden.teacher_train.epochs == 3


def test_unknown_schedule_or_dataset_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="schedule"):
        reproduce_config("cifar10", "weekend")
    with pytest.raises(ConfigError, match="no preset"):
        reproduce_config("imagenet")


def test_threshold_grid_holds_the_table_thresholds() -> None:
    for k in (10, 100):
        table = table_thresholds(k)
        assert table[0] == 0.0 and table[-1] == pytest.approx(math.log(k))
        assert set(table) <= set(threshold_grid(k, 9))


# --------------------------------------------------------------------------- aggregation


def _seed_report(accuracy: dict[str, float], full_macs: dict[str, float], k: int = 10) -> dict:
    """A per-seed report where every threshold of a model has the same accuracy and
    MACs fall linearly from full (h = 0) to half (h = 1)."""
    log_k = math.log(k)
    models = {}
    for name, acc in accuracy.items():
        sweep = [
            {"rule": "entropy", "threshold": t, "accuracy": acc,
             "mean_macs": full_macs[name] * (1 - t / log_k / 2), "exit_fractions": [0.5, 0.5]}
            for t in threshold_grid(k, 9)
        ]  # fmt: skip
        models[name] = {
            "arch": "resnet56" if name == "teacher" else "resnet20",
            "num_exits": 2,
            "macs_per_exit": [full_macs[name] / 2, full_macs[name]],
            "params_per_exit": [1, 2],
            "exit_accuracy": [acc - 0.1, acc],
            "sweep": sweep,
        }
    return {
        "dataset": {"name": "cifar10", "num_classes": k, "test_images": 100},
        "reference": {"tolerance": 0.005},
        "config": {"teacher": {"arch": "resnet56", "width": 1.0},
                   "student": {"arch": "resnet20", "width": 1.0}},
        "models": models,
    }  # fmt: skip


def test_mean_std_is_mean_and_sample_std() -> None:
    assert mean_std([0.8, 0.9]) == pytest.approx((0.85, math.sqrt(0.005)))
    assert mean_std([0.5]) == (0.5, 0.0)


def test_paired_p_value_matches_the_closed_form_for_two_degrees_of_freedom() -> None:
    # diffs 0.01, 0.02, 0.03: mean 0.02, sd 0.01, t = 2 sqrt(3); with 2 degrees of freedom
    # the t tail is 0.5 (1 - t / sqrt(t^2 + 2)), so p = 1 - sqrt(12 / 14)
    assert paired_p_value([0.01, 0.02, 0.03]) == pytest.approx(1 - math.sqrt(12 / 14))
    assert paired_p_value([-0.01, -0.02, -0.03]) == pytest.approx(1 - math.sqrt(12 / 14))
    assert paired_p_value([0.05, 0.05]) is None  # no spread: undefined, not 0
    assert paired_p_value([0.3 - 0.2, 0.1]) is None  # equal up to float noise
    assert paired_p_value([0.05]) is None


def test_aggregate_hand_computed_statistics_winner_reduction_and_anchor() -> None:
    macs = SIMPLE_MACS
    reports = {
        0: _seed_report({"teacher": 0.90, "student_ce": 0.80, "student_kd": 0.85, "student_erde": 0.90}, macs),
        1: _seed_report({"teacher": 0.92, "student_ce": 0.82, "student_kd": 0.86, "student_erde": 0.91}, macs),
    }  # fmt: skip

    results = aggregate(reports, dataset="cifar10", schedule="reduced")

    erde = results["models"]["student_erde"]
    assert erde["thresholds"][0]["accuracy_mean"] == pytest.approx(0.905)
    assert erde["thresholds"][0]["accuracy_std"] == pytest.approx(math.sqrt(0.00005))
    assert erde["thresholds"][-1]["macs_mean"] == pytest.approx(50.0)  # h = 1: half the MACs
    comparison = results["comparisons"][0]
    assert comparison["beat_at_every_threshold"] and comparison["wins"] == len(TABLE_LEVELS)
    assert comparison["per_threshold"][0]["accuracy_diff_mean"] == pytest.approx(0.05)
    assert comparison["per_threshold"][0]["seeds_ahead"] == 2
    assert comparison["per_threshold"][0]["p_value"] is None  # both seeds +0.05: no spread
    # teacher last exit 0.91; ERDE (0.905) is within 0.5 points at every threshold, so its
    # cheapest point is h = 1 at 50 MACs: 400 / 50 = 8x. KD (0.855) never gets there.
    assert erde["mac_reduction"]["reduction"] == pytest.approx(8.0)
    # 8x = 400 / 100 from the smaller network x 100 / 50 from the early exits
    assert erde["mac_reduction"]["from_network"] == pytest.approx(4.0)
    assert erde["mac_reduction"]["from_exits"] == pytest.approx(2.0)
    assert results["teacher_seeds"] == 2 and "independent" in results["teacher_design"]
    assert results["models"]["student_kd"]["mac_reduction"] is None
    teacher_anchor = next(a for a in results["anchors"] if a["model"] == "teacher")
    published = PUBLISHED_PLAIN[("cifar10", "resnet56")][0]
    assert teacher_anchor["gap"] == pytest.approx(0.91 - published)


def test_equal_macs_differences_are_read_seed_by_seed_on_the_other_curve() -> None:
    """The first model's (accuracy, MACs) at a threshold against the best accuracy the other
    reaches with at most those MACs on its own seed's curve, linear between points."""
    from erde.reproduce.stats import equal_macs_diffs

    curve = [  # the other model: two seeds, two thresholds
        {"macs_per_seed": [10.0, 10.0], "accuracy_per_seed": [0.5, 0.4]},
        {"macs_per_seed": [20.0, 20.0], "accuracy_per_seed": [0.7, 0.8]},
    ]
    row = {"accuracy_per_seed": [0.65, 0.5], "macs_per_seed": [15.0, 20.0]}
    assert equal_macs_diffs(row, curve) == pytest.approx([0.65 - 0.6, 0.5 - 0.8])
    # a cheaper better point is reachable (seed 0), a better one that costs more is not (seed 1)
    curve.append({"macs_per_seed": [12.0, 30.0], "accuracy_per_seed": [0.9, 0.99]})
    assert equal_macs_diffs(row, curve) == pytest.approx([0.65 - 0.9, 0.5 - 0.8])
    assert equal_macs_diffs({**row, "macs_per_seed": [5.0, 20.0]}, curve) is None  # below range
    assert equal_macs_diffs({"accuracy_per_seed": [0.6]}, curve) is None  # an older file


def test_aggregate_pairs_equal_macs_differences_with_an_interval() -> None:
    macs = SIMPLE_MACS
    reports = {
        seed: _seed_report({"teacher": 0.90, "student_ce": 0.80, "student_kd": 0.85 + d,
                            "student_erde": 0.90 + d}, macs)
        for seed, d in ((0, 0.0), (1, 0.01), (2, 0.03))
    }  # fmt: skip
    row = aggregate(reports, dataset="cifar10", schedule="reduced")["comparisons"][0][
        "per_threshold"
    ][0]
    # every seed: ERDE 0.05 above KD at the same (full) MACs, so the paired diff is 0.05 exactly
    assert row["equal_macs_diff_mean"] == pytest.approx(0.05)
    assert row["equal_macs_seeds_ahead"] == 3 and row["equal_macs_p_value"] is None
    assert row["equal_macs_ci95_low"] == pytest.approx(0.05)


def test_an_ablation_block_tabulates_every_further_student_against_kd_and_erde() -> None:
    macs = {**SIMPLE_MACS, "student_erde_g2": SIMPLE_MACS["student_erde"]}
    reports = {
        seed: _seed_report({"teacher": 0.9, "student_ce": 0.8, "student_kd": 0.85,
                            "student_erde": 0.86 + d, "student_erde_g2": 0.87 + 2 * d}, macs)
        for seed, d in ((0, 0.0), (1, 0.01), (2, 0.02))
    }  # fmt: skip
    results = aggregate(reports, dataset="cifar10", schedule="reduced")
    lines = render_markdown(results).splitlines()
    head = lines.index(
        "| Pair | Thresholds won | Mean diff. (points) | At the last exit (95 % interval) | At equal MACs |"
    )
    rows = {line.split(" | ")[0].lstrip("| "): line for line in lines[head + 2 : head + 6]}
    # g2 - KD: +0.02, +0.04, +0.06 at every threshold (and at equal MACs: the same MACs)
    g2_kd = rows["student_erde_g2 − KD student"]
    assert "| 11 of 11 | +4.00 | +4.00 (" in g2_kd and g2_kd.endswith("| +4.00 |")
    low, high = (
        results["comparisons"][-2]["per_threshold"][0]["ci95_low"],
        results["comparisons"][-2]["per_threshold"][0]["ci95_high"],
    )
    assert f"({100 * low:+.2f} to {100 * high:+.2f})" in g2_kd
    assert "student_erde_g2 − ERDE student" in rows  # and against the ERDE it varies


def test_reduction_ladder_reaches_a_student_only_once_enough_accuracy_is_given_up() -> None:
    macs = SIMPLE_MACS
    acc = {"teacher": 0.91, "student_ce": 0.80, "student_kd": 0.89, "student_erde": 0.905}
    results = aggregate({0: _seed_report(acc, macs)}, dataset="cifar10", schedule="reduced")

    def ladder(name: str) -> list:
        return [r["reduction"] for r in results["models"][name]["mac_reduction_by_tolerance"]]

    # every threshold keeps the model's accuracy, so once a level admits it, its cheapest
    # point is h = 1 at half its full MACs: 400 / 50 = 8x for a student, 2x for the teacher
    assert ladder("student_erde") == pytest.approx([8.0] * 4)  # 0.905: within 0.5 points
    assert ladder("student_kd")[:2] == [None, None]  # 0.89 is 2 points under 0.91
    assert ladder("student_kd")[2:] == pytest.approx([8.0, 8.0])
    assert ladder("student_ce") == [None] * 4  # 11 points under
    assert ladder("teacher") == pytest.approx([2.0] * 4)
    kd = results["models"]["student_kd"]["mac_reduction_by_tolerance"][2]
    assert (kd["from_network"], kd["from_exits"]) == pytest.approx((4.0, 2.0))

    md = render_markdown(results)
    row = next(x for x in md.splitlines() if x.startswith("| KD student | —"))
    assert (
        row
        == "| KD student | — | — | 8.00x (4.00 × 2.00), 89.00 % | 8.00x (4.00 × 2.00), 89.00 % |"
    )
    older = json.loads(json.dumps(results))  # written before the ladder was recorded
    for model in older["models"].values():
        del model["mac_reduction_by_tolerance"]
    assert render_markdown(older) == md  # derived from the same mean curves


def test_publish_fills_only_its_data_set_block_of_results_md(tmp_path: Path, docs: Path) -> None:
    macs, acc = SIMPLE_MACS, SIMPLE_ACC
    data = tmp_path.parent / "shared" / "cifar10"  # recorded absolute, shown from the repository
    teacher = docs.resolve() / "results" / "cifar10-teacher"  # a released teacher, likewise
    results = aggregate({0: _seed_report(acc, macs)}, dataset="cifar10", schedule="reduced",
                        command=f"erde reproduce --data-dir {data} --seeds 1 --teacher {teacher}")  # fmt: skip

    paths = publish(results, docs)

    text = (docs / "RESULTS.md").read_text()
    cifar10 = text.split("<!-- erde-results:cifar10-reduced:begin -->")[1].split(
        "<!-- erde-results:cifar10-reduced:end -->"
    )[0]
    svhn = text.split("<!-- erde-results:svhn-reduced:begin -->")[1].split(
        "<!-- erde-results:svhn-reduced:end -->"
    )[0]
    assert "Pending" not in cifar10 and "| 88.00 · 50 |" in cifar10
    assert "±" not in cifar10 and "one seed, so no spread" in cifar10  # std of one run: undefined
    shown = "erde reproduce --data-dir ../shared/cifar10 --seeds 1 --teacher docs/results/cifar10-teacher"
    assert f"Command: `{shown}`" in cifar10
    recorded = json.loads(paths["docs_results"].read_text())["command"]
    assert recorded.endswith(f"{data} --seeds 1 --teacher {teacher}")

    older = json.loads(json.dumps(results))  # results written before the split was recorded
    red = older["models"]["teacher"]["mac_reduction"]
    assert red.pop("from_network") and red.pop("from_exits")
    rows = [x for x in render_markdown(older).splitlines() if x.startswith("| Teacher |")]
    row = next(x for x in rows if "x |" in x)  # the MAC-reduction table's row
    assert "| 2.00x | 1.00x | 2.00x |" in row  # 400 / 200 MACs, all from the teacher's exits
    assert "Pending" in svhn
    assert "results/cifar10-reduced.png" in cifar10
    assert paths["docs_results"].name == "cifar10-reduced.json"
    assert json.loads(paths["docs_results"].read_text())["models"] == results["models"]
    assert paths["docs_plot"].read_bytes()[:4] == b"\x89PNG"
    assert "docs_training" not in paths and "Training curves" not in cifar10  # none recorded

    curve = {"epoch": [1, 2], "val_exit_accuracy": [[0.5, 0.6], [0.7, 0.8]], "train_loss": [2, 1],
             "val_exit_accuracy_std": [[0, 0], [0, 0]], "runs": 1}  # fmt: skip
    with_curves = aggregate({0: _seed_report(acc, macs)}, dataset="cifar10", schedule="reduced",
                            curves={"teacher": curve, "unknown_model": curve})  # fmt: skip
    assert list(with_curves["training_curves"]) == ["teacher"]  # only the results' models
    paths = publish(with_curves, docs)
    assert paths["docs_training"].name == "cifar10-reduced-training.png"
    assert paths["docs_training"].read_bytes()[:4] == b"\x89PNG"
    assert (
        "![training curves](results/cifar10-reduced-training.png)"
        in (docs / "RESULTS.md").read_text()
    )


PUBLISH_CHILD = """
import json, sys
from erde.reproduce import publish
publish(json.loads(open(sys.argv[1]).read()), sys.argv[2])
"""


def test_publish_waits_for_another_run_publishing_into_the_same_docs(
    tmp_path: Path, docs: Path
) -> None:
    """Two runs finishing together must not lose one of their RESULTS.md blocks."""
    from erde.outputs import folder_update_lock

    macs, acc = SIMPLE_MACS, SIMPLE_ACC
    svhn = tmp_path / "svhn.json"
    svhn.write_text(json.dumps(aggregate({0: _seed_report(acc, macs)}, dataset="svhn",
                                         schedule="reduced")))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with folder_update_lock(docs):  # this process is half-way through its own publish
        child = subprocess.Popen([sys.executable, "-c", PUBLISH_CHILD, str(svhn), str(docs)],
                                 env=env)  # fmt: skip
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=3)  # blocked: it has not read RESULTS.md yet
        text = (docs / "RESULTS.md").read_text()
        cifar = aggregate({0: _seed_report(acc, macs)}, dataset="cifar10", schedule="reduced")
        block = render_markdown(cifar, level=3)
        (docs / "RESULTS.md").write_text(replace_block(text, "cifar10-reduced", block))
    assert child.wait(timeout=120) == 0
    page = (docs / "RESULTS.md").read_text()
    for name in ("cifar10-reduced", "svhn-reduced"):
        inner = page.split(f"<!-- erde-results:{name}:begin -->")[1].split("<!-- erde")[0]
        assert "Pending" not in inner and "| 88.00 · 50 |" in inner, name  # both blocks kept


def test_replace_block_appends_markers_when_absent() -> None:
    text = replace_block("# Results\n", "svhn", "numbers")
    assert replace_block(text, "svhn", "new numbers").count("numbers") == 1
    assert "<!-- erde-results:svhn:begin -->\nnew numbers\n<!-- erde-results:svhn:end -->" in (
        replace_block(text, "svhn", "new numbers")
    )


def test_speed_only_switches_do_not_block_reuse_but_the_method_does(tmp_path: Path) -> None:
    from erde.config import save_config
    from erde.reproduce import check_reusable

    cfg = reproduce_config("cifar10", "fast")
    (tmp_path / "teacher").mkdir()
    saved = reproduce_config("cifar10", "fast", overrides=["teacher_train.channels_last=false"])
    save_config(saved, tmp_path / "teacher" / "config.yaml")
    check_reusable(tmp_path, cfg, ["teacher"])  # NHWC or not: the same training
    other = reproduce_config("cifar10", "fast", overrides=["teacher_train.lr=0.2"])
    with pytest.raises(ConfigError, match=r"teacher_train\.lr"):
        check_reusable(tmp_path, other, ["teacher"])


def test_a_null_split_seed_equals_the_seed_it_stands_for(tmp_path: Path) -> None:
    """One seed run with its own teacher saves split_seed null; seeds added later with the shared
    teacher ask for split_seed 0: for seed 0 those hold out the same images, so seed 0 is reused."""
    import dataclasses

    from erde.config import save_config
    from erde.reproduce import check_reusable
    from erde.training import Job, config_differences

    cfg = reproduce_config("cifar10", "fast")
    (tmp_path / "student_erde").mkdir()
    save_config(cfg, tmp_path / "student_erde" / "config.yaml")  # split_seed: null, seed 0
    for split_seed, reusable in ((0, True), (1, False)):
        asked = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, split_seed=split_seed))
        diffs = config_differences(cfg.to_dict(), asked.to_dict(), Job("student", "erde"))
        assert diffs == ([] if reusable else ["data.split_seed: 0 -> 1"])
        if reusable:
            check_reusable(tmp_path, asked, ["student_erde"])
        else:
            with pytest.raises(ConfigError, match=r"data\.split_seed \(0 there, 1 now\)"):
                check_reusable(tmp_path, asked, ["student_erde"])


def test_a_blocks_heading_names_its_models_and_its_anchor_stays_as_seeds_are_added(
    tmp_path: Path,
) -> None:
    """Blocks of one schedule differ by their models: the heading says which; the link
    target is the block's name, which does not change when a seed is added."""
    from erde.reproduce.publish import publish
    from erde.reproduce.render import render_markdown

    results = DOCS / "results"
    headline = json.loads((results / "cifar10-speed.json").read_text())
    ablation = json.loads(
        (results / "cifar10-speed-fastnet-fastnet_x0.25-ablation.json").read_text()
    )
    first = render_markdown(headline, level=3).splitlines()[0]
    assert first.startswith("### cifar10: speed schedule, fastnet → fastnet_x0.5, ")
    assert "students" not in first  # the ce, kd, erde trio goes without saying
    first = render_markdown(ablation, level=3).splitlines()[0]
    assert ", fastnet → fastnet_x0.25, students kd, erde, erde_g0.25," in first
    docs = tmp_path / "docs"
    publish(headline, docs)
    text = (docs / "RESULTS.md").read_text()
    assert '<!-- erde-results:cifar10-speed:begin -->\n<a id="cifar10-speed"></a>\n\n### ' in text
