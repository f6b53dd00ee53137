"""Crafted checkpoints and ONNX exports: refused at load, with the bad field named.

Sizes that would make erde allocate without bound are tried in a child
process under an address-space limit, so a regression fails the test instead
of bringing the machine down.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hostile import SRC, crafted_checkpoint, erde, one_error_line, png

from erde.checkpoints import load_checkpoint
from erde.cli import main
from erde.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")

MEMORY_LIMIT = 3 << 30  # the child needs ~0.7 GB for Python + torch; a 1e11-pixel image needs 1e12


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    return png(tmp_path_factory.mktemp("img") / "a.png", np.full((8, 8, 3), 120, np.uint8))


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"image_shape": [3, 100_000, 100_000]}, "image_shape[1] (height)"),
        ({"model_config": {"width": 1e6}}, "width must be a number in (0, 16]"),
    ],
    ids=["huge_image_shape", "huge_width"],
)
def test_crafted_sizes_are_refused_before_allocating(
    tiny_run, tmp_path: Path, image: Path, changes: dict, named: str
) -> None:
    bad = crafted_checkpoint(tiny_run["teacher"], tmp_path / "bad" / "checkpoint.pt", **changes)
    done = erde("predict", str(bad), str(image), "--threshold", "0.5", memory_limit=MEMORY_LIMIT)
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and named in line and str(bad) in line
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"mean": [float("nan")] * 3}, "mean must be finite"),
        ({"std": [0.0, 1.0, 1.0]}, "std must be > 0"),
        ({"std": [float("inf")] * 3}, "std must be finite"),
        (
            {"class_names": ["only", "three", "names"]},
            "class_names has 3 names but num_classes is 10",
        ),
        ({"model_config": {"head_hidden": 10**9}}, "head_hidden must be an integer in [0, 65536]"),
        ({"num_classes": 10**9}, "num_classes must be an integer in [1, 100000]"),
        ({"image_shape": [64, 8, 8]}, "image_shape[0] (channels)"),
    ],
    ids=[
        "nan_mean",
        "zero_std",
        "inf_std",
        "short_class_names",
        "huge_head",
        "huge_num_classes",
        "many_channels",
    ],
)
def test_bad_sizes_statistics_and_names_are_refused_at_load(
    tiny_run, tmp_path: Path, changes: dict, named: str
) -> None:
    bad = crafted_checkpoint(tiny_run["teacher"], tmp_path / "bad.pt", **changes)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert named in str(info.value) and str(bad) in str(info.value)


def test_nan_weight_is_refused_naming_it(tiny_run, tmp_path: Path, image: Path, capsys) -> None:
    ckpt = torch.load(tiny_run["teacher"], weights_only=True)
    name = next(k for k, v in ckpt["model"].items() if v.is_floating_point())
    weights = {**ckpt["model"], name: torch.full_like(ckpt["model"][name], math.nan)}
    bad = crafted_checkpoint(tiny_run["teacher"], tmp_path / "nan.pt", model=weights)
    assert main(["predict", str(bad), str(image), "--threshold", "0.5"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no "probability": NaN line
    assert name in one_error_line(captured.err)


# --------------------------------------------------------------------------- ONNX exports


def _edited_export(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(changes)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


def test_crafted_manifest_size_is_refused_before_allocating(
    tiny_export, tmp_path: Path, image: Path
) -> None:
    folder = _edited_export(tiny_export["dir"], tmp_path / "export", image_shape=[3, 10**5, 10**5])
    done = erde("predict", str(folder), str(image), "--threshold", "0.5", memory_limit=4 << 30)
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and "image_shape[1] (height)" in line
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"mean": [float("nan")] * 3}, "mean must be finite"),
        ({"std": [0.0, 0.0, 0.0]}, "std must be > 0"),
        ({"class_names": None, "model": "num_classes"}, "model.num_classes"),
    ],
    ids=["nan_mean", "zero_std", "huge_num_classes"],
)
def test_crafted_manifest_statistics_are_refused_naming_the_field(
    tiny_export, tmp_path: Path, image: Path, capsys, changes: dict, named: str
) -> None:
    if changes.get("model") == "num_classes":  # keep the rest of the model entry as it was
        manifest = json.loads((tiny_export["dir"] / "manifest.json").read_text())
        changes = {**changes, "model": {**manifest["model"], "num_classes": 10**9}}
    folder = _edited_export(tiny_export["dir"], tmp_path / "export", **changes)
    assert main(["predict", str(folder), str(image), "--threshold", "0.5"]) == 2
    captured = capsys.readouterr()
    assert named in one_error_line(captured.err) and captured.out == ""


def test_stage_graph_not_the_manifests_with_its_checksum_updated_is_refused(
    tiny_export, tmp_path: Path, image: Path, capsys
) -> None:
    """Stage 2's graph in stage 1's place: another network's inputs and outputs."""
    folder = _edited_export(tiny_export["dir"], tmp_path / "export")
    shutil.copy(folder / "stage_2.onnx", folder / "stage_1.onnx")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["stages"][1]["sha256"] = hashlib.sha256(
        (folder / "stage_1.onnx").read_bytes()
    ).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["predict", str(folder), str(image), "--threshold", "0.5"]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert "stage_1.onnx does not fit the manifest" in line and captured.out == ""


