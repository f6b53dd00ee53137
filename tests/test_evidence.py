"""Per-image records: written for every seed and model, packed per block, and enough to
re-derive every published table (erde verify); records that do not match are refused."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import write_svhn
from test_reproduce import _sets

from erde.cli import main
from erde.errors import ReportError
from erde.evaluation import sweep
from erde.records import RecordsError, exit_records, load_records, save_records, sweep_records
from erde.reproduce import seedfiles
from erde.reproduce.evidence import verify_block
from erde.reproduce.publish import rerender_block, rerender_blocks


@pytest.fixture(scope="module")
def block(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two student seeds sharing one teacher on small SVHN files, published into docs/."""
    root = tmp_path_factory.mktemp("evidence")
    data = root / "svhn"
    write_svhn(data, n_train=60, n_test=30)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        argv = ["reproduce", "--dataset", "svhn", "--data-dir", str(data), "--no-progress",
                "--seeds", "2", "--teacher-seeds", "1", "--out", str(root / "out"),
                "--docs", str(root / "docs"), "--students", "ce,kd,erde,erde_g2=erde:gamma=2",
                *_sets()]  # fmt: skip
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return root


def _published(folder: Path) -> Path:
    (path,) = folder.glob("*.json")
    return path


def test_records_replay_the_sweep_of_the_logits_exactly() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 2000, 10, generator=g) * 3
    labels = torch.randint(0, 10, (2000,), generator=g)
    grid = np.linspace(0, np.log(10), 41).tolist()
    assert sweep(logits, labels, [1, 2, 3], grid) == sweep_records(
        exit_records(logits), labels.numpy(), [1, 2, 3], grid
    )


def test_every_seed_and_the_block_carry_records_of_every_model(block: Path) -> None:
    out = block / "out"
    names = {"teacher", "student_ce", "student_kd", "student_erde", "student_erde_g2"}
    for seed in (0, 1):
        _, held = load_records(out / f"seed_{seed}" / "records.npz")
        assert set(held) == names
    results = json.loads((out / "results.json").read_text())
    entries = results["records"]["entries"]
    assert entries["0"]["teacher"] == entries["1"]["teacher"] == "seed_0/teacher"  # stored once
    json_path = _published(block / "docs" / "results")
    labels, held = load_records(json_path.with_name(json_path.stem + "-records.npz"))
    assert len(labels) == results["dataset"]["test_images"] and len(held) == 1 + 2 * 4
    extra = [c for c in results["comparisons"] if c["model"] == "student_erde_g2"]
    assert [c["other"] for c in extra] == ["student_kd", "student_erde"]
    row = results["comparisons"][0]["per_threshold"][3]
    assert row["ci95_low"] <= row["accuracy_diff_mean"] <= row["ci95_high"]


def test_verify_re_derives_every_published_number_from_the_records(block: Path, capsys) -> None:
    published = _published(block / "docs" / "results")
    checked, diffs = verify_block(published)
    assert diffs == [] and checked > 500
    assert main(["verify", str(published)]) == 0
    assert f"all {checked} numbers re-derived" in capsys.readouterr().out
    import erde

    assert erde.verify(published) == []


