"""Image files, image folders and archives: right pixels, bounded unpacking, named problems."""

from __future__ import annotations

import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import make_tar_gz, write_imagefolder
from hostile import one_error_line, png

from erde.cli import main
from erde.data.imagefolder import DataWarning, decode_image, list_images, load_imagefolder_raw
from erde.data.safety import ENV_MAX_BYTES, ENV_MAX_MEMBERS
from erde.errors import DataError
from erde.inference import load_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ERDE_CACHE_DIR", str(tmp_path / "user-cache"))
    monkeypatch.delenv(ENV_MAX_BYTES, raising=False)
    monkeypatch.delenv(ENV_MAX_MEMBERS, raising=False)


@pytest.fixture
def twins(tmp_path: Path) -> tuple[Path, Path]:
    """A 16-bit greyscale PNG and its 8-bit twin (same picture, v16 = 257 * v8)."""
    v8 = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    return (
        png(tmp_path / "deep.png", v8.astype(np.uint16) * 257),
        png(tmp_path / "flat.png", v8),
    )


# --------------------------------------------------------------------------- high bit depth


def test_16_bit_png_reads_like_its_8_bit_twin_for_predict(twins) -> None:
    deep, flat = twins
    for channels in (1, 3):
        a, b = (load_image(p, (channels, 8, 8)) for p in (deep, flat))
        assert a.equal(b)
        assert int(a.max()) == 252  # scaled, not clipped to 255


def test_16_bit_png_reads_like_its_8_bit_twin_in_an_image_folder(twins) -> None:
    deep, flat = twins
    assert np.array_equal(decode_image(deep, None), decode_image(flat, None))


def test_16_bit_png_and_its_twin_get_the_same_answer(tiny_run, twins, capsys) -> None:
    deep, flat = twins
    assert (
        main(["predict", str(tiny_run["teacher"]), str(deep), str(flat), "--threshold", "0.5"]) == 0
    )
    a, b = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert {k: v for k, v in a.items() if k != "file"} == {
        k: v for k, v in b.items() if k != "file"
    }


def test_float_pixels_are_refused_not_guessed(tmp_path: Path) -> None:
    from PIL import Image

    path = tmp_path / "float.tiff"
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(path)
    with pytest.raises(DataError, match="no fixed range"):
        decode_image(path, None)


# --------------------------------------------------------------------------- image folders


def test_decompression_bomb_in_an_image_folder_is_one_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from PIL import Image

    root = tmp_path / "data"
    write_imagefolder(root)
    png(root / "train" / "cat" / "bomb.png", np.zeros((64, 64, 3), np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 = 4096 > 2 x 1000: a bomb
    code = main(["train-teacher", "--dataset", "imagefolder", "--data-dir", str(root),
                 "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert "bomb.png" in line and "DecompressionBomb" in line
    assert not (tmp_path / "out").exists()


def test_an_image_over_the_input_bound_is_refused_from_its_header_at_native_size(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from PIL import ImageFile

    root = tmp_path / "data"
    write_imagefolder(root)
    big = png(root / "train" / "cat" / "big.png", np.zeros((1500, 1100, 3), np.uint8))
    decoded = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    code = main(["train-teacher", "--dataset", "imagefolder", "--data-dir", str(root),
                 "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert code == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{big} is 1100x1500 pixels" in line and "data.image_size" in line
    assert (1100, 1500) not in decoded  # judged from the header: never decoded
    assert not list(root.glob(".erde-cache-*")) and not (tmp_path / "out").exists()
    assert decode_image(big, 8).shape == (8, 8, 3)  # resized on the way in: accepted


def test_empty_class_folder_is_warned_about(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_imagefolder(root)
    (root / "train" / "yak").mkdir()
    (root / "test" / "yak").mkdir()
    with pytest.warns(DataWarning, match="yak"):
        files, classes = list_images(root / "train")
    assert "yak" in classes and len(files) == 12


def test_folder_without_empty_classes_gives_no_warning(tmp_path: Path) -> None:
    written = write_imagefolder(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        files, classes = list_images(tmp_path / "train")
    assert classes == ["cat", "dog", "emu"] and set(files) == set(written["train"])


def test_non_utf8_class_folder_is_named(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    write_imagefolder(root)
    for split in ("train", "test"):
        os.rename(os.fsencode(root / split / "emu"), os.fsencode(root / split) + b"/\xffmu")
    code = main(["train-teacher", "--dataset", "imagefolder", "--data-dir", str(root),
                 "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    assert code == 2
    assert r"b'\xffmu'" in one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- archives


def _zeros_archive(path: Path, size: int) -> Path:
    """A .tar.gz of train/ and test/ whose one big member is ``size`` zero bytes."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for split in ("train", "test"):
            info = tarfile.TarInfo(f"{split}/cat/big.bin")
            info.size = size
            tar.addfile(info, _Zeros(size))
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _unpacked_bytes(cache: Path) -> int:
    return sum(p.stat().st_size for p in cache.rglob("*") if p.is_file()) if cache.exists() else 0


def test_compression_bomb_is_refused_before_extracting(tmp_path: Path) -> None:
    archive = _zeros_archive(tmp_path / "bomb.tar.gz", 40 << 20)  # 80 MiB in well under 1 MB
    assert archive.stat().st_size < 2 << 20
    with pytest.raises(DataError, match=f"unpacks to more than .* bytes .*{ENV_MAX_BYTES}"):
        load_imagefolder_raw(archive)
    assert _unpacked_bytes(tmp_path / "user-cache") == 0


def test_unpacked_size_limit_is_an_option(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data"
    write_imagefolder(root)
    archive = tmp_path / "data.tar.gz"
    make_tar_gz(archive, {"train": root / "train", "test": root / "test"})
    monkeypatch.setenv(ENV_MAX_BYTES, "1K")
    with pytest.raises(DataError, match="unpacks to more than 1,024 bytes"):
        load_imagefolder_raw(archive)
    monkeypatch.setenv(ENV_MAX_BYTES, "1M")
    assert len(load_imagefolder_raw(archive).train) == 12


def test_member_count_is_bounded(tmp_path: Path, monkeypatch) -> None:
    archive = tmp_path / "many.tar.gz"
    make_tar_gz(archive, {f"train/cat/{i:05d}.png": b"x" for i in range(2_000)})
    monkeypatch.setenv(ENV_MAX_MEMBERS, "1000")
    with pytest.raises(DataError, match=f"more than 1,000 members .*{ENV_MAX_MEMBERS}"):
        load_imagefolder_raw(archive)
    assert _unpacked_bytes(tmp_path / "user-cache") == 0


def test_bad_limit_in_the_environment_is_named(tmp_path: Path, monkeypatch) -> None:
    archive = tmp_path / "a.tar.gz"
    make_tar_gz(archive, {"train/cat/a.png": b"x"})
    monkeypatch.setenv(ENV_MAX_MEMBERS, "lots")
    with pytest.raises(DataError, match=ENV_MAX_MEMBERS):
        load_imagefolder_raw(archive)
