"""Staged ONNX export: parity with PyTorch, later stages really skipped, broken folders refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from erde import exits
from erde.checkpoints import load_checkpoint, model_from_checkpoint
from erde.cli import main
from erde.config import config_from_dict
from erde.data import load_splits, prepare_batch
from erde.inference import EarlyExitRouter, ExitPolicy, Routed

ort = pytest.importorskip("onnxruntime")

from erde.inference.export import ExportError, OnnxEarlyExitRuntime, read_manifest  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tiny_export) -> dict:
    """The tiny teacher, calibrated then exported once through the CLI, and its test images."""
    ckpt = tiny_export["ckpt"]
    loaded = load_checkpoint(ckpt)
    splits = load_splits(config_from_dict(loaded["config"]))
    x = prepare_batch(splits.test.images, splits, train=False)
    model = model_from_checkpoint(loaded).eval()
    return {"ckpt": ckpt, "dir": tiny_export["dir"], "model": model, "x": x, "splits": splits}


def _middle_policy(model: torch.nn.Module, x: torch.Tensor) -> ExitPolicy:
    """A threshold at the median exit-0 score, so that images leave at every exit."""
    with torch.inference_mode():
        scores = exits.rule_score(model(x)[0], "entropy")
    return ExitPolicy.create(scores.median().item(), "entropy", 10, model.num_exits)


@pytest.mark.parametrize("batch_size", [1, 64])
def test_onnx_runtime_gives_the_same_exits_and_answers_as_pytorch(exported, batch_size) -> None:
    model, x = exported["model"], exported["x"]
    policy = _middle_policy(model, x)
    router = EarlyExitRouter(model, policy)
    runtime = OnnxEarlyExitRuntime(exported["dir"], policy)
    n = len(x) if batch_size > 1 else 96
    ours = Routed.concat([router(x[i : i + batch_size]) for i in range(0, n, batch_size)])
    theirs = Routed.concat([runtime(x[i : i + batch_size]) for i in range(0, n, batch_size)])
    # an image may only switch exit if its score sits within float tolerance of the threshold
    borderline = (ours.scores - policy.thresholds[0]).abs() < 1e-4
    same = ours.exit_index == theirs.exit_index
    assert bool((same | borderline).all()) and same.float().mean() > 0.98
    assert len(set(ours.exit_index.tolist())) == model.num_exits
    assert torch.equal(ours.classes[same], theirs.classes[same])
    torch.testing.assert_close(
        theirs.probabilities[same], ours.probabilities[same], atol=1e-4, rtol=1e-3
    )
    assert torch.equal(theirs.macs, runtime.macs[theirs.exit_index])
    assert torch.equal(runtime.macs, router.macs_per_exit((3, 8, 8), torch.device("cpu")))


def test_later_stages_run_only_on_images_still_in_flight(exported) -> None:
    model, x = exported["model"], exported["x"][:64]
    policy = _middle_policy(model, exported["x"])
    runtime = OnnxEarlyExitRuntime(exported["dir"], policy)
    seen: list[tuple[int, int]] = []

    class Recording:
        def __init__(self, i: int, session) -> None:
            self.i, self.session = i, session

        def run(self, names, feeds):
            seen.append((self.i, len(feeds["input"])))
            return self.session.run(names, feeds)

    runtime.sessions = [Recording(i, s) for i, s in enumerate(runtime.sessions)]
    out = runtime(x)
    in_flight = [len(x)] + [int((out.exit_index >= i).sum()) for i in range(1, model.num_exits)]
    assert seen == [(i, n) for i, n in enumerate(in_flight) if n > 0]
    assert in_flight[-1] < len(x)  # the last stage really was spared for some images
    seen.clear()
    everyone_leaves = ExitPolicy.create(exits.rule_range("entropy", 10)[1], "entropy", 10, 3)
    OnnxEarlyExitRuntime.__call__(_with(runtime, everyone_leaves), x)
    assert seen == [(0, len(x))]


def _with(runtime: OnnxEarlyExitRuntime, policy: ExitPolicy) -> OnnxEarlyExitRuntime:
    runtime.policy = policy
    return runtime


def test_export_folder_carries_manifest_and_thresholds(exported) -> None:
    manifest = read_manifest(exported["dir"])
    assert [s["file"] for s in manifest["stages"]] == [
        "stage_0.onnx",
        "stage_1.onnx",
        "stage_2.onnx",
    ]
    assert manifest["image_shape"] == [3, 8, 8] and manifest["class_names"][0] == "0"
    calibrated = json.loads((exported["ckpt"].parent / "checkpoint.thresholds.json").read_text())
    shipped = json.loads((exported["dir"] / "thresholds.json").read_text())
    assert shipped == calibrated
    assert OnnxEarlyExitRuntime(exported["dir"]).policy.thresholds == tuple(
        calibrated["thresholds"]
    )
    for i, session in enumerate(OnnxEarlyExitRuntime(exported["dir"]).sessions):
        shapes = {o.name: o.shape for o in session.get_outputs()}
        assert set(shapes) == {"features", "logits"} and shapes["logits"][1] == 10, i
        assert isinstance(session.get_inputs()[0].shape[0], str)  # dynamic batch


def _broken_copy(exported, tmp_path: Path) -> Path:
    folder = tmp_path / "onnx"
    shutil.copytree(exported["dir"], folder)
    return folder


def test_missing_or_altered_stage_is_a_clear_error(exported, tmp_path, capsys) -> None:
    folder = _broken_copy(exported, tmp_path)
    (folder / "stage_1.onnx").unlink()
    with pytest.raises(ExportError, match="lacks stage_1.onnx"):
        OnnxEarlyExitRuntime(folder)
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", str(folder), str(image)]) == 2
    assert "lacks stage_1.onnx" in capsys.readouterr().err
    shutil.copy(exported["dir"] / "stage_2.onnx", folder / "stage_1.onnx")
    with pytest.raises(ExportError, match="does not match the manifest"):
        OnnxEarlyExitRuntime(folder)
    manifest = json.loads((exported["dir"] / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "mean": [0.5]}))
    with pytest.raises(ExportError, match="malformed"):
        OnnxEarlyExitRuntime(folder)
    (folder / "manifest.json").write_text("{oops")
    with pytest.raises(ExportError, match="not readable JSON"):
        OnnxEarlyExitRuntime(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ExportError, match="no manifest.json"):
        OnnxEarlyExitRuntime(folder)


def test_thresholds_of_another_model_are_refused(exported, tiny_run, tmp_path, capsys) -> None:
    folder = _broken_copy(exported, tmp_path)
    student = tmp_path / "student.json"
    assert main(["calibrate", str(tiny_run["student_erde"]), "--budget", "0.8", "--out",
                 str(student), "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    shutil.copy(student, folder / "thresholds.json")
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (8, 8)).save(image)
    assert main(["predict", str(folder), str(image)]) == 2
    assert "calibrated for another model" in capsys.readouterr().err
    assert main(["export", str(exported["ckpt"]), "--out", str(tmp_path / "x"),
                 "--thresholds-file", str(student)]) == 2  # fmt: skip
    assert "another model" in capsys.readouterr().err


def test_predict_through_onnx_matches_predict_through_pytorch(exported, tmp_path, capsys) -> None:
    from PIL import Image

    images = exported["splits"].test.images[:20]
    for i, img in enumerate(images):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i:02d}.png")
    results = {}
    for source in (exported["ckpt"], exported["dir"]):
        assert main(["predict", str(source), str(tmp_path)]) == 0
        results[source] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    torch_rows, onnx_rows = results.values()
    threshold = json.loads((exported["dir"] / "thresholds.json").read_text())["thresholds"][0]
    assert len(torch_rows) == 20
    for a, b in zip(torch_rows, onnx_rows, strict=True):
        assert a["file"] == b["file"]
        if abs(a["score"] - threshold) > 1e-4:  # not on the fence: same exit, class and cost
            assert (a["exit"], a["class"], a["macs"]) == (b["exit"], b["class"], b["macs"])
            assert a["score"] == pytest.approx(b["score"], abs=1e-4)
