"""Loss functions: hand-computed values, masks checked through autograd, baselines vs references."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn import functional as F

from erde.errors import ConfigError
from erde.losses import (
    ce_exit_loss,
    erde_exit_loss,
    exit_mapping,
    kd_exit_loss,
    kl_per_sample,
    normalized_entropy_loss,
    student_loss,
    teacher_loss,
)


def _logits(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# --------------------------------------------------------------------------- L_E


def test_entropy_loss_is_zero_for_uniform_prediction() -> None:
    value = normalized_entropy_loss(torch.zeros(3, 10, dtype=torch.float64))
    assert torch.allclose(value, torch.zeros(3, dtype=torch.float64), atol=1e-12)


def test_entropy_loss_is_one_for_one_hot_like_prediction() -> None:
    logits = _logits([60.0, 0.0, 0.0, 0.0], [0.0, 0.0, 80.0, 0.0])
    value = normalized_entropy_loss(logits)
    assert torch.allclose(value, torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_entropy_loss_in_between_matches_hand_computation() -> None:
    # softmax([ln 3, 0]) = [3/4, 1/4]; H = 3/4 ln(4/3) + 1/4 ln 4; L_E = 1 - H / ln 2
    value = normalized_entropy_loss(_logits([math.log(3.0), 0.0]))
    h = 0.75 * math.log(4 / 3) + 0.25 * math.log(4)
    assert value.item() == pytest.approx(1 - h / math.log(2), abs=1e-12)
    assert 0.0 < value.item() < 1.0


def test_entropy_loss_grows_as_the_prediction_sharpens() -> None:
    gaps = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0, 8.0], dtype=torch.float64)
    logits = torch.stack([gaps, torch.zeros_like(gaps), torch.zeros_like(gaps)], dim=1)
    values = normalized_entropy_loss(logits)
    assert torch.all(values[1:] > values[:-1])


def test_kl_per_sample_is_zero_for_identical_logits_and_scales_with_tau_squared() -> None:
    torch.manual_seed(0)
    z = torch.randn(5, 4, dtype=torch.float64)
    assert torch.allclose(kl_per_sample(z, z, 3.0), torch.zeros(5, dtype=torch.float64))
    # softmax([0, ln 3]) = [1/4, 3/4] vs softmax([0, 0]) = [1/2, 1/2] at tau = 1
    kl = kl_per_sample(_logits([0.0, math.log(3.0)]), _logits([0.0, 0.0]), 1.0)
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl.item() == pytest.approx(expected, abs=1e-12)
    # tau = 2 with logits doubled gives the same distributions, times tau^2 = 4
    kl2 = kl_per_sample(_logits([0.0, 2 * math.log(3.0)]), _logits([0.0, 0.0]), 2.0)
    assert kl2.item() == pytest.approx(4 * expected, abs=1e-12)


# --------------------------------------------------------------------------- ERDE exit loss


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two samples, two classes; sample 0 the teacher gets right, sample 1 wrong."""
    student = _logits([0.0, 2 * math.log(3.0)], [math.log(4.0), 0.0])
    teacher = _logits([0.0, 2 * math.log(2.0)], [0.0, 2 * math.log(2.0)])  # argmax 1 twice
    labels = torch.tensor([1, 0])
    return student, teacher, labels


def test_erde_loss_matches_hand_computed_value() -> None:
    student, teacher, labels = _hand_batch()
    alpha, beta, gamma, tau = 0.5, 2.0, 3.0, 2.0
    terms = erde_exit_loss(student, teacher, labels, alpha, beta, gamma, tau)

    # CE at temperature 1: softmax(s0) = [1/10, 9/10], y=1; softmax(s1) = [4/5, 1/5], y=0
    ce = (math.log(10 / 9) + math.log(5 / 4)) / 2
    # sample 0 (teacher right): softmax(t0/2) = [1/3, 2/3], softmax(s0/2) = [1/4, 3/4]
    kl0 = tau**2 * (1 / 3 * math.log((1 / 3) / (1 / 4)) + 2 / 3 * math.log((2 / 3) / (3 / 4)))
    kl = kl0 / 2  # sample 1 contributes nothing, the mean is over the whole batch
    # sample 1 (teacher wrong): H([4/5, 1/5]) over ln 2
    h1 = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    ent = (1 - h1 / math.log(2)) / 2  # sample 0 contributes nothing
    assert terms["ce"].item() == pytest.approx(ce, abs=1e-12)
    assert terms["kl"].item() == pytest.approx(kl, abs=1e-12)
    assert terms["entropy"].item() == pytest.approx(ent, abs=1e-12)
    assert terms["teacher_correct"].item() == pytest.approx(0.5)
    total = alpha * ce + beta * kl + gamma * ent
    assert terms["total"].item() == pytest.approx(total, abs=1e-12)
    # the same value worked out on paper: 0.5 * 0.164252 + 2 * 0.034744 + 3 * 0.139036
    assert terms["total"].item() == pytest.approx(0.568722, abs=5e-6)


