"""Fetch CIFAR-10, CIFAR-100 and SVHN from their official addresses, checked against published MD5s.

Each file is streamed into a temporary file beside its target while its MD5 is
computed; only a file whose MD5 equals the published one is renamed into place.
A mismatch deletes the temporary file and raises :class:`DownloadError`, so a
corrupted or tampered download is never used. CIFAR archives are then unpacked
with the member checks every archive in erde goes through
(:mod:`erde.data.safety`: no absolute paths, no ``..``, no links leaving the
target folder, nothing written unless every member passes).

Mirrors: ``base_url`` (or the ``ERDE_DOWNLOAD_URL`` environment variable)
replaces the official folder of every file; the file name is appended. The MD5
check still applies, so a mirror can only serve the official bytes.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from erde.data.formats import CIFAR10, CIFAR100, SVHN_FILES, CifarLayout, find_cifar_folder
from erde.errors import ConfigError, DataError
from erde.version import __version__

ENV_BASE_URL = "ERDE_DOWNLOAD_URL"
CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60.0  # per socket operation, not for the whole file

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"


class DownloadError(DataError):
    """A download failed, or its bytes differ from the published checksum."""


@dataclass(frozen=True)
class Resource:
    """One file of an official release: where it lives and its published MD5."""

    filename: str
    base_url: str  # official folder; the file's URL is base_url + filename
    md5: str  # hex digest published with the release (the values torchvision checks too)


# The archives and .mat files exactly as their authors publish them.
OFFICIAL: dict[str, tuple[Resource, ...]] = {
    "cifar10": (Resource(CIFAR10.archive, CIFAR_URL, "c58f30108f718f92721af3b95e74349a"),),
    "cifar100": (Resource(CIFAR100.archive, CIFAR_URL, "eb9058c3a382ffc7106e4002c42a8d85"),),
    "svhn": (
        Resource(SVHN_FILES[0], SVHN_URL, "e26dedcc434d2e4c54c9b2d4a06d8373"),
        Resource(SVHN_FILES[1], SVHN_URL, "eb5a983be6a315427106f1b164d9cef3"),
    ),
}
CIFAR_LAYOUTS: dict[str, CifarLayout] = {"cifar10": CIFAR10, "cifar100": CIFAR100}


def md5_of(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def resource_url(resource: Resource, base_url: str | None = None) -> str:
    """The file's official URL, or the same file name under ``base_url``."""
    base = base_url or resource.base_url
    return base.rstrip("/") + "/" + resource.filename


def fetch(
    url: str,
    target: str | os.PathLike,
    md5: str,
    *,
    progress: bool = True,
    timeout: float = TIMEOUT_S,
) -> bool:
    """Download ``url`` to ``target`` unless a file with the right MD5 is already there.

    Returns True when bytes were downloaded, False when ``target`` was already
    correct. A present file with another MD5 is not ours to delete: the error
    says so. A downloaded file with the wrong MD5 is deleted before raising.
    """
    target = Path(target)
    md5 = md5.lower()
    if target.is_file():
        found = md5_of(target)
        if found == md5:
            return False
        raise DownloadError(
            f"{target} already exists but its MD5 is {found}, not the published {md5}; "
            "delete or move it and run again"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    request = urllib.request.Request(url, headers={"User-Agent": f"erde/{__version__}"})
    try:
        digest = hashlib.md5(usedforsecurity=False)
        received = 0
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            with tqdm(
                total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"downloading {target.name}", disable=not progress,
            ) as bar:  # fmt: skip
                while chunk := resp.read(CHUNK_BYTES):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if expected is not None and received != expected:
            raise DownloadError(
                f"{url}: connection closed after {received:,} of {expected:,} bytes; run again"
            )
        found = digest.hexdigest()
        if found != md5:
            raise DownloadError(
                f"{url}: MD5 of the downloaded file is {found}, not the published {md5}; "
                "the file was deleted (corrupted transfer or a mirror serving other bytes)"
            )
        os.replace(tmp, target)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
        raise DownloadError(f"could not download {url}: {reason}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return True


def _cifar_complete(root: Path, layout: CifarLayout) -> bool:
    folder = root / layout.folder
    return all((folder / f).is_file() for f in (*layout.train_files, *layout.test_files))


def download_dataset(
    name: str,
    data_dir: str | os.PathLike,
    *,
    base_url: str | None = None,
    resources: Sequence[Resource] | None = None,
    progress: bool = True,
) -> Path:
    """Make ``data_dir`` hold the official files of ``name``, downloading what is missing.

    ``base_url`` (default: env ``ERDE_DOWNLOAD_URL``, else the official
    addresses) serves every file under its official name. ``resources``
    replaces the official list (same names, other checksums), for tests and
    private mirrors of other files. CIFAR archives are verified, then unpacked
    safely; an archive that holds an unsafe member is refused, and deleted if
    this call downloaded it. Returns ``data_dir``.
    """
    if name not in OFFICIAL:
        raise ConfigError(
            f"--download knows {', '.join(OFFICIAL)}; {name!r} has no official download"
        )
    root = Path(data_dir).expanduser()
    if root.exists() and not root.is_dir():
        raise ConfigError(f"--download puts files into a folder; {root} is a file")
    layout = CIFAR_LAYOUTS.get(name)
    if layout is not None and _cifar_complete(root, layout):
        return root  # already unpacked; nothing to fetch
    base_url = base_url or os.environ.get(ENV_BASE_URL) or None
    fresh = {}
    for resource in resources if resources is not None else OFFICIAL[name]:
        target = root / resource.filename
        fresh[target] = fetch(
            resource_url(resource, base_url), target, resource.md5, progress=progress
        )
    if layout is not None:
        archive = root / layout.archive
        try:
            find_cifar_folder(root, layout)  # unpacks the archive with member checks
        except DataError:
            if fresh.get(archive):
                archive.unlink(missing_ok=True)
            raise
    return root


__all__ = [
    "ENV_BASE_URL",
    "OFFICIAL",
    "DownloadError",
    "Resource",
    "download_dataset",
    "fetch",
    "md5_of",
    "resource_url",
]
