"""MobileNetV2 and VGG families, exits placed by cost, exit mapping by cost, every family downstream.

Tiny versions of each family (and a user's own network) are routed per sample
and compared with the threshold sweep on recorded logits. ONNX parity is in
test_custom_backbones.py, on a user's network holding one block of each
family: export time grows with the graph, and the ops are what differ.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from erde import exits
from erde.config import load_config
from erde.errors import ConfigError
from erde.evaluation import collect_exit_logits, simulate
from erde.inference import EarlyExitRouter, ExitPolicy, Routed
from erde.losses import exit_mapping_by_cost
from erde.models import (
    MODELS,
    EarlyExitNet,
    block_boundary_macs,
    build_backbone,
    build_model,
    count_macs,
    measure_exit_costs,
)
from erde.models.early_exit import exits_at_macs
from erde.models.mobilenetv2 import CIFAR_TABLE, InvertedResidual, make_divisible
from erde.models.resnet import BasicBlock
from erde.models.vgg import CONFIGS, VGGBlock
from erde.models.wrn import WideBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- one block of each kind, MACs counted by hand -----------------------------------------


def test_basic_block_macs_match_hand_count() -> None:
    block = BasicBlock(16, 32, stride=2, shortcut="B")  # 8x8 -> 4x4 (16 output pixels)
    hand = 32 * 16 * 9 * 16 + 32 * 32 * 9 * 16 + 32 * 16 * 16  # conv1 + conv2 + 1x1 projection
    assert count_macs(block, torch.zeros(1, 16, 8, 8)) == hand


def test_wide_block_macs_match_hand_count() -> None:
    block = WideBlock(16, 32, stride=2)
    hand = 32 * 16 * 9 * 16 + 32 * 32 * 9 * 16 + 32 * 16 * 16
    assert count_macs(block, torch.zeros(1, 16, 8, 8)) == hand


def test_inverted_residual_macs_match_hand_count() -> None:
    block = InvertedResidual(16, 24, stride=2, expansion=6)  # hidden 96, 8x8 -> 4x4
    expand, depthwise, project = 16 * 96 * 64, 96 * 9 * 16, 96 * 24 * 16
    assert count_macs(block, torch.zeros(1, 16, 8, 8)) == expand + depthwise + project
    no_expand = InvertedResidual(16, 16, stride=1, expansion=1)  # t = 1: no 1x1 expansion
    assert count_macs(no_expand, torch.zeros(1, 16, 8, 8)) == 16 * 9 * 64 + 16 * 16 * 64


def test_vgg_block_macs_match_hand_count_and_pool_is_free() -> None:
    block = VGGBlock(8, 16, pool=True)
    assert count_macs(block, torch.zeros(1, 8, 8, 8)) == 16 * 8 * 9 * 64
    assert block(torch.zeros(1, 8, 8, 8)).shape == (1, 16, 4, 4)


# --- the families ------------------------------------------------------------------------


def test_new_families_are_registered_and_parse() -> None:
    for name in ("mobilenetv2", "mobilenetv2_x0.5", "vgg11_bn", "vgg16_bn"):
        assert name in MODELS
    assert len(build_backbone("mobilenetv2_x0.35", 10).blocks) == 17  # pattern beyond the registry
    with pytest.raises(KeyError, match="mobilenetv2_x<multiplier>"):
        build_backbone("mobilenetv2_x0", 10)
    with pytest.raises(KeyError, match="package.module:factory"):
        build_backbone("vgg16", 10)  # VGG comes with BatchNorm only


def test_mobilenetv2_follows_the_paper_table_with_cifar_strides() -> None:
    net = build_backbone("mobilenetv2", 10)
    assert len(net.blocks) == sum(n for _, _, n, _ in CIFAR_TABLE) == 17
    expected = [c for _, c, n, _ in CIFAR_TABLE for _ in range(n)]
    assert net.block_channels == expected
    residual = [b.residual for b in net.blocks]  # identity only where the shape is kept
    assert residual == [False, False, True, False, True, True, False, True, True, True,
                        False, True, True, False, True, True, False]  # fmt: skip
    h = net.stem(torch.zeros(1, 3, 32, 32))
    for block in net.blocks:
        h = block(h)
    assert h.shape == (1, 320, 4, 4)  # 8x downsampling on CIFAR
    # strides do not change parameters: torchvision's ImageNet MobileNetV2 has 3,504,872
    assert _params(build_backbone("mobilenetv2", 1000)) == 3_504_872


def test_mobilenetv2_width_multiplier_rounds_to_multiples_of_8() -> None:
    half = build_backbone("mobilenetv2_x0.5", 10)
    assert half.block_channels == [make_divisible(c * 0.5) for c in build_backbone(
        "mobilenetv2", 10).block_channels]  # fmt: skip
    assert all(c % 8 == 0 for c in half.block_channels)
    assert half.block_channels[:3] == [8, 16, 16]  # 16*0.5 = 8, 24*0.5 = 12 -> 16
    same = build_backbone("mobilenetv2", 10, width=0.5)  # config width multiplies the name's
    assert same.block_channels == half.block_channels
    assert make_divisible(20) == 24 and make_divisible(12) == 16 and make_divisible(7) == 8


def test_vgg_layout_params_and_small_inputs() -> None:
    for depth, table in CONFIGS.items():
        net = build_backbone(f"vgg{depth}_bn", 10, width=0.125)  # narrow: the layout is the same
        convs = [c // 8 for c in table if c != "M"]
        assert len(net.blocks) == len(convs) - 1  # the first conv is the stem
        assert net.block_channels == convs[1:]
        pools = [isinstance(b[-1], nn.MaxPool2d) for b in [net.stem, *net.blocks]]
        ends = [nxt == "M" for c, nxt in zip(table, [*table[1:], None], strict=True) if c != "M"]
        assert pools == ends and sum(pools) == 5  # a pool closes each of the five groups
    vgg16 = build_backbone("vgg16_bn", 10)
    convs, in_ch, hand = [c for c in CONFIGS[16] if c != "M"], 3, 0
    for c in convs:  # 3x3 conv (no bias) + BN weight and bias
        hand, in_ch = hand + 9 * in_ch * c + 2 * c, c
    assert _params(vgg16) == hand + 512 * 10 + 10
    assert vgg16(torch.zeros(2, 3, 8, 8)).shape == (2, 10)  # ceil-mode pools: 8 -> 4 -> 2 -> 1 -> 1
    small = build_backbone("vgg11_bn", 10, in_channels=1).eval()
    assert small(torch.zeros(1, 1, 5, 5)).shape == (1, 10)


@pytest.mark.parametrize("name", ["mobilenetv2", "vgg11_bn"])
def test_last_exit_of_every_family_is_the_plain_backbone(name: str) -> None:
    backbone = build_backbone(name, 10, width=0.25)
    model = EarlyExitNet(backbone).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], backbone.eval()(x))
    assert model.exits[-1] is backbone.classifier


@pytest.mark.parametrize("name", ["mobilenetv2_x0.25", "vgg11_bn", "wrn10_1"])
def test_every_family_can_be_cut_after_any_block(name: str) -> None:
    backbone = build_backbone(name, 10, width=0.25).eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = backbone(x)
        for b in range(1, len(backbone.blocks)):
            model = EarlyExitNet(backbone, exit_after=[b]).eval()
            assert model.exit_channels[0] == backbone.block_channels[b - 1]
            early, last = model(x)
            assert early.shape == (2, 10) and torch.equal(last, plain)


def test_new_families_take_dropout_before_the_last_layer() -> None:
    for name in ("mobilenetv2", "vgg11_bn"):
        net = build_backbone(name, 10, dropout=0.2)
        assert any(isinstance(m, nn.Dropout) and m.p == 0.2 for m in net.classifier)
        with pytest.raises(ValueError, match="dropout"):
            build_backbone(name, 10, dropout=1.0)


# --- exits placed by cost ----------------------------------------------------------------


def test_exits_at_macs_picks_the_nearest_boundary_by_hand() -> None:
    # blocks end at 10, 20, 30, 50, 80 MACs; the whole backbone costs 100
    boundaries = [10, 20, 30, 50, 80, 100]
    # shares of the usable boundaries (after blocks 1..4): 0.1, 0.2, 0.3, 0.5
    assert exits_at_macs([0.15, 0.29, 0.45], boundaries) == [1, 3, 4]  # 0.15: tie -> cheaper
    assert exits_at_macs([0.9], boundaries) == [4]  # after block 5 is the classifier's place
    assert exits_at_macs([], boundaries) == []


def test_exit_at_macs_on_uniform_blocks_matches_even_spacing() -> None:
    model = build_model("resnet20", 10, exit_at_macs=[1 / 3, 2 / 3])
    assert model.exit_after == [3, 6] == build_model("resnet20", 10).exit_after


def test_exit_at_macs_puts_each_exit_at_its_share_of_the_measured_cost() -> None:
    shape = (3, 32, 32)
    fractions = [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]  # SDN's placement
    model = build_model("mobilenetv2", 10, exit_at_macs=fractions, input_shape=shape)
    boundaries = block_boundary_macs(build_backbone("mobilenetv2", 10), shape)
    share = [m / boundaries[-1] for m in boundaries[:-2]]
    assert len(model.exit_after) == len(fractions)
    for f, b in zip(fractions, model.exit_after, strict=True):
        assert all(abs(share[b - 1] - f) <= abs(s - f) for s in share)
    costs = measure_exit_costs(model, shape)
    # the stages and the last exit (the backbone's own classifier) are the whole backbone
    assert sum(costs.stage_macs) + costs.head_macs[-1] == boundaries[-1]


def test_boundary_macs_add_up_to_the_backbone() -> None:
    backbone = build_backbone("vgg11_bn", 10, width=0.25)
    boundaries = block_boundary_macs(backbone, (3, 16, 16))
    assert len(boundaries) == len(backbone.blocks) + 1
    assert boundaries[-1] == count_macs(backbone, torch.zeros(1, 3, 16, 16))
    assert all(a < b for a, b in zip(boundaries, boundaries[1:], strict=False))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exit_at_macs": [0.0, 0.5]}, r"in \(0, 1\)"),
        ({"exit_at_macs": [0.5, 1.0]}, r"in \(0, 1\)"),
        ({"exit_at_macs": [float("nan")]}, r"in \(0, 1\)"),
        ({"exit_at_macs": [0.6, 0.3]}, "strictly increasing"),
        ({"exit_at_macs": [0.3, 0.3]}, "strictly increasing"),
        ({"exit_at_macs": [0.30, 0.32]}, "both land after block 3"),
        ({"exit_at_macs": [0.3], "exit_after": [3]}, "not both"),
        ({"exit_at_macs": [0.3, 0.6], "num_early_exits": 3}, "disagrees"),
    ],
)
def test_bad_exit_at_macs_is_one_clear_error(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model("resnet20", 10, **kwargs)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("student.exit_at_macs=[0.2, 1.2]", r"student.exit_at_macs values must be .* \(0, 1\)"),
        ("teacher.exit_at_macs=[0.5, 0.4]", "teacher.exit_at_macs must be strictly increasing"),
        ("distill.exit_mapping_by=width", "depth or cost"),
    ],
)
def test_config_refuses_bad_placement_before_any_training(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_config_refuses_exit_after_with_exit_at_macs() -> None:
    with pytest.raises(ConfigError, match="not both"):
        load_config(None, ["student.exit_after=[2]", "student.exit_at_macs=[0.5]"])


# --- exit mapping by cost ----------------------------------------------------------------


def test_exit_mapping_by_cost_by_hand() -> None:
    # student shares 0.1, 0.5, 1.0; teacher shares 0.25, 0.5, 0.75, 1.0
    assert exit_mapping_by_cost([10, 50, 100], [30, 60, 90, 120]) == [0, 1, 3]
    # 0.375 is as near 0.25 as 0.5: the deeper teacher exit wins; last always matches last
    assert exit_mapping_by_cost([3, 8], [2, 4, 6, 8]) == [1, 3]
    with pytest.raises(ValueError):
        exit_mapping_by_cost([], [1])


def test_resnet56_teacher_to_mobilenetv2_student_pairs_by_cost() -> None:
    shape = (3, 32, 32)
    teacher = measure_exit_costs(build_model("resnet56", 10), shape).macs_per_exit
    student_model = build_model(
        "mobilenetv2", 10, exit_at_macs=[0.15, 0.3, 0.45, 0.6, 0.75, 0.9], input_shape=shape
    )
    student = measure_exit_costs(student_model, shape).macs_per_exit
    mapping = exit_mapping_by_cost(student, teacher)
    assert len(mapping) == student_model.num_exits and mapping[-1] == len(teacher) - 1
    assert mapping == sorted(mapping)  # a later student exit never learns from an earlier one
    t_share = [m / teacher[-1] for m in teacher]
    for s_macs, j in zip(student, mapping, strict=True):
        share = s_macs / student[-1]
        assert all(abs(t_share[j] - share) <= abs(t - share) for t in t_share)


# --- every family downstream: routing equals the sweep -----------------------------------


def _custom_mixed() -> EarlyExitNet:
    """A user's network built from one block of each family, through the public API."""
    stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
    blocks = [
        BasicBlock(8, 8, 1, "A"),
        WideBlock(8, 16, 2),
        InvertedResidual(16, 16, 1, 6),
        VGGBlock(16, 16, pool=True),
    ]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    return EarlyExitNet.from_blocks(
        stem, blocks, classifier, input_shape=(3, 8, 8), num_classes=10, exit_after=[1, 2, 3]
    )


