"""erde status: read a run's folders while it trains, and tell a live run from a stopped one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from erde.cli import main
from erde.errors import ErdeError
from erde.status import lock_holder, model_status, status_lines
from erde.training import Job, model_run, train


def test_a_finished_run_lists_every_model_as_finished_and_not_running(tiny_run) -> None:
    lines = status_lines(tiny_run["out"])
    names = [line.split(":")[0] for line in lines[:-1]]
    assert names == ["student_ce", "student_erde", "student_kd", "teacher"]
    assert all("finished (" in line and "val acc " in line for line in lines[:-1])
    assert not any(" left" in line for line in lines)
    assert lines[-1].startswith("not running")


def test_a_stopped_run_says_where_it_stands_and_how_long_is_left(tiny_cfg, tmp_path) -> None:
    cfg = tiny_cfg
    cfg.teacher_train.epochs = 3
    cfg.teacher_train.checkpoint_every_steps = 2
    steps = cfg.teacher_train.max_steps_per_epoch  # 4

    def stop_at(step: int):
        def stop(s: int) -> None:
            if s == step:
                raise KeyboardInterrupt

        return stop

    with pytest.raises(KeyboardInterrupt):  # killed at step 3: checkpoint at step 2, no epoch yet
        train(cfg, Job("teacher"), tmp_path, progress=False, on_step=stop_at(3))
    (line, running) = status_lines(tmp_path)
    assert line.startswith(f"{tmp_path.name}: epoch 1/3 step 2/{steps}, checkpoint ")
    assert " left" not in line  # nothing timed yet
    assert running.startswith("not running")

    with pytest.raises(KeyboardInterrupt):  # one epoch done, stopped in the second
        train(cfg, Job("teacher"), tmp_path, resume=True, progress=False,
              on_step=stop_at(steps + 3))  # fmt: skip
    status = model_status(tmp_path)
    assert (status.finished, status.epoch, status.step_in_epoch) == (False, 1, 2)
    assert len(status.val_exit_accuracy) == 3
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["seconds_per_step"] > 0
    left = 3 * steps - (steps + 2)
    assert status.eta_seconds == pytest.approx(record["seconds_per_step"] * left)
    assert "about " in status_lines(tmp_path)[0]

    # a run of many epochs, one of them stopped for a while: the estimate is the recent median
    paused = {**record, "seconds_per_step": 50 * record["seconds_per_step"]}
    history = [{**record, "epoch": 1}, {**paused, "epoch": 2}, {**record, "epoch": 3}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    assert model_status(tmp_path).eta_seconds == pytest.approx(record["seconds_per_step"] * left)


def test_the_time_left_is_estimated_before_the_first_epoch_ends(
    tiny_cfg, tmp_path, monkeypatch
) -> None:
    """A long first epoch (a CPU run of hours) says how long is left from its timed steps."""
    monkeypatch.setattr(model_run, "SYNC_EVERY", 1)  # blocks of one step: timed before step 2
    cfg = tiny_cfg
    cfg.teacher_train.epochs = 3
    cfg.teacher_train.checkpoint_every_steps = 2
    steps = cfg.teacher_train.max_steps_per_epoch

    def stop(s: int) -> None:
        if s == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # checkpoint at step 2, no epoch record yet
        train(cfg, Job("teacher"), tmp_path, progress=False, on_step=stop)
    assert model_status(tmp_path).epoch == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["steady_seconds_per_step"] > 0
    status = model_status(tmp_path)
    assert status.eta_seconds == pytest.approx(ckpt["steady_seconds_per_step"] * (3 * steps - 2))
    assert "left" in status_lines(tmp_path)[0]

    for hostile in ("fast", float("nan"), -1.0, True):  # a checkpoint that says nonsense
        ckpt["steady_seconds_per_step"] = hostile
        torch.save(ckpt, tmp_path / "checkpoint.pt")
        assert model_status(tmp_path).eta_seconds is None, hostile


HOLDER = textwrap.dedent("""
    import sys, time
    from erde.outputs import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_live_erde_process_holding_the_folder_reads_as_running(tiny_run, tmp_path) -> None:
    folder = tmp_path / "run"  # a copy: the killed holder leaves its lock file behind, and the
    shutil.copytree(tiny_run["out"], folder)  # session's run is copied whole by other tests
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "locked"
        assert lock_holder(folder) == f"pid {child.pid} (erde {folder})"  # argv of the holder
        assert status_lines(folder)[-1].startswith(f"running: pid {child.pid}")
    finally:
        child.kill()
        child.wait()
    assert lock_holder(folder) is None  # a killed holder leaves nothing held
    assert status_lines(folder)[-1].startswith("not running")


