"""The FastNet family and the speed recipe's switches: costs, exits, whitening, look-ahead,
alternating flips, BN-bias learning rate, and the family working through routing, ONNX and int8."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from erde import exits
from erde.checkpoints import load_checkpoint, model_from_checkpoint
from erde.cli import main
from erde.config import load_config
from erde.errors import ConfigError
from erde.evaluation import collect_exit_logits, simulate
from erde.inference import EarlyExitRouter, ExitPolicy, Routed
from erde.models import build_backbone, build_model, measure_exit_costs
from erde.models.backbone import ModelConfigError
from erde.models.fastnet import LOGIT_SCALE, init_whitening, patches
from erde.recipe import Lookahead, alternating_flips, parameter_groups
from erde.reproduce.runs import reproduce_config
from erde.training import Job, build_optimizer, train

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPE = (3, 32, 32)


def _conv_macs(cin: int, cout: int, k: int, side: int) -> int:
    return cin * cout * k * k * side * side


def test_fastnet_costs_match_a_hand_count_at_32_pixels() -> None:
    """Stem 2x2 (31x31), groups at 31->15->7->3 (conv before the pool, conv after it)."""
    costs = measure_exit_costs(build_model("fastnet", 10), SHAPE)
    stem = _conv_macs(3, 24, 2, 31)
    group1 = _conv_macs(24, 64, 3, 31) + _conv_macs(64, 64, 3, 15)
    group2 = _conv_macs(64, 256, 3, 15) + _conv_macs(256, 256, 3, 7)
    group3 = _conv_macs(256, 256, 3, 7) + _conv_macs(256, 256, 3, 3)
    # BN, GELU and pools count no MACs; convs dominate, so allow only the bias/elementwise slack
    assert costs.stage_macs == pytest.approx([stem + group1, group2, group3], rel=0.002)
    assert costs.head_macs == [64 * 4 * 10, 256 * 4 * 10, 256 * 10]  # 2x2-pooled heads, last FC


def test_default_exits_follow_the_first_two_groups_and_share_the_logit_scale() -> None:
    model = build_model("fastnet", 10)
    assert model.exit_after == [1, 2] and model.num_exits == 3
    assert all(head.logit_scale == LOGIT_SCALE for head in model.exits[:-1])
    x = torch.randn(4, *SHAPE)
    model.eval()
    with torch.no_grad():
        unscaled = model.exits[0].fc(torch.flatten(model.exits[0].pool(
            torch.relu(model.exits[0].bn(model.stages[0](x)))), 1))  # fmt: skip
        assert torch.allclose(model(x)[0], unscaled * LOGIT_SCALE)


def test_fastnet_batchnorm_scales_are_fixed_and_only_biases_learn() -> None:
    backbone = build_backbone("fastnet", 10)
    norms = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    assert all(not bn.weight.requires_grad and bn.bias.requires_grad for bn in norms)


def test_width_multiplier_scales_the_groups_and_a_width_below_the_minimum_is_refused() -> None:
    assert build_backbone("fastnet", 10, width=0.5).block_channels == [32, 128, 128]
    with pytest.raises(ModelConfigError, match=r"fastnet width must be >= 0.125.*got 0.1"):
        build_backbone("fastnet", 10, width=0.1)


def test_images_too_small_for_the_three_pools_are_refused_when_the_model_is_built() -> None:
    with pytest.raises(ModelConfigError, match=r"at least 16x16 pixels, got 8x8"):
        build_model("fastnet", 10, input_shape=(3, 8, 8))


def test_a_width_below_the_minimum_on_the_command_line_is_one_line_and_trains_nothing(
    tmp_path: Path,
) -> None:
    out = tmp_path / "t"
    cmd = [sys.executable, "-m", "erde.cli", "train-teacher", "--out", str(out),
           "--set", "teacher.arch=fastnet", "--set", "teacher.width=0.05",
           "--set", "data.image_size=16", "--no-progress"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "fastnet width must be >= 0.125" in lines[0], proc.stderr
    assert not (out / "checkpoint.pt").exists()


def test_whitening_makes_the_patch_covariance_the_identity_and_freezes_the_weights() -> None:
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(3, 3, generator=g)
    images = torch.einsum("dc,nchw->ndhw", mix, torch.randn(64, 3, 12, 12, generator=g))
    images = images + 0.5 * images.roll(1, dims=3)  # neighbouring pixels correlated
    conv = nn.Conv2d(3, 24, 2)
    init_whitening(conv, images, eps=0.0)
    flat = patches(images.double(), 2)
    cov = flat.T @ flat / len(flat)
    w = conv.weight.detach().double().reshape(24, 12)
    torch.testing.assert_close(w[:12] @ cov @ w[:12].T, torch.eye(12, dtype=torch.float64),
                               atol=1e-4, rtol=0)  # fmt: skip
    torch.testing.assert_close(w[12:], -w[:12])
    assert not conv.weight.requires_grad and conv.bias.requires_grad


def test_the_optimizer_leaves_frozen_weights_out_and_scales_bn_bias_learning_rates() -> None:
    model = build_model("fastnet", 10, width=0.25)
    model.stages[0][0][0].weight.requires_grad_(False)  # as whitening leaves it
    cfg = load_config(None, ["teacher_train.norm_bias_lr_scale=64", "teacher_train.lr=0.5"])
    optimizer = build_optimizer(model, cfg.teacher_train)
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(model.stages[0][0][0].weight) not in in_groups
    bias_group = optimizer.param_groups[2]
    assert bias_group["lr"] == 32.0 and bias_group["weight_decay"] == 0.0
    bn_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert {id(p) for p in bias_group["params"]} == bn_biases
    assert len(parameter_groups(model, 0.5, 1e-3)) == 2  # scale 1: no group of its own


def test_decay_biases_decays_bn_biases_by_as_much_per_step_as_the_weights() -> None:
    model = build_model("fastnet", 10, width=0.25)
    cfg = load_config(None, ["teacher_train.norm_bias_lr_scale=64", "teacher_train.lr=0.5",
                             "teacher_train.weight_decay=0.002", "teacher_train.decay_biases=true",
                             "teacher_train.momentum=0"])  # fmt: skip
    optimizer = build_optimizer(model, cfg.teacher_train)
    weights, flat, biases = optimizer.param_groups
    assert biases["lr"] == 32.0 and flat["params"]  # the stem's bias, say
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        p.data.fill_(1.0)
        p.grad = torch.zeros_like(p)
    optimizer.step()  # no gradient: the step is the decay alone
    for p in params:  # every trained parameter, BN biases at 64x the lr included
        torch.testing.assert_close(p.data, torch.full_like(p, 0.999))  # 1 - lr x wd
    cfg = load_config(None, ["teacher_train.norm_bias_lr_scale=64", "teacher_train.lr=0.5"])
    assert [g["weight_decay"] for g in build_optimizer(model, cfg.teacher_train).param_groups][
        1:
    ] == [0, 0]


def test_lookahead_pulls_every_fifth_step_and_ends_on_the_average() -> None:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    la = Lookahead(model, total_steps=10)
    for step in range(1, 11):
        with torch.no_grad():
            model.weight.add_(1.0)  # a "step" that moves the weight by one
        before = model.weight.item()
        la.after_step(model, step)
        if step == 5:
            decay = 0.95**5 * 0.5**3
            expected = decay * 0.0 + (1 - decay) * before
            assert model.weight.item() == pytest.approx(expected)
        elif step < 10 and step != 5:
            assert model.weight.item() == before
    assert model.weight.item() == pytest.approx(la.average["weight"].item())


def test_alternating_flips_mirror_each_image_in_exactly_one_of_two_epochs() -> None:
    first = torch.rand(1000, generator=torch.Generator().manual_seed(1)) < 0.5
    even, odd = alternating_flips(first, 0) < 0.5, alternating_flips(first, 1) < 0.5
    assert torch.equal(even, first) and torch.equal(odd, ~first)
    assert torch.equal(alternating_flips(first, 2), alternating_flips(first, 0))


def _fast_config(*extra: str):
    from helpers import tiny_config

    return tiny_config(
        "data.image_size=16", "teacher.arch=fastnet", "teacher.width=0.125",
        "teacher_train.whiten_init=true", "teacher_train.lookahead=true",
        "teacher_train.norm_bias_lr_scale=8", "data.alternating_flip=true",
        "data.crop_padding=2", "data.crop_padding_mode=reflect", "teacher_train.decay_biases=true",
        "teacher_train.epochs=2", "teacher_train.max_steps_per_epoch=4", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fast_teacher(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    out = tmp_path_factory.mktemp("fast_teacher")
    return train(_fast_config(), Job("teacher"), out, progress=False)


class _Stop(Exception):
    pass


def test_a_run_with_every_switch_on_resumes_to_the_same_weights(
    fast_teacher: Path, tmp_path: Path
) -> None:
    """Look-ahead state, frozen whitening and alternating flips all survive a resume."""
    cfg = _fast_config("teacher_train.checkpoint_every_steps=3")

    def stop_at_7(step: int) -> None:
        if step == 7:
            raise _Stop

    with pytest.raises(_Stop):
        train(cfg, Job("teacher"), tmp_path, progress=False, on_step=stop_at_7)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["global_step"] == 6  # mid-epoch 2
    resumed = train(cfg, Job("teacher"), tmp_path, progress=False, resume=True,
                    allow_config_change=True)  # fmt: skip
    a, b = load_checkpoint(resumed), load_checkpoint(fast_teacher)
    assert a["lookahead"] is not None and a["lookahead"].keys() == b["lookahead"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    stem = a["model"]["stages.0.0.0.weight"]
    assert stem.abs().sum() > 0  # whitened, not default-initialised and then overwritten


def test_whiten_init_on_a_family_without_such_a_layer_is_refused(tmp_path: Path) -> None:
    from helpers import tiny_config

    cfg = tiny_config("teacher_train.whiten_init=true")
    with pytest.raises(ConfigError, match="resnet8 has no layer that is set from data"):
        train(cfg, Job("teacher"), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_speed_schedule_refuses_other_families_and_names_the_supported_one() -> None:
    cfg = reproduce_config("cifar10", "speed")
    assert cfg.teacher.arch == "fastnet" and cfg.student.width == 0.5
    assert cfg.teacher_train.lookahead and cfg.teacher_train.whiten_init
    with pytest.raises(ConfigError, match=r"made for fastnet only.*'resnet56'"):
        reproduce_config("cifar10", "speed", overrides=["teacher.arch=resnet56"])


def test_routing_equals_the_sweep_on_fastnet() -> None:
    model = build_model("fastnet", 10, width=0.125)
    x, labels = torch.randn(96, 3, 16, 16), torch.randint(0, 10, (96,))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    model.eval()
    logits, labels = collect_exit_logits(model, [(x, labels)])
    macs = measure_exit_costs(model, (3, 16, 16)).macs_per_exit
    scores = [exits.rule_score(logits[i], "entropy") for i in range(2)]
    policy = ExitPolicy.create([s.median().item() for s in scores], "entropy", 10, 3)
    reference = simulate(logits, labels, macs, list(policy.thresholds), "entropy")
    router = EarlyExitRouter(model, policy, image_shape=(3, 16, 16))
    out = Routed.concat([router(x[i : i + 7]) for i in range(0, 96, 7)])
    assert torch.equal(out.exit_index, reference.exit_index)
    assert set(reference.exit_index.tolist()) == {0, 1, 2}


def test_fastnet_exports_to_onnx_with_parity_and_to_int8(
    fast_teacher: Path, tmp_path: Path
) -> None:
    pytest.importorskip("onnxruntime")
    from erde.inference.export import OnnxEarlyExitRuntime

    assert main(["calibrate", str(fast_teacher), "--budget", "0.8", "--no-progress"]) == 0
    assert main(["export", str(fast_teacher), "--out", str(tmp_path / "onnx")]) == 0
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert len(manifest["stages"]) == 3
    model = model_from_checkpoint(load_checkpoint(fast_teacher)).eval()
    x = torch.randn(64, 3, 16, 16)
    with torch.no_grad():
        scores = exits.rule_score(model(x)[0], "entropy")
    policy = ExitPolicy.create([scores.median().item(), 0.0], "entropy", 10, 3)
    ours = EarlyExitRouter(model, policy)(x)
    theirs = OnnxEarlyExitRuntime(tmp_path / "onnx", policy)(x)
    borderline = (scores - policy.thresholds[0]).abs() < 1e-4
    same = ours.exit_index == theirs.exit_index
    assert bool((same | borderline).all())
    torch.testing.assert_close(theirs.probabilities[same], ours.probabilities[same],
                               atol=1e-4, rtol=1e-3)  # fmt: skip
    assert main(["export", str(fast_teacher), "--out", str(tmp_path / "q"), "--int8"]) == 0
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["precision"] == "int8"


def test_a_released_checkpoint_leaves_the_look_ahead_state_out(
    fast_teacher: Path, tmp_path
) -> None:
    """The average is resume-only state as large as the weights: a release does not ship it."""
    assert load_checkpoint(fast_teacher)["lookahead"] is not None
    assert main(["release", str(fast_teacher), "--out", str(tmp_path / "r" / "checkpoint.pt")]) == 0
    released = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert "lookahead" not in released and released["finished"]
