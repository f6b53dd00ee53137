"""The import graph of ``src/erde``: no circles, and imports running one way.

Every ``import`` statement counts, at module level, inside functions and under
``TYPE_CHECKING`` alike: a circle hidden in a function is still a circle a reader
has to untangle. ``from package import name`` counts as an import of the
submodule when ``name`` is one, else of the package.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# lower layers first: a module may import its own layer and those before it, never after
LAYERS = [
    ("erde.data",),
    ("erde.models",),
    ("erde.losses",),
    ("erde.training",),
    ("erde.evaluation", "erde.calibration", "erde.inference"),
    ("erde.report",),
    ("erde.cli",),
]


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in (SRC / "erde").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return mods


@functools.cache
def _graph() -> dict[str, set[str]]:
    """module -> the erde modules it imports."""
    mods = _modules()

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, (path, is_package) in mods.items():
        package = module if is_package else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*up, base] if base else up)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]  # fmt: skip
            else:
                continue
            for target in targets:
                found = known(target) if target.startswith("erde") else None
                if found and found != module:
                    graph[module].add(found)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_from_real_imports() -> None:
    graph = _graph()
    assert "erde.training.loop" in graph["erde.training"]
    assert "erde.losses" in graph["erde.training.jobs"]
    assert "erde.data" in graph["erde.training.loop"]


def test_the_cycle_finder_finds_a_circle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_of_erde_imports_itself_back_through_others() -> None:
    assert _cycles(_graph()) == []


def _layer(module: str) -> int | None:
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    return None


@pytest.mark.parametrize("lower", [p for layer in LAYERS[:-1] for p in layer])
def test_imports_run_one_way_from_data_to_the_command_line(lower: str) -> None:
    graph = _graph()
    rank = _layer(lower)
    upward = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if _layer(m) == rank
        for t in targets
        if (_layer(t) or -1) > rank
    )
    assert upward == []


def test_no_module_imports_a_private_name_of_another() -> None:
    """A leading underscore says "not for other modules": a name others need gets a public one."""
    private = []
    for module, (path, _) in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("erde"):
                private += [
                    f"{module} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert private == []
