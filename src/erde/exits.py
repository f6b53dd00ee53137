"""Exit heads and exit rules.

An exit head turns a stage's feature map into class logits. An exit rule says,
from those logits, whether an image may leave: the paper's rule stops at the
first exit whose softmax entropy is below a threshold; the max-softmax rule
stops when the top probability reaches a threshold. Both are expressed here
once and reused by evaluation (simulated on recorded logits), the routing
engine and the ONNX runtime, so that all three agree exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from erde.errors import ErdeError


class ThresholdError(ErdeError, ValueError):
    """A threshold outside its rule's range, or the wrong number of thresholds."""


class ExitHead(nn.Module):
    """BN -> ReLU -> adaptive avg-pool to ``pool x pool`` -> Dropout -> FC (as in the paper).

    The pool is adaptive (output side ``pool``) rather than a fixed 2x2 kernel so
    that the head's size does not depend on the input resolution. ``hidden > 0``
    inserts one hidden FC layer for users who want a deeper head. ``logit_scale``
    multiplies the logits (a backbone's ``head_logit_scale``; FastNet's 1/9 keeps
    its heads stable at a high learning rate).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool: int = 2,
        dropout: float = 0.5,
        hidden: int = 0,
        logit_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.logit_scale = float(logit_scale)
        self.bn = nn.BatchNorm2d(in_channels)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.dropout = nn.Dropout(dropout)
        features = in_channels * pool * pool
        if hidden > 0:
            self.fc = nn.Sequential(
                nn.Linear(features, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
            )
        else:
            self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, K)
        x = self.pool(F.relu(self.bn(x)))
        logits = self.fc(self.dropout(torch.flatten(x, 1)))
        return logits if self.logit_scale == 1.0 else logits * self.logit_scale


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy in nats along the last dim: (..., K) -> (...)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Top softmax probability along the last dim: (..., K) -> (...)."""
    return F.softmax(logits.float(), dim=-1).amax(dim=-1)


@dataclass(frozen=True)
class ExitRule:
    """An exit rule: a score per image, which side of the threshold leaves, and its range.

    ``score``: logits (..., K) -> (...) float32. ``leaves_below``: an image leaves
    when its score is below the threshold (entropy), else when at or above it
    (max-softmax). ``top(K)``: the top of the threshold range, whose bottom is 0.
    """

    name: str
    score: Callable[[torch.Tensor], torch.Tensor]
    leaves_below: bool
    top: Callable[[int], float]
    hint: str = ""  # appended to range errors, e.g. "(0 to log K, K = {k} classes)"


EXIT_RULES: dict[str, ExitRule] = {}


def register_rule(
    name: str, *, leaves_below: bool, top: Callable[[int], float], hint: str = ""
) -> Callable[[Callable[[torch.Tensor], torch.Tensor]], Callable[[torch.Tensor], torch.Tensor]]:
    """Register an exit rule on its score function: evaluation, calibration, routing, export
    and the CLI find it by name (``--rule``, ``evaluation.rules``)."""

    def decorator(score: Callable[[torch.Tensor], torch.Tensor]):
        if name in EXIT_RULES:
            raise KeyError(f"exit rule {name!r} is already registered")
        EXIT_RULES[name] = ExitRule(name, score, leaves_below, top, hint)
        RULES[:] = list(EXIT_RULES)
        return score

    return decorator


RULES: list[str] = []  # the registered names, in registration order


register_rule(
    "entropy", leaves_below=True, top=lambda k: math.log(k), hint=" (0 to log K, K = {k} classes)"
)(entropy)
register_rule("max_softmax", leaves_below=False, top=lambda k: 1.0)(max_softmax)


def get_rule(rule: str) -> ExitRule:
    """The registered rule ``rule``; a ValueError listing the valid ones otherwise."""
    if rule not in EXIT_RULES:
        raise ThresholdError(
            f"unknown exit rule {str(rule)[:40]!r}; valid rules: {', '.join(RULES)}"
        )
    return EXIT_RULES[rule]


