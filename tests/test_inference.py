"""Per-sample routing: equals the evaluation sweep exactly, answers in order, bad input refused."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from erde import exits
from erde.checkpoints import load_checkpoint, model_from_checkpoint
from erde.cli import main
from erde.config import config_from_dict
from erde.data import load_splits, prepare_batch
from erde.evaluation import collect_exit_logits, simulate, sweep
from erde.inference import (
    EarlyExitRouter,
    ExitPolicy,
    ImageInputError,
    ModelIdentity,
    Routed,
    ThresholdsFileError,
    apply_temperatures,
    benchmark_routing,
    compact_rows,
    estimate_seconds,
    fmt_duration,
    full_network_macs,
    load_image,
    load_thresholds,
    model_fingerprint,
    route_whole_batch,
    save_thresholds,
    serving_advice,
    speedup_spread,
    thresholds_path,
    timing_warning,
)
from erde.models import measure_exit_costs

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(checkpoint: Path) -> dict:
    """Model, normalised test images, and every exit's logits recorded in one pass."""
    ckpt = load_checkpoint(checkpoint)
    splits = load_splits(config_from_dict(ckpt["config"]))
    model = model_from_checkpoint(ckpt).eval()
    x = prepare_batch(splits.test.images, splits, train=False)
    logits, labels = collect_exit_logits(model, [(x, splits.test.labels)])
    costs = measure_exit_costs(model, splits.image_shape)
    identity = ModelIdentity(
        ckpt["name"], model_fingerprint(ckpt["model"]), splits.num_classes, model.num_exits
    )
    return dict(ckpt=ckpt, splits=splits, model=model, x=x, logits=logits, labels=labels,
                macs=costs.macs_per_exit, identity=identity)  # fmt: skip


@pytest.fixture(scope="module")
def teacher(tiny_run) -> dict:
    return _setup(tiny_run["teacher"])