def test_a_changed_number_is_found_and_named(block: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "results"
    shutil.copytree(block / "docs" / "results", folder)
    path = _published(folder)
    results = json.loads(path.read_text())
    row = results["models"]["student_erde"]["thresholds"][2]
    row["accuracy_per_seed"][1] += 0.01
    path.write_text(json.dumps(results))
    assert main(["verify", str(path)]) == 1
    assert "student_erde at h=0.02: accuracy_per_seed[1]" in capsys.readouterr().out


def test_the_block_says_what_the_entropy_term_changed_and_verify_checks_it(
    block: Path, tmp_path: Path, capsys
) -> None:
    """Every student but KD, against KD, per exit; rendered in RESULTS.md; re-derived by verify."""
    path = _published(block / "docs" / "results")
    results = json.loads(path.read_text())
    diag = results["entropy_diagnostics"]
    assert diag["reference"] == "student_kd"
    assert set(diag["models"]) == {"student_ce", "student_erde", "student_erde_g2"}
    exits = results["models"]["student_kd"]["num_exits"]
    assert [r["exit"] for r in diag["models"]["student_erde"]] == list(range(exits))
    assert (
        "What the entropy term changes, against the KD student"
        in (block / "docs" / "RESULTS.md").read_text()
    )

    folder = tmp_path / "results"
    shutil.copytree(block / "docs" / "results", folder)
    path = _published(folder)
    row = results["entropy_diagnostics"]["models"]["student_erde"][0]
    row["entropy_shift_teacher_right_mean"] = 0.123
    path.write_text(json.dumps(results))
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "entropy_diagnostics.models.student_erde[0].entropy_shift_teacher_right_mean" in out


def test_the_block_tests_the_whole_curve_once_per_pair_and_verify_checks_it(
    block: Path, tmp_path: Path, capsys
) -> None:
    """One paired test of the whole trade-off per comparison, rendered under the table
    and in the other pairs' table, re-derived from the records by verify."""
    path = _published(block / "docs" / "results")
    results = json.loads(path.read_text())
    pairs = [(c["model"], c["other"]) for c in results["comparisons"]]
    assert [(w["model"], w["other"]) for w in results["whole_curve"]] == pairs
    first = results["whole_curve"][0]
    assert first["n_seeds"] == 2 and len(first["diff_per_seed"]) == 2
    assert first["ci95_low"] <= first["diff_mean"] <= first["ci95_high"]
    macs = results["models"]["student_kd"]["macs_per_exit"]
    assert first["macs_low"] == pytest.approx(macs[0]) and first["macs_high"] == pytest.approx(
        macs[-1]
    )
    text = (block / "docs" / "RESULTS.md").read_text()
    assert "Over the whole curve, one paired test instead of one per threshold" in text
    assert "| Whole curve |" in text
    each = ", ".join(f"{100 * d:+.2f}" for d in first["diff_per_seed"])
    assert f"of 2 seeds (per seed: {each})." in text  # whether one seed carries the mean

    folder = tmp_path / "results"
    shutil.copytree(block / "docs" / "results", folder)
    path = _published(folder)
    results["whole_curve"][1]["diff_per_seed"][0] += 0.001
    path.write_text(json.dumps(results))
    assert main(["verify", str(path)]) == 1
    assert "whole_curve[1].diff_per_seed[0]" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("other_file", "do not belong together"),
        ("missing", "records file not found"),
        ("classes", "a class index beyond the results' 10 classes"),
        ("count", "images, the results say 999"),
        ("not_results", "not a results file of erde reproduce with records"),
    ],
)
def test_records_that_do_not_match_their_json_are_one_line(
    block: Path, tmp_path: Path, damage: str, message: str
) -> None:
    folder = tmp_path / "results"
    shutil.copytree(block / "docs" / "results", folder)
    path = _published(folder)
    records = path.with_name(path.stem + "-records.npz")
    if damage == "other_file":
        shutil.copy(block / "out" / "seed_1" / "records.npz", records)
    elif damage == "missing":
        records.unlink()
    elif damage == "not_results":
        results = json.loads(path.read_text())
        del results["models"]
        path.write_text(json.dumps(results))
    elif damage == "count":
        results = json.loads(path.read_text())
        results["records"]["images"] = 999
        path.write_text(json.dumps(results))
    else:  # records rewritten with an impossible class, and the JSON told its new sha256
        labels, held = load_records(records)
        first = next(iter(held))
        held[first].pred[0, 0] = 200
        results = json.loads(path.read_text())
        results["records"]["sha256"] = save_records(records, held, labels)
        path.write_text(json.dumps(results))
    proc = subprocess.run([sys.executable, "-m", "erde.cli", "verify", str(path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_a_records_file_that_would_decompress_too_far_is_refused(
    tmp_path: Path, monkeypatch
) -> None:
    from erde import records

    path = tmp_path / "r.npz"
    save_records(
        path, {"m": exit_records(torch.zeros(2, 5000, 10))}, torch.zeros(5000, dtype=torch.long)
    )
    monkeypatch.setattr(records, "MAX_RECORDS_ARRAY_BYTES", 1000)
    with pytest.raises(RecordsError, match="would decompress past the limit"):
        load_records(path)


def test_seeds_are_added_elsewhere_from_a_released_teacher_without_training_it(
    block: Path, tmp_path: Path, capsys
) -> None:
    shipped = tmp_path / "shipped-teacher"
    trained = block / "out" / "seed_0" / "teacher"
    assert main(["release", str(trained), "--out", str(shipped / "checkpoint.pt")]) == 0
    shutil.copy(trained / "config.yaml", shipped / "config.yaml")
    data = block / "svhn"
    argv = ["reproduce", "--dataset", "svhn", "--data-dir", str(data), "--no-progress",
            "--seeds", "1", "--teacher-seeds", "1", "--teacher", str(shipped),
            "--out", str(tmp_path / "elsewhere"), *_sets()]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "copied into" in printed and "teacher: already finished" in printed
    assert "teacher: training" not in printed
    _, before = load_records(block / "out" / "seed_0" / "records.npz")
    _, after = load_records(tmp_path / "elsewhere" / "seed_0" / "records.npz")
    assert np.array_equal(before["teacher"].entropy, after["teacher"].entropy)


def test_a_teacher_without_its_config_or_of_another_seed_is_refused(
    block: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "t"
    folder.mkdir()
    shutil.copy(block / "out" / "seed_0" / "teacher" / "checkpoint.pt", folder / "checkpoint.pt")
    base = ["reproduce", "--dataset", "svhn", "--data-dir", str(block / "svhn"), "--no-progress",
            "--out", str(tmp_path / "o"), *_sets(), "--teacher"]  # fmt: skip
    shipped = _ship_teacher(block, tmp_path / "shipped")
    for extra, message in (
        ([str(folder), "--seeds", "1"], "needs checkpoint.pt and config.yaml"),
        ([str(shipped), "--seed", "1", "--seeds", "1"], "trained with another config"),
    ):
        proc = subprocess.run([sys.executable, "-m", "erde.cli", *base, *extra],
                              capture_output=True, text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not list((tmp_path / "o").glob("seed_*/student_ce"))


def test_a_released_teacher_is_the_first_of_several_teachers_and_the_others_train(
    block: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three teachers' block, one of them released already: only the other is trained."""
    shipped = _ship_teacher(block, tmp_path / "shipped")
    out = tmp_path / "o"
    monkeypatch.chdir(shipped.parent)  # given relative, recorded absolute
    argv = ["reproduce", "--dataset", "svhn", "--data-dir", str(block / "svhn"), "--no-progress",
            "--seeds", "2", "--teacher-seeds", "2", "--teacher", shipped.name,
            "--out", str(out), *_sets()]  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "(the first seed's, not trained)" in printed and printed.count("teacher: training") == 1
    assert (out / "seed_0" / "teacher" / "checkpoint.pt").read_bytes() == (
        shipped / "checkpoint.pt"
    ).read_bytes()
    assert (out / "seed_1" / "teacher" / "checkpoint.pt").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["teacher_seeds"] == 2 and f"--teacher {shipped}" in results["command"]


def _ship_teacher(block: Path, shipped: Path) -> Path:
    """The fixture's teacher released as a folder of its own (fp16 checkpoint, config)."""
    trained = block / "out" / "seed_0" / "teacher"
    assert main(["release", str(trained), "--out", str(shipped / "checkpoint.pt")]) == 0
    shutil.copy(trained / "config.yaml", shipped / "config.yaml")
    shutil.copy(trained / "metrics.jsonl", shipped / "metrics.jsonl")
    return shipped


def _continue_argv(block: Path, docs: Path, out: Path, seeds: int, *extra: str) -> list[str]:
    return ["reproduce", "--dataset", "svhn", "--data-dir", str(block / "svhn"), "--no-progress",
            "--seeds", str(seeds), "--teacher-seeds", "1", "--docs", str(docs), "--out", str(out),
            "--students", "ce,kd,erde,erde_g2=erde:gamma=2", *extra, *_sets()]  # fmt: skip


def test_a_published_block_gains_a_seed_elsewhere_without_training_its_seeds_again(
    block: Path, tmp_path: Path, capsys
) -> None:
    """Only the committed docs and the released teacher travel: the block's two seeds are
    restored from its seed files, the third trains, and the three-seed block verifies."""
    docs = tmp_path / "docs"
    shutil.copytree(block / "docs", docs)
    before = json.loads(_published(docs / "results").read_text())
    assert (docs / "results" / f"{_published(docs / 'results').stem}-seeds.json.gz").is_file()
    shipped = _ship_teacher(block, tmp_path / "shipped")
    out = tmp_path / "elsewhere"
    capsys.readouterr()
    assert main(_continue_argv(block, docs, out, 3, "--teacher", str(shipped))) == 0
    printed = capsys.readouterr().out
    assert "seed 0: restored from" in printed and "seed 1: restored from" in printed
    assert "seed 2 (3/3)" in printed and "seed 0 (1/3)" not in printed
    assert "teacher: training" not in printed
    assert not any((out / f"seed_{s}" / "student_kd" / "checkpoint.pt").exists() for s in (0, 1))
    assert (out / "seed_2" / "student_kd" / "checkpoint.pt").is_file()
    published = _published(docs / "results")
    after = json.loads(published.read_text())
    assert after["seeds"] == [0, 1, 2] and after["n_seeds"] == 3
    for name, model in before["models"].items():
        for old, new in zip(model["thresholds"], after["models"][name]["thresholds"], strict=True):
            assert new["accuracy_per_seed"][:2] == old["accuracy_per_seed"]
        assert after["training_time"][name]["epochs"] == before["training_time"][name]["epochs"]
    _, old_records = load_records(block / "out" / "seed_1" / "records.npz")
    _, new_records = load_records(out / "seed_1" / "records.npz")
    assert np.array_equal(old_records["student_erde"].pred, new_records["student_erde"].pred)
    assert main(["verify", str(published)]) == 0


def test_a_restored_block_without_its_teachers_weights_trains_nothing(
    block: Path, tmp_path: Path
) -> None:
    """A new seed of a one-teacher block needs that teacher's weights, which the seed files
    do not hold: one line naming --teacher, and no student trained."""
    docs = tmp_path / "docs"
    shutil.copytree(block / "docs", docs)
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "erde.cli", *_continue_argv(block, docs, out, 3)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "give the released teacher with --teacher" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (
        not (out / "seed_2").exists()
        and not (out / "seed_0" / "teacher" / "checkpoint.pt").exists()
    )


def _rewrite_seed_files(path: Path, change) -> None:
    body = json.loads(gzip.decompress(path.read_bytes()))
    change(body)
    path.write_bytes(gzip.compress(json.dumps(body).encode()))


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b["files"].update({"seed_0/../../escape.yaml": "x"}), "refuses the path"),
        (lambda b: b["files"].update({"seed_7/report.json": "{}"}), "refuses the path"),
        (lambda b: b.update(records_sha256="0" * 64), "belongs with records"),
        (lambda b: b["files"].pop("seed_1/report.json"), "no report of the models"),
    ],
    ids=["path-outside", "unknown-seed", "other-records", "missing-report"],
)
def test_seed_files_that_do_not_belong_are_refused_before_anything_is_written(
    block: Path, tmp_path: Path, change, message: str
) -> None:
    docs = tmp_path / "docs"
    shutil.copytree(block / "docs", docs)
    (seeds,) = (docs / "results").glob("*-seeds.json.gz")
    _rewrite_seed_files(seeds, change)
    shipped = _ship_teacher(block, tmp_path / "shipped")
    out = tmp_path / "o"
    argv = _continue_argv(block, docs, out, 2, "--teacher", str(shipped))
    proc = subprocess.run([sys.executable, "-m", "erde.cli", *argv],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert not out.exists() and not (tmp_path / "escape.yaml").exists()


def test_seed_files_that_decompress_too_far_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "x-seeds.json.gz"
    path.write_bytes(gzip.compress(b" " * 5000 + b"{}"))
    monkeypatch.setattr(seedfiles, "MAX_SEEDS_JSON_BYTES", 1000)
    with pytest.raises(ReportError, match="decompresses past"):
        seedfiles.read_seed_files(path)


def test_verify_finds_a_seed_report_that_is_not_the_blocks(
    block: Path, tmp_path: Path, capsys
) -> None:
    results = tmp_path / "results"
    shutil.copytree(block / "docs" / "results", results)
    (seeds,) = results.glob("*-seeds.json.gz")

    def change(body) -> None:
        report = json.loads(body["files"]["seed_1/report.json"])
        report["models"]["student_kd"]["exit_accuracy"][-1] += 0.5
        body["files"]["seed_1/report.json"] = json.dumps(report)

    _rewrite_seed_files(seeds, change)
    assert main(["verify", str(_published(results))]) == 1
    assert "seed 1's student_kd is not the block's" in capsys.readouterr().out


COMMITTED = sorted(
    p
    for p in (Path(__file__).resolve().parents[1] / "docs" / "results").glob("*.json")
    if "records" in json.loads(p.read_text())
)


@pytest.mark.parametrize("published", COMMITTED, ids=lambda p: p.stem)
def test_every_committed_block_with_records_is_re_derived_from_them(published: Path) -> None:
    """The published tables of docs/results are what their committed per-image records give."""
    checked, diffs = verify_block(published)
    assert diffs == [] and checked > 1000


@pytest.mark.parametrize("published", COMMITTED, ids=lambda p: p.stem)
def test_every_committed_block_in_results_md_is_what_its_json_renders(published: Path) -> None:
    """RESULTS.md's generated block of a committed block is exactly what publishing its JSON
    writes: no hand edit inside the markers, and no renderer change left unpublished (after
    one, republish the blocks from their JSON)."""
    root = published.parents[2]
    text = (root / "docs" / "RESULTS.md").read_text()
    results = json.loads(published.read_text())
    assert f"erde-results:{published.stem}:begin" in text
    assert rerender_block(text, results, root) == text


def test_rerender_blocks_writes_the_committed_blocks_back_from_their_json(tmp_path: Path) -> None:
    """What ARCHITECTURE.md says to run after a change to the renderer: a block edited by
    hand comes back as its JSON renders it; text outside the blocks and each block's command,
    as published, are left alone."""
    docs = tmp_path / "docs"
    (docs / "results").mkdir(parents=True)
    for path in COMMITTED:
        shutil.copy(path, docs / "results" / path.name)
    page = (COMMITTED[0].parents[1] / "RESULTS.md").read_text()
    name = COMMITTED[0].stem
    inside = page.index(f"<!-- erde-results:{name}:begin -->")
    edited = page[:inside] + page[inside:].replace("thresholds", "thresholds (edited)", 1)
    (docs / "RESULTS.md").write_text(edited + "\nA line of prose.\n")
    assert rerender_blocks(docs) == [p.stem for p in COMMITTED]
    text = (docs / "RESULTS.md").read_text()
    assert "(edited)" not in text
    assert text == page + "\nA line of prose.\n"  # in tmp_path as in the repository


def test_at_least_one_committed_block_carries_its_records() -> None:
    assert any(p.stem.startswith("cifar10-speed") for p in COMMITTED), COMMITTED
