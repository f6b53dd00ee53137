"""Which images get ERDE's entropy term: the teacher's mistakes only, or its unsure answers too.

Public summaries of the paper say the entropy term applies where the teacher is
"uncertain or incorrect". erde's default reads "incorrect" only
(``distill.uncertain_above: null``); ``distill.uncertain_above: u`` also moves
an image whose teacher exit is right but unsure (normalised entropy
H / log K above u) from the KL term to the entropy term. This benchmark trains
one ERDE student per setting (``--values``) from each given teacher (one per
seed: the student takes the teacher's seed, so the settings of a seed share
initialisation, batches and augmentation draws), evaluates them with the
teacher on the test set, and compares each setting with the default, paired by
seed, on the table thresholds of docs/RESULTS.md.

    python benchmarks/entropy_mask.py --teachers RUNS/seed_0/teacher RUNS/seed_1/teacher \\
        --values none 0.5 --out /work/erde-runs/entropy-mask --set student_train.epochs=10

The students start from each teacher's own config (data, split, schedule);
``--set`` changes it (student architecture, epochs, ...). Runs are ordinary
``erde train-student`` folders under ``--out``: rerun the same command to resume
an interrupted one and reuse finished ones. Writes ``entropy_mask.json`` and
``entropy_mask.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

try:  # run from a fresh clone without `pip install -e .` as well
    import erde  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from erde.checkpoints import load_checkpoint  # noqa: E402
from erde.cli import guarded  # noqa: E402
from erde.config import config_from_dict, load_config  # noqa: E402
from erde.io import atomic_write_text  # noqa: E402
from erde.pipeline import evaluate_checkpoints  # noqa: E402
from erde.report import markdown_table  # noqa: E402
from erde.reproduce.stats import (  # noqa: E402
    RULE,
    TABLE_LEVELS,
    aggregate,
    mean_std,
    paired_p_value,
    threshold_grid,
)
from erde.training import Job, load_splits, train  # noqa: E402

DEFAULT = "none"


def setting_name(value: str) -> str:
    """Model name of one setting in the report: ``erde`` (default) or ``erde_u<value>``."""
    return "erde" if value == DEFAULT else f"erde_u{value}"


def parse_value(text: str) -> str:
    """``none`` or a number in (0, 1), kept as written (it names folders and models)."""
    if text == DEFAULT:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give none or a number in (0, 1)") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a normalised entropy must be in (0, 1)")
    return text


def student_config(teacher: Path, value: str, overrides: list[str]):
    """The teacher's own config with ``overrides`` and the setting's ``distill.uncertain_above``."""
    base = load_checkpoint(teacher)["config"]
    cfg = load_config(base=base, overrides=overrides)
    cfg.distill.uncertain_above = None if value == DEFAULT else float(value)
    return config_from_dict(cfg.to_dict())  # validated


def run_seed(teacher: Path, values: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Train (or reuse) one student per setting from ``teacher``, evaluate them, return the report."""
    cfg = student_config(teacher, values[0], args.overrides)
    seed_dir = args.out / f"seed_{cfg.seed}"
    splits = load_splits(cfg)
    students = []
    for value in values:
        out = seed_dir / setting_name(value)
        print(f"seed {cfg.seed}: ERDE student, uncertain_above={value} -> {out}", flush=True)
        students.append(
            train(
                student_config(teacher, value, args.overrides),
                Job("student", "erde"),
                out,
                teacher_checkpoint=teacher,
                resume=True,
                progress=not args.no_progress,
                splits=splits,
            )  # fmt: skip
        )
    cfg.evaluation.rules = [RULE]  # the table grid is a grid of entropy thresholds
    paths = evaluate_checkpoints(
        [teacher, *students], seed_dir / "report", cfg=cfg, splits=splits,
        thresholds=threshold_grid(splits.num_classes, cfg.evaluation.num_thresholds),
        progress=not args.no_progress, names=["teacher", *map(setting_name, values)],
    )  # fmt: skip
    return json.loads(paths["json"].read_text())