TINY_FAMILIES = {
    "resnet8": lambda: build_model("resnet8", 10, width=0.5),
    "wrn10_1": lambda: build_model("wrn10_1", 10, width=0.5),
    "mobilenetv2": lambda: build_model("mobilenetv2_x0.25", 10, exit_at_macs=[0.3, 0.6]),
    "vgg11_bn": lambda: build_model("vgg11_bn", 10, width=0.125),
    "custom": _custom_mixed,
}


def _settle_bn(model: nn.Module, x: torch.Tensor) -> None:
    """A few train-mode passes so BN statistics fit the data and exits disagree like trained ones."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()


@pytest.mark.parametrize("family", list(TINY_FAMILIES))
def test_routing_equals_the_sweep_for_every_family(family: str) -> None:
    model = TINY_FAMILIES[family]()
    x, labels = torch.randn(96, 3, 8, 8), torch.randint(0, 10, (96,))
    _settle_bn(model, x)
    logits, labels = collect_exit_logits(model, [(x, labels)])  # (E, N, K)
    macs = measure_exit_costs(model, (3, 8, 8)).macs_per_exit
    scores = [exits.rule_score(logits[i], "entropy") for i in range(model.num_exits - 1)]
    thresholds = [s.median().item() for s in scores]  # about half leave at each early exit
    policy = ExitPolicy.create(thresholds, "entropy", 10, model.num_exits)
    reference = simulate(logits, labels, macs, list(policy.thresholds), "entropy")
    router = EarlyExitRouter(model, policy, image_shape=(3, 8, 8))
    for batch_size in (96, 7):
        out = Routed.concat([router(x[i : i + batch_size]) for i in range(0, 96, batch_size)])
        assert torch.equal(out.exit_index, reference.exit_index)
        assert torch.equal(out.classes, logits.argmax(-1)[out.exit_index, torch.arange(96)])
        assert out.macs.double().mean().item() == pytest.approx(reference.mean_macs, rel=1e-12)
    assert set(reference.exit_index.tolist()) == set(range(model.num_exits))


# --- the reproduce command with another family -------------------------------------------


def test_reproduce_with_a_mobilenetv2_student_and_a_vgg_teacher(tmp_path, monkeypatch) -> None:
    """`erde reproduce --set student.arch=mobilenetv2` on a tiny CIFAR-10 ImageFolder archive."""
    import json

    from data_fixtures import CIFAR10_NAMES, make_tar_gz, write_imagefolder
    from helpers import TINY_OVERRIDES

    from erde.cli import main

    monkeypatch.setenv("ERDE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "jpeg"
    write_imagefolder(folder, classes=tuple(CIFAR10_NAMES), per_class=(5, 2), size=32)
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    make_tar_gz(archive, {"train": folder / "train", "test": folder / "test"})
    tiny = [o for o in TINY_OVERRIDES if o.split("=")[0] not in ("data.name", "data.image_size")]
    sets = [*tiny, "data.image_size=16", "data.val_fraction=0.2", "data.batch_size=16",
            "teacher_train.epochs=1", "teacher_train.max_steps_per_epoch=2",
            "student_train.max_steps_per_epoch=2", "teacher.arch=vgg11_bn", "teacher.width=0.125",
            "student.arch=mobilenetv2", "distill.exit_mapping_by=cost"]  # fmt: skip
    out = tmp_path / "out"
    argv = ["reproduce", "--dataset", "cifar10", "--data-dir", str(archive), "--seeds", "1",
            "--schedule", "reduced", "--out", str(out), "--no-progress",
            "--docs", str(tmp_path / "docs")]  # fmt: skip
    assert main([*argv, *(a for o in sets for a in ("--set", o))]) == 0

    results = json.loads((out / "results.json").read_text())
    archs = {name: m["arch"] for name, m in results["models"].items()}
    assert archs == {"teacher": "vgg11_bn", "student_ce": "mobilenetv2",
                     "student_kd": "mobilenetv2", "student_erde": "mobilenetv2"}  # fmt: skip
    assert results["models"]["student_erde"]["num_exits"] == 4  # 17 blocks: 3 early exits
    assert "mobilenetv2" in (out / "results.md").read_text()
    # published beside, not over, the preset pair's CIFAR-10 results
    name = "cifar10-reduced-vgg11_bn_x0.125-mobilenetv2_x0.25"  # widths other than 1 named
    assert (tmp_path / "docs" / "results" / f"{name}.json").is_file()
    assert f"<!-- erde-results:{name}:begin -->" in (tmp_path / "docs" / "RESULTS.md").read_text()


def test_results_of_another_model_pair_are_named_apart_from_the_preset_pair() -> None:
    from erde.reproduce.publish import results_name

    def results(teacher: str, student: str, width: float = 1.0) -> dict:
        config = {"teacher": {"arch": teacher}, "student": {"arch": student, "width": width}}
        return {"dataset": {"name": "cifar10"}, "schedule": "reduced", "config": config}

    assert results_name(results("resnet56", "resnet20")) == "cifar10-reduced"  # the preset's pair
    assert (
        results_name(results("resnet56", "mobilenetv2")) == "cifar10-reduced-resnet56-mobilenetv2"
    )
    assert (
        results_name(results("pkg.nets:tiny", "resnet20"))
        == "cifar10-reduced-pkg.nets_tiny-resnet20"
    )
    # the preset's student at half width is another pair too: it must not replace the preset's
    assert results_name(results("resnet56", "resnet20", 0.5)) == (
        "cifar10-reduced-resnet56-resnet20_x0.5"
    )


def test_runs_saved_before_the_placement_keys_existed_are_still_reusable(tmp_path) -> None:
    """A seed folder whose config.yaml predates exit_at_macs / exit_mapping_by is not 'another config'."""
    import yaml

    from erde.reproduce import check_reusable, reproduce_config

    cfg = reproduce_config("cifar10", "reduced")
    saved = cfg.to_dict()
    for section in ("teacher", "student"):
        del saved[section]["exit_at_macs"]
    del saved["distill"]["exit_mapping_by"]
    for name in ("teacher", "student_erde"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump(saved))
    check_reusable(tmp_path, cfg)  # raises ConfigError if the new keys made it look different
    changed = reproduce_config("cifar10", "reduced", overrides=["distill.exit_mapping_by=cost"])
    with pytest.raises(ConfigError, match="exit_mapping_by"):
        check_reusable(tmp_path, changed)


def test_backbone_costs_script_prints_the_measured_costs() -> None:
    """benchmarks/backbone_costs.py writes the tables of docs/BACKBONES.md."""
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "backbone_costs.py"
    render = runpy.run_path(str(script))["render"]
    text = render(["resnet8"], 8, 10, None)
    costs = measure_exit_costs(build_model("resnet8", 10), (3, 8, 8))
    rows = [line for line in text.splitlines() if line.startswith("| resnet8 |")]
    assert len(rows) == 3
    for row, macs in zip(rows, costs.macs_per_exit, strict=True):
        assert f"| {macs / 1e3:.1f}K |" in row
