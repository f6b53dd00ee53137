"""A results block published into the docs: RESULTS.md between its markers, and its files
under ``docs/results/`` (JSON, plots, per-image records, the finished seeds' files).

The block's name (:func:`results_name`) says which data set, schedule and model pair it
holds; a publish replaces that block only, under a lock, so runs of other blocks can
publish beside it. :func:`rerender_blocks` rewrites every committed block from its JSON
after a change to the renderer (:mod:`erde.reproduce.render`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from erde.config import load_yaml, preset_path
from erde.outputs import folder_update_lock
from erde.reproduce.differences import render_difference_png
from erde.reproduce.render import (
    arch_name,
    json_bytes,
    render_markdown,
    render_plot,
    render_training_png,
    write_rendered,
)
from erde.reproduce.variants import render_variants_png


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- erde-results:{name}:begin -->", f"<!-- erde-results:{name}:end -->"


def replace_block(text: str, name: str, block: str) -> str:
    """Put ``block`` between the data set's markers in ``text`` (appended with markers if absent)."""
    begin, end = _markers(name)
    i, j = text.find(begin), text.find(end)
    if i >= 0 and j > i:
        return f"{text[: i + len(begin)]}\n{block.strip()}\n{text[j:]}"
    return f"{text.rstrip()}\n\n## {name}\n\n{begin}\n{block.strip()}\n{end}\n"


def results_name(results: Mapping[str, Any]) -> str:
    """``<dataset>-<schedule>``: the file stem and RESULTS.md block of one set of results.

    A teacher/student pair other than the data set's preset or its schedule's
    (e.g. a MobileNetV2 student, or the preset's student at another width) adds
    ``-<teacher>-<student>`` (``_x<width>`` after an architecture whose width
    is not 1), so that its results get a block of their own instead of
    replacing the preset pair's; students other than ce, kd and erde
    (``--students``, a gamma sweep) add ``-ablation``. A name given with
    ``--block`` (``results["block"]``) is taken as it is.
    """
    if results.get("block"):
        return str(results["block"])
    dataset = results["dataset"]["name"]
    name = f"{dataset}-{results['schedule']}"
    config = results.get("config") or {}
    preset = preset_path(dataset)
    defaults = load_yaml(preset) if preset.is_file() else {}
    overlay = preset.parent / "schedules" / f"{results['schedule']}.yaml"
    if overlay.is_file():  # a schedule with models of its own (speed: fastnet) names them
        for role, section in load_yaml(overlay).items():
            if role in ("teacher", "student"):
                defaults[role] = {**(defaults.get(role) or {}), **section}
    pair = [arch_name(config.get(role)) for role in ("teacher", "student")]
    if pair != [arch_name(defaults.get(role)) for role in ("teacher", "student")]:
        name += "".join(f"-{re.sub(r'[^A-Za-z0-9_.]+', '_', model)}" for model in pair)
    students = (config.get("distill") or {}).get("students")
    if students is not None and [s.get("name") for s in students] != ["ce", "kd", "erde"]:
        name += "-ablation"  # other students than the default three: a block of their own
    return name


def command_from(command: str | None, root: Path) -> str | None:
    """The recorded command with an absolute ``--data-dir`` or ``--teacher`` written relative
    to ``root``.

    Runs record the absolute paths they read (so that a rerun from anywhere finds
    the same files); the docs show the command as typed from the repository
    root (a released teacher as ``docs/results/...``), and no machine's own folder
    names. Paths further than two levels up stay absolute.
    """
    if not command:
        return command
    parts = shlex.split(command)
    for i, part in enumerate(parts[:-1]):
        if part in ("--data-dir", "--teacher") and Path(parts[i + 1]).is_absolute():
            relative = os.path.relpath(parts[i + 1], root)
            if Path(relative).parts[:3] != ("..", "..", ".."):
                parts[i + 1] = relative
    return shlex.join(parts)


