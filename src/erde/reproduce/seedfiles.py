"""A published block's finished seeds, kept small enough to commit and restored elsewhere.

A block's JSON and records hold its statistics and every per-image answer, but not
what ``erde reproduce`` needs to *continue* it: each seed's ``report.json`` and each
model's ``config.yaml`` and ``metrics.jsonl`` (training time and curves). Without them a
run folder lost with its machine meant training every finished seed again before one
could be added. :func:`pack_seed_files` writes those small files of the finished seeds
into one gzip-compressed JSON (``docs/results/<block>-seeds.json.gz``, a few tens of KB
per seed; no weights), and :func:`restore_seeds` writes them back into a new ``--out``
folder, with each seed's ``records.npz`` cut from the block's records, so that the
finished seeds are aggregated as they were and only new seeds train.

The file is untrusted input: its compressed and decompressed sizes are bounded before
anything is parsed, every path in it must be one of the few a seed folder holds (no
``..``, no other names), and it must name the sha256 of the records it belongs with.
Nothing is ever overwritten: a seed is restored only into a folder that holds no
finished report and no student checkpoint.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from erde.errors import ReportError
from erde.io import atomic_write_bytes, atomic_write_text, read_json
from erde.records import save_records
from erde.report.html import MAX_REPORT_BYTES
from erde.reproduce.evidence import load_block_records, records_path

SEEDS_SUFFIX = "-seeds.json.gz"  # docs/results/<block>-seeds.json.gz beside <block>.json
SEEDS_FILE = "seeds.json.gz"  # the same, in a run folder
RESTORED_FILE = "restored.json"  # in a restored seed folder: where it came from
SCHEMA = "erde-seed-files"
MAX_SEEDS_FILE_BYTES = 8 << 20  # compressed, as committed
MAX_SEEDS_JSON_BYTES = 64 << 20  # decompressed; ~60 KB per seed in practice

# the only files a seed folder contributes: its report and config, each model's config
# and training log (the teacher under the seed of its own folder)
_PATH = re.compile(
    r"seed_(\d{1,9})/(?:report\.json|config\.yaml|"
    r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,71}/(?:config\.yaml|metrics\.jsonl))"
)
_MODEL_FILES = ("config.yaml", "metrics.jsonl")


def seeds_path(results_json: Path) -> Path:
    """Where a block's seed files live: ``<stem>-seeds.json.gz`` beside its JSON."""
    return results_json.with_name(results_json.stem + SEEDS_SUFFIX)


def pack_seed_files(
    out: Path,
    seeds: Sequence[tuple[int, int]],
    names: Sequence[str],
    target: Path,
    records_sha256: str,
) -> None:
    """Write the small files of ``seeds`` ((student seed, teacher seed) pairs) to ``target``.

    ``names`` are the block's models (``teacher`` first); ``records_sha256`` the block
    records' hash, so that the two files are only ever used together.
    """
    files: dict[str, str] = {}

    def add(relative: str) -> None:
        path = out / relative
        if path.is_file() and relative not in files:
            files[relative] = path.read_text(encoding="utf-8")

    for seed, teacher_seed in seeds:
        add(f"seed_{seed}/report.json")
        add(f"seed_{seed}/config.yaml")
        for name in names:
            folder = f"seed_{teacher_seed}/teacher" if name == "teacher" else f"seed_{seed}/{name}"
            for file in _MODEL_FILES:
                add(f"{folder}/{file}")
    body = {
        "schema": SCHEMA,
        "schema_version": 1,
        "records_sha256": records_sha256,
        "seeds": [[s, t] for s, t in seeds],
        "files": files,
    }
    data = json.dumps(body, sort_keys=True).encode()
    atomic_write_bytes(target, gzip.compress(data, compresslevel=9, mtime=0))


def read_seed_files(path: Path) -> dict[str, Any]:
    """The seed files of a block, refused in one line unless they are well formed."""
    if not path.is_file():
        raise ReportError(f"seed files not found: {path}")
    if path.stat().st_size > MAX_SEEDS_FILE_BYTES:
        raise ReportError(
            f"{path}: over the {MAX_SEEDS_FILE_BYTES >> 20} MiB allowed for seed files"
        )
    try:
        with gzip.open(path, "rb") as f:
            data = f.read(MAX_SEEDS_JSON_BYTES + 1)
    except (OSError, EOFError) as exc:
        raise ReportError(f"{path}: not a gzip file ({exc})") from None
    if len(data) > MAX_SEEDS_JSON_BYTES:
        raise ReportError(f"{path}: decompresses past {MAX_SEEDS_JSON_BYTES >> 20} MiB")
    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ReportError(f"{path}: not readable JSON ({type(exc).__name__})") from None
    if not isinstance(body, dict) or body.get("schema") != SCHEMA:
        raise ReportError(f"{path}: not an erde seed-files file")
    seeds, files = body.get("seeds"), body.get("files")
    if not (
        isinstance(body.get("records_sha256"), str)
        and isinstance(seeds, list)
        and all(
            isinstance(p, list) and len(p) == 2 and all(type(v) is int for v in p) for p in seeds
        )  # fmt: skip
        and isinstance(files, dict)
        and all(isinstance(v, str) for v in files.values())
    ):
        raise ReportError(f"{path}: malformed records_sha256, seeds or files")
    known = {s for pair in seeds for s in pair}
    for relative in files:
        match = _PATH.fullmatch(relative)
        if match is None or int(match.group(1)) not in known:
            raise ReportError(f"{path}: refuses the path {relative[:80]!r} (not a seed file)")
    return body


