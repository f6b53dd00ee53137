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


def test_the_readme_says_how_to_get_the_cpu_build_and_what_the_browser_tests_need() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert '"torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in readme
    development = readme.split("## Development")[1]
    assert "chromium" in development and "chromedriver" in development
