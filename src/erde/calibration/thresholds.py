"""Choose exit thresholds from recorded logits: pure tensors in, an :class:`ExitPolicy` out.

MSDNet's budgeted protocol: thresholds are fitted on a held-out validation
split, never on the test set, for either

- a **MAC budget**: mean MACs per image at most ``budget`` times the full
  network's (``macs_per_exit[-1]``, the cost of an image that goes through every
  exit, as in the evaluation report), as accurate as possible within it; or
- a **maximum accuracy drop** relative to the last exit: the cheapest setting
  whose validation accuracy is at least the last exit's minus ``max_drop``.

One recorded pass of validation logits serves every candidate threshold: the
rule (:func:`erde.exits.may_exit`) is replayed on the recorded scores for
thousands of candidates at once. Optionally each exit's logits are
temperature-scaled first (one temperature per exit, fitted by NLL on the same
validation data). An unreachable target gives a :class:`CalibrationWarning`
and the nearest feasible setting (the cheapest for a budget, the most
accurate for an accuracy drop), never silence.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from erde import exits
from erde.errors import ConfigError
from erde.evaluation import simulate
from erde.inference.policy import ExitPolicy, apply_temperatures, float32_within, scale_logits

DEFAULT_BUDGETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # fractions of the full MACs


class CalibrationWarning(UserWarning):
    """The target cannot be met on validation data; the nearest feasible setting is used."""


# --------------------------------------------------------------------------- temperatures


def fit_temperature(logits: Tensor, labels: Tensor, low: float = 0.05, high: float = 20.0) -> float:
    """Temperature T minimising the NLL of softmax(logits / T) on (logits (N, K), labels (N,)).

    Golden-section search on log T (the NLL is unimodal in it); deterministic.
    """
    labels = labels.to(logits.device)

    def nll(log_t: float) -> float:
        return F.cross_entropy(scale_logits(logits, math.exp(log_t)), labels).item()

    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(60):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)


def fit_temperatures(exit_logits: Tensor, labels: Tensor) -> list[float]:
    """One temperature per exit, each fitted on that exit's logits (E, N, K)."""
    return [fit_temperature(z, labels) for z in exit_logits]


# --------------------------------------------------------------------------- candidates


def candidate_thresholds(
    scores: Tensor, rule: str, num_classes: int, max_candidates: int = 2048
) -> Tensor:
    """Thresholds that reach every distinct outcome of the rule on ``scores`` (any shape).

    Outcomes only change where a threshold crosses a recorded score, so the
    candidates are the rule range's two ends and the midpoints between
    consecutive distinct scores (midpoints generalise better than the scores
    themselves). Float32 values inside the range, ascending; thinned evenly by
    rank to at most ``max_candidates``.
    """
    low, high = exits.rule_range(rule, num_classes)
    values = torch.unique(scores.detach().float().cpu().reshape(-1))  # sorted
    values = values[(values >= low) & (values <= high)]
    mids = ((values[:-1].double() + values[1:].double()) / 2).float()
    mids = torch.where(mids <= values[:-1], values[1:], mids)  # no float32 strictly between
    ends = torch.tensor([float32_within(low, low, high), float32_within(high, low, high)])
    candidates = torch.unique(torch.cat([ends, mids]))
    if len(candidates) > max_candidates:
        keep = torch.linspace(0, len(candidates) - 1, max_candidates).round().long().unique()
        candidates = candidates[keep]
    return candidates


