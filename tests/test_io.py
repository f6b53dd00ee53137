"""erde.io.read_json: JSON from files erde did not necessarily write, read within bounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from erde.errors import ReportError
from erde.io import read_json


def _read(path: Path, max_bytes: int = 1 << 20):
    return read_json(path, max_bytes=max_bytes, error=ReportError, what="a report")


def test_reads_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"models": {"teacher": [1, 2]}}))
    assert _read(path) == {"models": {"teacher": [1, 2]}}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"x" * 2048,
            "is 2048 bytes, over the 1024 bytes allowed for a report",
        ),  # checked before a byte is read
        (b"\xff\xfe{}", "not readable JSON"),
        (b'{"models": ', "not readable JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
    ids=["too-large", "not-utf8", "truncated", "nested"],
)
def test_every_bad_file_is_one_error_naming_it(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "r.json"
    path.write_bytes(content)
    limit = 1024 if content.startswith(b"xx") else 1 << 20
    with pytest.raises(ReportError, match=message) as info:
        _read(path, limit)
    assert str(path) in str(info.value)


def test_a_missing_file_or_a_folder_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="a report not found"):
        _read(tmp_path / "absent.json")
    with pytest.raises(ReportError, match="a report not found"):
        _read(tmp_path)


def test_an_oversized_report_left_in_a_run_folder_is_not_read(tmp_path: Path, monkeypatch) -> None:
    """The resume check of erde run treats a report too large to read like an unreadable one."""
    import erde.pipeline as pipeline

    monkeypatch.setattr(pipeline, "MAX_REPORT_BYTES", 64)
    (tmp_path / "report.json").write_text(json.dumps({"models": {"other": {}}, "pad": "x" * 100}))
    pipeline._check_same_models(tmp_path, ["teacher"])  # no error: it is replaced, not read
    monkeypatch.setattr(pipeline, "MAX_REPORT_BYTES", 1 << 20)
    with pytest.raises(Exception, match="reports other"):
        pipeline._check_same_models(tmp_path, ["teacher"])
