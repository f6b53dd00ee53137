"""Screenshot of a report.html in headless Chromium: the picture in docs/INFERENCE.md.

    python scripts/report_html_screenshot.py runs/digits/report.html docs/report-html.png \
        --move student_erde=-3

Needs Chromium, chromedriver and selenium (`.ci/run` installs them on Debian). ``--move
NAME=STEPS`` presses the arrow key STEPS times on that model's slider (negative: left) before
the shot; the window is ``--width`` pixels wide and as tall as the page.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("page", type=Path, help="a report.html")
    p.add_argument("out", type=Path, help="the PNG to write")
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--move", action="append", default=[], metavar="NAME=STEPS")
    args = p.parse_args(argv)
    browser, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver_path):
        p.error("needs chromium and chromedriver on PATH")
    if not args.page.is_file():
        p.error(f"{args.page}: no such file")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    moves = {}
    for text in args.move:
        name, _, steps = text.partition("=")
        moves[name] = int(steps)
    with tempfile.TemporaryDirectory() as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update",
                     f"--window-size={args.width},1000", f"--user-data-dir={profile}"):  # fmt: skip
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(driver_path))
        try:
            driver.get(args.page.resolve().as_uri())
            data = driver.find_element(By.ID, "report-data").get_attribute("textContent")
            names = [m["name"] for m in json.loads(data)["models"]]
            for name, steps in moves.items():
                if name not in names:
                    p.error(f"--move {name}: the page has {', '.join(names)}")
                slider = driver.find_element(By.ID, f"slider-{names.index(name)}")
                key = Keys.ARROW_RIGHT if steps > 0 else Keys.ARROW_LEFT
                for _ in range(abs(steps)):
                    slider.send_keys(key)
            for _ in range(3):  # the whole page, no scroll bar: grow until the page fits
                page = driver.execute_script("return document.documentElement.scrollHeight")
                view = driver.execute_script("return window.innerHeight")
                if view >= page:
                    break
                size = driver.get_window_size()
                driver.set_window_size(args.width, size["height"] + page - view + 10)
            driver.execute_script("window.scrollTo(0, 0)")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(args.out))
        finally:
            driver.quit()
    print(f"screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