def evaluate_thresholds(
    scores: Tensor, correct: Tensor, macs: Tensor, thresholds: Tensor, rule: str, chunk: int = 256
) -> tuple[Tensor, Tensor]:
    """Accuracy and mean MACs of many threshold settings at once, from recorded scores.

    scores (E-1, N) float32, correct (E, N) bool, macs (E,) float64, thresholds
    (C, E-1) float32 -> accuracy (C,), mean MACs (C,), both float64. The rule
    is :func:`erde.exits.may_exit` itself, broadcast over the candidates.
    """
    num_early, n = scores.shape
    rows = torch.arange(n)
    accuracy, mean_macs = [], []
    for start in range(0, len(thresholds), chunk):
        t = thresholds[start : start + chunk].unsqueeze(-1)  # (C, E-1, 1)
        leave = exits.may_exit(scores.unsqueeze(0), t, rule)  # (C, E-1, N)
        chosen = torch.full((len(t), n), num_early, dtype=torch.long)  # (C, N) last exit
        for i in reversed(range(num_early)):  # first exit allowed to answer (faster than argmax)
            chosen = torch.where(leave[:, i], i, chosen)
        accuracy.append(correct[chosen, rows].double().mean(dim=1))
        mean_macs.append(macs[chosen].mean(dim=1))
    return torch.cat(accuracy), torch.cat(mean_macs)


# --------------------------------------------------------------------------- choosing


@dataclass(frozen=True)
class Target:
    """What calibration aims for: ``budget`` (fraction of full MACs) or ``max_drop`` (accuracy)."""

    kind: str
    value: float

    @classmethod
    def create(cls, budget: float | None, max_drop: float | None) -> Target:
        if (budget is None) == (max_drop is None):
            raise ConfigError(
                "give exactly one calibration target: a MAC budget or a max accuracy drop"
            )
        if budget is not None:
            if not (math.isfinite(budget) and budget > 0):
                raise ConfigError(f"budget must be a fraction of the full MACs > 0, got {budget}")
            return cls("budget", float(budget))
        assert max_drop is not None
        if not 0 <= max_drop <= 1:
            raise ConfigError(
                f"max accuracy drop must be in [0, 1] (0.01 = 1 point), got {max_drop}"
            )
        return cls("max_drop", float(max_drop))


def _sort_keys(accuracy: Tensor, mean_macs: Tensor, feasible: Tensor, kind: str) -> list[tuple]:
    """Sort keys, larger is better: feasible first; then best accuracy within a budget,
    or fewest MACs within an accuracy floor; infeasible ones by closeness to feasibility."""
    out = []
    for a, m, f in zip(accuracy.tolist(), mean_macs.tolist(), feasible.tolist(), strict=True):
        if kind == "budget":
            out.append((f, a, -m) if f else (f, -m, a))
        else:
            out.append((f, -m, a) if f else (f, a, -m))
    return out


@dataclass
class Calibration:
    """Chosen policy and what it gives on validation (where it was fitted) and test data."""

    policy: ExitPolicy
    target: Target
    full_macs: float  # macs_per_exit[-1]
    validation: dict[str, Any]
    test: dict[str, Any] | None
    feasible: bool
    warning: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": {"kind": self.target.kind, "value": self.target.value},
            "full_macs": self.full_macs,
            "feasible": self.feasible,
            "warning": self.warning,
            "validation": self.validation,
            "test": self.test,
        }


def outcome(
    exit_logits: Tensor, labels: Tensor, macs_per_exit: Sequence[float], policy: ExitPolicy
) -> dict:
    """What ``policy`` gives on recorded logits, via the evaluation's reference ``simulate``."""
    sim = simulate(
        apply_temperatures(exit_logits, policy),
        labels,
        macs_per_exit,
        list(policy.thresholds),
        policy.rule,
    )
    out = sim.to_dict()
    out["macs_fraction"] = sim.mean_macs / float(macs_per_exit[-1])
    out["last_exit_accuracy"] = (exit_logits[-1].argmax(-1) == labels).double().mean().item()
    out["num_images"] = int(labels.numel())
    return out


