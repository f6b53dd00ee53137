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
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from erde.errors import ErdeError

RULES = ("entropy", "max_softmax")


class ThresholdError(ErdeError, ValueError):
    """A threshold outside its rule's range, or the wrong number of thresholds."""


class ExitHead(nn.Module):
    """BN -> ReLU -> adaptive avg-pool to ``pool x pool`` -> Dropout -> FC (as in the paper).

    The pool is adaptive (output side ``pool``) rather than a fixed 2x2 kernel so
    that the head's size does not depend on the input resolution. ``hidden > 0``
    inserts one hidden FC layer for users who want a deeper head.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        pool: int = 2,
        dropout: float = 0.5,
        hidden: int = 0,
    ) -> None:
        super().__init__()
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
        return self.fc(self.dropout(torch.flatten(x, 1)))


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Softmax entropy in nats along the last dim: (..., K) -> (...)."""
    log_p = F.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def max_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Top softmax probability along the last dim: (..., K) -> (...)."""
    return F.softmax(logits.float(), dim=-1).amax(dim=-1)


def rule_score(logits: torch.Tensor, rule: str) -> torch.Tensor:
    """The score the rule compares to its threshold (entropy, or max probability)."""
    if rule == "entropy":
        return entropy(logits)
    if rule == "max_softmax":
        return max_softmax(logits)
    raise ValueError(f"unknown exit rule {rule!r}; valid rules: {', '.join(RULES)}")


def rule_range(rule: str, num_classes: int) -> tuple[float, float]:
    """Closed range of meaningful thresholds: entropy in [0, log K], max-softmax in [0, 1]."""
    if rule == "entropy":
        return 0.0, math.log(num_classes)
    if rule == "max_softmax":
        return 0.0, 1.0
    raise ValueError(f"unknown exit rule {rule!r}; valid rules: {', '.join(RULES)}")


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
    scalar = isinstance(thresholds, (int, float))
    values = [float(thresholds)] if scalar else [float(t) for t in thresholds]
    hint = f" (0 to log K, K = {num_classes} classes)" if rule == "entropy" else ""
    for t in values:
        if not (low <= t <= high):  # also false for NaN
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
    if rule == "entropy":
        return score < threshold
    if rule == "max_softmax":
        return score >= threshold
    raise ValueError(f"unknown exit rule {rule!r}; valid rules: {', '.join(RULES)}")


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
