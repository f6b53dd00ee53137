"""A user's own network: by import path from a real module file, through the same commands.

The module is written to a temporary folder and imported the ordinary way
(that folder on ``sys.path``, or on ``PYTHONPATH`` for a separate process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import TINY_OVERRIDES
from torch import nn

from erde import exits
from erde.checkpoints import load_checkpoint, model_from_checkpoint
from erde.cli import main
from erde.config import config_from_dict, load_config
from erde.data import load_splits, prepare_batch
from erde.errors import ConfigError
from erde.inference import EarlyExitRouter, ExitPolicy
from erde.losses import exit_mapping_by_cost
from erde.models import EarlyExitNet, ModelConfigError, build_model, measure_exit_costs
from erde.models.custom import import_factory

pytestmark = pytest.mark.usefixtures("one_thread")

SRC = Path(__file__).resolve().parents[1] / "src"
MODULE = "erde_user_nets"
NETS = """
import os

import torch
from torch import nn

from erde.models import backbone_factory

if os.environ.get("ERDE_USER_NETS_MARK"):
    open(os.environ["ERDE_USER_NETS_MARK"], "w").close()  # tells a test the module was imported


def conv_block(in_ch, out_ch, stride=1):
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()
    )


class TinyNet(nn.Module):
    def __init__(self, num_classes, in_channels=3, width=1.0):
        super().__init__()
        c = max(4, round(8 * width))
        self.stem = conv_block(in_channels, c)
        self.blocks = nn.ModuleList(
            [conv_block(c, c), conv_block(c, 2 * c, 2), conv_block(2 * c, 2 * c)]
        )
        self.classifier = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes)
        )

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)


@backbone_factory
def tiny(num_classes, in_channels=3, width=1.0):
    return TinyNet(num_classes, in_channels, width)


@backbone_factory
def mixed(num_classes, in_channels=3, width=1.0):
    # one block of each erde family in one network: every kind of op crosses the ONNX export
    from erde.models.mobilenetv2 import InvertedResidual
    from erde.models.resnet import BasicBlock
    from erde.models.vgg import VGGBlock
    from erde.models.wrn import WideBlock

    c = max(4, round(8 * width))
    blocks = [BasicBlock(c, c, 1, "A"), WideBlock(c, 2 * c, 2), InvertedResidual(2 * c, 2 * c, 1, 6),
              VGGBlock(2 * c, 2 * c, pool=True)]
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * c, num_classes))
    return conv_block(in_channels, c), blocks, head


@backbone_factory
def as_tuple(num_classes, in_channels=3):
    net = TinyNet(num_classes, in_channels)
    return net.stem, list(net.blocks), net.classifier


@backbone_factory
def fixed_width(num_classes, in_channels=3):
    return TinyNet(num_classes, in_channels)


def unmarked(num_classes, in_channels=3):
    return TinyNet(num_classes, in_channels)


@backbone_factory
def plain_sequential(num_classes, in_channels=3):
    net = TinyNet(num_classes, in_channels)
    return nn.Sequential(net.stem, *net.blocks, net.classifier)


@backbone_factory
def one_block(num_classes, in_channels=3):
    net = TinyNet(num_classes, in_channels)
    return net.stem, nn.Conv2d(8, 8, 1), net.classifier


@backbone_factory
def flat_blocks(num_classes, in_channels=3):
    net = TinyNet(num_classes, in_channels)
    return net.stem, [nn.Flatten(), nn.Identity()], nn.LazyLinear(num_classes)


@backbone_factory
def broken(num_classes, in_channels=3):
    raise RuntimeError("out of cheese")
"""


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The folder holding ``erde_user_nets.py``, on ``sys.path`` for this module's tests."""
    folder = tmp_path_factory.mktemp("user_code")
    (folder / f"{MODULE}.py").write_text(textwrap.dedent(NETS), encoding="utf-8")
    sys.path.insert(0, str(folder))
    try:
        yield folder
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(MODULE, None)