def test_erde_kl_gives_no_gradient_to_teacher_wrong_samples() -> None:
    student, teacher, labels = _hand_batch()
    student.requires_grad_(True)
    terms = erde_exit_loss(student, teacher, labels, alpha=0.0, beta=1.0, gamma=0.0, tau=4.0)
    terms["total"].backward()
    assert torch.all(student.grad[1] == 0)  # teacher wrong: the KL term ignores it
    assert student.grad[0].abs().sum() > 0  # teacher right: the KL term pulls it


def test_erde_entropy_term_gives_no_gradient_to_teacher_correct_samples() -> None:
    student, teacher, labels = _hand_batch()
    student.requires_grad_(True)
    terms = erde_exit_loss(student, teacher, labels, alpha=0.0, beta=0.0, gamma=1.0, tau=4.0)
    terms["total"].backward()
    assert torch.all(student.grad[0] == 0)  # teacher right: no entropy push
    assert student.grad[1].abs().sum() > 0  # teacher wrong: pushed towards uncertainty
    # gradient descent on L_E flattens the wrong sample's prediction
    flatter = (student - 0.1 * student.grad).detach()
    assert normalized_entropy_loss(flatter[1:]) < normalized_entropy_loss(student[1:].detach())


def test_erde_all_correct_batch_has_zero_entropy_term_and_all_wrong_zero_kl() -> None:
    torch.manual_seed(1)
    student = torch.randn(6, 5, dtype=torch.float64)
    teacher = torch.randn(6, 5, dtype=torch.float64)
    right = teacher.argmax(-1)
    terms = erde_exit_loss(student, teacher, right, 1.0, 1.0, 1.0, 4.0)
    assert terms["entropy"].item() == 0.0
    assert terms["kl"].item() > 0
    wrong = (right + 1) % 5
    terms = erde_exit_loss(student, teacher, wrong, 1.0, 1.0, 1.0, 4.0)
    assert terms["kl"].item() == 0.0
    assert terms["entropy"].item() > 0


def test_erde_masked_terms_are_averaged_over_the_whole_batch() -> None:
    torch.manual_seed(2)
    student = torch.randn(4, 3, dtype=torch.float64) * 3
    teacher = torch.randn(4, 3, dtype=torch.float64)
    labels = teacher.argmax(-1).clone()
    labels[2] = (labels[2] + 1) % 3  # only sample 2 is teacher-wrong
    terms = erde_exit_loss(student, teacher, labels, 1.0, 1.0, 1.0, 2.0)
    only_wrong = normalized_entropy_loss(student[2:3]).item()
    assert terms["entropy"].item() == pytest.approx(only_wrong / 4, abs=1e-12)
    right = [0, 1, 3]
    kl_right = kl_per_sample(student[right], teacher[right], 2.0).sum().item()
    assert terms["kl"].item() == pytest.approx(kl_right / 4, abs=1e-12)


def test_erde_with_gamma_zero_and_all_correct_equals_kd() -> None:
    torch.manual_seed(3)
    student = torch.randn(8, 6)
    teacher = torch.randn(8, 6)
    labels = teacher.argmax(-1)
    erde = erde_exit_loss(student, teacher, labels, 0.7, 1.3, 5.0, 3.0)["total"]
    kd = kd_exit_loss(student, teacher, labels, 0.7, 1.3, 3.0)["total"]
    assert torch.allclose(erde, kd)


def test_erde_uncertain_or_incorrect_moves_a_right_but_unsure_teacher_to_the_entropy_term() -> None:
    """distill.uncertain_above: the "uncertain or incorrect" reading of the entropy mask."""
    student = _logits([2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0])
    teacher = _logits([6.0, 0.0, 0.0], [0.0, 0.3, 0.0], [4.0, 0.0, 0.0])
    labels = torch.tensor([0, 1, 2])  # sample 0: right and sure; 1: right, unsure; 2: wrong
    h_teacher = 1 - normalized_entropy_loss(teacher)  # H / log K per sample
    assert h_teacher[0] < 0.1 and 0.9 < h_teacher[1] < 0.995  # the setting is what the names say

    terms = erde_exit_loss(student, teacher, labels, 1.0, 1.0, 1.0, 2.0, uncertain_above=0.5)

    kl_sure = kl_per_sample(student[:1], teacher[:1], 2.0).item()
    assert terms["kl"].item() == pytest.approx(kl_sure / 3, abs=1e-12)  # sample 0 only
    ent = normalized_entropy_loss(student[1:]).sum().item()
    assert terms["entropy"].item() == pytest.approx(ent / 3, abs=1e-12)  # samples 1 and 2
    assert terms["teacher_correct"].item() == pytest.approx(2 / 3)
    assert terms["teacher_trusted"].item() == pytest.approx(1 / 3)

    plain = erde_exit_loss(student, teacher, labels, 1.0, 1.0, 1.0, 2.0)  # incorrect only
    assert "teacher_trusted" not in plain
    kl_right = kl_per_sample(student[:2], teacher[:2], 2.0).sum().item()
    assert plain["kl"].item() == pytest.approx(kl_right / 3, abs=1e-12)
    # above the unsure teacher's 0.990: nothing moves
    loose = erde_exit_loss(student, teacher, labels, 1.0, 1.0, 1.0, 2.0, uncertain_above=0.995)
    assert loose["total"].item() == pytest.approx(plain["total"].item(), abs=1e-12)


