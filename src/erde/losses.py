"""Student and teacher losses as small pure functions (see docs/METHOD.md), and the
registry of student methods: a new method is one loss function plus one
``@register_method`` line (docs/ARCHITECTURE.md).

Each returns a dict of named terms so the trainer can log every term on its own;
``"total"`` is the one to back-propagate. Masked terms are averaged over the
whole batch, so a batch where the teacher is always right gives L_E = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F


def kl_per_sample(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float
) -> torch.Tensor:
    """tau^2 KL(softmax(z_T/tau) || softmax(z_S/tau)) per sample: (B, K), (B, K) -> (B,)."""
    log_p_s = F.log_softmax(student_logits / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / tau, dim=-1)
    return tau * tau * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


def normalized_entropy_loss(logits: torch.Tensor) -> torch.Tensor:
    """1 - H(softmax(z)) / log K per sample: 0 for a uniform prediction, 1 for one-hot. (B,K)->(B,)."""
    log_p = F.log_softmax(logits, dim=-1)
    ent = -(log_p.exp() * log_p).sum(dim=-1)
    return 1.0 - ent / math.log(logits.shape[-1])


def erde_exit_loss(
    student_logits: torch.Tensor,  # (B, K) student exit i
    teacher_logits: torch.Tensor,  # (B, K) teacher exit m(i)
    labels: torch.Tensor,  # (B,)
    alpha: float,
    beta: float,
    gamma: float,
    tau: float,
    label_smoothing: float = 0.0,
    uncertain_above: float | None = None,
) -> dict[str, torch.Tensor]:
    """ERDE loss of one exit.

        trusted = [argmax z_T == y]
        L = alpha * CE(z_S, y)
          + beta  * mean_B( trusted     * tau^2 KL(softmax(z_T/tau) || softmax(z_S/tau)) )
          + gamma * mean_B( not trusted * (1 - H(softmax(z_S)) / log K) )

    Where the teacher is wrong its soft labels carry the mistake, so the student
    is pushed towards uncertainty there instead of imitating it. With
    ``uncertain_above`` (the "uncertain or incorrect" reading), a right teacher
    whose normalised entropy H(softmax(z_T)) / log K exceeds it is not trusted
    either. ``teacher_correct`` logs the share of right teacher answers,
    ``teacher_trusted`` the share distilled (equal unless ``uncertain_above``).
    """
    correct = teacher_logits.argmax(dim=-1) == labels  # (B,)
    trusted = correct
    if uncertain_above is not None:
        teacher_entropy = 1.0 - normalized_entropy_loss(teacher_logits)  # H / log K, (B,)
        trusted = correct & (teacher_entropy <= uncertain_above)
    trusted = trusted.float()
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    kl = (trusted * kl_per_sample(student_logits, teacher_logits, tau)).mean()
    ent = ((1.0 - trusted) * normalized_entropy_loss(student_logits)).mean()
    total = alpha * ce + beta * kl + gamma * ent
    terms = {"total": total, "ce": ce, "kl": kl, "entropy": ent}
    terms["teacher_correct"] = correct.float().mean()
    if uncertain_above is not None:
        terms["teacher_trusted"] = trusted.mean()
    return terms


def kd_exit_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    beta: float,
    tau: float,
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Classic Hinton KD of one exit: alpha CE(z_S, y) + beta tau^2 KL on every sample."""
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    kl = kl_per_sample(student_logits, teacher_logits, tau).mean()
    return {"total": alpha * ce + beta * kl, "ce": ce, "kl": kl}


def ce_exit_loss(
    student_logits: torch.Tensor, labels: torch.Tensor, alpha: float, label_smoothing: float = 0.0
) -> dict[str, torch.Tensor]:
    """Label-only baseline of one exit: alpha CE(z_S, y)."""
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return {"total": alpha * ce, "ce": ce}


def exit_mapping(num_student_exits: int, num_teacher_exits: int) -> list[int]:
    """Teacher exit matched to each student exit.

    Same index when the counts agree, else the teacher exit at the nearest
    relative depth ((i+1)/n_S vs (j+1)/n_T), the deeper one on a tie; the last
    exits always match. Depths are compared in integers, |(j+1) n_S - (i+1) n_T|,
    so float round-off cannot break a tie the wrong way (10 vs 5 exits).
    """
    if num_student_exits < 1 or num_teacher_exits < 1:
        raise ValueError(
            f"need at least one exit on each side, got {num_student_exits} student "
            f"and {num_teacher_exits} teacher exits"
        )
    if num_student_exits == num_teacher_exits:
        return list(range(num_student_exits))
    return [
        min(
            range(num_teacher_exits),
            key=lambda j: (abs((j + 1) * num_student_exits - (i + 1) * num_teacher_exits), -j),
        )
        for i in range(num_student_exits)
    ]


def exit_mapping_by_cost(student_macs: Sequence[float], teacher_macs: Sequence[float]) -> list[int]:
    """Teacher exit matched to each student exit by relative cost, for networks of other families.

    Each exit's cost is its share of its own network's last-exit MACs
    (``macs[i] / macs[-1]``); each student exit gets the teacher exit whose
    share is nearest, the deeper one on a tie, so the last exits always match.
    Exit indices say little when a MobileNetV2 student learns from a ResNet
    teacher whose exits sit elsewhere; shares of the compute say where each
    exit really is.
    """
    if not student_macs or not teacher_macs:
        raise ValueError("need at least one exit on each side")
    if min(*student_macs, *teacher_macs) <= 0:
        raise ValueError("exit MACs must be > 0")
    s_share = [m / student_macs[-1] for m in student_macs]
    t_share = [m / teacher_macs[-1] for m in teacher_macs]
    return [
        min(range(len(t_share)), key=lambda j: (abs(t_share[j] - share), -j)) for share in s_share
    ]