# --------------------------------------------------------------------------- building


def test_factory_by_import_path_builds_an_early_exit_network(user_module: Path) -> None:
    torch.manual_seed(0)
    model = build_model(f"{MODULE}:tiny", 10, input_shape=(3, 8, 8))
    assert model.arch == f"{MODULE}:tiny" and model.num_blocks == 3
    assert model.exit_after == [1, 2] and model.exit_channels == [8, 16, 16]
    torch.manual_seed(0)  # the factory draws its weights first, so the same seed gives the same net
    net = import_factory(f"{MODULE}:tiny")(10).eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x)[-1], net(x))  # the last exit is the user's own network


def test_tuple_factory_width_and_exit_options(user_module: Path) -> None:
    parts = build_model(f"{MODULE}:as_tuple", 10, input_shape=(1, 8, 8), in_channels=1)
    assert parts.num_blocks == 3 and parts.exit_channels == [8, 16, 16]
    narrow = build_model(f"{MODULE}:tiny", 5, width=0.5, exit_after=[2], input_shape=(3, 8, 8))
    assert narrow.exit_channels == [8, 8] and narrow.num_exits == 2
    placed = build_model(f"{MODULE}:tiny", 5, exit_at_macs=[0.5], input_shape=(3, 8, 8))
    assert placed.num_exits == 2


@pytest.mark.parametrize(
    ("arch", "kwargs", "message"),
    [
        ("erde_no_such_module:tiny", {}, "cannot import 'erde_no_such_module'"),
        (f"{MODULE}:missing", {}, f"module '{MODULE}' has no 'missing'"),
        ("os:system", {}, "standard-library module"),
        (f"{MODULE}:unmarked", {}, "not marked as a backbone factory"),
        (f"{MODULE}:plain_sequential", {}, "returned Sequential, not a backbone"),
        (f"{MODULE}:one_block", {}, "blocks is one Conv2d, not a sequence"),
        (f"{MODULE}:flat_blocks", {}, "block 0 returned (1, 512), exits need (B, C, H, W)"),
        (f"{MODULE}:broken", {}, "the factory raised RuntimeError: out of cheese"),
        (f"{MODULE}:fixed_width", {"width": 0.5}, "takes no 'width' argument"),
        (f"{MODULE}:tiny:x", {}, "not an import path"),
    ],
)
def test_bad_user_factories_are_one_clear_error(
    user_module: Path, arch: str, kwargs: dict, message: str
) -> None:
    with pytest.raises(ModelConfigError) as info:
        build_model(arch, 10, input_shape=(3, 8, 8), **kwargs)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert arch in text  # names the import path the user gave


def test_the_module_is_imported_only_when_a_model_names_it(
    user_module: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mark = tmp_path / "imported"
    monkeypatch.setenv("ERDE_USER_NETS_MARK", str(mark))
    sys.modules.pop(MODULE, None)
    cfg = load_config(None, [f"teacher.arch={MODULE}:tiny"])  # naming it in a config: no import
    assert cfg.teacher.arch == f"{MODULE}:tiny" and not mark.exists()
    build_model("resnet8", 10)
    assert not mark.exists()
    build_model(cfg.teacher.arch, 10, input_shape=(3, 8, 8))
    assert mark.exists()
    with pytest.raises(ModelConfigError, match="standard-library"):
        build_model("antigravity:x", 10)  # refused before anything is imported
    assert "antigravity" not in sys.modules


def test_from_blocks_wraps_modules_and_checks_them() -> None:
    stem = nn.Conv2d(3, 4, 3, padding=1)
    blocks = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(6, 6, 3, stride=2, padding=1))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))
    model = EarlyExitNet.from_blocks(stem, blocks, head, input_shape=(3, 8, 8), exit_after=[1])
    assert model.num_classes == 3 and model.exit_channels == [6, 6]
    assert model.stages[0][0] is stem and model.exits[-1] is head  # not copied
    assert [o.shape for o in model(torch.randn(2, 3, 8, 8))] == [(2, 3), (2, 3)]
    with pytest.raises(ModelConfigError, match="gives 3 outputs, the data set has 10"):
        EarlyExitNet.from_blocks(stem, blocks, head, input_shape=(3, 8, 8), num_classes=10)
    bad = [nn.Conv2d(4, 6, 3), nn.Conv2d(5, 6, 3)]  # 6 channels out, 5 expected in
    with pytest.raises(ModelConfigError, match="block 1 failed"):
        EarlyExitNet.from_blocks(stem, bad, head, input_shape=(3, 8, 8))
    with pytest.raises(ModelConfigError, match="non-empty sequence"):
        EarlyExitNet.from_blocks(stem, [], head, input_shape=(3, 8, 8))