def test_a_lock_file_rewritten_with_hostile_json_still_reads_as_held(tiny_run, tmp_path) -> None:
    """Whoever can write the run folder cannot crash status, or a second writer, through the lock."""
    from erde.outputs import LOCK_NAME, OutputLockedError, output_lock

    folder = tmp_path / "run"
    shutil.copytree(tiny_run["out"] / "teacher", folder / "teacher")
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "locked"
        with (folder / LOCK_NAME).open("r+") as f:  # same file, still locked: only its text changes
            f.truncate()
            f.write("[" * 200_000)
        assert lock_holder(folder) == "an erde process"
        assert status_lines(folder)[-1] == "running: an erde process"
        with (
            pytest.raises(OutputLockedError, match="in use by another process"),
            output_lock(folder),
        ):
            pass
    finally:
        child.kill()
        child.wait()


def test_a_lock_two_levels_above_the_models_reads_as_running_from_further_up(
    tiny_run, tmp_path
) -> None:
    """erde reproduce locks its --out; asked about the folder of several such runs, still running."""
    out = tmp_path / "queue" / "cifar10-fast"
    shutil.copytree(tiny_run["out"], out / "seed_0")
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE,
                             text=True)  # fmt: skip
    try:
        assert child.stdout.readline().strip() == "locked"
        lines = status_lines(tmp_path / "queue")
        assert lines[0].startswith("cifar10-fast/seed_0/student_ce: finished")
        assert lines[-1].startswith(f"running: pid {child.pid}")
    finally:
        child.kill()
        child.wait()


def test_a_model_before_its_first_checkpoint_is_listed_as_started(tiny_run, tmp_path) -> None:
    """A seed's students write config.yaml at once and checkpoint.pt only after N steps."""
    shutil.copytree(tiny_run["out"], tmp_path / "seed_0")
    (tmp_path / "seed_0" / "config.yaml").write_text("seed: 0\n")  # a seed folder's own config
    started = tmp_path / "seed_1" / "student_kd"
    started.mkdir(parents=True)
    shutil.copy(tiny_run["out"] / "student_kd" / "config.yaml", started / "config.yaml")
    now = (started / "config.yaml").stat().st_mtime + 30

    lines = status_lines(tmp_path, now=now)

    assert [line.split(":")[0] for line in lines[:-1]] == [
        "seed_0/student_ce", "seed_0/student_erde", "seed_0/student_kd", "seed_0/teacher",
        "seed_1/student_ce", "seed_1/student_erde", "seed_1/student_kd",
    ]  # fmt: skip
    assert lines[-2] == "seed_1/student_kd: started 30 s ago, no checkpoint yet"
    # the students seed 1 has still to train, as seed 0 holds them; its teacher is not asked
    # for (a seed may share another seed's teacher)
    assert lines[-4:-2] == [
        f"seed_1/student_{m}: not started (another seed here has it)" for m in ("ce", "erde")
    ]
    assert lines[-1].startswith("not running")
    # only started models below: listed, not refused as a folder without models
    assert status_lines(tmp_path / "seed_1", now=now)[0].startswith("student_kd: started 30 s")


