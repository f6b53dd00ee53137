"""The training loop: teacher use, device-side metrics, sampler shards, resume checks."""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from erde.checkpoints import load_checkpoint
from erde.data import AugmentSpec, load_splits, prepare_batch
from erde.distributed import DistContext
from erde.errors import CheckpointError
from erde.training import (
    EpochSums,
    Job,
    NonFiniteWatch,
    console,
    context,
    epoch_indices,
    jobs,
    meters,
    model_run,
    optim,
    precision,
    train,
)
from erde.training.meters import collapsed_exits


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(
        tiny_config("teacher_train.epochs=1"),
        Job("teacher"),
        tmp_path_factory.mktemp("t"),
        progress=False,
    )


def test_teacher_and_erde_student_train_without_any_warning(tmp_path: Path) -> None:
    """Guards against logging a loss term that still requires grad (a warning per step)."""
    cfg = tiny_config("teacher_train.epochs=1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        teacher = train(cfg, Job("teacher"), tmp_path / "t", progress=False)
        train(
            cfg, Job("student", "erde"), tmp_path / "s", teacher_checkpoint=teacher, progress=False
        )
    assert [str(w.message) for w in caught] == []


def test_an_epoch_of_a_few_steps_warns_and_suggests_a_batch_size(tmp_path: Path, capsys) -> None:
    cfg = tiny_config(
        "teacher_train.epochs=1", "teacher_train.max_steps_per_epoch=null", "data.batch_size=512"
    )
    train(cfg, Job("teacher"), tmp_path / "t", progress=False)
    out = capsys.readouterr().out
    assert "warning: teacher: 2 optimiser steps per epoch" in out, out
    assert "try --set data.batch_size=128 (10 steps per epoch)" in out, out


def test_few_steps_asked_for_with_max_steps_per_epoch_give_no_warning() -> None:
    assert console.few_steps_warning("teacher", 1000, 128, 4, capped=True) is None
    assert console.few_steps_warning("teacher", 1000, 64, 15) is None
    line = console.few_steps_warning("teacher", 162, 128, 1)
    assert "1 optimiser step per epoch (162 training images" in line
    assert "data.batch_size=16 (10 steps per epoch)" in line
    assert "add training images" in console.few_steps_warning("teacher", 12, 4, 3)


def test_teacher_runs_once_per_batch_for_all_exits_under_inference_mode(
    tmp_path: Path, teacher_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls, exits = [], []
    real = jobs.model_from_checkpoint

    def spied(ckpt):
        teacher = real(ckpt)
        exits.append(teacher.num_exits)
        teacher.register_forward_hook(
            lambda module, args, out: calls.append((torch.is_inference_mode_enabled(), len(out)))
        )
        return teacher

    monkeypatch.setattr(jobs, "model_from_checkpoint", spied)
    cfg = tiny_config("student_train.max_steps_per_epoch=3")
    train(cfg, Job("student", "erde"), tmp_path, teacher_checkpoint=teacher_ckpt, progress=False)
    assert len(calls) == 3  # one forward per batch, none for validation
    assert all(inference for inference, _ in calls)
    assert exits[0] > 1 and {n for _, n in calls} == {exits[0]}  # every exit from that one forward


def test_erde_with_uncertain_above_logs_the_share_it_distills_beside_the_share_right(
    tmp_path: Path, teacher_ckpt: Path
) -> None:
    cfg = tiny_config("student_train.max_steps_per_epoch=3", "distill.uncertain_above=0.2")
    train(cfg, Job("student", "erde"), tmp_path, teacher_checkpoint=teacher_ckpt, progress=False)
    terms = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["terms"]
    exits = sum(1 for k in terms if k.startswith("teacher_correct_"))
    assert exits >= 2 and all(f"teacher_trusted_{i}" in terms for i in range(exits))
    shares = [(terms[f"teacher_trusted_{i}"], terms[f"teacher_correct_{i}"]) for i in range(exits)]
    assert all(0 <= trusted <= right <= 1 for trusted, right in shares), shares
    # a one-epoch teacher is unsure of much that it gets right: 0.2 moves some of it
    assert any(trusted < right for trusted, right in shares)
    assert load_checkpoint(tmp_path)["config"]["distill"]["uncertain_above"] == 0.2


def test_a_stall_inside_an_epoch_moves_its_wall_time_not_its_steady_time_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped for a while (SIGSTOP, a laptop asleep) must not skew its time estimates.

    The stall is virtual (the clock jumps 100 s), so the test holds on a loaded machine too:
    a real sleep would have to outlast steps whose own length depends on the load.
    """
    monkeypatch.setattr(model_run, "SYNC_EVERY", 2)  # blocks of 2 steps in a 12-step epoch
    real_clock, jumped = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + jumped[0])

    def stall(step: int) -> None:
        if step == 5:
            jumped[0] += 100.0  # far longer than all 12 tiny steps together

    cfg = tiny_config("teacher_train.epochs=2", "teacher_train.max_steps_per_epoch=12",
                      "teacher_train.checkpoint_every_steps=0")  # fmt: skip
    train(cfg, Job("teacher"), tmp_path, progress=False, on_step=stall)
    first, second = (json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert first["seconds_per_step"] > 100 / 12  # the wall time holds the stall ...
    assert first["steady_seconds_per_step"] < 100 / 12 / 4  # ... the median block does not
    assert first["eta_seconds"] == pytest.approx(first["steady_seconds_per_step"] * 12)
    assert 0 < second["steady_seconds_per_step"] < 100 / 12 / 4


def test_block_timer_is_the_median_seconds_per_step_of_its_blocks() -> None:
    clock = iter([0.0, 20.0, 140.0, 162.0, 180.0, 181.0])  # blocks of 20: 1, 6, 1.1, 0.9 s/step
    timer = meters.BlockTimer(0, clock=lambda: next(clock))
    assert timer.steady() is None
    for step in (20, 40, 60, 80):
        timer.mark(step)
    assert timer.steady() == pytest.approx((1.0 + 1.1) / 2)
    timer.mark(80)  # no step since the last mark: nothing to time
    assert len(timer.per_step) == 4


def test_host_reads_metrics_every_few_steps_not_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads = {"n": 0}
    real = NonFiniteWatch.first_bad_step

    def counted(self, ctx):
        reads["n"] += 1
        return real(self, ctx)

    monkeypatch.setattr(NonFiniteWatch, "first_bad_step", counted)
    steps = 2 * model_run.SYNC_EVERY
    cfg = tiny_config(
        "data.batch_size=16", "teacher_train.epochs=1", f"teacher_train.max_steps_per_epoch={steps}"
    )
    train(cfg, Job("teacher"), tmp_path, progress=False)
    # every SYNC_EVERY steps within the epoch, plus once at its end (step 40 is both)
    assert reads["n"] == (steps - 1) // model_run.SYNC_EVERY + 1


def test_epoch_sums_give_image_weighted_means() -> None:
    sums = EpochSums(torch.device("cpu"))
    labels = torch.tensor([0, 1])
    right = [torch.tensor([[5.0, 0.0], [0.0, 5.0]])] * 2  # both exits right on both images
    half = [right[0], torch.tensor([[5.0, 0.0], [5.0, 0.0]])]  # last exit wrong on one
    sums.add(torch.tensor(1.0), {"ce_0": torch.tensor(0.5)}, right, labels)
    sums.add(torch.tensor(3.0), {"ce_0": torch.tensor(1.5)}, half, labels)
    means = sums.local_means()
    assert means == {"loss": 2.0, "correct_0": 1.0, "correct_1": 0.75, "ce_0": 1.0}
    state = sums.reduced(DistContext())
    assert state["images"] == 4 and state["names"] == ["loss", "correct_0", "correct_1", "ce_0"]


def test_non_finite_watch_names_the_first_bad_step() -> None:
    watch = NonFiniteWatch(torch.device("cpu"))
    for step, loss in enumerate([1.0, 2.0, math.nan, math.inf, 3.0], start=1):
        watch.update(torch.tensor(loss), step)
    assert watch.first_bad_step(DistContext()) == 3
    assert NonFiniteWatch(torch.device("cpu")).first_bad_step(DistContext()) is None


def test_epoch_shards_are_disjoint_equal_and_depend_only_on_seed_and_epoch() -> None:
    shards = [epoch_indices(100, 0, 4, DistContext(r, r, 3)) for r in range(3)]
    assert [len(s) for s in shards] == [33, 33, 33]
    assert len(set(torch.cat(shards).tolist())) == 99
    assert torch.equal(shards[1], epoch_indices(100, 0, 4, DistContext(1, 1, 3)))
    assert not torch.equal(shards[1], epoch_indices(100, 0, 5, DistContext(1, 1, 3)))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("data.batch_size=32", "same number of processes and data.batch_size"),
        ("teacher.width=1.0", "width=0.5 but the config asks for width=1.0"),
    ],
)
def test_resume_mid_epoch_refuses_another_batch_size_or_model(
    change: str, message: str, tmp_path: Path
) -> None:
    base = ("data.max_train=256", "teacher_train.max_steps_per_epoch=null")
    cfg = tiny_config(*base, "teacher_train.checkpoint_every_steps=1")

    def crash(step: int) -> None:
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, Job("teacher"), tmp_path, progress=False, on_step=crash)
    with pytest.raises(CheckpointError, match=message):
        train(tiny_config(*base, change), Job("teacher"), tmp_path, resume=True, progress=False)


def test_mixed_precision_and_channels_last_train_on_cpu(tmp_path: Path) -> None:
    cfg = tiny_config(
        "teacher_train.epochs=1", "teacher_train.amp=true", "teacher_train.channels_last=true"
    )
    ckpt = load_checkpoint(train(cfg, Job("teacher"), tmp_path, progress=False))
    assert all(v.dtype != torch.bfloat16 for v in ckpt["model"].values())  # fp32 master weights
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert math.isfinite(json.loads(line)["train_loss"])


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedules_warm_up_then_follow_their_shape(schedule: str) -> None:
    from erde.config import TrainConfig

    t = TrainConfig(epochs=4, lr=0.4, schedule=schedule, warmup_epochs=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)
    sched = optim.build_scheduler(opt, t, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.04) and lrs[9] == pytest.approx(0.4)  # linear warm-up
    after = lrs[10:]
    if schedule == "constant":
        assert after == pytest.approx([0.4] * 30)
    else:
        assert all(a >= b for a, b in zip(after, after[1:], strict=False))  # never rises
        mid = (
            0.4 * (1 - 15 / 30) if schedule == "linear" else 0.4 * 0.5 * (1 + math.cos(math.pi / 2))
        )
        assert after[15] == pytest.approx(mid)
        assert after[-1] < 0.03  # annealed to (almost) zero by the last step


def test_label_smoothing_reaches_the_loss(tmp_path: Path) -> None:
    base = tiny_config("teacher_train.epochs=1", "teacher_train.max_steps_per_epoch=2")
    smooth = tiny_config(
        "teacher_train.epochs=1", "teacher_train.max_steps_per_epoch=2",
        "teacher_train.label_smoothing=0.3",
    )  # fmt: skip
    plain = load_checkpoint(train(base, Job("teacher"), tmp_path / "a", progress=False))
    smoothed = load_checkpoint(train(smooth, Job("teacher"), tmp_path / "b", progress=False))
    # same seed, batches and initial weights: only the targets differ
    assert plain["history"][0]["train_loss"] != smoothed["history"][0]["train_loss"]
    assert any(not torch.equal(plain["model"][k], smoothed["model"][k]) for k in plain["model"])


def test_amp_default_follows_the_cpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    from erde import hardware

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    assert precision.amp_dtype(cpu, None) is None  # fp32 where bf16 would be emulated
    assert precision.amp_dtype(cpu, True) is torch.bfloat16  # asked for: obeyed
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    assert precision.amp_dtype(cpu, None) is torch.bfloat16
    assert precision.amp_dtype(cpu, False) is None
    amx = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile\n"
    zen3 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n"
    assert "amx_bf16" in hardware.cpu_flags(amx)
    assert not set(hardware.BF16_FLAGS) & hardware.cpu_flags(zen3)
    assert hardware.cpu_flags("no flags here") == set()


def test_results_name_the_cpu_they_ran_on() -> None:
    """Speed depends on the CPU's ISA and bf16 flags: reports and RESULTS blocks record them."""
    from erde import hardware
    from erde.io import environment_info
    from erde.reproduce.render import _cpu_text

    info = "processor\t: 0\nmodel name\t: AMD EPYC 9R14\nflags\t\t: avx2 avx512_bf16\n"
    assert hardware.cpu_model(info) == "AMD EPYC 9R14"
    assert hardware.cpu_model("processor\t: 0\n") != ""  # unknown, never empty
    env = environment_info()
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu_bf16_flags"] == sorted(hardware.cpu_flags() & set(hardware.BF16_FLAGS))
    text = _cpu_text({"cpu_model": "AMD EPYC", "cpu_capability": "AVX2", "cpu_bf16_flags": []})
    assert text == ", AMD EPYC, AVX2, bf16 hardware: none"
    assert _cpu_text({"torch": "2.13.0"}) == ""  # results written before these fields existed


@pytest.mark.parametrize(
    "spec",
    [AugmentSpec(crop_padding=4, flip=True), AugmentSpec(2, False), AugmentSpec(0, False)],
    ids=["crop+flip", "crop", "none"],
)
def test_batches_from_an_epochs_draws_equal_batches_drawn_step_by_step(spec: AugmentSpec) -> None:
    """The loop draws a whole epoch's crops and flips at once (one copy to a GPU per epoch);
    every batch must still be the one a generator seeded for its own step gives."""
    cfg = tiny_config()
    splits = dataclasses.replace(load_splits(cfg), augment=spec)
    batch, steps = 16, 3
    env = context.TrainingContext(
        cfg=cfg, tcfg=cfg.teacher_train, ctx=DistContext(), device=torch.device("cpu"),
        splits=splits, teacher=None, batch_size=batch, steps_per_epoch=steps, on_step=None,
        on_epoch=None,
    )  # fmt: skip
    for step in (0, 1, 2, 3, 5, 4, 1):  # across epochs, forwards and back (a resumed run)
        epoch, k = divmod(step, steps)
        idx = epoch_indices(len(splits.train), cfg.seed, epoch, DistContext())
        idx = idx[k * batch : (k + 1) * batch]
        g = torch.Generator().manual_seed(context.augment_seed(cfg.seed, 0, step))
        expected = prepare_batch(splits.train.images[idx], splits, train=True, generator=g)
        x, labels = env.batch(step)
        assert torch.equal(x, expected), step
        assert torch.equal(labels, splits.train.labels[idx]), step
    assert not torch.equal(env.batch(0)[0], env.batch(1)[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_batch_within_an_epoch_makes_the_host_wait_for_nothing_on_a_gpu() -> None:
    cfg = tiny_config()
    splits = dataclasses.replace(load_splits(cfg), augment=AugmentSpec(4, True))
    env = context.TrainingContext(
        cfg=cfg, tcfg=cfg.teacher_train, ctx=DistContext(), device=torch.device("cuda"),
        splits=splits, teacher=None, batch_size=16, steps_per_epoch=4, on_step=None,
        on_epoch=None,
    )  # fmt: skip
    env.batch(0)  # the epoch's order and draws are copied here, once
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in (1, 2, 3):
            env.batch(step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- exits that fall to chance ------------------------------------------------------------

# Train accuracy per exit and epoch of the quarter-width KD and ERDE students distilled from
# the unsmoothed speed teacher (docs/LOG.md, 2026-12-06): their last exit fell to chance
# while the loss stayed finite, and nothing said so.
KD_FROM_SHARP_TEACHER = [
    [0.1378, 0.2096, 0.2549], [0.2393, 0.3957, 0.3291], [0.2599, 0.4789, 0.1515],
    [0.2782, 0.5238, 0.1002], [0.1442, 0.5461, 0.1000], [0.0995, 0.5935, 0.0998],
]  # fmt: skip
ERDE_FROM_SHARP_TEACHER = [
    [0.1373, 0.2070, 0.2571], [0.2477, 0.3770, 0.2912], [0.3483, 0.4915, 0.1015],
    [0.3279, 0.5103, 0.1000],
]  # fmt: skip


def _records(rows: list[list[float]]) -> list[dict]:
    return [{"epoch": i + 1, "train_exit_accuracy": row} for i, row in enumerate(rows)]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (KD_FROM_SHARP_TEACHER, {4: [2], 5: [2], 6: [0, 2]}),  # 15.2 % in epoch 3 is not chance yet
        (ERDE_FROM_SHARP_TEACHER, {3: [2], 4: [2]}),
    ],
)
def test_an_exit_that_falls_to_chance_is_caught_in_that_epoch(
    rows: list[list[float]], expected: dict[int, list[int]]
) -> None:
    records = _records(rows)
    found = {
        r["epoch"]: collapsed_exits(records[:i], r, num_classes=10) for i, r in enumerate(records)
    }
    assert {e: ks for e, ks in found.items() if ks} == expected


def test_healthy_runs_are_never_flagged() -> None:
    """The released speed teacher's epochs, and a run that starts at chance and climbs."""
    released = Path(__file__).parents[1] / "docs/results/cifar10-speed-teacher/metrics.jsonl"
    teacher = [json.loads(line) for line in released.read_text().splitlines()]
    climbing = _records([[0.1, 0.1, 0.1], [0.11, 0.1, 0.12], [0.3, 0.4, 0.5]])
    assert len(teacher) == 16
    for records in (teacher, climbing):
        assert all(not collapsed_exits(records[:i], r, 10) for i, r in enumerate(records))
    assert collapsed_exits([], {"train_exit_accuracy": [0.1]}, 10) == []  # no history: nothing


def test_a_collapse_in_a_real_run_is_warned_once_after_the_epoch_line_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The loop's own path; only the measured accuracy is replaced (a tiny run cannot be
    made to collapse on purpose without changing the code under test)."""
    import erde.training.model_run as model_run

    real = model_run.epoch_record

    def last_exit_collapses_after_epoch_1(*args, **kwargs) -> dict:
        record = real(*args, **kwargs)
        n = len(record["train_exit_accuracy"])
        record["train_exit_accuracy"] = [0.6] * (n - 1) + [0.6 if record["epoch"] == 1 else 0.1]
        return record

    monkeypatch.setattr(model_run, "epoch_record", last_exit_collapses_after_epoch_1)
    cfg = tiny_config("teacher_train.epochs=3")
    train(cfg, Job("teacher"), tmp_path, progress=False,
          on_epoch=lambda out, r: print(f"epoch line {r['epoch']}"))  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    warnings_ = [line for line in lines if line.startswith("warning: teacher: exit")]
    assert len(warnings_) == 1  # epoch 3 is still at chance: said once
    assert "exit 2 (10.0 %, 60.0 % at best before) fell to chance" in warnings_[0]
    assert "in epoch 2" in warnings_[0]
    assert lines.index(warnings_[0]) == lines.index("epoch line 2") + 1
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["collapsed_exits"] for m in metrics] == [[], [2], [2]]
