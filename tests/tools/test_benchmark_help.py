"""Every benchmark script answers ``--help`` and explains each of its options."""

from __future__ import annotations

import argparse

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
