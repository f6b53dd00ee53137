"""Every benchmark script answers ``--help`` and explains each of its options, and fails in one line."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import BENCHMARKS, load_benchmark

NAMES = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("name", NAMES)
def test_help_exits_0_and_every_option_is_explained(
    name: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    parsers: list[argparse.ArgumentParser] = []
    parse = argparse.ArgumentParser.parse_args

    def recording(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> object:
        parsers.append(self)
        return parse(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording)
    with pytest.raises(SystemExit) as exc:
        load_benchmark(name).main(["--help"])

    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out
    assert parsers, f"{name} parsed no arguments"
    silent = [
        max(a.option_strings or [a.dest], key=len)
        for a in parsers[0]._actions
        if not a.help and not isinstance(a, argparse._HelpAction)
    ]
    assert not silent, f"benchmarks/{name}.py options without a help text: {silent}"


# the benchmarks that read a checkpoint, with the arguments that point them at one
MISSING_CHECKPOINT = {
    "guarantee": ["{path}"],
    "inference": ["--checkpoint", "{path}"],
    "precision": ["{path}"],
    "tta": ["{path}"],
}


@pytest.mark.parametrize("name", sorted(MISSING_CHECKPOINT))
def test_a_missing_checkpoint_is_one_line_and_status_2(name: str, tmp_path: Path) -> None:
    """Run as a user would, in a real process: one ``NAME.py: error:`` line, no traceback."""
    missing = tmp_path / "no-such-run"
    args = [a.format(path=missing) for a in MISSING_CHECKPOINT[name]]
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{name}.py: error: ") and str(missing) in last
