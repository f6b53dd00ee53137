"""report.html: written beside report.json, self-contained, refuses other schemas, and in a real
headless Chromium its sliders show report.json's numbers."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
from test_calibration import MACS, synthetic

from erde.cli import main
from erde.errors import ReportError
from erde.evaluation import model_report
from erde.report import build_report
from erde.report.html import check_report, render_report_html, write_report_html

BROWSER, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


def synthetic_report(models: int, thresholds: int, name: str = "model") -> dict:
    """A report of many models and thresholds: one real model_report, its sweep copied with
    shifted accuracies (building hundreds of real sweeps would only slow the test)."""
    logits, labels = synthetic(300, 0)
    grid = torch.linspace(0, 2.3, thresholds).tolist()
    base = model_report(
        name, logits, labels, MACS, [10, 20, 30], thresholds=grid, rules=["entropy"]
    )
    entries = {}
    for i in range(models):
        entry = json.loads(json.dumps(base))
        for p in entry["sweep"]:
            p["accuracy"] = p["accuracy"] * (1 - i / (2 * models))
        entries[f"{name}_{i}"] = entry
    return build_report(entries, reference=f"{name}_0")


# --------------------------------------------------------------------------- without a browser


def test_run_writes_report_html_beside_report_json(tiny_run):
    page = (tiny_run["out"] / "report.html").read_text()
    report = json.loads(tiny_run["report"].read_text())
    for name in report["models"]:
        assert f'"name": "{name}"' in page


def test_the_page_warns_when_the_reference_is_not_trained():
    report = synthetic_report(2, 5)
    assert "No MAC reduction" not in render_report_html(report)
    report["reference"] |= {"untrained": True, "chance_accuracy": 0.1}
    page = render_report_html(report)
    assert "No MAC reduction: the reference (model_0, last exit" in page
    assert "D.reference.warning" in page  # shown under the title


def test_page_is_self_contained():
    page = render_report_html(synthetic_report(2, 5))
    assert not re.search(r"<(link|img|iframe|object|embed)\b", page, re.I)
    assert not re.search(r"\b(src|href)\s*=", page, re.I)
    assert not re.search(r"\b(fetch|XMLHttpRequest|import\s*\(|WebSocket)\b", page)
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    assert urls == {"http://www.w3.org/2000/svg"}  # the SVG namespace name, never fetched


def test_names_cannot_close_the_data_block():
    page = render_report_html(synthetic_report(1, 3, name="</script><b>x"))
    assert "</script><b>x" not in page  # escaped inside the JSON (\u003c)
    assert page.count("</script>") == 2


def test_the_diagnostics_table_is_escaped_and_absent_without_kd(tiny_run):
    report = json.loads(tiny_run["report"].read_text())
    assert report["entropy_diagnostics"]["models"]  # the tiny run has a KD and an ERDE student
    diag = report["entropy_diagnostics"]
    diag["models"] = {"<b>x</b>`y`": next(iter(diag["models"].values()))}
    page = render_report_html(report)
    assert '<section id="diagnostics">' in page and "<b>x</b>" not in page
    assert "&lt;b&gt;x&lt;/b&gt;`y`" in page  # a name's backticks are text, not <code>
    assert "<code>erde reproduce</code>" in page  # the explanation's own are
    report.pop("entropy_diagnostics")
    assert "diagnostics" not in render_report_html(report).split("<body>")[1].split("<script")[0]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.pop("schema_version"), "no schema_version"),
        (lambda r: r.update(schema_version=0), "schema_version 0"),
        (lambda r: r.update(models={}), "no models"),
        (lambda r: r["models"]["model_0"]["sweep"][0].update(accuracy="high"), "malformed sweep"),
        (lambda r: r["models"]["model_0"].pop("macs_per_exit"), "no numeric macs_per_exit"),
        (lambda r: r["models"]["model_0"].update(exit_ece="low"), "exit_ece that is not one"),
        (lambda r: r["models"]["model_0"].update(exit_ece=[0.1]), "exit_ece that is not one"),
    ],
)
def test_reports_the_page_cannot_show_are_refused(change, message):
    report = synthetic_report(1, 3)
    change(report)
    with pytest.raises(ReportError, match=message):
        check_report(report)


def test_cli_old_schema_is_one_line_and_writes_nothing(tmp_path, capsys):
    report = synthetic_report(1, 3)
    report["schema_version"] = 0
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    assert main(["report-html", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "schema_version 0" in err
    assert not (tmp_path / "report.html").exists()
    path.write_text("{not json")
    assert main(["report-html", str(path)]) == 2
    assert "not readable JSON" in capsys.readouterr().err


def test_calibrated_thresholds_are_marked(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run["out"], run)
    report = json.loads((run / "report.json").read_text())
    teacher = run / "teacher" / "checkpoint.pt"
    report["models"]["teacher"]["checkpoint"] = str(teacher)
    (run / "report.json").write_text(json.dumps(report))
    assert main(["calibrate", str(teacher), "--max-drop", "0.5", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["report-html", str(run / "report.json")]) == 0
    assert "html:" in capsys.readouterr().out
    page = (run / "report.html").read_text()
    assert '"kind": "calibrated"' in page and "max_drop 0.5" in page


# --------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """Headless system Chromium through Selenium and the system chromedriver; no network."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    if not (BROWSER and DRIVER):
        pytest.skip("no chromium/chromedriver on PATH (.ci/run installs Debian's packages)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1100,1300", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def _shown(driver, i: int) -> dict:
    from selenium.webdriver.common.by import By

    out = {}
    for key in ("theta", "acc", "macs"):
        element = driver.find_element(By.ID, f"{key}-{i}")
        out[key] = (element.text, float(element.get_attribute("data-value")))
    bars = driver.find_elements(By.CSS_SELECTOR, f"#hist-{i} > div")
    out["fractions"] = [float(b.get_attribute("data-value")) for b in bars]
    return out


def test_slider_shows_the_report_sweep_at_its_threshold(browser, tiny_run, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    report = json.loads(tiny_run["report"].read_text())
    browser.get((tiny_run["out"] / "report.html").as_uri())
    rule = report["reference"]["rule"]
    for i, (name, model) in enumerate(report["models"].items()):
        sweep = sorted(
            (p for p in model["sweep"] if p["rule"] == rule), key=lambda p: p["threshold"]
        )
        slider = browser.find_element(By.ID, f"slider-{i}")
        slider.send_keys(Keys.HOME)
        for _ in range(i + 2):  # a different position for each model
            slider.send_keys(Keys.ARROW_RIGHT)
        k = int(slider.get_attribute("value"))
        assert k == i + 2, name
        point, shown = sweep[k], _shown(browser, i)
        assert shown["theta"][1] == point["threshold"]
        assert shown["acc"][1] == point["accuracy"] and shown["macs"][1] == point["mean_macs"]
        assert shown["fractions"] == point["exit_fractions"]
        assert shown["acc"][0] == f"{100 * point['accuracy']:.2f}%"
        number, unit = re.fullmatch(r"([\d.]+)([KMG]?)", shown["macs"][0]).groups()
        scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}[unit]
        assert abs(float(number) * scale - point["mean_macs"]) <= 0.005 * scale, name
        marker = browser.find_element(By.ID, f"marker-{i}")
        assert marker.get_attribute("cx") and marker.is_displayed()
        alone = browser.find_element(By.ID, f"exits-{i}").text  # every exit on its own
        ece = " / ".join(f"{100 * e:.2f}%" for e in model["exit_ece"])
        assert alone.endswith(f"calibration error (ECE) {ece}"), alone
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_the_page_shows_report_md_diagnostics_cells(browser, tiny_run):
    from selenium.webdriver.common.by import By

    browser.get((tiny_run["out"] / "report.html").as_uri())
    section = browser.find_element(By.ID, "diagnostics")
    shown = [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in section.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]
    md = (tiny_run["out"] / "report.md").read_text()
    table = md.split("## What the entropy term changed")[1].split("\n## ")[0]
    rows = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    expected = [[c.strip() for c in row] for row in rows[1:]]  # [0] is the header
    assert shown and shown == expected
    assert section.is_displayed()
    whole = [p.text for p in section.find_elements(By.CSS_SELECTOR, "p.whole-curve")]
    in_md = [line for line in table.splitlines() if "over the whole accuracy-MACs curve" in line]
    assert whole and [w.replace("erde reproduce", "`erde reproduce`") for w in whole] == in_md


def test_hundreds_of_models_and_thresholds_stay_responsive(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    report = synthetic_report(200, 300)
    path = write_report_html(tmp_path, report, marks={})
    started = time.perf_counter()
    browser.get(path.as_uri())
    loaded = time.perf_counter() - started
    slider = browser.find_element(By.ID, "slider-199")
    started = time.perf_counter()
    slider.send_keys(Keys.END)
    shown = _shown(browser, 199)
    moved = time.perf_counter() - started
    last = sorted(report["models"]["model_199"]["sweep"], key=lambda p: p["threshold"])[-1]
    assert shown["acc"][1] == last["accuracy"] and shown["macs"][1] == last["mean_macs"]
    assert loaded < 20 and moved < 5, (loaded, moved)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#plot polyline")) == 200


def test_page_has_no_script_errors(browser, tiny_run):
    browser.get((tiny_run["out"] / "report.html").as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    assert Path(tiny_run["out"] / "report.html").stat().st_size < 1 << 20


def test_a_deeply_nested_report_json_is_one_error(tmp_path: Path) -> None:
    from erde.errors import ReportError
    from erde.report.html import load_report

    path = tmp_path / "report.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ReportError, match="nested too deeply"):
        load_report(path)


def test_the_screenshot_script_draws_the_whole_page(tiny_run, tmp_path):
    """scripts/report_html_screenshot.py, the maker of docs/report-html.png, in a real Chromium."""
    if not (BROWSER and DRIVER):
        pytest.skip("no chromium/chromedriver on PATH (.ci/run installs Debian's packages)")
    pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "scripts" / "report_html_screenshot.py"
    page, shot = tiny_run["out"] / "report.html", tmp_path / "shot.png"
    done = subprocess.run([sys.executable, str(script), str(page), str(shot), "--width", "800",
                           "--move", "student_erde=-1"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    from PIL import Image

    with Image.open(shot) as image:
        width, height = image.size
    assert width == 800 and height > 1000  # four model panels below the plot: more than a screen
    wrong = subprocess.run([sys.executable, str(script), str(page), str(shot), "--move", "nobody=1"],
                           capture_output=True, text=True)  # fmt: skip
    assert wrong.returncode == 2 and "the page has teacher, student_ce" in wrong.stderr