def restore_seeds(
    out: Path, results_json: Path, wanted: Sequence[int], names: Sequence[str]
) -> list[int]:
    """Write the published seeds among ``wanted`` back into ``out``; returns those restored.

    A seed is restored only where ``out/seed_<s>`` holds neither a report nor a student
    checkpoint (nothing trained there is ever replaced), only when the published block
    holds exactly the models ``names`` for it, and never a file that already exists (a
    released teacher placed there stays). Its ``records.npz`` is cut from the block's
    records, checked against the JSON's sha256 first. Everything is checked before the
    first file is written. A block published without seed files restores nothing.
    """
    body_path = seeds_path(results_json)
    if not results_json.is_file() or not body_path.is_file():
        return []
    results = read_json(results_json, max_bytes=MAX_REPORT_BYTES, error=ReportError,
                        what="a results file")  # fmt: skip
    body = read_seed_files(body_path)
    info = results.get("records") if isinstance(results, dict) else None
    if not isinstance(info, dict) or body["records_sha256"] != info.get("sha256"):
        raise ReportError(
            f"{body_path}: belongs with records {str(body['records_sha256'])[:12]}..., "
            f"not those {results_json.name} names"
        )
    entries = info.get("entries") or {}
    pairs = {s: t for s, t in body["seeds"]}
    todo = [
        s for s in wanted
        if s in pairs and set(entries.get(str(s)) or ()) == set(names)
        and _is_empty(out / f"seed_{s}", names)
    ]  # fmt: skip
    if not todo:
        return []
    for seed in todo:
        _check_report(body, body_path, seed, names)
    labels, held = load_block_records(results, records_path(results_json))
    for seed in todo:
        for relative, text in body["files"].items():
            target = out / relative
            if _belongs(relative, seed, pairs[seed]) and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(target, text)
        seed_dir = out / f"seed_{seed}"
        chosen = {n: held[k] for n, k in entries[str(seed)].items()}
        save_records(seed_dir / "records.npz", chosen, labels)
        mark = {"block": str(results_json), "records_sha256": info["sha256"]}
        atomic_write_text(seed_dir / RESTORED_FILE, json.dumps(mark, indent=1) + "\n")
    return todo


def _check_report(body: Mapping[str, Any], path: Path, seed: int, names: Sequence[str]) -> None:
    """The seed's report is in the file and covers exactly the block's models."""
    text = body["files"].get(f"seed_{seed}/report.json")
    try:
        models = json.loads(text)["models"] if text is not None else None
    except (json.JSONDecodeError, RecursionError, KeyError, TypeError):
        models = None
    if not isinstance(models, dict) or set(models) != set(names):
        raise ReportError(f"{path}: no report of the models {list(names)} for seed {seed}")


def _belongs(relative: str, seed: int, teacher_seed: int) -> bool:
    """The file is this seed's own, or its teacher's (which may live in another seed)."""
    if relative.startswith(f"seed_{seed}/") and not relative.startswith(f"seed_{seed}/teacher/"):
        return True
    return relative.startswith(f"seed_{teacher_seed}/teacher/")


def _is_empty(seed_dir: Path, names: Sequence[str]) -> bool:
    """Nothing finished or trained there: no report, no student checkpoint."""
    if (seed_dir / "report.json").exists():
        return False
    return not any((seed_dir / n / "checkpoint.pt").exists() for n in names if n != "teacher")


def is_restored(seed_dir: Path) -> bool:
    """A seed folder written by :func:`restore_seeds` (no checkpoints: never trained on)."""
    return (seed_dir / RESTORED_FILE).is_file()


def restored_teacher_without_weights(teacher_dir: Path) -> bool:
    """A teacher folder restored from seed files, with no checkpoint to distil from."""
    return is_restored(teacher_dir.parent) and not (teacher_dir / "checkpoint.pt").exists()


def check_seed_files(results_json: Path) -> list[str]:
    """What is wrong with a block's seed files (nothing when it has none): they must name
    its records and hold a report of every one of its seeds whose numbers are the JSON's."""
    path = seeds_path(results_json)
    if not path.is_file():
        return []
    results = read_json(results_json, max_bytes=MAX_REPORT_BYTES, error=ReportError,
                        what="a results file")  # fmt: skip
    body = read_seed_files(path)
    if body["records_sha256"] != (results.get("records") or {}).get("sha256"):
        return [f"{path}: belongs with other records than {results_json.name}'s"]
    problems = []
    for i, seed in enumerate(results.get("seeds", [])):
        try:
            report = json.loads(body["files"].get(f"seed_{seed}/report.json") or "null")
            held = report["models"]
        except (json.JSONDecodeError, RecursionError, TypeError, KeyError):
            problems.append(f"{path}: no readable report for seed {seed}")
            continue
        for name, model in results["models"].items():
            last = (held.get(name) or {}).get("exit_accuracy") or [None]
            # at threshold 0 every image leaves at the last exit: the seed's last-exit accuracy
            at_zero = [
                r["accuracy_per_seed"][i] for r in model["thresholds"] if r["threshold"] == 0
            ]
            if at_zero and last[-1] != at_zero[0]:
                problems.append(f"{path}: seed {seed}'s {name} is not the block's ({last[-1]})")
    return problems
