"""Every Python block of the README and docs/ runs, in order, against tiny trained models.

A page's blocks share one namespace, as a reader pasting them in turn would.
They run in a scratch folder holding what the pages refer to: ``runs/digits``
(the session's tiny `erde run`) and ``my_images/`` (a small image folder).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from data_fixtures import write_imagefolder

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


PAGES_WITH_CODE = [p for p in PAGES if python_blocks(p)]


def test_the_api_and_inference_pages_have_code_to_run() -> None:
    names = {p.name for p in PAGES_WITH_CODE}
    assert {"API.md", "INFERENCE.md"} <= names


@pytest.fixture
def workspace(tmp_path: Path, tiny_run: dict[str, Path], one_thread, monkeypatch) -> Path:
    shutil.copytree(tiny_run["out"], tmp_path / "runs" / "digits")
    write_imagefolder(tmp_path / "my_images", per_class=(24, 6), size=8)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.name)
def test_every_python_block_of_the_page_runs(page: Path, workspace: Path) -> None:
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(python_blocks(page), start=1):
        exec(compile(block, f"{page.name}, python block {i}", "exec"), namespace)
    if page.name == "API.md":  # what the walk-through claims, checked on what it left behind
        assert (workspace / "runs/own/report/sweep.csv").is_file()
        assert (workspace / "runs/folder/report.json").is_file()
        assert (workspace / "runs/own/student_erde/checkpoint.thresholds.json").is_file()
        assert (workspace / "runs/own/student_erde_onnx/manifest.json").is_file()
        onnx_out, torch_out = namespace["onnx_out"], namespace["torch_out"]  # same thresholds
        assert onnx_out.classes.tolist() == torch_out.classes.tolist()  # prints True, as said
        assert onnx_out.exit_index.tolist() == torch_out.exit_index.tolist()
        assert [s[1] for s in namespace["seen"]] == [1, 2]
        assert namespace["line"].startswith("not running")  # the status block's last line


FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """The heading anchors of a page, as GitHub makes them (a repeated one gets -1, -2...)."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", FENCE.sub("", page.read_text()), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    # explicit targets: <a id="..."></a> (the results blocks' stable names)
    anchors.update(re.findall(r'<a id="([^"]+)"></a>', FENCE.sub("", page.read_text())))
    return anchors


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_of_the_page_resolves(page: Path) -> None:
    """Files linked from the README and docs/ exist, and so do the headings they point at."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: " + ", ".join(broken)


README_ROWS = {  # the README's results table: row label -> the result file it is read from
    "`fast` schedule: ResNet-56 → ResNet-20 |": "cifar10-fast",
    "`reduced` schedule: ResNet-56 → ResNet-20 |": "cifar10-reduced",
    "`fast` schedule: ResNet-56 → ResNet-20 x0.5 |": "cifar10-fast-resnet56-resnet20_x0.5",
    "`reduced` schedule: ResNet-56 → MobileNetV2 x0.5 |": "cifar10-reduced-resnet56-mobilenetv2_x0.5",
    "`speed` schedule: FastNet → FastNet x0.5 |": "cifar10-speed",
    "`speed` schedule: FastNet → FastNet x0.25 |": "cifar10-speed-fastnet-fastnet_x0.25",
    "the same at half the student learning rate (0.75) |": "cifar10-speed-x0.25-lr0.75",
    "`speed` schedule, three teachers: FastNet → FastNet x0.5 |": "cifar10-speed-3teachers",
}


def _last_exit(model: dict, n_seeds: int) -> str:
    mean, std = model["exit_accuracy_mean"][-1] * 100, model["exit_accuracy_std"][-1] * 100
    return f"{mean:.2f} ± {std:.2f} %" if n_seeds > 1 and std > 0 else f"{mean:.2f} %"


def _within_one_point(model: dict) -> str:
    (row,) = [r for r in model["mac_reduction_by_tolerance"] if r["tolerance"] == 0.01]
    return f"{row['reduction']:.2f}x" if row.get("reduction") else "not reached"


def _whole_curve_cell(results: dict) -> str:
    """ERDE - KD over the whole curve (erde.reproduce.tradeoff), as the README writes it."""
    found = [
        w
        for w in results.get("whole_curve") or []
        if (w["model"], w["other"]) == ("student_erde", "student_kd")
    ]
    if not found:
        return "— (no per-image records)"
    (w,) = found
    return (
        f"{100 * w['diff_mean']:+.2f} ({100 * w['ci95_low']:+.2f} to {100 * w['ci95_high']:+.2f})"
        f" points, p = {w['p_value']:.2g}"
    )


def test_the_readme_results_table_is_read_from_the_result_files() -> None:
    """Every number of the README's table is the one its docs/results/*.json file holds."""
    import json

    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    for label, name in README_ROWS.items():
        (row,) = [line for line in lines if line.startswith(f"| {label}")]
        results = json.loads((ROOT / "docs" / "results" / f"{name}.json").read_text())
        models, n = results["models"], results["n_seeds"]
        seeds = ", ".join(str(s) for s in results["seeds"])
        (comparison,) = [
            c
            for c in results["comparisons"]
            if (c["model"], c["other"]) == ("student_erde", "student_kd")
        ]
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].startswith(seeds), (name, cells[1])
        assert cells[2:5] == [
            _last_exit(models[m], n) for m in ("teacher", "student_kd", "student_erde")
        ]
        assert cells[5] == " / ".join(
            _within_one_point(models[m]) for m in ("student_kd", "student_erde")
        )
        assert cells[6] == _whole_curve_cell(results), (name, cells[6])
        verdict = cells[7]
        wins, losses = comparison["wins"], comparison["losses"]
        assert ("ERDE did not beat KD" in verdict) == (wins < losses), (name, verdict)
        assert f"{max(wins, losses)} of {wins + losses} thresholds" in verdict, (name, verdict)
        average = re.search(r"by ([\d.]+) points on average", verdict)
        if average:  # the mean over the thresholds, as the block's comparison holds it
            assert average[1] == f"{abs(100 * comparison['accuracy_diff_mean']):.2f}", verdict