def rule_score(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """The score the rule compares to its threshold (entropy, or max probability)."""
    return get_rule(rule).score(logits)


def rule_range(rule: str, num_classes: int) -> tuple[float, float]:
    """Closed range of meaningful thresholds: entropy in [0, log K], max-softmax in [0, 1]."""
    return 0.0, float(get_rule(rule).top(num_classes))


def never_threshold(rule: str, num_classes: int) -> float:
    """The threshold at which no image leaves early, whatever its score.

    The bottom of the range for a rule that leaves below its threshold (no entropy
    is < 0); for one that leaves at or above it, one float32 step above the top: a
    top probability of exactly 1.0 (saturated logits) still leaves at the top.
    """
    low, high = rule_range(rule, num_classes)
    if get_rule(rule).leaves_below:
        return low
    return torch.nextafter(torch.tensor(high), torch.tensor(math.inf)).item()


def threshold_bounds(rule: str, num_classes: int) -> tuple[float, float]:
    """The interval holding every accepted threshold: the rule's range and
    :func:`never_threshold` (the only value accepted above the top)."""
    low, high = rule_range(rule, num_classes)
    return low, max(high, never_threshold(rule, num_classes))


def conservative_end(rule: str, num_classes: int) -> float:
    """The threshold at which (almost) no image leaves early: the bottom for a rule that
    leaves below its threshold, the top for one that leaves at or above it."""
    low, high = rule_range(rule, num_classes)
    return low if get_rule(rule).leaves_below else high


def check_thresholds(
    thresholds: float | Sequence[float], rule: str, num_classes: int, num_exits: int
) -> list[float]:
    """Validate thresholds for ``rule`` and expand one value to one per early exit.

    Returns ``num_exits - 1`` values (the last exit always answers). Every value
    given is range-checked, even one that ends up unused (a single-exit model,
    a value for the last exit). Raises :class:`ThresholdError` (a ``ValueError``)
    naming the valid range when a value is outside it.
    """
    low, high = rule_range(rule, num_classes)
    never = never_threshold(rule, num_classes)  # in range, or one float32 step above it
    scalar = isinstance(thresholds, (int, float))
    values = [float(thresholds)] if scalar else [float(t) for t in thresholds]
    hint = get_rule(rule).hint.format(k=num_classes)
    for t in values:
        if not (low <= t <= high or t == never):  # also false for NaN
            raise ThresholdError(
                f"threshold {t} is outside the {rule} rule's range [{low:.4g}, {high:.4g}]{hint}"
            )
    if scalar or len(values) == 1:  # one value, bare or in a list: shared by every early exit
        return values * (num_exits - 1)
    if len(values) == num_exits and num_exits > 1:
        values = values[:-1]  # a value for the last exit is accepted and ignored
    if len(values) != num_exits - 1:
        raise ThresholdError(
            f"expected 1 or {num_exits - 1} thresholds (one per early exit), got {len(values)}"
        )
    return values


def may_exit(score: torch.Tensor, threshold: float, rule: str) -> torch.Tensor:
    """Boolean mask of samples the rule lets leave: entropy < theta, or max-softmax >= theta."""
    return score < threshold if get_rule(rule).leaves_below else score >= threshold


def first_exit(exit_logits: torch.Tensor, thresholds: Sequence[float], rule: str) -> torch.Tensor:
    """Index of the exit each sample leaves at, from every exit's logits.

    ``exit_logits``: (E, N, K); ``thresholds``: E-1 values. Returns (N,) int64.
    The last exit always answers. This is the reference the router must match.
    """
    num_exits, n = exit_logits.shape[:2]
    chosen = torch.full((n,), num_exits - 1, dtype=torch.long, device=exit_logits.device)
    undecided = torch.ones(n, dtype=torch.bool, device=exit_logits.device)
    for i in range(num_exits - 1):
        leave = undecided & may_exit(rule_score(exit_logits[i], rule), thresholds[i], rule)
        chosen[leave] = i
        undecided &= ~leave
    return chosen
