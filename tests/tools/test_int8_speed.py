"""benchmarks/int8_speed.py: real export, real quantisation, real ONNX Runtime, on a tiny network."""

from __future__ import annotations

import json

import onnx
import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def script():
    return load_benchmark("int8_speed")


def test_the_int8_folder_holds_quantised_stages_that_the_runtime_opens(script, tmp_path) -> None:
    fp32, int8 = script.export_pair("resnet8:0.25", 16, 16, tmp_path)
    manifest = json.loads((int8 / "manifest.json").read_text())
    assert manifest["precision"] == "int8"
    for stage in manifest["stages"]:
        ops = {n.op_type for n in onnx.load(str(int8 / stage["file"])).graph.node}
        assert "QuantizeLinear" in ops
        assert "QuantizeLinear" not in {
            n.op_type for n in onnx.load(str(fp32 / stage["file"])).graph.node
        }


def test_prints_a_ratio_per_batch_size_and_writes_the_json(script, tmp_path, capsys) -> None:
    out = tmp_path / "int8.json"
    argv = ["--arch", "resnet8:0.25", "--image-size", "16", "--batch-sizes", "1", "4",
            "--calibration", "16", "--threads", "1", "--repeats", "2", "--min-time", "0",
            "--json", str(out)]  # fmt: skip
    assert script.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("int8/fp32") == 2
    (result,) = json.loads(out.read_text())["results"]
    assert result["arch"] == "resnet8:0.25"
    assert [r["batch_size"] for r in result["rows"]] == [1, 4]
    for row in result["rows"]:
        assert row["fp32_img_s"] > 0 and row["int8_img_s"] > 0
        assert row["ratio_q1"] <= row["int8_over_fp32"] <= row["ratio_q3"]


def test_a_width_after_the_colon_is_parsed(script) -> None:
    assert script.parse_arch("resnet20") == ("resnet20", 1.0)
    assert script.parse_arch("mobilenetv2:0.5") == ("mobilenetv2", 0.5)