def test_the_readme_figure_of_differences_says_what_its_block_holds() -> None:
    """The README's sentence under the half-width difference figure stays true as seeds are
    added: how many 95 % intervals of ERDE - KD at equal MACs exclude 0, and where."""
    import json

    from erde.reproduce.stats import PAIRS

    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert "](docs/results/cifar10-speed-difference.png)" in readme
    results = json.loads((ROOT / "docs" / "results" / "cifar10-speed.json").read_text())
    (comparison,) = [
        c for c in results["comparisons"] if (c["model"], c["other"]) == PAIRS[0]
    ]  # fmt: skip
    apart = [
        p for p in comparison["per_threshold"]
        if not p["equal_macs_ci95_low"] <= 0 <= p["equal_macs_ci95_high"]
    ]  # fmt: skip
    if "At equal MACs every bar crosses 0." in readme:
        assert apart == []
    else:
        match = re.search(
            r"At equal MACs every bar but one crosses 0, and that one \(h = ([\d.]+)\) by "
            r"([\d.]+) points", readme,
        )  # fmt: skip
        assert match, "the sentence under the figure is neither form"
        (point,) = apart
        assert f"{point['normalized_threshold']:g}" == match[1]
        nearest = min(abs(point["equal_macs_ci95_low"]), abs(point["equal_macs_ci95_high"]))
        assert f"{100 * nearest:.2f}" == match[2]


def test_the_readme_says_how_to_get_the_cpu_build_and_what_the_browser_tests_need() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert '"torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in readme
    development = readme.split("## Development")[1]
    assert "chromium" in development and "chromedriver" in development


def _pts(value: float) -> str:
    """``+0.15`` / ``−0.08``: points with the typographic minus RESULTS.md's prose uses."""
    return f"{100 * value:+.2f}".replace("-", "−")


def test_the_results_verdict_table_is_read_from_the_result_files() -> None:
    """The table under RESULTS.md's verdict stays true as seeds are added: each row's
    numbers are the ones its block's JSON holds."""
    import json

    def block(name: str) -> dict:
        return json.loads((ROOT / "docs" / "results" / f"{name}.json").read_text())

    def whole(results: dict, model: str, other: str) -> dict:
        (w,) = [w for w in results["whole_curve"] if (w["model"], w["other"]) == (model, other)]
        return w

    text = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    table = text.split("**Verdict so far")[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    half, quarter = block("cifar10-speed"), block("cifar10-speed-fastnet-fastnet_x0.25")
    ablation = block("cifar10-speed-fastnet-fastnet_x0.25-ablation")
    gamma4_half = block("cifar10-speed-ablation")
    slow = block("cifar10-speed-x0.25-lr0.75")
    three = block("cifar10-speed-3teachers")
    expected = {
        0: (half, whole(half, "student_erde", "student_kd")),
        1: (quarter, whole(quarter, "student_erde", "student_kd")),
        2: (half, None),
        3: (half, whole(half, "student_erde", "student_ce")),
        4: (half, whole(half, "student_kd", "student_ce")),
        5: (ablation, whole(ablation, "student_erde_g4", "student_kd")),
        6: (gamma4_half, whole(gamma4_half, "student_erde_g4", "student_kd")),
        8: (slow, whole(slow, "student_erde", "student_kd")),
        9: (slow, whole(slow, "student_kd", "student_ce")),
        10: (three, whole(three, "student_erde", "student_kd")),
    }
    assert len(rows) == 11, rows
    for index, (results, w) in expected.items():
        row = rows[index]
        assert f"({results['n_seeds']} seeds" in row[0], row
        if w is None:  # the best single threshold at equal MACs
            (p,) = [
                p for p in results["comparisons"][0]["per_threshold"]
                if p["normalized_threshold"] == 0.75
            ]  # fmt: skip
            assert row[1].startswith(f"{_pts(p['equal_macs_diff_mean'])} points, p = ")
            assert f"p = {p['equal_macs_p_value']:.2g}" in row[1]
            low, high = p["equal_macs_ci95_low"], p["equal_macs_ci95_high"]
        else:
            assert row[1].startswith(f"{_pts(w['diff_mean'])} points"), (row, w["diff_mean"])
            if "ahead in" in row[1]:
                assert f"p = {w['p_value']:.1g}" in row[1]
                assert f"ahead in {w['seeds_ahead']} of {w['n_seeds']} seeds" in row[1]
            if "behind in" in row[1]:
                behind = w["n_seeds"] - w["seeds_ahead"]
                assert f"behind in {behind} of {w['n_seeds']} seeds" in row[1]
            low, high = w["ci95_low"], w["ci95_high"]
        assert row[2] == f"{_pts(low)} to {_pts(high)}", row
    diag = half["entropy_diagnostics"]["models"]["student_erde"][0]
    assert rows[7][2] == (
        f"{diag['selectivity_ci95_low']:+.3f} to {diag['selectivity_ci95_high']:+.3f} nats"
    ).replace("-", "−")
    assert diag["selectivity_ci95_low"] < 0 < diag["selectivity_ci95_high"]