def calibrate(
    val_logits: Tensor,
    val_labels: Tensor,
    macs_per_exit: Sequence[float],
    *,
    budget: float | None = None,
    max_drop: float | None = None,
    rule: str = "entropy",
    per_exit: bool = False,
    temperature: bool | Sequence[float] = False,
    test_logits: Tensor | None = None,
    test_labels: Tensor | None = None,
    max_candidates: int = 2048,
    warn: bool = True,
) -> Calibration:
    """Fit thresholds on validation logits (E, N, K) for a budget or an accuracy drop.

    ``per_exit=False`` fits one threshold shared by every early exit;
    ``per_exit=True`` then refines each exit's threshold in turn (coordinate
    search) while the objective improves. ``temperature``: True fits one
    temperature per exit on the validation data, a sequence gives them.
    With ``test_logits``/``test_labels`` the result also says what the chosen
    policy gives on test data (never used for choosing).
    """
    target = Target.create(budget, max_drop)
    if rule not in exits.RULES:
        raise ConfigError(f"unknown exit rule {rule!r}; valid rules: {', '.join(exits.RULES)}")
    num_exits, n, num_classes = val_logits.shape
    if n == 0:
        raise ConfigError("calibration needs validation images; the validation split is empty")
    if len(macs_per_exit) != num_exits:
        raise ValueError(
            f"expected {num_exits} MAC counts (one per exit), got {len(macs_per_exit)}"
        )
    val_logits, val_labels = val_logits.detach().float().cpu(), val_labels.detach().long().cpu()
    temps = (
        fit_temperatures(val_logits, val_labels) if temperature is True else (temperature or None)
    )
    shape = ExitPolicy.create(0.0, rule, num_classes, num_exits, temps)  # validates temperatures
    full = float(macs_per_exit[-1])
    macs = torch.tensor([float(m) for m in macs_per_exit], dtype=torch.float64)
    if num_exits == 1:  # nothing to choose: the only exit answers
        policy = shape
    else:
        scaled = apply_temperatures(val_logits, shape)
        scores = exits.rule_score(scaled[:-1], rule)  # (E-1, N)
        correct = val_logits.argmax(-1) == val_labels  # (E, N)
        policy = search_thresholds(
            scores, correct, macs, target, shape, num_classes, per_exit, max_candidates
        )
    validation = outcome(val_logits, val_labels, macs_per_exit, policy)
    if target.kind == "budget":
        feasible = validation["mean_macs"] <= target.value * full * (1 + 1e-9)
        problem = (
            f"a mean-MACs budget of {target.value:.3g} x full is not reachable on validation data; "
            f"using the cheapest setting ({validation['macs_fraction']:.3g} x full)"
        )
    else:
        floor = validation["last_exit_accuracy"] - target.value
        feasible = validation["accuracy"] >= floor - 1e-12
        problem = (
            f"an accuracy drop of at most {target.value:.3g} is not reachable on validation data; "
            f"using the most accurate setting (drop {validation['last_exit_accuracy'] - validation['accuracy']:.3g})"
        )
    warning = None if feasible else problem
    if warning and warn:
        warnings.warn(warning, CalibrationWarning, stacklevel=2)
    test = None
    if test_logits is not None and test_labels is not None:
        test = outcome(
            test_logits.detach().float().cpu(),
            test_labels.detach().long().cpu(),
            macs_per_exit,
            policy,
        )
    return Calibration(policy, target, full, validation, test, feasible, warning)


def resolution_note(result: Calibration) -> str | None:
    """A note when the validation split is too easy to choose between settings well.

    When the last exit answers every validation image correctly, a validation
    accuracy only moves in steps of one image (1/N) and the target is met by
    settings the test set may not agree with: say so, and what to change.
    """
    v = result.validation
    if v["last_exit_accuracy"] < 1.0:
        return None
    n = v["num_images"]
    return (
        f"the last exit answers all {n} validation images correctly, so validation accuracy "
        f"moves in steps of {100 / n:.2g} points and cannot tell close settings apart; a larger "
        "validation split (--set data.val_fraction=0.3) gives calibration more to choose from"
    )