def test_stage_graph_with_a_nan_weight_and_its_checksum_updated_is_refused(
    tiny_export, tmp_path: Path, image: Path, capsys
) -> None:
    """A damaged graph would answer nan for every image: refused at load, naming the tensor."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    folder = _edited_export(tiny_export["dir"], tmp_path / "export")
    graph_file = folder / "stage_1.onnx"
    model = onnx.load(str(graph_file))
    weight = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT)
    values = numpy_helper.to_array(weight).copy()
    values.flat[0] = np.nan
    weight.CopyFrom(numpy_helper.from_array(values, weight.name))
    onnx.save(model, str(graph_file))
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["stages"][1]["sha256"] = hashlib.sha256(graph_file.read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert main(["predict", str(folder), str(image), "--threshold", "0.5"]) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert f"stage_1.onnx: weight {weight.name!r} holds nan or inf" in line and captured.out == ""


def test_export_with_an_opset_the_exporter_cannot_write_fails_and_claims_nothing(
    tiny_run, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "export"
    assert main(["export", str(tiny_run["teacher"]), "--out", str(out), "--opset", "999"]) == 2
    assert "opset" in one_error_line(capsys.readouterr().err)
    assert not (out / "manifest.json").exists()


def test_resume_from_a_checkpoint_with_damaged_training_state_is_one_line(
    tiny_run, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "teacher"
    ckpt = torch.load(tiny_run["teacher"], weights_only=True)
    del ckpt["optimizer"]
    out.mkdir()
    torch.save({**ckpt, "finished": False, "epoch": 0}, out / "checkpoint.pt")
    before = (out / "checkpoint.pt").read_bytes()
    config = tiny_run["teacher"].parent / "config.yaml"
    argv = [
        "train-teacher",
        "--config",
        str(config),
        "--out",
        str(out),
        "--resume",
        "--no-progress",
    ]
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "cannot be resumed" in line and "optimizer" in line and "--force" in line
    assert (out / "checkpoint.pt").read_bytes() == before


def test_manifest_cost_too_large_for_an_integer_is_refused(
    tiny_export, tmp_path: Path, capsys
) -> None:
    from erde.inference.export import ExportError, read_manifest

    manifest = json.loads((tiny_export["dir"] / "manifest.json").read_text())
    huge = [2**100] * len(manifest["macs_per_exit"])
    folder = _edited_export(tiny_export["dir"], tmp_path / "export", macs_per_exit=huge)
    with pytest.raises(ExportError, match=r"macs_per_exit\[0\] must be an integer"):
        read_manifest(folder)


def test_predict_does_not_block_on_a_fifo(tiny_run, tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert main(["predict", str(tiny_run["teacher"]), str(fifo), "--threshold", "0.5"]) == 1
    record = json.loads(capsys.readouterr().out)
    assert "not a regular file" in record["error"]


# --------------------------------------------------------------------------- code by import path


@pytest.fixture
def planted_module(tmp_path: Path) -> tuple[Path, Path]:
    """A module that leaves a mark file when imported, and the folder that makes it importable."""
    folder, mark = tmp_path / "planted", tmp_path / "imported"
    folder.mkdir()
    (folder / "erde_planted.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    return folder, mark


@pytest.mark.parametrize("arch", ["erde_planted:x", "erde_planted.sub:x", "PIL.__main__:x"])
def test_a_checkpoint_naming_a_module_imports_nothing_unless_trusted(
    tiny_run, tmp_path: Path, image: Path, planted_module: tuple[Path, Path], arch: str
) -> None:
    folder, mark = planted_module
    bad = crafted_checkpoint(
        tiny_run["teacher"], tmp_path / "bad" / "checkpoint.pt", model_config={"arch": arch}
    )
    module = arch.partition(":")[0]
    done = erde(
        "predict", str(bad), str(image), "--threshold", "0.5", env={"PYTHONPATH": f"{SRC}:{folder}"}
    )
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and done.stdout == ""
    assert f"names the module {module!r}" in line and f"--trust-module {module}" in line
    assert not mark.exists()


def test_trust_module_lets_the_user_opt_in_and_the_factory_mark_still_applies(
    tiny_run, tmp_path: Path, image: Path, planted_module: tuple[Path, Path]
) -> None:
    folder, mark = planted_module
    bad = crafted_checkpoint(
        tiny_run["teacher"], tmp_path / "bad" / "checkpoint.pt",
        model_config={"arch": "erde_planted:x"},
    )  # fmt: skip
    done = erde(
        "predict", str(bad), str(image), "--threshold", "0.5", "--trust-module", "erde_planted",
        env={"PYTHONPATH": f"{SRC}:{folder}"},
    )  # fmt: skip
    line = one_error_line(done.stderr)
    assert done.returncode == 2 and mark.exists()  # imported: the user asked for it
    assert "has no 'x'" in line


def test_model_from_checkpoint_refuses_an_untrusted_module_in_python(tiny_run, tmp_path) -> None:
    from erde.checkpoints import model_from_checkpoint

    bad = crafted_checkpoint(
        tiny_run["teacher"], tmp_path / "checkpoint.pt", model_config={"arch": "erde_nowhere:x"}
    )
    with pytest.raises(CheckpointError, match="trust_modules=\\['erde_nowhere'\\]"):
        model_from_checkpoint(load_checkpoint(bad))
    with pytest.raises(CheckpointError, match="cannot import 'erde_nowhere'"):
        model_from_checkpoint(load_checkpoint(bad), trust_modules=["erde_nowhere"])


# --------------------------------------------------------------------------- oversized records


def _bomb(source: Path, target: Path, unpacked: int) -> Path:
    """``source`` with an extra field whose record is ``unpacked`` deflated zero bytes."""
    import zipfile

    marker = 12_345  # a record size no real field has, to find the field's record
    plain = crafted_checkpoint(
        source, target.with_suffix(".plain"), junk=torch.zeros(marker, dtype=torch.uint8)
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            if info.file_size != marker:
                dst.writestr(info, src.read(info))
                continue
            record = zipfile.ZipInfo(info.filename)
            record.compress_type = zipfile.ZIP_DEFLATED
            with dst.open(record, "w", force_zip64=True) as out:
                chunk = bytes(1 << 20)
                for _ in range(unpacked >> 20):
                    out.write(chunk)
    return target


def test_a_compression_bomb_in_a_checkpoint_is_refused_before_it_is_inflated(
    tiny_run, tmp_path: Path, image: Path
) -> None:
    import zipfile

    bomb = _bomb(tiny_run["teacher"], tmp_path / "bomb" / "checkpoint.pt", 256 << 20)
    with zipfile.ZipFile(bomb) as archive:  # the deflated record really is there
        archive.getinfo(
            next(n for n in archive.namelist() if archive.getinfo(n).file_size == 256 << 20)
        )
    for argv in (
        ["predict", str(bomb), str(image), "--threshold", "0.5"],
        ["status", str(bomb.parent)],
    ):
        done = erde(*argv, memory_limit=MEMORY_LIMIT)
        text = done.stderr if argv[0] == "predict" else done.stdout
        assert "compression bomb" in text and "268,435,456 bytes" in text, done
        if argv[0] == "predict":
            assert done.returncode == 2 and one_error_line(done.stderr)
        else:
            assert "unreadable" in text


def test_a_field_erde_never_writes_is_refused(tiny_run, tmp_path: Path) -> None:
    bad = crafted_checkpoint(
        tiny_run["teacher"], tmp_path / "extra.pt", junk=torch.zeros(3), **{"x" * 500: 1}
    )
    with pytest.raises(
        CheckpointError, match="field\\(s\\) erde never writes \\('junk', 'xxx"
    ) as info:
        load_checkpoint(bad)
    assert len(str(info.value)) < 400  # the long name is cut
    for key in ("lookahead", "teacher_sha256"):  # written by newer training code: accepted
        load_checkpoint(
            crafted_checkpoint(tiny_run["teacher"], tmp_path / f"{key}.pt", **{key: None})
        )
