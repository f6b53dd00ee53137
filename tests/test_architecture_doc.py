"""docs/ARCHITECTURE.md stays true: what it names exists, and it names every module.

A renamed or removed module fails the first test until the map is edited; a new
module fails the second until it has its line in the map.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGE = ROOT / "src" / "erde"
PATH = re.compile(r"(?:src/erde|tests)/[\w./<>-]*")
DOTTED = re.compile(r"(?<![\w./])erde(?:\.\w+)+")


def _text() -> str:
    return PAGE.read_text(encoding="utf-8")


def _module_path(dotted: str) -> Path | None:
    """The file or folder of a dotted module name, or None when there is none."""
    base = ROOT / "src" / Path(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py", base):
        if candidate.exists():
            return candidate
    return None


def _resolve(dotted: str) -> tuple[str, list[str]]:
    """The longest module prefix of ``dotted`` (below the top package) and the names after it."""
    parts = dotted.split(".")
    for cut in range(len(parts), 1, -1):
        if _module_path(".".join(parts[:cut])) is not None:
            return ".".join(parts[:cut]), parts[cut:]
    raise AssertionError(f"docs/ARCHITECTURE.md names {dotted}, which is no module of src/erde")


def _defines(path: Path, name: str) -> bool:
    source = path.read_text(encoding="utf-8")
    return re.search(rf"^\s*(?:def|class)\s+{name}\b|^\s*{name}\s*[:=]", source, re.M) is not None


def _modules() -> set[str]:
    """Every module and package of src/erde as a dotted name (the top package aside)."""
    names = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(ROOT / "src").with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if len(parts) > 1:
            names.add(".".join(parts))
    return names


def test_every_path_and_module_the_map_names_exists() -> None:
    text = _text()
    paths = PATH.findall(text)
    assert paths, "no src/erde/ or tests/ path found in docs/ARCHITECTURE.md"
    for raw in paths:
        path = raw.rstrip(".,")
        if "<" in path:  # a pattern such as src/erde/configs/<name>.yaml: its folder exists
            path = path.split("<")[0]
        assert (ROOT / path).exists(), f"docs/ARCHITECTURE.md names {raw}, which does not exist"
    for dotted in set(DOTTED.findall(text)):
        module, attributes = _resolve(dotted)
        if attributes:
            path = _module_path(module)
            source = path if path.suffix == ".py" else path / "__init__.py"
            assert _defines(source, attributes[0]), (
                f"docs/ARCHITECTURE.md names {dotted}, but {module} defines no {attributes[0]}"
            )


def test_the_map_names_every_module_of_the_package() -> None:
    named = {_resolve(d)[0] for d in DOTTED.findall(_text())}
    missing = sorted(_modules() - named)
    assert not missing, f"docs/ARCHITECTURE.md does not name: {', '.join(missing)}"


def test_the_map_is_checked_against_renames() -> None:
    """The checks above would notice a module that is not there."""
    try:
        _resolve("erde.no_such_module")
    except AssertionError:
        pass
    else:
        raise AssertionError("a missing module went unnoticed")
    assert _resolve("erde.losses.student_loss") == ("erde.losses", ["student_loss"])
