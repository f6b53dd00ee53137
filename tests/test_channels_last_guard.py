"""Models PyTorch cannot train in channels_last on a CPU are trained in NCHW, not crashed.

PyTorch 2.13.0+cpu corrupts the heap in the weight gradient of a strided 1x1
convolution with under 8 input channels in channels_last (erde.hardware). The
training run is a real child process: were the guard gone, the child would
abort, and the test would fail instead of taking pytest down with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from torch import nn

from erde.hardware import nhwc_unsafe_convs
from erde.models import build_model


def test_the_unsafe_layers_are_the_narrow_strided_1x1_convolutions() -> None:
    narrow = build_model("resnet8", 10, width=0.25, input_shape=(3, 16, 16))
    assert nhwc_unsafe_convs(narrow) == ["stages.1.0.shortcut.0"]  # 4 -> 8 channels, stride 2
    assert nhwc_unsafe_convs(build_model("resnet8", 10, width=0.5, input_shape=(3, 16, 16))) == []
    for arch in ("resnet20", "mobilenetv2_x0.5", "vgg11_bn"):
        assert nhwc_unsafe_convs(build_model(arch, 10, input_shape=(3, 32, 32))) == [], arch
    stem = nn.Sequential(nn.Conv2d(3, 16, 1, stride=2), nn.Conv2d(16, 16, 1, stride=2))
    assert nhwc_unsafe_convs(stem) == ["0"]


CHILD = """
import sys
sys.path.insert(0, {tests!r})
from helpers import tiny_config
from erde.training import Job, train
cfg = tiny_config("student.width=0.25", "student_train.channels_last=true",
                  "teacher_train.channels_last=true", "student_train.max_steps_per_epoch=6")
teacher = train(cfg, Job("teacher"), {out!r} + "/teacher", progress=False)
train(cfg, Job("student", "erde"), {out!r} + "/student", teacher_checkpoint=teacher,
      progress=False)
"""


def test_a_narrow_student_asked_for_channels_last_trains_in_nchw(tmp_path: Path) -> None:
    code = CHILD.format(tests=str(Path(__file__).parent), out=str(tmp_path))
    child = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-2000:]
    assert "student_erde: trained in NCHW, not channels_last" in child.stdout
    assert "stages.1.0.shortcut.0" in child.stdout
    assert "teacher: trained in NCHW" not in child.stdout  # 8 channels: channels_last is safe
    starts = {
        line.split(":")[0]: line for line in child.stdout.splitlines() if ": training " in line
    }
    assert ", NHWC)" in starts["teacher"] and ", NCHW)" in starts["student_erde"]  # as trained
    records = [
        json.loads(line)
        for name in ("teacher", "student")
        for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["memory_format"] for r in records] == ["NHWC"] * 2 + ["NCHW"]
    assert (tmp_path / "student" / "checkpoint.pt").is_file()