def teacher_loss(
    exit_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    weights: Sequence[float],
    label_smoothing: float = 0.0,
) -> dict[str, torch.Tensor]:
    """L_T = sum_i w_i CE(z_i, y), with each exit's CE logged as ``ce_<i>``.

    ``label_smoothing`` (0 = off) mixes the one-hot target with the uniform one.
    """
    terms: dict[str, torch.Tensor] = {}
    total = exit_logits[0].new_zeros(())
    for i, (z, w) in enumerate(zip(exit_logits, weights, strict=True)):
        ce = F.cross_entropy(z, labels, label_smoothing=label_smoothing)
        terms[f"ce_{i}"] = ce
        total = total + w * ce
    terms["total"] = total
    return terms


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class LossSettings:
    """What a per-exit student loss may read: ``distill``'s weights, temperature and mask."""

    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 1.0
    tau: float = 4.0
    label_smoothing: float = 0.0
    uncertain_above: float | None = None


# (student exit logits (B, K), teacher exit logits (B, K) float32 or None, labels (B,), settings)
# -> {"total": scalar, <term>: scalar, ...}
ExitLoss = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, LossSettings], dict]


@dataclass(frozen=True)
class StudentMethod:
    """A way to train a student: its per-exit loss and whether it needs the teacher's logits."""

    name: str
    exit_loss: ExitLoss
    needs_teacher: bool
    summary: str = ""


METHODS: dict[str, StudentMethod] = {}


def register_method(
    name: str, *, needs_teacher: bool, summary: str = ""
) -> Callable[[ExitLoss], ExitLoss]:
    """Register a student method: ``@register_method("mine", needs_teacher=True)`` on its loss.

    The loss is called once per exit with the student's logits (in the step's
    precision), the mapped teacher exit's logits as float32 (None without a
    teacher), the labels and the :class:`LossSettings`, and returns its terms
    with ``"total"``. Everything else (config validation, the training loop,
    ``erde run --methods``, reports) finds the method here by name.
    """

    def decorator(fn: ExitLoss) -> ExitLoss:
        if name in METHODS:
            raise KeyError(f"student method {name!r} is already registered")
        METHODS[name] = StudentMethod(name, fn, needs_teacher, summary)
        return fn

    return decorator


@register_method("ce", needs_teacher=False, summary="cross-entropy on the labels only")
def _ce(
    z_s: torch.Tensor, _z_t: torch.Tensor | None, labels: torch.Tensor, s: LossSettings
) -> dict:
    return ce_exit_loss(z_s, labels, s.alpha, s.label_smoothing)


@register_method("kd", needs_teacher=True, summary="classic KD: CE + KL to the teacher's exit")
def _kd(z_s: torch.Tensor, z_t: torch.Tensor | None, labels: torch.Tensor, s: LossSettings) -> dict:
    assert z_t is not None
    return kd_exit_loss(z_s.float(), z_t, labels, s.alpha, s.beta, s.tau, s.label_smoothing)


@register_method(
    "erde", needs_teacher=True, summary="CE + KL where the teacher is right, entropy where wrong"
)
def _erde(
    z_s: torch.Tensor, z_t: torch.Tensor | None, labels: torch.Tensor, s: LossSettings
) -> dict:
    assert z_t is not None
    return erde_exit_loss(
        z_s.float(), z_t, labels, s.alpha, s.beta, s.gamma, s.tau, s.label_smoothing,
        s.uncertain_above,
    )  # fmt: skip


def student_loss(
    method: str,
    student_exits: Sequence[torch.Tensor],
    teacher_exits: Sequence[torch.Tensor] | None,
    labels: torch.Tensor,
    weights: Sequence[float],
    mapping: Sequence[int],
    *,
    alpha: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    tau: float = 4.0,
    label_smoothing: float = 0.0,
    uncertain_above: float | None = None,
) -> dict[str, torch.Tensor]:
    """L_tot = sum_i w_i L_i for a registered ``method``; per-exit terms logged as ``<term>_<i>``.

    ``label_smoothing`` applies to the cross-entropy on labels only, never to the
    teacher's soft targets; ``uncertain_above`` to erde only (see :func:`erde_exit_loss`).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    spec = METHODS[method]
    if spec.needs_teacher and teacher_exits is None:
        raise ValueError(f"method {method!r} needs teacher logits")
    settings = LossSettings(alpha, beta, gamma, tau, label_smoothing, uncertain_above)
    terms: dict[str, torch.Tensor] = {}
    total = student_exits[0].new_zeros(())
    for i, (z_s, w) in enumerate(zip(student_exits, weights, strict=True)):
        z_t = teacher_exits[mapping[i]].float() if spec.needs_teacher and teacher_exits else None
        parts = spec.exit_loss(z_s, z_t, labels, settings)
        total = total + w * parts.pop("total")
        terms.update({f"{k}_{i}": v for k, v in parts.items()})
    terms["total"] = total
    return terms
