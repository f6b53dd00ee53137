"""Every ``>>>`` example in erde's docstrings runs, so the API docs cannot drift from the code."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import erde


def _modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages(erde.__path__, "erde."))


def _examples(name: str) -> list[doctest.DocTest]:
    module = importlib.import_module(name)
    return [t for t in doctest.DocTestFinder().find(module, name) if t.examples]


WITH_EXAMPLES = [name for name in _modules() if _examples(name)]


def test_docstring_examples_exist_in_the_public_modules() -> None:
    assert {"erde.monitor", "erde.threads"} <= set(WITH_EXAMPLES)


@pytest.mark.parametrize("name", WITH_EXAMPLES)
def test_docstring_examples_run(name: str, one_thread) -> None:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in _examples(name):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