def test_students_of_one_run_s_seeds_are_compared_with_each_other_only(tiny_run, tmp_path):
    """A folder of several reproduce runs: a run's seed lacks only what that run's seeds hold."""
    for run, models in (("a", ("teacher", "student_ce")), ("b", ("student_kd",))):
        shutil.copytree(tiny_run["out"] / models[0], tmp_path / run / "seed_0" / models[0])
        for name in models:
            shutil.copytree(tiny_run["out"] / name, tmp_path / run / "seed_1" / name)
    names = [line.split(":")[0] for line in status_lines(tmp_path)[:-1]]
    assert names == [
        "a/seed_0/student_ce", "a/seed_0/teacher", "a/seed_1/student_ce", "a/seed_1/teacher",
        "b/seed_0/student_kd", "b/seed_1/student_kd",
    ]  # fmt: skip
    shutil.rmtree(tmp_path / "a" / "seed_0" / "teacher")  # seed 0 shares seed 1's: not asked
    assert "a/seed_0/teacher" not in [line.split(":")[0] for line in status_lines(tmp_path)]
    assert (
        status_lines(tmp_path)[0] == "a/seed_0/student_ce: not started (another seed here has it)"
    )


def test_cli_status_prints_the_lines_and_refuses_a_folder_without_models(
    tiny_run, tmp_path, capsys, monkeypatch
) -> None:
    now = time.time()  # one clock for both reads: a second boundary between them changes "ago"
    monkeypatch.setattr("erde.status.time.time", lambda: now)
    assert main(["status", str(tiny_run["out"])]) == 0
    assert capsys.readouterr().out.splitlines() == status_lines(tiny_run["out"])
    assert main(["status", str(tmp_path)]) == 2
    assert "no checkpoint.pt here" in capsys.readouterr().err
    assert main(["status", str(tmp_path / "missing")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_without_a_lock_table_the_state_is_unknown_not_stopped(tiny_run, monkeypatch) -> None:
    """On systems without /proc/locks (macOS), a live run must not be reported as stopped."""
    import erde.status

    monkeypatch.setattr(erde.status, "_flock_table", lambda: None)
    assert status_lines(tiny_run["out"])[-1].startswith("running or not: unknown")


def test_a_damaged_checkpoint_is_one_line_and_the_others_are_still_read(tiny_run, tmp_path) -> None:
    import shutil

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    shutil.copytree(tiny_run["teacher"].parent, tmp_path / "teacher")
    lines = status_lines(tmp_path)
    assert lines[0].startswith("broken: unreadable (") and "checkpoint" in lines[0]
    assert lines[1].startswith("teacher: finished (")
    with pytest.raises(ErdeError, match="not a folder"):
        status_lines(tmp_path / "broken" / "checkpoint.pt")


def test_a_corrupt_metrics_file_is_named_in_its_model_s_line(tiny_run, tmp_path, capsys) -> None:
    run = shutil.copytree(tiny_run["out"], tmp_path / "run")
    (run / "student_kd" / "metrics.jsonl").write_text('{"epoch": 1, broken\n')
    assert main(["status", str(run)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("student_kd:"))
    assert line.startswith("student_kd: finished (")
    assert f"metrics unreadable ({run / 'student_kd' / 'metrics.jsonl'}: line 1" in line


def test_a_reader_that_goes_away_stops_the_command_quietly(tiny_run) -> None:
    """`erde status DIR | head -1`: no "Broken pipe" error line when head has read enough."""
    child = subprocess.Popen(
        [sys.executable, "-m", "erde.cli", "status", str(tiny_run["out"])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    child.stdout.close()  # the reader is gone before the first line is written
    _, err = child.communicate(timeout=120)
    assert err.decode() == ""
    assert child.returncode == 141


def test_a_report_folder_beside_the_models_is_not_listed_as_a_model(tiny_run, tmp_path) -> None:
    """erde.evaluate writes report.json and config.yaml into its folder, no checkpoint."""
    shutil.copytree(tiny_run["out"] / "teacher", tmp_path / "teacher")
    report = tmp_path / "report"
    report.mkdir()
    shutil.copy(tiny_run["report"], report / "report.json")
    shutil.copy(tiny_run["out"] / "teacher" / "config.yaml", report / "config.yaml")

    lines = status_lines(tmp_path)

    assert [line.split(":")[0] for line in lines[:-1]] == ["teacher"], lines
    assert not any("no checkpoint yet" in line for line in lines)