def _route(router: EarlyExitRouter, x: torch.Tensor, batch_size: int) -> Routed:
    return Routed.concat([router(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def _spread_thresholds(logits: torch.Tensor, rule: str) -> list[float]:
    """Thresholds at quantiles of the recorded exit-0 scores (each one a recorded score itself,
    so some images sit exactly on the threshold), so that images really leave at every exit."""
    scores = exits.rule_score(logits[0], rule).sort().values
    return [scores[int(q * (len(scores) - 1))].item() for q in (0.1, 0.3, 0.5, 0.7, 0.9)]


@pytest.mark.parametrize("rule", exits.RULES)
def test_routing_equals_the_sweep_prediction_exactly(teacher, rule) -> None:
    t = teacher
    thresholds = _spread_thresholds(t["logits"], rule)
    points = sweep(t["logits"], t["labels"], t["macs"], thresholds, rule)
    seen_exits = set()
    for threshold, point in zip(thresholds, points, strict=True):
        policy = ExitPolicy.create(threshold, rule, 10, t["model"].num_exits)
        assert policy.thresholds[0] == threshold  # recorded scores are float32 already
        router = EarlyExitRouter(t["model"], policy, image_shape=t["splits"].image_shape)
        reference = simulate(t["logits"], t["labels"], t["macs"], threshold, rule)
        for batch_size in (len(t["x"]), 64, 7):
            out = _route(router, t["x"], batch_size)
            assert torch.equal(out.exit_index, reference.exit_index)
            assert torch.equal(
                out.classes, t["logits"].argmax(-1)[out.exit_index, torch.arange(len(out))]
            )
            assert (out.classes == t["labels"]).double().mean().item() == point.accuracy
            assert out.macs.double().mean().item() == pytest.approx(point.mean_macs, rel=1e-12)
            fractions = torch.bincount(out.exit_index, minlength=3).double() / len(out)
            assert fractions.tolist() == pytest.approx(point.exit_fractions, abs=1e-12)
        seen_exits |= set(out.exit_index.tolist())
    assert seen_exits == set(range(t["model"].num_exits))  # the test really exercised every exit


def test_batch_size_one_routes_like_a_large_batch(teacher) -> None:
    t = teacher
    policy = ExitPolicy.create(_spread_thresholds(t["logits"], "entropy")[2], "entropy", 10, 3)
    router = EarlyExitRouter(t["model"], policy)
    x = t["x"][:48]
    one, many = _route(router, x, 1), router(x)
    assert torch.equal(one.exit_index, many.exit_index)
    assert torch.equal(one.classes, many.classes)
    torch.testing.assert_close(one.probabilities, many.probabilities, rtol=1e-4, atol=1e-5)


def test_per_exit_thresholds_and_temperatures_match_simulate(teacher) -> None:
    t = teacher
    q = _spread_thresholds(t["logits"], "entropy")
    policy = ExitPolicy.create([q[1], q[3]], "entropy", 10, 3, temperatures=[0.7, 1.3, 2.0])
    out = EarlyExitRouter(t["model"], policy)(t["x"])
    reference = simulate(
        apply_temperatures(t["logits"], policy),
        t["labels"],
        t["macs"],
        policy.thresholds,
        "entropy",
    )
    assert torch.equal(out.exit_index, reference.exit_index)
    scaled = apply_temperatures(t["logits"], policy)[out.exit_index, torch.arange(len(out))]
    torch.testing.assert_close(out.probabilities, scaled.softmax(-1), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.scores, exits.entropy(scaled), rtol=1e-4, atol=1e-5)


def test_answers_come_back_in_input_order(teacher) -> None:
    t = teacher
    policy = ExitPolicy.create(
        _spread_thresholds(t["logits"], "max_softmax")[2], "max_softmax", 10, 3
    )
    router = EarlyExitRouter(t["model"], policy)
    perm = torch.randperm(len(t["x"]), generator=torch.Generator().manual_seed(0))
    straight, shuffled = router(t["x"]), router(t["x"][perm])
    assert torch.equal(shuffled.exit_index, straight.exit_index[perm])
    assert torch.equal(shuffled.classes, straight.classes[perm])


def test_macs_spent_are_the_cumulative_macs_of_the_exit_taken(teacher) -> None:
    t = teacher
    policy = ExitPolicy.create(_spread_thresholds(t["logits"], "entropy")[2], "entropy", 10, 3)
    out = EarlyExitRouter(t["model"], policy)(t["x"])
    assert out.macs.tolist() == [t["macs"][e] for e in out.exit_index.tolist()]
    assert full_network_macs(t["model"], t["splits"].image_shape) < t["macs"][-1]  # no early heads


def test_batch_level_routing_waits_for_the_hardest_image(teacher) -> None:
    t = teacher
    policy = ExitPolicy.create(_spread_thresholds(t["logits"], "entropy")[2], "entropy", 10, 3)
    router = EarlyExitRouter(t["model"], policy)
    macs = router.macs_per_exit(t["splits"].image_shape, torch.device("cpu"))
    for batch in (t["x"][:1], t["x"][:16], t["x"]):
        per_sample = router(batch)
        whole = route_whole_batch(t["model"], batch, policy, macs)
        assert whole.exit_index.unique().tolist() == [per_sample.exit_index.max().item()]
    assert torch.equal(route_whole_batch(t["model"], t["x"][:1], policy, macs).exit_index,
                       router(t["x"][:1]).exit_index)  # fmt: skip


def test_images_of_the_wrong_shape_are_a_clear_error(teacher) -> None:
    t = teacher
    policy = ExitPolicy.create(0.5, "entropy", 10, 3)
    router = EarlyExitRouter(t["model"], policy, image_shape=t["splits"].image_shape)
    with pytest.raises(ImageInputError, match="model expects 3x8x8"):
        router(torch.zeros(2, 3, 9, 8))
    with pytest.raises(ImageInputError, match=r"\(B, C, H, W\)"):
        router(torch.zeros(3, 8, 8))


def test_thresholds_outside_the_rule_range_are_refused() -> None:
    with pytest.raises(ValueError, match="range"):
        ExitPolicy.create(2.5, "entropy", 10, 3)  # log 10 = 2.303
    with pytest.raises(ValueError, match="range"):
        ExitPolicy.create([0.5, 1.5], "max_softmax", 10, 3)
    with pytest.raises(ValueError, match="one per early exit"):
        ExitPolicy.create([0.1, 0.2, 0.3, 0.4], "entropy", 10, 3)
    top = ExitPolicy.create(float(np.log(10)), "entropy", 10, 3).thresholds[0]
    assert top <= np.log(10) and top == float(np.float32(top))  # float32 kept inside the range


def test_thresholds_file_round_trip_and_refusals(tmp_path, teacher, tiny_run) -> None:
    t = teacher
    policy = ExitPolicy.create([0.4, 0.9], "entropy", 10, 3, temperatures=[1.0, 1.5, 2.0])
    path = save_thresholds(tmp_path / "t.json", policy, t["identity"], {"note": "test"})
    assert load_thresholds(path, t["identity"]) == policy
    student = _setup(tiny_run["student_erde"])["identity"]
    with pytest.raises(ThresholdsFileError, match="another model"):
        load_thresholds(path, student)
    data = json.loads(path.read_text())
    bad = {
        "range": {**data, "thresholds": [0.4, 7.0]},
        "unknown exit rule": {**data, "rule": "margin"},
        "list of numbers": {**data, "thresholds": "0.4"},
        "temperatures": {**data, "temperatures": [1.0, -1.0, 2.0]},
        "not an erde thresholds file": {**data, "format": "other"},
        "calibrated for a model with num_exits": {
            **data,
            "model": {**data["model"], "num_exits": 4},
        },
    }
    for message, content in bad.items():
        (tmp_path / "bad.json").write_text(json.dumps(content))
        with pytest.raises(ThresholdsFileError, match=message):
            load_thresholds(tmp_path / "bad.json", t["identity"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ThresholdsFileError, match="not readable JSON"):
        load_thresholds(tmp_path / "bad.json", t["identity"])
    assert thresholds_path(tmp_path / "run" / "checkpoint.pt").name == "checkpoint.thresholds.json"


def test_load_image_converts_mode_and_resizes(tmp_path) -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (20, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rgba[:, :, 0], "L").save(tmp_path / "g.png")
    assert load_image(tmp_path / "a.png", (3, 8, 8)).shape == (3, 8, 8)
    grey = load_image(tmp_path / "g.png", (3, 20, 30))
    assert grey.dtype == torch.uint8 and torch.equal(grey[0], grey[2])  # grey expanded to RGB
    assert torch.equal(grey[0], torch.from_numpy(rgba[:, :, 0]))  # right size: pixels untouched
    assert load_image(tmp_path / "a.png", (1, 20, 30)).shape == (1, 20, 30)
    with pytest.raises(ImageInputError, match="expects 8x8"):
        load_image(tmp_path / "a.png", (3, 8, 8), resize=False)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ImageInputError, match="cannot read image"):
        load_image(tmp_path / "broken.png", (3, 8, 8))


def test_predict_cli_reports_bad_files_and_goes_on(tmp_path, tiny_run, capsys) -> None:
    ckpt = tmp_path / "model" / "checkpoint.pt"
    ckpt.parent.mkdir()
    shutil.copy(tiny_run["teacher"], ckpt)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(images / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(images / "big.png")
    (images / "z.png").write_bytes(b"garbage")
    assert main(["predict", str(ckpt), str(images)]) == 2  # not calibrated yet: no thresholds
    assert "erde calibrate" in capsys.readouterr().err
    assert main(["predict", str(ckpt), str(images), "--threshold", "1.0", "--no-resize"]) == 1
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines()]
    assert [Path(r["file"]).name for r in lines] == ["0.png", "1.png", "2.png", "big.png", "z.png"]
    assert {"class", "class_name", "probability", "exit", "score", "macs"} <= set(lines[0])
    assert "expects 8x8" in lines[3]["error"] and "cannot read image" in lines[4]["error"]
    assert "2 of 5 images" in err
    assert main(["predict", str(ckpt), str(images / "big.png"), "--threshold", "1.0"]) == 0
    assert json.loads(capsys.readouterr().out)["exit"] in (0, 1, 2)  # resized by default
    assert main(["predict", str(ckpt), str(images), "--threshold", "9"]) == 2
    assert "outside the entropy rule's range" in capsys.readouterr().err


def test_benchmark_records_relate_speedups_and_macs(teacher) -> None:
    t = teacher
    policy = ExitPolicy.create(_spread_thresholds(t["logits"], "entropy")[2], "entropy", 10, 3)
    x = t["x"][:8]
    records = benchmark_routing(t["model"], x, policy, (1, 4), repeats=1, min_time=0.0)
    spent = EarlyExitRouter(t["model"], policy)(x).macs.double().mean().item()
    ideal = full_network_macs(t["model"], t["splits"].image_shape) / spent
    assert [(r["backend"], r["batch_size"]) for r in records] == [
        ("torch", 1), ("torch-batch-routing", 1), ("torch", 4), ("torch-batch-routing", 4)
    ]  # fmt: skip
    for r in records:
        assert r["ideal_speedup"] == pytest.approx(ideal)
        assert r["measured_speedup"] == pytest.approx(r["early_exit_ips"] / r["full_ips"])
        assert r["ratio"] == pytest.approx(r["measured_speedup"] / r["ideal_speedup"])
        low, high = r["speedup_quartiles"]
        assert low <= high and r["turns"] >= 1
        assert r["warning"] == timing_warning(r)


def test_per_turn_speedup_quartiles_come_from_paired_turns() -> None:
    full = [2.0, 2.0, 2.0, 2.0, 2.0]
    early = [1.0, 1.0, 0.5, 1.0, 2.0]  # per turn: 2, 2, 4, 2, 1
    assert speedup_spread(full, early) == (2.0, 2.0)
    assert speedup_spread([3.0], [1.0]) == (3.0, 3.0)


def _record(ratio: float, quartiles: tuple[float, float], speedup: float = 2.0) -> dict:
    return {"backend": "torch", "batch_size": 32, "measured_speedup": speedup,
            "speedup_quartiles": list(quartiles), "ratio": ratio}  # fmt: skip


def test_a_busy_machine_s_impossible_ratio_is_flagged() -> None:
    assert timing_warning(_record(0.9, (1.9, 2.1))) is None  # steady and plausible
    loaded = timing_warning(_record(7.96, (1.9, 2.1)))  # what a loaded machine printed once
    assert loaded.startswith("warning: torch batch 32: ratio 7.96 is more than skipped MACs")
    assert "--threads 1" in loaded
    noisy = timing_warning(_record(0.9, (1.2, 2.4)))
    assert "speedups varied by 60 % between turns" in noisy


@pytest.mark.slow
def test_compiled_stages_route_like_eager_ones(teacher) -> None:
    t = teacher
    policy = ExitPolicy.create(_spread_thresholds(t["logits"], "entropy")[2], "entropy", 10, 3)
    x = t["x"][:40]
    eager = EarlyExitRouter(t["model"], policy)(x)
    compiled = EarlyExitRouter(t["model"], policy, compile=True)
    for batch in (x, x[:9]):  # a second batch size reuses the dynamic-shape graphs
        out = compiled(batch)
        same = out.exit_index == eager.exit_index[: len(batch)]
        fence = (eager.scores[: len(batch)] - policy.thresholds[0]).abs() < 1e-4  # float tolerance
        assert bool((same | fence).all())
        torch.testing.assert_close(
            out.probabilities[same], eager.probabilities[: len(batch)][same], rtol=1e-4, atol=1e-5
        )
    assert len(set(eager.exit_index.tolist())) > 1


def test_channels_last_routing_keeps_nhwc_and_gives_the_same_answers(teacher) -> None:
    t = teacher
    scores = exits.rule_score(t["logits"][0], "entropy").sort().values
    middle = len(scores) // 2
    threshold = 0.5 * (scores[middle] + scores[middle + 1]).item()  # no image sits on it
    policy = ExitPolicy.create(threshold, "entropy", 10, t["model"].num_exits)
    reference = _route(EarlyExitRouter(t["model"], policy), t["x"], 64)

    nhwc_model = copy.deepcopy(t["model"]).to(memory_format=torch.channels_last)
    x = t["x"].contiguous(memory_format=torch.channels_last)
    out = _route(EarlyExitRouter(nhwc_model, policy), x, 64)
    assert torch.equal(out.exit_index, reference.exit_index)
    assert torch.equal(out.classes, reference.classes)
    assert 0 < int((out.exit_index == 0).sum()) < len(out)  # some images left early, some did not

    h = nhwc_model.stages[0](x[:8])
    assert h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous()
    kept = compact_rows(h, torch.tensor([1, 5, 6]))
    assert kept.is_contiguous(memory_format=torch.channels_last) and torch.equal(kept, h[[1, 5, 6]])


def test_benchmark_in_channels_last_leaves_the_callers_model_alone(teacher) -> None:
    t = teacher
    policy = ExitPolicy.create(_spread_thresholds(t["logits"], "entropy")[2], "entropy", 10, 3)
    conv = next(m for m in t["model"].modules() if isinstance(m, torch.nn.Conv2d))
    records = benchmark_routing(
        t["model"], t["x"][:8], policy, (4,), repeats=1, min_time=0.0, channels_last=True
    )
    assert {r["backend"] for r in records} == {"torch", "torch-batch-routing"}
    assert conv.weight.is_contiguous()  # still NCHW


def test_bench_cli_writes_one_record_per_backend_and_batch_size(tmp_path, tiny_run) -> None:
    out = tmp_path / "bench.json"
    code = main(
        [
            "bench", str(tiny_run["teacher"]), "--threshold", "0.5", "--batch-sizes", "1,4",
            "--images", "8", "--repeats", "1", "--min-time", "0", "--json", str(out),
        ]
    )  # fmt: skip
    assert code == 0
    records = json.loads(out.read_text())
    assert sorted((r["backend"], r["batch_size"]) for r in records) == sorted(
        (b, n) for b in ("torch", "torch-batch-routing", "onnxruntime") for n in (1, 4)
    )
    for r in records:
        assert r["ratio"] == pytest.approx(r["measured_speedup"] / r["ideal_speedup"])
        assert r["full_ips"] > 0 and r["early_exit_ips"] > 0
    assert len({r["ideal_speedup"] for r in records}) == 1  # one policy, one MAC budget


def _bench_record(backend: str, speedup: float, batch: int = 256) -> dict:
    return {"backend": backend, "batch_size": batch, "device": "cpu", "full_ips": 1000.0,
            "early_exit_ips": 1000.0 * speedup, "measured_speedup": speedup}  # fmt: skip


def test_early_exit_slower_than_the_full_network_is_said_plainly_with_what_to_serve() -> None:
    slower = [_bench_record("torch", 0.6), _bench_record("torch-batch-routing", 0.8)]
    advice = serving_advice(slower)
    assert advice.startswith("at batch 256 on cpu the full network without exits is faster")
    assert "torch-batch-routing, 0.80x" in advice and "serve it without routing" in advice
    assert serving_advice([_bench_record("torch", 0.6), _bench_record("onnxruntime", 1.3)]) is None


def test_bench_says_first_what_it_times_and_how_long_it_should_take(teacher) -> None:
    t = teacher
    policy = ExitPolicy.create(_spread_thresholds(t["logits"], "entropy")[2], "entropy", 10, 3)
    lines: list[str] = []
    records = benchmark_routing(
        t["model"], t["x"][:8], policy, (1, 4), repeats=2, min_time=0.0, log=lines.append
    )
    plan = lines[0]
    assert plan.startswith("cpu: timing 3 ways to serve (full, torch, torch-batch-routing)")
    assert "6 candidates of 8 images per pass" in plan and "estimate about " in plan, plan
    assert all("full_network_faster" in r for r in records)
    slower = [r for r in records if r["full_network_faster"]]
    assert all(r["measured_speedup"] < 1 for r in slower)
    assert any("serve it without routing" in line for line in lines) == bool(slower)


def test_the_bench_estimate_counts_every_candidate_s_passes() -> None:
    assert estimate_seconds(2.0, candidates=5, repeats=5, min_time=1.0) == 5 * (1 + 5) * 2.0
    assert estimate_seconds(0.01, candidates=3, repeats=5, min_time=1.0) == pytest.approx(
        3 * (1 + 100) * 0.01
    )  # min_time, not repeats, sets the count of short passes
    assert [fmt_duration(s) for s in (45, 485, 9000)] == ["45 s", "8 min", "2.5 h"]


def test_bench_help_says_how_long_it_takes(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "It takes minutes" in text and "prints its own estimate first" in text
