"""Tests for erde.models: backbones, the early-exit wrapper and measured exit costs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from erde.exits import ExitHead
from erde.models import (
    MODELS,
    EarlyExitNet,
    build_backbone,
    build_model,
    count_macs,
    measure_exit_costs,
)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --- count_macs -------------------------------------------------------------------------


def test_count_macs_conv_matches_hand_formula() -> None:
    conv = nn.Conv2d(3, 8, 3, padding=1)
    assert count_macs(conv, torch.zeros(1, 3, 10, 10)) == 8 * 3 * 3 * 3 * 10 * 10
    strided = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)  # 10x10 -> 5x5
    assert count_macs(strided, torch.zeros(1, 4, 10, 10)) == 6 * 4 * 3 * 3 * 5 * 5


def test_count_macs_linear_matches_hand_formula() -> None:
    fc = nn.Linear(20, 7)
    assert count_macs(fc, torch.zeros(1, 20)) == 20 * 7
    assert count_macs(fc, torch.zeros(3, 20)) == 3 * 20 * 7  # counts the batch given


def test_count_macs_ignores_bn_relu_pool() -> None:
    net = nn.Sequential(nn.BatchNorm2d(3), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
    assert count_macs(net, torch.zeros(1, 3, 8, 8)) == 0


def test_count_macs_restores_modes_and_grad() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    net.train()
    net[1].eval()  # e.g. frozen BN: a per-submodule mode must survive too
    count_macs(net, torch.zeros(1, 3, 6, 6))
    assert net.training and not net[1].training and net[2].training
    assert net[1].num_batches_tracked.item() == 0  # ran in eval: BN stats untouched


# --- registry and construction ----------------------------------------------------------


@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model_builds_and_runs(name: str) -> None:
    model = build_model(name, 5)
    side = max(8, getattr(build_backbone(name, 5), "min_input_side", 8))
    x = torch.randn(2, 3, side, side)
    for train in (True, False):
        model.train(train)
        with torch.no_grad():
            out = model(x)
        assert isinstance(out, list) and len(out) == model.num_exits
        assert all(o.shape == (2, 5) for o in out)


def test_required_names_registered() -> None:
    for name in ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56"):
        assert name in MODELS
    for name in ("resnet110", "wrn16_2", "wrn16_4", "wrn16_8", "wrn22_4", "wrn28_10", "wrn40_2"):
        assert name in MODELS


def test_generic_names_parse_beyond_registry() -> None:
    assert "resnet26" not in MODELS and "wrn10_3" not in MODELS
    assert len(build_backbone("resnet26", 10).blocks) == 12  # n = 4
    wrn = build_backbone("wrn10_3", 10)
    assert len(wrn.blocks) == 3 and wrn.block_channels[-1] == 192


@pytest.mark.parametrize("name", ["vgg16", "resnet21", "resnet2", "wrn17_2", "wrn16_0", "wrn16"])
def test_unknown_names_raise_key_error_listing_valid(name: str) -> None:
    with pytest.raises(KeyError) as info:
        build_model(name, 10)
    message = str(info.value)
    assert "resnet56" in message and "wrn<depth>_<k>" in message and "6n+2" in message


def test_default_exit_counts() -> None:
    assert build_model("resnet20", 10).num_exits == 3
    assert build_model("resnet20", 10).exit_after == [3, 6]
    assert build_model("resnet56", 10).num_exits == 4
    assert build_model("resnet110", 10).num_exits == 4
    assert build_model("resnet8", 10).exit_after == [1, 2]


def test_explicit_exit_after_is_honored() -> None:
    model = build_model("resnet20", 10, exit_after=[2, 5, 8])
    assert model.exit_after == [2, 5, 8] and model.num_exits == 4
    assert len(model.stages) == len(model.exits) == 4
    blocks_per_stage = [sum(isinstance(m, nn.Module) for m in s) for s in model.stages]
    assert blocks_per_stage == [1 + 2, 3, 3, 1]  # stage 0 also holds the stem
    assert [c.bn.num_features for c in model.exits[:-1]] == [16, 32, 64]
    assert build_model("resnet20", 10, num_early_exits=1).exit_after == [5]  # 9 / 2 = 4.5 rounds up
    assert build_model("resnet20", 10, exit_after=[]).num_exits == 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"exit_after": [0, 3]}, r"\[1, 8\]"),
        ({"exit_after": [3, 9]}, r"\[1, 8\]"),
        ({"exit_after": [3, 3]}, "strictly increasing"),
        ({"exit_after": [6, 3]}, "strictly increasing"),
        ({"exit_after": [2.5]}, "integers"),
        ({"num_early_exits": 9}, r"\[0, 8\]"),
        ({"exit_after": [3, 6], "num_early_exits": 3}, "disagrees"),
        ({"head_pool": 0}, "head_pool"),
    ],
)
def test_bad_exit_arguments_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_model("resnet20", 10, **kwargs)


def test_width_multiplier_changes_params() -> None:
    half, full, double = (_params(build_backbone("resnet20", 10, width=w)) for w in (0.5, 1, 2))
    assert half < full < double
    assert build_backbone("resnet20", 10, width=0.5).block_channels[-1] == 32


def test_known_param_counts() -> None:
    resnet20, resnet56 = (
        _params(build_backbone("resnet20", 10)),
        _params(build_backbone("resnet56", 10)),
    )
    assert abs(resnet20 - 0.27e6) / 0.27e6 < 0.1
    assert abs(resnet56 - 0.85e6) / 0.85e6 < 0.1
    assert _params(build_backbone("resnet56", 10, shortcut="A")) == 853_018  # He et al.'s 0.85M


def test_shortcut_a_handles_odd_channel_growth() -> None:
    backbone = build_backbone("resnet8", 4, width=0.3, shortcut="A")  # 5 -> 10 -> 19 channels
    assert backbone(torch.randn(2, 3, 9, 9)).shape == (2, 4)


def test_in_channels_and_dropout_options() -> None:
    model = build_model("wrn16_2", 10, in_channels=1, dropout=0.3)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.stages.modules())
    assert all(o.shape == (3, 10) for o in model(torch.randn(3, 1, 8, 8)))
    with pytest.raises(ValueError, match="dropout"):
        build_model("wrn16_2", 10, dropout=1.0)


# --- the early-exit wrapper -------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet20", "wrn16_2"])
def test_last_exit_equals_plain_backbone(name: str) -> None:
    backbone = build_backbone(name, 10)
    model = EarlyExitNet(backbone).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x)[-1], backbone.eval()(x))
    assert model.exits[-1] is backbone.classifier


def test_forward_stage_chain_equals_forward() -> None:
    model = build_model("resnet14", 6).eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        h, chained = x, []
        for i in range(model.num_exits):
            h, logits = model.forward_stage(i, h)
            chained.append(logits)
    assert all(torch.equal(a, b) for a, b in zip(chained, expected, strict=True))


def test_gradients_reach_every_exit_head() -> None:
    model = build_model("resnet8", 4, exit_after=[1, 2]).train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    sum(F.cross_entropy(o, y) for o in model(x)).backward()
    for head in model.exits:
        grads = [p.grad for p in head.parameters()]
        assert grads and all(g is not None for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is not None for p in model.stages[0].parameters())
    assert isinstance(model.exits[0], ExitHead)


def test_state_dict_has_no_duplicate_modules() -> None:
    model = build_model("resnet8", 3)
    assert all(k.startswith(("stages.", "exits.")) for k in model.state_dict())
    shared = list(model.named_parameters(remove_duplicate=False))
    assert len(shared) == len(list(model.parameters()))  # each backbone module appears once


def test_describe() -> None:
    info = build_model("resnet20", 10, width=0.5).describe()
    assert info["arch"] == "resnet20" and info["num_exits"] == 3 and info["exit_after"] == [3, 6]
    assert info["params"] == _params(build_model("resnet20", 10, width=0.5))
    assert info["width"] == 0.5 and info["num_classes"] == 10


# --- measured exit costs ----------------------------------------------------------------


def test_exit_costs_increase_and_cover_backbone() -> None:
    backbone = build_backbone("resnet20", 10)
    model = EarlyExitNet(backbone)
    costs = measure_exit_costs(model, (3, 16, 16))
    macs = costs.macs_per_exit
    assert all(a < b for a, b in zip(macs, macs[1:], strict=False))
    plain = count_macs(backbone, torch.zeros(1, 3, 16, 16))
    assert macs[-1] >= plain
    assert macs[-1] == plain + sum(costs.head_macs[:-1])  # early heads are the only extra
    assert costs.params_per_exit[-1] == _params(model)
    assert costs.head_macs[0] == 16 * 2 * 2 * 10  # pooled 2x2 features -> FC
    assert costs.input_shape == (3, 16, 16)


def test_exit_macs_scale_with_input_area() -> None:
    model = build_model("resnet8", 10)
    small = measure_exit_costs(model, (3, 16, 16)).macs_per_exit[-1]
    large = measure_exit_costs(model, (3, 32, 32)).macs_per_exit[-1]
    assert 3.9 < large / small <= 4.0  # heads are resolution-independent, convs scale 4x
    assert measure_exit_costs(model, (3, 8, 8)).macs_per_exit[-1] < small


def test_measure_exit_costs_leaves_model_as_it_was() -> None:
    model = build_model("resnet8", 10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    measure_exit_costs(model, (3, 8, 8))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).device.type == "cpu"