def search_thresholds(
    scores: Tensor, correct: Tensor, macs: Tensor, target: Target, shape: ExitPolicy,
    num_classes: int, per_exit: bool, max_candidates: int,
) -> ExitPolicy:  # fmt: skip
    """Best shared threshold, then (``per_exit``) coordinate refinement exit by exit."""
    rule, num_early = shape.rule, scores.shape[0]
    if target.kind == "budget":
        limit = target.value * float(macs[-1]) * (1 + 1e-9)
    else:
        limit = correct[-1].double().mean().item() - target.value - 1e-12

    def best(settings: Tensor) -> tuple[tuple, Tensor]:
        accuracy, mean_macs = evaluate_thresholds(scores, correct, macs, settings, rule)
        feasible = mean_macs <= limit if target.kind == "budget" else accuracy >= limit
        keys = _sort_keys(accuracy, mean_macs, feasible, target.kind)
        i = max(range(len(keys)), key=keys.__getitem__)
        return keys[i], settings[i]

    shared = candidate_thresholds(scores, rule, num_classes, max_candidates)
    key, chosen = best(shared.unsqueeze(1).expand(-1, num_early).contiguous())
    if per_exit and num_early > 1:
        for _ in range(3):  # rounds; stops early when no exit's threshold moves
            moved = False
            for i in range(num_early):
                values = candidate_thresholds(scores[i], rule, num_classes, max_candidates)
                settings = chosen.unsqueeze(0).repeat(len(values), 1)
                settings[:, i] = values
                new_key, new = best(settings)
                if new_key > key:
                    key, chosen, moved = new_key, new, True
            if not moved:
                break
    return ExitPolicy.create(
        chosen.tolist(), rule, num_classes, num_exits=num_early + 1, temperatures=shape.temperatures
    )


def threshold_near_macs(
    val_logits: Tensor,
    val_labels: Tensor,
    macs_per_exit: Sequence[float],
    fraction: float,
    rule: str = "entropy",
) -> ExitPolicy:
    """The shared threshold whose validation mean MACs are closest to ``fraction`` of full.

    For benchmarks, which want an operating point at a given cost whatever its
    accuracy (a budget target would pick the most accurate point under it).
    """
    num_exits, _, num_classes = val_logits.shape
    if num_exits == 1:
        return ExitPolicy.create(0.0, rule, num_classes, num_exits)
    logits = val_logits.detach().float().cpu()
    scores = exits.rule_score(logits[:-1], rule)  # (E-1, N)
    correct = logits.argmax(-1) == val_labels.cpu()
    macs = torch.tensor([float(m) for m in macs_per_exit], dtype=torch.float64)
    values = candidate_thresholds(scores, rule, num_classes)
    _, mean_macs = evaluate_thresholds(
        scores, correct, macs, values.unsqueeze(1).expand(-1, num_exits - 1), rule
    )
    best = int((mean_macs - fraction * float(macs[-1])).abs().argmin())
    return ExitPolicy.create(values[best].item(), rule, num_classes, num_exits)


def budgeted_curve(
    val_logits: Tensor,
    val_labels: Tensor,
    test_logits: Tensor,
    test_labels: Tensor,
    macs_per_exit: Sequence[float],
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    *,
    rule: str = "entropy",
    per_exit: bool = False,
    temperature: bool = False,
) -> list[dict[str, Any]]:
    """Test accuracy against test MACs, each point's thresholds fitted on validation for one budget.

    Budgets below what the cheapest setting reaches are kept, marked
    ``feasible: false`` (their point is the cheapest setting).
    """
    val_logits = val_logits.detach().float().cpu()
    temps = fit_temperatures(val_logits, val_labels.long().cpu()) if temperature else None
    points = []
    for b in budgets:
        cal = calibrate(
            val_logits, val_labels, macs_per_exit, budget=b, rule=rule, per_exit=per_exit,
            temperature=temps or False, test_logits=test_logits, test_labels=test_labels, warn=False,
        )  # fmt: skip
        assert cal.test is not None
        points.append(
            {
                "budget": b,
                "feasible": cal.feasible,
                **cal.policy.to_dict(),
                "val_accuracy": cal.validation["accuracy"],
                "val_macs_fraction": cal.validation["macs_fraction"],
                "test_accuracy": cal.test["accuracy"],
                "test_mean_macs": cal.test["mean_macs"],
                "test_macs_fraction": cal.test["macs_fraction"],
                "test_exit_fractions": cal.test["exit_fractions"],
            }
        )
    return points