def test_student_loss_passes_uncertain_above_to_erde_only() -> None:
    torch.manual_seed(4)
    student = [torch.randn(5, 4)]
    teacher = [torch.randn(5, 4) * 0.1]  # every teacher answer close to uniform: unsure
    labels = teacher[0].argmax(-1)  # ... and right
    args = (student, teacher, labels, [1.0], [0])
    erde = student_loss("erde", *args, uncertain_above=0.5)
    assert erde["kl_0"].item() == 0.0 and erde["entropy_0"].item() > 0
    assert student_loss("erde", *args)["entropy_0"].item() == 0.0
    kd = student_loss("kd", *args, uncertain_above=0.5)
    assert kd["total"] == student_loss("kd", *args)["total"]


# --------------------------------------------------------------------------- KD and CE


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_equals_classic_hinton_kd(tau: float) -> None:
    torch.manual_seed(4)
    student = torch.randn(16, 10)
    teacher = torch.randn(16, 10) * 2
    labels = torch.randint(0, 10, (16,))
    alpha, beta = 0.3, 0.9
    hinton = alpha * F.cross_entropy(student, labels) + beta * tau**2 * F.kl_div(
        F.log_softmax(student / tau, dim=1),
        F.softmax(teacher / tau, dim=1),
        reduction="batchmean",
    )
    terms = kd_exit_loss(student, teacher, labels, alpha, beta, tau)
    assert torch.allclose(terms["total"], hinton, rtol=1e-5, atol=1e-6)


def test_kd_applies_to_every_sample_even_teacher_wrong_ones() -> None:
    student, teacher, labels = _hand_batch()
    student.requires_grad_(True)
    kd_exit_loss(student, teacher, labels, alpha=0.0, beta=1.0, tau=4.0)["total"].backward()
    assert student.grad[1].abs().sum() > 0


def test_ce_uses_labels_only() -> None:
    torch.manual_seed(5)
    student = [torch.randn(7, 4) for _ in range(2)]
    labels = torch.randint(0, 4, (7,))
    expected = sum(w * F.cross_entropy(z, labels) for z, w in zip(student, (1.0, 0.5), strict=True))
    for teacher in (None, [torch.randn(7, 4) for _ in range(2)]):
        terms = student_loss("ce", student, teacher, labels, [1.0, 0.5], [0, 1], alpha=1.0)
        assert torch.allclose(terms["total"], expected)
    single = ce_exit_loss(student[0], labels, alpha=2.0)
    assert torch.allclose(single["total"], 2 * F.cross_entropy(student[0], labels))
    assert "kl_0" not in terms and "entropy_0" not in terms


# --------------------------------------------------------------------------- sums over exits


def test_student_loss_sums_exits_with_weights_and_mapping() -> None:
    torch.manual_seed(6)
    student = [torch.randn(9, 5) for _ in range(3)]
    teacher = [torch.randn(9, 5) for _ in range(4)]
    labels = torch.randint(0, 5, (9,))
    weights = [0.2, 0.3, 1.5]
    mapping = exit_mapping(3, 4)
    kwargs = {"alpha": 0.5, "beta": 2.0, "gamma": 1.5, "tau": 3.0}
    terms = student_loss("erde", student, teacher, labels, weights, mapping, **kwargs)
    expected = sum(
        w * erde_exit_loss(z, teacher[m], labels, 0.5, 2.0, 1.5, 3.0)["total"]
        for z, w, m in zip(student, weights, mapping, strict=True)
    )
    assert torch.allclose(terms["total"], expected)
    for i, m in enumerate(mapping):  # per-exit terms are logged by exit index
        one = erde_exit_loss(student[i], teacher[m], labels, 0.5, 2.0, 1.5, 3.0)
        assert torch.allclose(terms[f"kl_{i}"], one["kl"])
        assert torch.allclose(terms[f"entropy_{i}"], one["entropy"])
    other = student_loss("erde", student, teacher, labels, weights, [1, 1, 3], **kwargs)
    assert not torch.allclose(other["total"], terms["total"])  # the mapping is really used


