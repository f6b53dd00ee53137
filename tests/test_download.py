"""`--download`: official files fetched from a local HTTP server, checked by MD5, unpacked safely.

The server on 127.0.0.1 serves small archives and .mat files generated in the
official formats: a good one, a corrupted one and one with a path-traversal
member. Nothing here reaches the internet.
"""

from __future__ import annotations

import http.server
import re
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from data_fixtures import (
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    CIFAR100_FOLDER,
    make_tar_gz,
    write_cifar10,
    write_cifar100,
    write_svhn,
)

from erde.cli import main
from erde.data import load_data
from erde.data.formats import CIFAR10, CIFAR100, SVHN_FILES
from erde.download import (
    ENV_BASE_URL,
    OFFICIAL,
    DownloadError,
    Resource,
    download_dataset,
    fetch,
    md5_of,
)
from erde.errors import ConfigError, DataError


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


class _ShortHandler(http.server.BaseHTTPRequestHandler):
    """Announces more bytes than it sends, like a connection dropped mid-file."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        self.wfile.write(b"x" * 100)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def _serve(handler) -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/files"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves under /files/) of a local HTTP server."""
    root = tmp_path / "www"
    (root / "files").mkdir(parents=True)
    for url in _serve(partial(_QuietHandler, directory=str(root))):
        yield url, root / "files"


def _cifar10_archive(path: Path, work: Path, extra: dict[str, bytes] | None = None) -> Path:
    """A small cifar-10-python.tar.gz in the official layout (plus ``extra`` members)."""
    write_cifar10(work, per_batch=10, n_test=10)
    make_tar_gz(path, {CIFAR10_FOLDER: work / CIFAR10_FOLDER, **(extra or {})})
    return path


def _no_partial_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".part")]


def test_official_table_names_the_files_the_loaders_read() -> None:
    assert [r.filename for r in OFFICIAL["cifar10"]] == [CIFAR10.archive]
    assert [r.filename for r in OFFICIAL["cifar100"]] == [CIFAR100.archive]
    assert tuple(r.filename for r in OFFICIAL["svhn"]) == SVHN_FILES
    for resources in OFFICIAL.values():
        for r in resources:
            assert re.fullmatch(r"[0-9a-f]{32}", r.md5)
            assert r.base_url.startswith(
                ("https://www.cs.toronto.edu/", "http://ufldl.stanford.edu/")
            )


def test_good_archive_is_verified_renamed_and_unpacked(served, tmp_path: Path) -> None:
    url, files = served
    archive = _cifar10_archive(files / CIFAR10_ARCHIVE, tmp_path / "gen")
    data_dir = tmp_path / "data"
    resources = [Resource(CIFAR10_ARCHIVE, "https://unused.invalid/", md5_of(archive))]

    download_dataset("cifar10", data_dir, base_url=url, resources=resources, progress=False)

    assert md5_of(data_dir / CIFAR10_ARCHIVE) == md5_of(archive)
    assert (data_dir / CIFAR10_FOLDER / "test_batch").is_file()
    assert _no_partial_files(data_dir)
    splits = load_data("cifar10", data_dir, val_fraction=0.0)
    assert (len(splits.train), len(splits.test)) == (50, 10)


def test_corrupted_file_is_refused_against_the_published_md5_and_deleted(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, files = served
    archive = _cifar10_archive(files / CIFAR10_ARCHIVE, tmp_path / "gen")
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    monkeypatch.setenv(ENV_BASE_URL, url)  # the official table, only the host replaced
    data_dir = tmp_path / "data"

    with pytest.raises(DownloadError, match=OFFICIAL["cifar10"][0].md5):
        download_dataset("cifar10", data_dir, progress=False)

    assert not (data_dir / CIFAR10_ARCHIVE).exists()
    assert not (data_dir / CIFAR10_FOLDER).exists()
    assert _no_partial_files(data_dir)


def test_archive_with_path_traversal_member_is_refused(served, tmp_path: Path) -> None:
    url, files = served
    archive = _cifar10_archive(
        files / CIFAR10_ARCHIVE, tmp_path / "gen", extra={"../escaped.txt": b"outside"}
    )
    data_dir = tmp_path / "deep" / "data"
    resources = [Resource(CIFAR10_ARCHIVE, "https://unused.invalid/", md5_of(archive))]

    with pytest.raises(DataError, match="unsafe member"):
        download_dataset("cifar10", data_dir, base_url=url, resources=resources, progress=False)

    assert not (tmp_path / "deep" / "escaped.txt").exists()
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (data_dir / CIFAR10_FOLDER).exists()
    assert not (data_dir / CIFAR10_ARCHIVE).exists()  # the refused download is not kept


def test_cifar100_and_svhn_official_files_download_and_load(served, tmp_path: Path) -> None:
    url, files = served
    gen = tmp_path / "gen"
    write_cifar100(gen, n_train=200, n_test=100)
    make_tar_gz(files / CIFAR100.archive, {CIFAR100_FOLDER: gen / CIFAR100_FOLDER})
    write_svhn(files, n_train=40, n_test=20)
    for name, names in (("cifar100", [CIFAR100.archive]), ("svhn", list(SVHN_FILES))):
        resources = [Resource(n, "https://unused.invalid/", md5_of(files / n)) for n in names]
        data_dir = tmp_path / name
        download_dataset(name, data_dir, base_url=url, resources=resources, progress=False)
        splits = load_data(name, data_dir, val_fraction=0.0)
        assert len(splits.test) == {"cifar100": 100, "svhn": 20}[name]


def test_file_already_present_with_published_md5_is_not_fetched_again(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"official bytes")
    # the URL cannot be reached: a second download would fail the test
    assert fetch("http://127.0.0.1:9/none", target, md5_of(target), progress=False) is False


def test_file_already_present_with_other_md5_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "file.bin"
    target.write_bytes(b"someone else's bytes")
    with pytest.raises(DownloadError, match="already exists"):
        fetch("http://127.0.0.1:9/none", target, "0" * 32, progress=False)
    assert target.read_bytes() == b"someone else's bytes"


def test_missing_file_on_server_is_a_download_error(served, tmp_path: Path) -> None:
    url, _ = served
    data_dir = tmp_path / "data"
    with pytest.raises(DownloadError, match="404"):
        fetch(f"{url}/absent.tar.gz", data_dir / "absent.tar.gz", "0" * 32, progress=False)
    assert not list(data_dir.iterdir())


def test_connection_closed_early_is_a_download_error(tmp_path: Path) -> None:
    for url in _serve(_ShortHandler):
        with pytest.raises(DownloadError):
            fetch(f"{url}/short.bin", tmp_path / "short.bin", "0" * 32, progress=False)
    assert not list(tmp_path.iterdir())


def test_unknown_dataset_cannot_be_downloaded(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no official download"):
        download_dataset("imagefolder", tmp_path)


def test_cli_download_mismatch_exits_2_with_one_line(
    served, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    url, files = served
    (files / "train_32x32.mat").write_bytes(b"not the official file")
    monkeypatch.setenv(ENV_BASE_URL, url)
    data_dir = tmp_path / "svhn"

    code = main(
        ["reproduce", "--dataset", "svhn", "--data-dir", str(data_dir), "--download",
         "--seeds", "1", "--out", str(tmp_path / "out"), "--no-progress"]
    )  # fmt: skip

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("erde: error:") and "MD5" in err and err.count("\n") == 1
    assert not (data_dir / "train_32x32.mat").exists()
    assert not (tmp_path / "out").exists()