def publish(
    results: Mapping[str, Any],
    docs_dir: str | Path,
    records: str | Path | None = None,
    seed_files: str | Path | None = None,
) -> dict[str, Path]:
    """Copy the results into the docs: ``results/<dataset>-<schedule>.json``, ``.png``,
    ``-training.png`` (when the results hold training curves), ``-difference.png`` (when KD
    is among the models), ``-variants.png`` (three students or more against KD),
    ``-records.npz`` (the per-image records, when given), ``-seeds.json.gz`` (the finished
    seeds' reports, configs and training logs, when given: what a later run needs to add
    seeds without training these again) and RESULTS.md's block of that name."""
    docs = Path(docs_dir)
    docs.mkdir(parents=True, exist_ok=True)
    with folder_update_lock(docs):  # another run may be publishing its block right now
        return _publish(results, docs, records, seed_files)


def published_block(results: Mapping[str, Any], root: Path) -> str:
    """RESULTS.md's block for ``results``, as publish writes it between the block's markers:
    links into ``results/``, the command's paths shown relative to the repository ``root``,
    and a stable link target before the heading (which changes as seeds are added)."""
    name = results_name(results)
    shown = {**results, "command": command_from(results.get("command"), root)}
    block = render_markdown(
        shown,
        plot_link=f"results/{name}.png",
        curves_link=f"results/{name}-training.png",
        difference_link=f"results/{name}-difference.png",
        variants_link=f"results/{name}-variants.png",
        level=3,
    )
    return f'<a id="{name}"></a>\n\n{block}'


def rerender_block(text: str, results: Mapping[str, Any], root: Path) -> str:
    """``text`` (RESULTS.md) with the block of ``results`` rendered afresh from them, keeping
    the ``Command:`` line the page shows: publishing wrote its paths relative to the checkout
    it ran in, and another checkout (a clean clone, say) would show the same paths otherwise."""
    name = results_name(results)
    block = published_block(results, root)
    begin, end = _markers(name)
    i, j = text.find(begin), text.find(end)
    shown = [ln for ln in text[i:j].splitlines() if ln.startswith("Command: `")] if i >= 0 else []
    if j > i and len(shown) == 1:
        block = "\n".join(
            shown[0] if line.startswith("Command: `") else line for line in block.split("\n")
        )
    return replace_block(text, name, block)


def rerender_blocks(docs_dir: str | Path) -> list[str]:
    """Write RESULTS.md's block of every committed block with per-image records afresh from
    its JSON (after a change to the renderer; the JSON, plots and records stay as they are).
    Returns the names of the blocks rewritten."""
    docs = Path(docs_dir)
    doc = docs / "RESULTS.md"
    text, names = doc.read_text(), []
    for path in sorted((docs / "results").glob("*.json")):
        results = json.loads(path.read_text())
        if "records" in results:
            text = rerender_block(text, results, docs.resolve().parent)
            names.append(path.stem)
    doc.write_text(text)
    return names


def _publish(
    results: Mapping[str, Any],
    docs: Path,
    records: str | Path | None = None,
    seed_files: str | Path | None = None,
) -> dict[str, Path]:
    name = results_name(results)
    doc = docs / "RESULTS.md"
    text = doc.read_text() if doc.is_file() else "# Results\n"
    block = published_block(results, docs.resolve().parent)
    files = {
        "docs_results": (docs / "results" / f"{name}.json", json_bytes(results)),
        "docs_plot": (docs / "results" / f"{name}.png", render_plot(results)),
        "docs_markdown": (doc, replace_block(text, name, block).encode()),
    }
    training = render_training_png(results)
    if training is not None:
        files["docs_training"] = (docs / "results" / f"{name}-training.png", training)
    difference = render_difference_png(results)
    if difference is not None:
        files["docs_difference"] = (docs / "results" / f"{name}-difference.png", difference)
    variants = render_variants_png(results)
    if variants is not None:
        files["docs_variants"] = (docs / "results" / f"{name}-variants.png", variants)
    if records is not None:
        files["docs_records"] = (
            docs / "results" / f"{name}-records.npz",
            Path(records).read_bytes(),
        )
    if seed_files is not None:
        files["docs_seed_files"] = (
            docs / "results" / f"{name}-seeds.json.gz",
            Path(seed_files).read_bytes(),
        )
    return write_rendered(files)