def test_student_loss_kd_sums_exits() -> None:
    torch.manual_seed(7)
    student = [torch.randn(5, 3) for _ in range(2)]
    teacher = [torch.randn(5, 3) for _ in range(2)]
    labels = torch.randint(0, 3, (5,))
    terms = student_loss("kd", student, teacher, labels, [1.0, 2.0], [0, 1], beta=0.5, tau=2.0)
    expected = (
        kd_exit_loss(student[0], teacher[0], labels, 1.0, 0.5, 2.0)["total"]
        + 2.0 * (kd_exit_loss(student[1], teacher[1], labels, 1.0, 0.5, 2.0)["total"])
    )
    assert torch.allclose(terms["total"], expected)


def test_teacher_loss_is_weighted_sum_of_exit_ces() -> None:
    torch.manual_seed(8)
    exits = [torch.randn(6, 4) for _ in range(3)]
    labels = torch.randint(0, 4, (6,))
    terms = teacher_loss(exits, labels, [0.5, 1.0, 2.0])
    ces = [F.cross_entropy(z, labels) for z in exits]
    assert torch.allclose(terms["total"], 0.5 * ces[0] + ces[1] + 2.0 * ces[2])
    for i, ce in enumerate(ces):
        assert torch.allclose(terms[f"ce_{i}"], ce)
    with pytest.raises(ValueError):
        teacher_loss(exits, labels, [1.0, 1.0])  # one weight per exit


def test_student_loss_rejects_unknown_method_and_missing_teacher() -> None:
    z = [torch.randn(2, 3)]
    labels = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="valid methods: ce, kd, erde"):
        student_loss("hinton", z, z, labels, [1.0], [0])
    for method in ("kd", "erde"):
        with pytest.raises(ValueError, match="needs teacher logits"):
            student_loss(method, z, None, labels, [1.0], [0])


# --------------------------------------------------------------------------- exit mapping


def test_exit_mapping_same_index_when_counts_agree() -> None:
    assert exit_mapping(3, 3) == [0, 1, 2]
    assert exit_mapping(1, 1) == [0]


def test_exit_mapping_nearest_relative_depth() -> None:
    # student depths 1/3, 2/3, 1 vs teacher 1/4, 1/2, 3/4, 1
    assert exit_mapping(3, 4) == [0, 2, 3]
    assert exit_mapping(2, 4) == [1, 3]
    assert exit_mapping(4, 2) == [0, 0, 1, 1]  # depth 3/4 ties between 1/2 and 1: deeper wins
    assert exit_mapping(1, 4) == [3]


def test_exit_mapping_ties_go_deeper_despite_float_round_off() -> None:
    # depth 3/10 lies exactly between teacher depths 1/5 and 2/5; in floats it did not
    assert exit_mapping(10, 5) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert exit_mapping(12, 6) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_exit_mapping_last_exits_always_match_and_rejects_zero_exits() -> None:
    for n_s in range(1, 8):
        for n_t in range(1, 8):
            mapping = exit_mapping(n_s, n_t)
            assert len(mapping) == n_s and mapping[-1] == n_t - 1
            assert mapping == sorted(mapping)
    with pytest.raises(ValueError, match="at least one exit"):
        exit_mapping(0, 3)


def test_a_method_registered_in_one_place_trains_and_is_reported_end_to_end(tmp_path) -> None:
    """One function and one registration, nothing else edited: config, loop, report find it."""
    import json

    from helpers import tiny_config

    from erde.losses import METHODS, kd_exit_loss, register_method
    from erde.pipeline import run_pipeline

    @register_method("halfkd", needs_teacher=True, summary="KD with half the KL weight")
    def halfkd(z_s, z_t, labels, s):
        return kd_exit_loss(z_s.float(), z_t, labels, s.alpha, 0.5 * s.beta, s.tau)

    try:
        cfg = tiny_config(
            "distill.students=[{name: halfkd, method: halfkd}, {name: kd, method: kd}]"
        )
        paths = run_pipeline(cfg, tmp_path, progress=False)
        report = json.loads(paths["json"].read_text())
        assert list(report["models"]) == ["teacher", "student_halfkd", "student_kd"]
        metrics = (tmp_path / "student_halfkd" / "metrics.jsonl").read_text()
        assert '"kl_0"' in metrics  # the registered loss's terms were logged
    finally:
        METHODS.pop("halfkd", None)
    with pytest.raises(ConfigError, match="unknown method 'halfkd'"):
        tiny_config("distill.students=[{name: halfkd, method: halfkd}]")


def test_every_registered_method_declares_whether_it_needs_the_teacher() -> None:
    from erde.losses import METHODS

    assert {m: s.needs_teacher for m, s in METHODS.items()} == {
        "ce": False, "kd": True, "erde": True
    }  # fmt: skip