# --------------------------------------------------------------------------- the same commands


TINY_SET = [arg for o in TINY_OVERRIDES for arg in ("--set", o)]


@pytest.fixture(scope="module")
def cross_family_run(user_module: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`erde run`: the user's network as teacher, a MobileNetV2 student placed and paired by cost."""
    out = tmp_path_factory.mktemp("custom_run")
    argv = ["run", "--out", str(out), "--students", "kd,erde", "--no-progress", *TINY_SET,
            "--set", f"teacher.arch={MODULE}:mixed", "--set", "teacher.exit_after=[2]",
            "--set", "student.arch=mobilenetv2", "--set", "student.exit_at_macs=[0.3, 0.6]",
            "--set", "distill.exit_mapping_by=cost"]  # fmt: skip
    assert main(argv) == 0
    return out


def test_user_teacher_and_mobilenetv2_student_train_and_evaluate(cross_family_run: Path) -> None:
    out = cross_family_run
    teacher = load_checkpoint(out / "teacher")
    assert teacher["model_config"]["arch"] == f"{MODULE}:mixed"  # the import path is recorded
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student_kd", "student_erde"}
    assert report["models"]["teacher"]["arch"] == f"{MODULE}:mixed"
    student = load_checkpoint(out / "student_erde")
    s_model = model_from_checkpoint(student)  # a MobileNetV2: no module to trust
    t_model = model_from_checkpoint(teacher, trust_modules=[MODULE])
    assert s_model.num_exits == 3 and t_model.num_exits == 2
    shape = tuple(student["image_shape"])
    expected = exit_mapping_by_cost(
        measure_exit_costs(s_model, shape).macs_per_exit,
        measure_exit_costs(t_model, shape).macs_per_exit,
    )
    assert student["exit_mapping"] == expected and expected[-1] == 1


def test_user_model_calibrates_and_exports_with_onnx_runtime_parity(
    cross_family_run: Path, tmp_path: Path
) -> None:
    """The teacher holds one block of each family, so every kind of op crosses the export."""
    pytest.importorskip("onnxruntime")
    from erde.inference.export import OnnxEarlyExitRuntime

    ckpt = cross_family_run / "teacher" / "checkpoint.pt"
    assert main(["calibrate", str(ckpt), "--budget", "0.8", "--no-progress"]) == 2  # untrusted
    trust = ["--trust-module", MODULE]
    assert main(["calibrate", str(ckpt), "--budget", "0.8", "--no-progress", *trust]) == 0
    assert main(["export", str(ckpt), "--out", str(tmp_path / "onnx"), *trust]) == 0  # each graph
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert len(manifest["stages"]) == 2 and (tmp_path / "onnx" / "thresholds.json").is_file()

    loaded = load_checkpoint(ckpt)
    splits = load_splits(config_from_dict(loaded["config"]))
    x = prepare_batch(splits.test.images, splits, train=False)
    model = model_from_checkpoint(loaded, trust_modules=[MODULE]).eval()
    with torch.no_grad():
        scores = exits.rule_score(model(x)[0], "entropy")
    policy = ExitPolicy.create(scores.median().item(), "entropy", 10, 2)
    ours = EarlyExitRouter(model, policy)(x)
    theirs = OnnxEarlyExitRuntime(tmp_path / "onnx", policy)(x)
    borderline = (scores - policy.thresholds[0]).abs() < 1e-4
    same = ours.exit_index == theirs.exit_index
    assert bool((same | borderline).all()) and same.float().mean() > 0.98
    assert set(ours.exit_index.tolist()) == {0, 1}
    assert torch.equal(ours.classes[same], theirs.classes[same])
    torch.testing.assert_close(
        theirs.probabilities[same], ours.probabilities[same], atol=1e-4, rtol=1e-3
    )


def test_checkpoint_of_a_user_model_without_its_module_is_one_line_and_writes_nothing(
    cross_family_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "eval"
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "OMP_NUM_THREADS": "1",
    }  # the module's folder left out
    result = subprocess.run(
        [sys.executable, "-m", "erde.cli", "evaluate", str(cross_family_run / "teacher"),
         "--out", str(out), "--no-progress", "--trust-module", MODULE],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("erde: error: ") and result.stderr.count("\n") == 1
    assert f"'{MODULE}:mixed'" in result.stderr and f"cannot import '{MODULE}'" in result.stderr
    assert not out.exists()


def test_bad_import_path_on_the_command_line_trains_nothing(
    user_module: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--no-progress", *TINY_SET,
            "--set", "student.arch=erde_no_such_module:net"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("erde: error: ") and "\n" not in err
    assert "erde_no_such_module:net" in err and not out.exists()  # before the teacher trained


def test_same_boundary_exits_fail_before_the_teacher_trains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["run", "--out", str(out), "--no-progress", *TINY_SET,
            "--set", "student.exit_at_macs=[0.30, 0.32]"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "both land after block" in err and "\n" not in err and not out.exists()


def test_config_error_type_for_bad_exit_at_macs() -> None:
    with pytest.raises(ConfigError):
        load_config(None, ["student.exit_at_macs=[1.5]"])


def _own_network_page() -> tuple[str, list[list[str]]]:
    """docs/BACKBONES.md's "Your own network": the factory's Python block and the commands."""
    import re
    import shlex

    page = (Path(__file__).resolve().parents[1] / "docs" / "BACKBONES.md").read_text()
    section = page.split("## Your own network")[1]
    python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1).replace("\\\n", " ")
    commands = [shlex.split(line)[1:] for line in shell.splitlines() if line.strip()]
    return python, commands  # [1:]: without PYTHONPATH=.


def test_backbones_page_trains_a_student_of_your_own_network_too(
    tmp_path: Path, monkeypatch
) -> None:
    python, commands = _own_network_page()
    assert [c[1] for c in commands] == ["train-teacher", "train-student", "evaluate"]
    (tmp_path / "mypackage").mkdir()
    (tmp_path / "mypackage" / "__init__.py").write_text("")
    (tmp_path / "mypackage" / "models.py").write_text(python)
    monkeypatch.syspath_prepend(str(tmp_path))  # as PYTHONPATH=.
    monkeypatch.chdir(tmp_path)
    tiny = ["data.image_size=16", "teacher_train.epochs=1", "teacher_train.max_steps_per_epoch=2",
            "student_train.epochs=1", "student_train.max_steps_per_epoch=2", "device=cpu"]  # fmt: skip
    sets = [arg for o in tiny for arg in ("--set", o)]
    for command in commands:
        extra = ["--no-progress", *(sets if command[1].startswith("train") else [])]
        assert main([*command[1:], *extra]) == 0, command

    student = load_checkpoint(tmp_path / "runs" / "mine_student")
    assert student["model_config"]["arch"] == "mypackage.models:my_factory"
    assert (tmp_path / "runs" / "mine_report" / "report.json").is_file()
