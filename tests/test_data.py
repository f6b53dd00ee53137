"""Tests for erde.data: every loader on tiny files in the official formats, hostile
and broken inputs, validation carving and batched augmentation."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    CIFAR10_ARCHIVE,
    CIFAR10_FOLDER,
    CIFAR100_FOLDER,
    add_link,
    dump_pickle,
    image_id,
    make_tar_gz,
    malicious_pickle_bytes,
    tagged_images,
    to_cifar_rows,
    truncate,
    write_cifar10,
    write_cifar100,
    write_image,
    write_imagefolder,
    write_svhn,
)

import erde.data.imagefolder as imagefolder
from erde.checkpoints import save_checkpoint
from erde.cli import main
from erde.data import (
    AugmentSpec,
    iterate_batches,
    load_data,
    load_splits,
    prepare_batch,
    stratified_split,
)
from erde.data.augment import (
    augment,
    channel_stats,
    crop_at,
    normalize,
    random_crop,
    random_flip,
)
from erde.errors import DataError


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Derived files (extractions, decode caches) go to a per-test folder, never ~/.cache."""
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("ERDE_CACHE_DIR", str(cache))
    monkeypatch.delenv("ERDE_DATA_DIR", raising=False)
    return cache


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- CIFAR-10 -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_folder_reads_every_batch_in_order(tmp_path: Path, protocol: int) -> None:
    written = write_cifar10(tmp_path, protocol=protocol)
    splits = load_data("cifar10", tmp_path, val_fraction=0.0)
    assert splits.train.images.shape == (100, 3, 32, 32)
    assert splits.train.images.dtype == torch.uint8
    np.testing.assert_array_equal(splits.train.images.numpy(), written.train_images)
    np.testing.assert_array_equal(splits.train.labels.numpy(), written.train_labels)
    np.testing.assert_array_equal(splits.test.images.numpy(), written.test_images)
    np.testing.assert_array_equal(splits.test.labels.numpy(), written.test_labels)
    assert splits.class_names == written.class_names  # decoded from bytes in batches.meta
    assert splits.num_classes == 10
    assert splits.augment == AugmentSpec(crop_padding=4, flip=True)


def test_cifar10_accepts_the_batches_folder_itself(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)
    splits = load_data("cifar10", tmp_path / CIFAR10_FOLDER, val_fraction=0.0)
    assert image_id(splits.test.images) == image_id(written.test_images)


def test_cifar10_without_meta_falls_back_to_official_names(tmp_path: Path) -> None:
    write_cifar10(tmp_path, with_meta=False)
    assert load_data("cifar10", tmp_path).class_names[0] == "airplane"


def test_cifar_row_planes_become_chw_image(tmp_path: Path) -> None:
    """A row is 1024 red, then 1024 green, then 1024 blue values, each plane row-major."""
    write_cifar10(tmp_path, n_test=1)
    h, w = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
    red = (h * 7 + w) % 256
    green = 255 - w * 5
    blue = np.full((32, 32), 42)
    row = np.concatenate([red.ravel(), green.ravel(), blue.ravel()]).astype(np.uint8)[None]
    dump_pickle({b"data": row, b"labels": [3]}, tmp_path / CIFAR10_FOLDER / "test_batch")

    image = load_data("cifar10", tmp_path).test.images[0].numpy()  # (C, H, W)
    assert image.shape == (3, 32, 32)
    np.testing.assert_array_equal(image[0], red)
    np.testing.assert_array_equal(image[1], green)
    np.testing.assert_array_equal(image[2], blue)
    assert image[:, 1, 2].tolist() == [9, 245, 42]  # pixel at row 1, column 2 as (R, G, B)