def compare(results: dict[str, Any], values: list[str]) -> list[dict[str, Any]]:
    """Each setting against the default, paired by seed, at every table threshold (h = 0: the
    last exit, where every image runs to the end)."""
    models = results["models"]
    base = models[setting_name(DEFAULT)]
    rows = []
    for value in values:
        model = models[setting_name(value)]
        diffs = [
            [a - b for a, b in zip(m["accuracy_per_seed"], d["accuracy_per_seed"], strict=True)]
            for m, d in zip(model["thresholds"], base["thresholds"], strict=True)
        ]
        red = model.get("mac_reduction") or {}
        rows.append(
            {
                "setting": setting_name(value),
                "uncertain_above": None if value == DEFAULT else float(value),
                "last_exit": (model["exit_accuracy_mean"][-1], model["exit_accuracy_std"][-1]),
                "accuracy": [(r["accuracy_mean"], r["accuracy_std"]) for r in model["thresholds"]],
                "macs_fraction": [r["macs_fraction_of_reference"] for r in model["thresholds"]],
                "diff_vs_default": [mean_std(d)[0] for d in diffs],
                "p_value": [paired_p_value(d) for d in diffs],
                "seeds_ahead": [sum(x > 0 for x in d) for d in diffs],
                "mac_reduction": red.get("reduction"),
                "exit_ece": list(zip(model["exit_ece_mean"], model["exit_ece_std"], strict=True)),
            }
        )
    return rows


def render(rows: list[dict[str, Any]], results: dict[str, Any]) -> str:
    levels = [i for i, h in enumerate(TABLE_LEVELS) if h in (0.0, 0.1, 0.3, 0.5, 1.0)]
    n = results["n_seeds"]
    teacher = results["models"]["teacher"]
    lines = [
        f"ERDE students by entropy mask, {n} seed(s); teacher last exit "
        f"{100 * teacher['exit_accuracy_mean'][-1]:.2f} %. Accuracy (%) mean ± std over seeds "
        "at h (θ = h · log K), MACs as a fraction of the teacher's; setting − default in points "
        "(p: paired t-test over seeds).",
        "",
    ]
    header = ["Setting", "Reduction at equal acc.", "ECE per exit (%)"]
    header += [f"h = {TABLE_LEVELS[i]:g}" for i in levels]
    body = []
    for r in rows:
        cells = [
            r["setting"],
            f"{r['mac_reduction']:.2f}x" if r["mac_reduction"] else "not reached",
            " / ".join(f"{100 * m:.2f} ± {100 * s:.2f}" for m, s in r["exit_ece"]),
        ]
        for i in levels:
            mean, std = r["accuracy"][i]
            cell = f"{100 * mean:.2f} ± {100 * std:.2f} · {r['macs_fraction'][i]:.3f}"
            if r["uncertain_above"] is not None:
                p = r["p_value"][i]
                cell += f" ({100 * r['diff_vs_default'][i]:+.2f}, {r['seeds_ahead'][i]}/{n} ahead"
                cell += f", p = {p:.2f})" if p is not None else ")"
            cells.append(cell)
        body.append(cells)
    return "\n".join(lines + markdown_table(header, body)) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--teachers", nargs="+", type=Path, required=True,
                   help="teacher checkpoints (files or folders), one per seed")  # fmt: skip
    p.add_argument("--values", nargs="+", type=parse_value, default=[DEFAULT, "0.5"],
                   help="settings of distill.uncertain_above: none (the default reading) and "
                   "numbers in (0, 1) (default: none 0.5)")  # fmt: skip
    p.add_argument(
        "--out", type=Path, required=True, help="student run folders (reused on a rerun)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every student, repeatable")  # fmt: skip
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    values = [DEFAULT, *dict.fromkeys(v for v in args.values if v != DEFAULT)]
    if args.threads:
        torch.set_num_threads(args.threads)
    reports: dict[int, dict[str, Any]] = {}
    for teacher in args.teachers:
        report = run_seed(teacher, values, args)
        seed = int(report["config"]["seed"])
        if seed in reports:
            p.error(f"{teacher}: seed {seed} again; give one teacher per seed")
        reports[seed] = report
    dataset = reports[min(reports)]["dataset"]["name"]
    results = aggregate(reports, dataset=dataset, schedule="entropy-mask")
    rows = compare(results, values)
    record = {"values": values, "rows": rows, "results": results}
    atomic_write_text(args.out / "entropy_mask.json", json.dumps(record, indent=1) + "\n")
    text = render(rows, results)
    atomic_write_text(args.out / "entropy_mask.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(guarded(main, Path(__file__).name))