def test_cifar10_tar_gz_is_unpacked_next_to_it_once(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    make_tar_gz(data / CIFAR10_ARCHIVE, {CIFAR10_FOLDER: tmp_path / "src" / CIFAR10_FOLDER})

    splits = load_data("cifar10", data, val_fraction=0.0)
    np.testing.assert_array_equal(splits.train.images.numpy(), written.train_images)
    np.testing.assert_array_equal(splits.test.labels.numpy(), written.test_labels)
    assert (data / CIFAR10_FOLDER / "data_batch_5").is_file()
    assert _files_under(data) == {CIFAR10_ARCHIVE, CIFAR10_FOLDER} | {
        f"{CIFAR10_FOLDER}/{n}" for n in os.listdir(data / CIFAR10_FOLDER)
    }  # no temporary extraction folder left behind

    (data / CIFAR10_ARCHIVE).unlink()  # the unpacked folder is what later loads read
    again = load_data("cifar10", data, val_fraction=0.0)
    assert torch.equal(again.train.images, splits.train.images)


def test_cifar10_archive_path_itself_is_accepted(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path / "src")
    archive = tmp_path / "dl" / CIFAR10_ARCHIVE
    archive.parent.mkdir()
    make_tar_gz(archive, {CIFAR10_FOLDER: tmp_path / "src" / CIFAR10_FOLDER})
    splits = load_data("cifar10", archive, val_fraction=0.0)
    assert image_id(splits.train.images) == image_id(written.train_images)


def test_cifar10_archive_in_read_only_folder_unpacks_to_user_cache(
    tmp_path: Path, monkeypatch, _isolated_cache: Path
) -> None:
    import erde.data.formats as formats

    written = write_cifar10(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    make_tar_gz(data / CIFAR10_ARCHIVE, {CIFAR10_FOLDER: tmp_path / "src" / CIFAR10_FOLDER})
    real = formats.safe_extract_folder

    def read_only_data_folder(archive: Path, dest: Path, folder: str) -> Path:
        if dest == data:
            raise PermissionError(13, "Permission denied", str(dest))
        return real(archive, dest, folder)

    monkeypatch.setattr(formats, "safe_extract_folder", read_only_data_folder)
    splits = load_data("cifar10", data, val_fraction=0.0)
    assert image_id(splits.train.images) == image_id(written.train_images)
    assert _files_under(data) == {CIFAR10_ARCHIVE}
    assert list(_isolated_cache.glob(f"extracted-*/{CIFAR10_FOLDER}/test_batch"))

    monkeypatch.setattr(formats, "safe_extract_folder", None)  # found again, not unpacked
    assert torch.equal(load_data("cifar10", data, val_fraction=0.0).test.images, splits.test.images)


# --- CIFAR-100 ----------------------------------------------------------------------------


def test_cifar100_uses_fine_labels_and_100_classes(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path)
    splits = load_data("cifar100", tmp_path, val_fraction=0.0)
    assert splits.num_classes == 100
    assert splits.class_names == written.class_names
    np.testing.assert_array_equal(splits.train.labels.numpy(), written.train_labels)
    np.testing.assert_array_equal(splits.test.images.numpy(), written.test_images)
    assert int(splits.train.labels.max()) == 99  # fine labels, not the 20 coarse ones
    assert splits.augment.flip


# --- SVHN ---------------------------------------------------------------------------------


def test_svhn_mat_layout_and_label_10_is_digit_0(tmp_path: Path) -> None:
    written = write_svhn(tmp_path)
    splits = load_data("svhn", tmp_path, val_fraction=0.0)
    np.testing.assert_array_equal(splits.train.images.numpy(), written.train_images)
    np.testing.assert_array_equal(splits.test.images.numpy(), written.test_images)
    np.testing.assert_array_equal(splits.train.labels.numpy(), written.train_labels)
    assert splits.class_names == [str(d) for d in range(10)]
    assert splits.augment == AugmentSpec(crop_padding=2, flip=False)


def test_svhn_label_mapping_one_by_one(tmp_path: Path) -> None:
    raw = np.array([10, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 4)
    write_svhn(tmp_path, raw_train_labels=raw)
    labels = load_data("svhn", tmp_path, val_fraction=0.0).train.labels
    assert labels[:10].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_svhn_x_axes_are_height_width_channel_sample(tmp_path: Path) -> None:
    from scipy.io import savemat

    write_svhn(tmp_path)
    x = np.zeros((32, 32, 3, 2), dtype=np.uint8)
    x[5, 9, 1, 1] = 77  # row 5, column 9, green, second image
    savemat(tmp_path / "test_32x32.mat", {"X": x, "y": np.array([[1], [2]], dtype=np.uint8)})
    image = load_data("svhn", tmp_path).test.images[1]
    assert image[1, 5, 9].item() == 77
    assert image.sum().item() == 77


# --- imagefolder --------------------------------------------------------------------------


def test_imagefolder_png_and_jpeg(tmp_path: Path) -> None:
    written = write_imagefolder(tmp_path / "set")
    splits = load_data("imagefolder", tmp_path / "set", val_fraction=0.0)
    assert splits.class_names == ["cat", "dog", "emu"]
    assert splits.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert splits.test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert splits.augment == AugmentSpec(crop_padding=1, flip=True)
    for i, (path, pixels) in enumerate(sorted(written["train"].items())):
        got = splits.train.images[i].permute(1, 2, 0).numpy()  # (H, W, 3)
        if path.suffix == ".png":
            np.testing.assert_array_equal(got, pixels)
        else:  # JPEG is lossy; a flat colour at quality 100 is within a couple of levels
            assert np.abs(got.astype(int) - pixels.astype(int)).max() <= 2


def test_imagefolder_resizes_to_image_size(tmp_path: Path) -> None:
    write_imagefolder(tmp_path / "set")
    splits = load_data("imagefolder", tmp_path / "set", image_size=4)
    assert splits.image_shape == (3, 4, 4)


def test_imagefolder_decode_cache_is_reused(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "set"
    write_imagefolder(root)
    first = load_data("imagefolder", root, val_fraction=0.0)
    assert len(list(root.glob(".erde-cache-*.npz"))) == 2  # one per split

    def no_decoding(*args):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(imagefolder, "_decode_all", no_decoding)
    second = load_data("imagefolder", root, val_fraction=0.0)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.images, second.test.images)


def test_imagefolder_cache_invalidated_when_a_file_changes(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_imagefolder(root)
    before = load_data("imagefolder", root, val_fraction=0.0)
    assert before.train.images[0].sum() > 0
    write_image(root / "train" / "cat" / "000.png", np.zeros((8, 8, 3), dtype=np.uint8))
    after = load_data("imagefolder", root, val_fraction=0.0)
    assert after.train.images[0].sum() == 0
    assert torch.equal(after.train.images[1:], before.train.images[1:])


def test_imagefolder_cache_invalidated_when_a_file_is_added(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_imagefolder(root)
    assert len(load_data("imagefolder", root, val_fraction=0.0).train) == 12
    write_image(root / "train" / "dog" / "zzz.png", np.full((8, 8, 3), 9, dtype=np.uint8))
    splits = load_data("imagefolder", root, val_fraction=0.0)
    assert len(splits.train) == 13
    assert splits.train.labels.tolist().count(1) == 5


def test_imagefolder_stale_cache_is_deleted_other_sizes_kept(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_imagefolder(root)
    load_data("imagefolder", root, val_fraction=0.0)
    load_data("imagefolder", root, val_fraction=0.0, image_size=4)
    first = {p.name for p in root.glob(".erde-cache-*.npz")}
    assert len(first) == 4  # train/test at the native size and at 4x4
    write_image(root / "train" / "dog" / "zzz.png", np.full((8, 8, 3), 9, dtype=np.uint8))
    load_data("imagefolder", root, val_fraction=0.0)
    now = {p.name for p in root.glob(".erde-cache-*.npz")}
    assert len(now) == 4
    replaced = first - now
    assert len(replaced) == 1 and replaced.pop().startswith(".erde-cache-train-native-")
    assert {n for n in now if "-4-" in n} == {n for n in first if "-4-" in n}


def test_imagefolder_cache_goes_to_user_cache_when_folder_is_read_only(
    tmp_path: Path, monkeypatch, _isolated_cache: Path
) -> None:
    root = tmp_path / "set"
    write_imagefolder(root)
    real = imagefolder.atomic_write_bytes

    def read_only_root(path: Path, data: bytes) -> None:
        if Path(path).parent == root:
            raise PermissionError(13, "Permission denied", str(path))
        real(path, data)

    monkeypatch.setattr(imagefolder, "atomic_write_bytes", read_only_root)
    first = load_data("imagefolder", root, val_fraction=0.0)
    assert not list(root.glob(".erde-cache-*"))
    assert len(list(_isolated_cache.glob("imagefolder-*/.erde-cache-*.npz"))) == 2

    monkeypatch.setattr(imagefolder, "_decode_all", None)  # must come from the user cache
    assert torch.equal(
        load_data("imagefolder", root, val_fraction=0.0).train.images, first.train.images
    )


def test_imagefolder_damaged_cache_is_rebuilt(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_imagefolder(root)
    good = load_data("imagefolder", root, val_fraction=0.0)
    for cache in root.glob(".erde-cache-*.npz"):
        truncate(cache, 0.3)
    again = load_data("imagefolder", root, val_fraction=0.0)
    assert torch.equal(good.train.images, again.train.images)


def test_imagefolder_tar_gz_matches_folder(tmp_path: Path, _isolated_cache: Path) -> None:
    root = tmp_path / "set"
    write_imagefolder(root)
    archive = tmp_path / "set.tar.gz"
    make_tar_gz(archive, {"train": root / "train", "test": root / "test"})
    from_folder = load_data("imagefolder", root, val_fraction=0.0)
    from_archive = load_data("imagefolder", archive, val_fraction=0.0)
    assert torch.equal(from_folder.train.images, from_archive.train.images)
    assert torch.equal(from_folder.test.labels, from_archive.test.labels)
    assert from_archive.class_names == from_folder.class_names


def test_imagefolder_replaced_archive_is_unpacked_again(
    tmp_path: Path, _isolated_cache: Path
) -> None:
    archive = tmp_path / "set.tar.gz"
    for name, classes in (("a", ("cat", "dog")), ("b", ("x", "y", "z"))):
        write_imagefolder(tmp_path / name, classes=classes)
        make_tar_gz(archive, {s: tmp_path / name / s for s in ("train", "test")})
        splits = load_data("imagefolder", archive)
        assert splits.class_names == list(classes)
        # the copy of the replaced archive is gone: one unpacked version on disk
        assert len(list(_isolated_cache.glob("imagefolder-archive-*"))) == 1


def test_imagefolder_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    root = tmp_path / "set"
    write_imagefolder(root)
    write_image(root / "train" / "cat" / "big.png", np.zeros((10, 10, 3), dtype=np.uint8))
    with pytest.raises(DataError, match="image_size"):
        load_data("imagefolder", root)
    assert load_data("imagefolder", root, image_size=8).image_shape == (3, 8, 8)


# --- digits -------------------------------------------------------------------------------


def test_digits_is_the_embedded_1797_images() -> None:
    splits = load_data("digits")
    assert len(splits.train) + len(splits.val) + len(splits.test) == 1797
    assert splits.num_classes == 10
    assert splits.class_names == [str(d) for d in range(10)]
    assert splits.image_shape == (3, 16, 16)
    for part in (splits.train, splits.val, splits.test):
        assert sorted(set(part.labels.tolist())) == list(range(10))
    assert splits.augment.flip is False  # a mirrored digit is another symbol
    assert load_data("digits", image_size=8).image_shape == (3, 8, 8)


def test_digits_test_set_does_not_depend_on_seed() -> None:
    a = load_data("digits", seed=0)
    b = load_data("digits", seed=123)
    assert torch.equal(a.test.images, b.test.images)
    assert torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.val.images, b.val.images)  # the seed does move validation


# --- broken, missing and hostile inputs ---------------------------------------------------


@dataclass
class Broken:
    dataset: str
    data_dir: Path
    expect: list[str]  # substrings the error message must contain
    must_not_exist: list[Path] = field(default_factory=list)


def _cifar10_missing(tmp: Path) -> Broken:
    (tmp / "data").mkdir()
    return Broken(
        "cifar10", tmp / "data", ["data_batch_1..5", "test_batch", "cifar-10-python.tar.gz"]
    )


def _cifar10_missing_batch(tmp: Path) -> Broken:
    write_cifar10(tmp / "data")
    (tmp / "data" / CIFAR10_FOLDER / "data_batch_4").unlink()
    return Broken("cifar10", tmp / "data", ["missing data_batch_4", "data_batch_1..5"])


def _cifar10_truncated_pickle(tmp: Path) -> Broken:
    write_cifar10(tmp / "data")
    truncate(tmp / "data" / CIFAR10_FOLDER / "data_batch_2")
    return Broken("cifar10", tmp / "data", ["data_batch_2", "truncated"])


def _cifar10_malicious_pickle(tmp: Path) -> Broken:
    write_cifar10(tmp / "data")
    marker = tmp / "code-ran"
    (tmp / "data" / CIFAR10_FOLDER / "data_batch_1").write_bytes(malicious_pickle_bytes(marker))
    return Broken("cifar10", tmp / "data", ["data_batch_1", "system"], [marker])


def _cifar10_truncated_archive(tmp: Path) -> Broken:
    write_cifar10(tmp / "src")
    (tmp / "data").mkdir()
    make_tar_gz(tmp / "data" / CIFAR10_ARCHIVE, {CIFAR10_FOLDER: tmp / "src" / CIFAR10_FOLDER})
    truncate(tmp / "data" / CIFAR10_ARCHIVE, 0.6)
    return Broken(
        "cifar10", tmp / "data", [CIFAR10_ARCHIVE, "truncated"], [tmp / "data" / CIFAR10_FOLDER]
    )


def _cifar10_path_traversal_archive(tmp: Path) -> Broken:
    write_cifar10(tmp / "src")
    (tmp / "data").mkdir()
    evil = tmp / "evil.txt"
    make_tar_gz(
        tmp / "data" / CIFAR10_ARCHIVE,
        {CIFAR10_FOLDER: tmp / "src" / CIFAR10_FOLDER, "../evil.txt": b"escaped"},
    )
    return Broken("cifar10", tmp / "data", ["../evil.txt", "unsafe"], [evil])


def _cifar10_symlink_archive(tmp: Path) -> Broken:
    write_cifar10(tmp / "src")
    (tmp / "data").mkdir()
    plain = tmp / "data" / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(tmp / "src" / CIFAR10_FOLDER, arcname=CIFAR10_FOLDER)
    add_link(plain, f"{CIFAR10_FOLDER}/data_batch_6", str(tmp / "outside"))
    (tmp / "data" / CIFAR10_ARCHIVE).write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    return Broken(
        "cifar10", tmp / "data", ["data_batch_6", "outside"], [tmp / "data" / CIFAR10_FOLDER]
    )


def _cifar10_with_test_labels(tmp: Path, labels: list, expected: list[str]) -> Broken:
    """A complete CIFAR-10 folder whose test batch holds two images with ``labels``."""
    write_cifar10(tmp / "data")
    images = tagged_images(2, np.random.default_rng(0), 0)
    dump_pickle(
        {b"data": to_cifar_rows(images), b"labels": labels},
        tmp / "data" / CIFAR10_FOLDER / "test_batch",
    )
    return Broken("cifar10", tmp / "data", expected)


def _cifar10_label_out_of_range(tmp: Path) -> Broken:
    return _cifar10_with_test_labels(tmp, [3, 10], ["0..9", "10"])


def _cifar10_fractional_labels(tmp: Path) -> Broken:
    return _cifar10_with_test_labels(tmp, [1.5, 2.0], ["test_batch", "integer"])


def _cifar10_text_labels(tmp: Path) -> Broken:
    return _cifar10_with_test_labels(tmp, [b"cat", b"dog"], ["test_batch", "integer"])


def _cifar100_missing(tmp: Path) -> Broken:
    write_cifar10(tmp / "data")  # the wrong CIFAR
    return Broken("cifar100", tmp / "data", [CIFAR100_FOLDER, "train and test"])


def _cifar100_label_out_of_range(tmp: Path) -> Broken:
    write_cifar100(tmp / "data")
    images = tagged_images(2, np.random.default_rng(0), 0)
    dump_pickle(
        {b"data": to_cifar_rows(images), b"fine_labels": [0, 100], b"coarse_labels": [0, 0]},
        tmp / "data" / CIFAR100_FOLDER / "test",
    )
    return Broken("cifar100", tmp / "data", ["0..99", "100"])


def _svhn_missing_test(tmp: Path) -> Broken:
    write_svhn(tmp / "data")
    (tmp / "data" / "test_32x32.mat").unlink()
    return Broken("svhn", tmp / "data", ["train_32x32.mat and test_32x32.mat", "missing"])


def _svhn_truncated(tmp: Path) -> Broken:
    write_svhn(tmp / "data")
    truncate(tmp / "data" / "train_32x32.mat")
    return Broken("svhn", tmp / "data", ["train_32x32.mat", "truncated"])


def _svhn_label_out_of_range(tmp: Path) -> Broken:
    write_svhn(tmp / "data", raw_train_labels=np.arange(40) % 11 + 1)  # 1..11
    return Broken("svhn", tmp / "data", ["train_32x32.mat", "1..10", "11"])


def _imagefolder_missing_test(tmp: Path) -> Broken:
    write_imagefolder(tmp / "data")
    for f in (tmp / "data" / "test").rglob("*.*"):
        f.unlink()
    for d in sorted((tmp / "data" / "test").rglob("*"), reverse=True):
        d.rmdir()
    (tmp / "data" / "test").rmdir()
    return Broken("imagefolder", tmp / "data", ["test/<class>/", "missing test/"])


def _imagefolder_corrupt_image(tmp: Path) -> Broken:
    write_imagefolder(tmp / "data")
    (tmp / "data" / "train" / "dog" / "001.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return Broken("imagefolder", tmp / "data", ["dog/001.jpg"])


def _imagefolder_traversal_archive(tmp: Path) -> Broken:
    write_imagefolder(tmp / "src")
    archive = tmp / "set.tar.gz"
    make_tar_gz(
        archive,
        {
            "train": tmp / "src" / "train",
            "test": tmp / "src" / "test",
            "train/../../evil.txt": b"escaped",
        },
    )
    return Broken("imagefolder", archive, ["evil.txt", "unsafe"], [tmp / "evil.txt"])


BROKEN: dict[str, Callable[[Path], Broken]] = {
    f.__name__.lstrip("_"): f
    for f in (
        _cifar10_missing,
        _cifar10_missing_batch,
        _cifar10_truncated_pickle,
        _cifar10_malicious_pickle,
        _cifar10_truncated_archive,
        _cifar10_path_traversal_archive,
        _cifar10_symlink_archive,
        _cifar10_label_out_of_range,
        _cifar10_fractional_labels,
        _cifar10_text_labels,
        _cifar100_missing,
        _cifar100_label_out_of_range,
        _svhn_missing_test,
        _svhn_truncated,
        _svhn_label_out_of_range,
        _imagefolder_missing_test,
        _imagefolder_corrupt_image,
        _imagefolder_traversal_archive,
    )
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_data_is_one_data_error(tmp_path: Path, case: str) -> None:
    broken = BROKEN[case](tmp_path)
    before = _files_under(tmp_path)
    with pytest.raises(DataError) as info:
        load_data(broken.dataset, broken.data_dir)
    message = str(info.value)
    for text in broken.expect:
        assert text in message
    assert "\n" not in message
    for path in broken.must_not_exist:
        assert not path.exists(), f"{path} was created"
    assert _files_under(tmp_path) - before <= {"user-cache"}  # nothing half-written left


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_data_via_cli_exits_2_and_keeps_out(tmp_path: Path, case: str, capsys) -> None:
    broken = BROKEN[case](tmp_path)
    out = tmp_path / "out"
    save_checkpoint({"name": "teacher", "model": {}}, out / "checkpoint.pt")
    kept = (out / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    argv = ["train-teacher", "--dataset", broken.dataset, "--data-dir", str(broken.data_dir)]
    code = main([*argv, "--out", str(out), "--force", "--device", "cpu", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("erde: error: ")
    assert broken.expect[0] in lines[0]
    assert captured.out == ""
    assert (out / "checkpoint.pt").read_bytes() == kept
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]


def test_unknown_dataset_lists_valid_names() -> None:
    with pytest.raises(DataError, match="cifar10, cifar100, digits, imagefolder, svhn"):
        load_data("mnist")


def test_missing_data_dir_says_how_to_give_one() -> None:
    with pytest.raises(DataError, match="ERDE_DATA_DIR"):
        load_data("svhn")


def test_data_dir_from_environment(tmp_path: Path, monkeypatch) -> None:
    write_svhn(tmp_path)
    monkeypatch.setenv("ERDE_DATA_DIR", str(tmp_path))
    assert len(load_data("svhn", val_fraction=0.0).train) == 40


def test_tar_with_absolute_member_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "src")
    (tmp_path / "data").mkdir()
    target = tmp_path / "absolute.txt"
    make_tar_gz(
        tmp_path / "data" / CIFAR10_ARCHIVE,
        {CIFAR10_FOLDER: tmp_path / "src" / CIFAR10_FOLDER, str(target): b"escaped"},
    )
    with pytest.raises(DataError, match="absolute path"):
        load_data("cifar10", tmp_path / "data")
    assert not target.exists()
    assert not (tmp_path / "data" / CIFAR10_FOLDER).exists()


def test_tar_with_hard_link_outside_is_refused(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "src")
    (tmp_path / "data").mkdir()
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(tmp_path / "src" / CIFAR10_FOLDER, arcname=CIFAR10_FOLDER)
        info = tarfile.TarInfo(f"{CIFAR10_FOLDER}/note")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    add_link(plain, f"{CIFAR10_FOLDER}/passwd", "../../etc/passwd", symbolic=False)
    (tmp_path / "data" / CIFAR10_ARCHIVE).write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(DataError, match="unsafe member"):
        load_data("cifar10", tmp_path / "data")
    assert not (tmp_path / "data" / CIFAR10_FOLDER).exists()


# --- validation carving -------------------------------------------------------------------


def _ids(images: torch.Tensor) -> set[int]:
    return set(image_id(images.numpy()))


def test_validation_split_disjoint_stratified_and_test_untouched(tmp_path: Path) -> None:
    written = write_cifar10(tmp_path)  # 10 images per class
    splits = load_data("cifar10", tmp_path, val_fraction=0.2, seed=0)
    train_ids, val_ids = _ids(splits.train.images), _ids(splits.val.images)
    assert not train_ids & val_ids
    assert train_ids | val_ids == set(range(100))
    assert Counter(splits.val.labels.tolist()) == dict.fromkeys(range(10), 2)
    assert Counter(splits.train.labels.tolist()) == dict.fromkeys(range(10), 8)
    # labels travel with their images
    by_id = dict(zip(image_id(written.train_images), written.train_labels.tolist(), strict=True))
    assert [by_id[i] for i in image_id(splits.val.images.numpy())] == splits.val.labels.tolist()
    np.testing.assert_array_equal(splits.test.images.numpy(), written.test_images)
    np.testing.assert_array_equal(splits.test.labels.numpy(), written.test_labels)


def test_validation_split_fixed_by_seed(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    a = load_data("cifar10", tmp_path, val_fraction=0.2, seed=7)
    b = load_data("cifar10", tmp_path, val_fraction=0.2, seed=7)
    c = load_data("cifar10", tmp_path, val_fraction=0.2, seed=8)
    assert image_id(a.val.images.numpy()) == image_id(b.val.images.numpy())
    assert _ids(a.val.images) != _ids(c.val.images)
    assert torch.equal(a.test.images, c.test.images)
    assert a.mean == b.mean  # statistics come from the (same) train part


def test_val_fraction_zero_keeps_everything_for_training(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    splits = load_data("cifar10", tmp_path, val_fraction=0.0)
    assert len(splits.val) == 0 and len(splits.train) == 100


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5])
def test_val_fraction_out_of_range(bad: float) -> None:
    with pytest.raises(DataError, match="val_fraction"):
        load_data("digits", val_fraction=bad)


def test_max_train_subsamples_train_only(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    full = load_data("cifar10", tmp_path, val_fraction=0.2, seed=3)
    small = load_data("cifar10", tmp_path, val_fraction=0.2, seed=3, max_train=30)
    again = load_data("cifar10", tmp_path, val_fraction=0.2, seed=3, max_train=30)
    assert len(small.train) == 30
    assert _ids(small.train.images) <= _ids(full.train.images)
    assert torch.equal(small.val.images, full.val.images)
    assert torch.equal(small.test.images, full.test.images)
    assert torch.equal(small.train.images, again.train.images)
    assert len(load_data("cifar10", tmp_path, val_fraction=0.2, max_train=10_000).train) == 80


@pytest.mark.parametrize("bad", [0, -5])
def test_max_train_must_be_positive(tmp_path: Path, bad: int) -> None:
    write_cifar10(tmp_path)
    with pytest.raises(DataError, match="max_train"):
        load_data("cifar10", tmp_path, max_train=bad)


@pytest.mark.parametrize("dataset", ["digits", "imagefolder"])
def test_image_size_must_be_positive(tmp_path: Path, dataset: str) -> None:
    write_imagefolder(tmp_path)
    with pytest.raises(DataError, match="image_size must be a positive"):
        load_data(dataset, tmp_path, image_size=0)


def test_stratified_split_rounds_per_class() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    kept, taken = stratified_split(labels, 0.3, seed=0)
    assert Counter(labels[taken].tolist()) == {0: 3, 1: 2}  # 3.0, 1.5 -> 2, 0.3 -> 0
    assert torch.equal(torch.sort(torch.cat([kept, taken])).values, torch.arange(16))
    assert torch.all(kept[1:] > kept[:-1]) and torch.all(taken[1:] > taken[:-1])


# --- batching -----------------------------------------------------------------------------


def test_iterate_batches_order_shuffle_and_drop_last(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    data = load_data("cifar10", tmp_path, val_fraction=0.0).train
    plain = list(iterate_batches(data, 32))
    assert [len(y) for _, y in plain] == [32, 32, 32, 4]
    assert torch.equal(torch.cat([x for x, _ in plain]), data.images)
    dropped = list(iterate_batches(data, 32, drop_last=True))
    assert [len(y) for _, y in dropped] == [32, 32, 32]
    gen = torch.Generator().manual_seed(5)
    shuffled = torch.cat([y for _, y in iterate_batches(data, 32, shuffle=True, generator=gen)])
    order = torch.randperm(100, generator=torch.Generator().manual_seed(5))
    assert torch.equal(shuffled, data.labels[order])


# --- augmentation and normalisation -------------------------------------------------------


def _random_images(n: int, size: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _windows(image: torch.Tensor, padding: int) -> list[tuple[int, int, torch.Tensor]]:
    """Every (row offset, column offset, window) of the zero-padded image."""
    _, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    span = 2 * padding + 1
    return [(r, c, padded[:, r : r + h, c : c + w]) for r in range(span) for c in range(span)]


@pytest.mark.parametrize("padding", [1, 2, 4])
def test_random_crop_is_a_shifted_window_of_the_padded_image(padding: int) -> None:
    images = _random_images(64)
    out = random_crop(images, padding, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    offsets = set()
    for original, cropped in zip(images, out, strict=True):
        matches = [(r, c) for r, c, win in _windows(original, padding) if torch.equal(win, cropped)]
        assert len(matches) == 1  # pixels are never zero, so exactly one window fits
        offsets.add(matches[0])
    assert len(offsets) > 1  # not the same shift for the whole batch


def test_random_crop_reaches_every_shift() -> None:
    images = _random_images(600, size=4)
    out = random_crop(images, 1, torch.Generator().manual_seed(2))
    seen = set()
    for original, cropped in zip(images, out, strict=True):
        seen |= {(r, c) for r, c, win in _windows(original, 1) if torch.equal(win, cropped)}
    assert seen == {(r, c) for r in range(3) for c in range(3)}


def test_reflect_padding_fills_the_border_with_the_mirrored_image() -> None:
    images = _random_images(32, size=6)
    offsets = torch.randint(0, 5, (2, 32), generator=torch.Generator().manual_seed(3))
    out = crop_at(images, 2, offsets, "reflect")
    for image, cropped, (r, c) in zip(images, out, offsets.T.tolist(), strict=True):
        padded = torch.nn.functional.pad(image[None].float(), (2,) * 4, mode="reflect")[0]
        assert torch.equal(cropped, padded[:, r : r + 6, c : c + 6].to(torch.uint8))
    assert (out > 0).all()  # no black band: every pixel comes from the image (pixels >= 1)
    assert not torch.equal(out, crop_at(images, 2, offsets))  # the zero-padded crop differs


def test_the_config_sets_the_padding_mode_and_refuses_reflect_wider_than_the_image() -> None:
    from helpers import tiny_config

    splits = load_splits(tiny_config("data.crop_padding=2", "data.crop_padding_mode=reflect"))
    assert splits.augment.crop_padding_mode == "reflect"
    assert load_splits(tiny_config()).augment.crop_padding_mode == "zeros"
    with pytest.raises(DataError, match="reflect needs crop_padding < the image side"):
        load_splits(tiny_config("data.crop_padding=16", "data.crop_padding_mode=reflect"))


def test_an_unknown_padding_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="zeros, reflect"):
        crop_at(_random_images(2), 1, torch.zeros(2, 2, dtype=torch.long), "wrap")


def test_random_crop_padding_zero_is_identity() -> None:
    images = _random_images(4)
    assert torch.equal(random_crop(images, 0), images)


def test_random_flip_mirrors_about_half() -> None:
    images = _random_images(4000, size=4)
    out = random_flip(images, torch.Generator().manual_seed(3))
    same = (out == images).flatten(1).all(1)
    mirrored = (out == images.flip(3)).flatten(1).all(1)
    assert bool((same | mirrored).all())  # each image either untouched or exactly mirrored
    assert not bool((same & mirrored).any())  # (random images are never symmetric)
    assert 0.46 < mirrored.float().mean().item() < 0.54


def test_augment_same_seed_same_output_other_seed_differs() -> None:
    images = _random_images(32)
    spec = AugmentSpec(crop_padding=2, flip=True)
    a = augment(images, spec, torch.Generator().manual_seed(11))
    b = augment(images, spec, torch.Generator().manual_seed(11))
    c = augment(images, spec, torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_without_flip_never_mirrors() -> None:
    images = _random_images(200)
    out = augment(images, AugmentSpec(crop_padding=1, flip=False), torch.Generator())
    for original, cropped in zip(images, out, strict=True):
        assert any(torch.equal(win, cropped) for _, _, win in _windows(original, 1))


def test_digits_and_svhn_never_flip(tmp_path: Path) -> None:
    write_svhn(tmp_path)
    for splits in (load_data("digits"), load_data("svhn", tmp_path)):
        assert splits.augment.flip is False
        assert splits.augment.crop_padding == 2


def test_normalize_with_channel_stats_gives_zero_mean_unit_std(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    for splits in (load_data("digits"), load_data("cifar10", tmp_path)):
        x = normalize(splits.train.images, splits.mean, splits.std).double()
        assert x.dtype == torch.float64
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3), unbiased=False)
        assert torch.allclose(mean, torch.zeros(3, dtype=torch.float64), atol=1e-4)
        assert torch.allclose(std, torch.ones(3, dtype=torch.float64), atol=1e-4)


def test_channel_stats_in_unit_range_and_chunk_independent() -> None:
    images = torch.stack(
        [torch.full((8, 8), 0), torch.full((8, 8), 255), torch.arange(64).view(8, 8)]
    ).to(torch.uint8)[None]
    images = images.repeat(10, 1, 1, 1)
    mean, std = channel_stats(images)
    assert mean[0] == 0.0 and mean[1] == 1.0
    assert std[0] == 1.0 and std[1] == 1.0  # constant channels are left unscaled
    assert mean[2] == pytest.approx(31.5 / 255)
    assert std[2] == pytest.approx(np.arange(64).std() / 255)
    chunked_mean, chunked_std = channel_stats(images, chunk=3)
    assert chunked_mean == pytest.approx(mean) and chunked_std == pytest.approx(std)


def test_prepare_batch_eval_is_deterministic_normalisation(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    splits = load_data("cifar10", tmp_path)
    batch = splits.test.images[:8]
    x = prepare_batch(batch, splits, train=False)
    assert torch.equal(x, normalize(batch, splits.mean, splits.std))
    g = torch.Generator().manual_seed(0)
    y = prepare_batch(batch, splits, train=True, generator=g)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert not torch.equal(x, y)


def test_the_cifar10_loader_points_an_imagefolder_copy_to_its_loader(tmp_path: Path) -> None:
    """Through the Python API (no CLI layout detection) a JPEG copy given as cifar10 fails
    with a line that says which loader reads it."""
    write_imagefolder(tmp_path, per_class=(1, 1))
    with pytest.raises(DataError, match="ImageFolder copy is read with data.name = imagefolder"):
        load_data("cifar10", tmp_path)
    with pytest.raises(DataError) as missing:
        load_data("cifar10", tmp_path / "train")  # class folders, no train/ and test/
    assert "imagefolder" not in str(missing.value)
