"""Evaluate early-exit models: record every exit's logits once, then simulate exit rules.

One forward pass over the test set that keeps all exits' logits is enough to
answer "what accuracy and mean MACs would threshold theta give?" for every
theta: the rule is replayed on the recorded logits (with the same functions
from :mod:`erde.exits` that the router uses), so a sweep costs no extra
forward passes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from erde import exits

Thresholds = float | Sequence[float]


# --------------------------------------------------------------------------- recording


def _exit_outputs(out: Any) -> list[Tensor]:
    """A model's output as a list of per-exit logits; a bare (B, K) tensor is one exit."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (list, tuple)) and out and all(isinstance(o, Tensor) for o in out):
        return list(out)
    raise TypeError(f"model must return a list of per-exit logits, got {type(out).__name__}")


def _check_model_device(model: nn.Module, device: torch.device) -> None:
    """Fail with a clear message instead of a device-mismatch error deep in a conv."""
    param = next(model.parameters(), None)
    if param is not None and param.device.type != device.type:
        raise ValueError(f"model is on {param.device} but device={device}; move it first")


@torch.no_grad()
def collect_exit_logits(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` once over ``batches`` and keep every exit's logits.

    ``batches`` yields (already normalized float images (B, C, H, W), labels (B,)).
    The model must already live on ``device``. It runs in eval mode; each
    submodule's train/eval flag is restored afterwards (even on error).
    Returns exit_logits (E, N, K) float32 on CPU and labels (N,) int64.
    """
    device = torch.device(device)
    _check_model_device(model, device)
    modes = {m: m.training for m in model.modules()}
    model.eval()
    logits: list[Tensor] = []  # each (E, B, K)
    labels: list[Tensor] = []  # each (B,)
    try:
        for x, y in tqdm(batches, desc="evaluating", unit="batch", disable=not progress):
            outs = _exit_outputs(model(x.to(device, non_blocking=True)))
            if logits and len(outs) != logits[0].shape[0]:
                raise ValueError(f"model returned {len(outs)} exits, earlier {logits[0].shape[0]}")
            logits.append(torch.stack([o.float() for o in outs]).cpu())
            labels.append(y.detach().cpu().long().reshape(-1))
    finally:
        for module, mode in modes.items():
            module.training = mode
    if not logits:
        raise ValueError("no batches to evaluate")
    return torch.cat(logits, dim=1), torch.cat(labels)


# --------------------------------------------------------------------------- checks


def _check_inputs(exit_logits: Tensor, labels: Tensor, macs_per_exit: Sequence[float]) -> None:
    """Shapes must agree: exit_logits (E, N, K), labels (N,), one MAC count per exit."""
    if exit_logits.dim() != 3:
        raise ValueError(f"exit_logits must be (E, N, K), got shape {tuple(exit_logits.shape)}")
    num_exits, n, _ = exit_logits.shape
    if n == 0:
        raise ValueError("no samples")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if len(macs_per_exit) != num_exits:
        raise ValueError(
            f"expected {num_exits} MAC counts (one per exit), got {len(macs_per_exit)}"
        )


def _plain(value: Any) -> int | float:
    """A Python number for JSON (tensors and numpy scalars become int/float)."""
    value = value.item() if hasattr(value, "item") else value
    return int(value) if isinstance(value, int) else float(value)


# --------------------------------------------------------------------------- metrics


def exit_accuracy(exit_logits: Tensor, labels: Tensor) -> list[float]:
    """Accuracy in [0, 1] of each exit on its own (everyone answered there)."""
    correct = exit_logits.argmax(dim=-1) == labels.to(exit_logits.device)  # (E, N)
    return correct.double().mean(dim=1).tolist()


ECE_BINS = 15  # equal-width confidence bins, as in Guo et al. 2017


def reliability_sums(
    exit_logits: Tensor, labels: Tensor, bins: int = ECE_BINS
) -> tuple[Tensor, Tensor, Tensor]:
    """Per exit and confidence bin: images, summed confidence, summed hits: 3 x (E, bins), float64.

    Images are binned by their max softmax probability into ``bins`` equal-width
    bins over [0, 1] (a probability of exactly 1 goes to the last bin).
    """
    probs = exit_logits.float().softmax(dim=-1)
    confidence, predicted = probs.max(dim=-1)  # (E, N)
    correct = (predicted == labels.to(exit_logits.device)).double()
    index = (confidence.double() * bins).long().clamp_(max=bins - 1)  # (E, N)
    rows = [
        [torch.bincount(index[e], weights=w[e], minlength=bins) for e in range(len(index))]
        for w in (torch.ones_like(correct), confidence.double(), correct)
    ]
    count, conf, hits = (torch.stack(r) for r in rows)
    return count, conf, hits


def exit_calibration_error(
    exit_logits: Tensor, labels: Tensor, bins: int = ECE_BINS
) -> list[float]:
    """Expected calibration error of each exit on its own, in [0, 1]: (E, N, K), (N,) -> [E].

    The entropy rule lets an image leave where the exit is sure of itself, so
    how far an exit's confidence is from its accuracy matters as much as its
    accuracy. Per exit: the images are binned by their max softmax probability
    (:func:`reliability_sums`) and ECE = Σ_b (n_b / N) |acc_b - conf_b|.

    >>> z = torch.tensor([[[4.0, 0.0], [4.0, 0.0]]])  # one exit, two images, both 98 % sure
    >>> round(exit_calibration_error(z, torch.tensor([0, 1]))[0], 4)  # half of them right
    0.482
    """
    count, conf, hits = reliability_sums(exit_logits, labels, bins)
    n = max(exit_logits.shape[1], 1)
    return ((hits - conf).abs().sum(dim=1) / n).tolist()


def exit_reliability(
    exit_logits: Tensor, labels: Tensor, bins: int = ECE_BINS
) -> list[dict[str, list]]:
    """The reliability diagram of each exit: per confidence bin, images, mean confidence and
    accuracy (None for an empty bin). (E, N, K), (N,) -> [E] of {count, confidence, accuracy}.

    >>> z = torch.tensor([[[4.0, 0.0], [4.0, 0.0]]])
    >>> r = exit_reliability(z, torch.tensor([0, 1]), bins=2)[0]
    >>> r["count"], round(r["confidence"][1], 3), r["accuracy"]
    ([0, 2], 0.982, [None, 0.5])
    """
    count, conf, hits = reliability_sums(exit_logits, labels, bins)
    out = []
    for c, s, h in zip(count.tolist(), conf.tolist(), hits.tolist(), strict=True):
        out.append(
            {
                "count": [int(k) for k in c],
                "confidence": [x / k if k else None for x, k in zip(s, c, strict=True)],
                "accuracy": [x / k if k else None for x, k in zip(h, c, strict=True)],
            }
        )
    return out


def default_thresholds(rule: str, num_classes: int, n: int = 41) -> list[float]:
    """``n`` ascending thresholds covering the rule's whole range, both ends included.

    The ends give the two extremes (entropy: 0 sends everyone to the last exit,
    log K lets every non-uniform prediction leave at exit 0; max-softmax: 0
    lets everyone leave at exit 0). Trained nets are very confident, so points
    are packed geometrically near the "confident" end: entropy near 0,
    max-softmax near 1.
    """
    if n < 2:
        raise ValueError(f"need at least 2 thresholds to cover a range, got n={n}")
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    low, high = exits.rule_range(rule, num_classes)
    gaps = torch.logspace(-5, 0, n - 1, dtype=torch.float64).tolist()  # 1e-5 .. 1, ascending
    if exits.get_rule(rule).leaves_below:  # e.g. entropy: 0, then up to the top
        values = [low] + [high * g for g in gaps]
    else:  # max_softmax: 0, then 1/K .. 1 with points packed near 1
        floor = 1.0 / num_classes
        values = [low] + [high - (high - floor) * g for g in reversed(gaps)]
    values[-1] = high
    return sorted(values)


@dataclass
class SweepPoint:
    """One operating point of a model under a rule: what a threshold buys and costs."""

    rule: str
    threshold: float
    accuracy: float  # in [0, 1]
    mean_macs: float  # per image
    exit_fractions: list[float]  # fraction of images leaving at each exit, sums to 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the report's sweep entries)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepPoint:
        """Inverse of :meth:`to_dict` (reads a report's sweep back)."""
        return cls(
            rule=str(data["rule"]),
            threshold=float(data["threshold"]),
            accuracy=float(data["accuracy"]),
            mean_macs=float(data["mean_macs"]),
            exit_fractions=[float(f) for f in data["exit_fractions"]],
        )


@dataclass
class Simulation:
    """Outcome of one rule setting with possibly different thresholds per early exit."""

    rule: str
    thresholds: list[float]  # one per early exit (E-1)
    accuracy: float
    mean_macs: float
    exit_fractions: list[float]
    exit_index: Tensor = field(repr=False)  # (N,) int64, exit each sample leaves at

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, without the per-sample exit index."""
        data = asdict(self)
        del data["exit_index"]
        return data


def _summarize(chosen: Tensor, correct: Tensor, macs: Tensor) -> tuple[float, float, list[float]]:
    """Accuracy, mean MACs and exit fractions of one assignment of samples to exits.

    chosen (N,) int64, correct (E, N) bool, macs (E,) float64.
    """
    num_exits, n = correct.shape
    hit = correct.gather(0, chosen.unsqueeze(0)).squeeze(0)  # (N,)
    fractions = torch.bincount(chosen, minlength=num_exits).double() / n  # (E,)
    return hit.double().mean().item(), macs[chosen].mean().item(), fractions.tolist()


def simulate(
    exit_logits: Tensor,
    labels: Tensor,
    macs_per_exit: Sequence[float],
    thresholds: Thresholds,
    rule: str = "entropy",
) -> Simulation:
    """Replay the exit rule on recorded logits with one threshold, or one per early exit.

    ``macs_per_exit[i]`` is the cost of an image that leaves at exit i.
    """
    _check_inputs(exit_logits, labels, macs_per_exit)
    num_exits, _, num_classes = exit_logits.shape
    values = exits.check_thresholds(thresholds, rule, num_classes, num_exits)
    chosen = exits.first_exit(exit_logits, values, rule).cpu()  # (N,)
    correct = (exit_logits.argmax(dim=-1) == labels.to(exit_logits.device)).cpu()  # (E, N)
    macs = torch.tensor([float(m) for m in macs_per_exit], dtype=torch.float64)
    accuracy, mean_macs, fractions = _summarize(chosen, correct, macs)
    return Simulation(rule, values, accuracy, mean_macs, fractions, chosen)


def sweep(
    exit_logits: Tensor,
    labels: Tensor,
    macs_per_exit: Sequence[float],
    thresholds: Sequence[float] | None = None,
    rule: str = "entropy",
) -> list[SweepPoint]:
    """One point per threshold, the threshold shared by all early exits.

    Scores and correctness are computed once; each threshold then costs one
    comparison over (E-1, N), using the same ``exits.may_exit`` as the router,
    so results match :func:`simulate` / ``exits.first_exit`` exactly.
    """
    _check_inputs(exit_logits, labels, macs_per_exit)
    num_exits, n, num_classes = exit_logits.shape
    if thresholds is None:
        thresholds = default_thresholds(rule, num_classes)
    if len(thresholds) == 0:
        raise exits.ThresholdError("no thresholds to sweep; give at least one")
    for t in thresholds:  # validate all before any work
        exits.check_thresholds(float(t), rule, num_classes, num_exits)
    logits = exit_logits.detach().cpu()
    scores = exits.rule_score(logits[:-1], rule)  # (E-1, N)
    correct = logits.argmax(dim=-1) == labels.cpu()  # (E, N)
    return sweep_scores(scores, correct, macs_per_exit, thresholds, rule)


def sweep_scores(
    scores: Tensor,
    correct: Tensor,
    macs_per_exit: Sequence[float],
    thresholds: Sequence[float],
    rule: str = "entropy",
) -> list[SweepPoint]:
    """The routing loop of :func:`sweep` on precomputed scores: one point per threshold.

    ``scores`` (E-1, N): the rule's score at each early exit; ``correct`` (E, N) bool:
    whether each exit's answer is right. Shared by the sweep of logits and the replay of
    per-image records (:func:`erde.records.sweep_records`), so both route identically.
    """
    n = correct.shape[1]
    macs = torch.tensor([float(m) for m in macs_per_exit], dtype=torch.float64)
    last = torch.ones(1, n, dtype=torch.bool)  # the last exit always answers
    points = []
    for t in thresholds:
        leave = torch.cat([exits.may_exit(scores, float(t), rule), last])  # (E, N)
        chosen = leave.byte().argmax(dim=0)  # (N,) first exit allowed to answer
        accuracy, mean_macs, fractions = _summarize(chosen, correct, macs)
        points.append(SweepPoint(rule, float(t), accuracy, mean_macs, fractions))
    return points


def envelope_arrays(points: Sequence[tuple[float, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(MACs ascending, best accuracy reachable with at most those MACs) of (MACs, accuracy)
    ``points``: a curve made monotone, to be read at any MACs by linear interpolation."""
    pts = sorted(points)
    xs = np.array([x for x, _ in pts], dtype=np.float64)
    ys = np.maximum.accumulate(np.array([y for _, y in pts], dtype=np.float64))
    return xs, ys


def mac_reduction_at_equal_accuracy(
    points: Sequence[SweepPoint],
    reference_accuracy: float,
    reference_macs: float,
    tolerance: float = 0.005,
) -> dict[str, Any] | None:
    """Cheapest point whose accuracy is at least ``reference_accuracy - tolerance``.

    The paper's headline: how many fewer MACs a model needs to stay within
    ``tolerance`` (0.005 = 0.5 points) of the reference. Ties in MACs go to the
    more accurate point. Returns None when no point qualifies.
    """
    floor = reference_accuracy - tolerance - 1e-12  # slack for float round-off
    qualifying = [p for p in points if p.accuracy >= floor]
    if not qualifying:
        return None
    best = min(qualifying, key=lambda p: (p.mean_macs, -p.accuracy))
    return {
        "threshold": best.threshold,
        "rule": best.rule,
        "accuracy": best.accuracy,
        "mean_macs": best.mean_macs,
        "reduction": reference_macs / best.mean_macs if best.mean_macs > 0 else None,
        "saved_fraction": 1.0 - best.mean_macs / reference_macs if reference_macs > 0 else None,
        "reference_accuracy": reference_accuracy,
        "reference_macs": reference_macs,
        "tolerance": tolerance,
    }


# Accuracy given up below the reference's last exit (fractions: 0.5, 1, 2 and 5 points) for the
# table of MAC reductions against accuracy: where a smaller student's ~10x sits.
TOLERANCE_LEVELS = (0.005, 0.01, 0.02, 0.05)


def split_reduction(reduction: dict[str, Any] | None, full_macs: float) -> dict[str, Any] | None:
    """Add to a MAC reduction how much comes from the smaller network and how much from exits.

    reduction = reference MACs / mean MACs
              = (reference MACs / the model's full MACs) x (full MACs / mean MACs)
              =  from_network                            x  from_exits

    >>> r = split_reduction({"reference_macs": 120.0, "mean_macs": 10.0, "reduction": 12.0}, 40.0)
    >>> r["from_network"], r["from_exits"]
    (3.0, 4.0)
    """
    if reduction is None or not reduction.get("mean_macs"):
        return reduction
    return {
        **reduction,
        "from_network": reduction["reference_macs"] / full_macs,
        "from_exits": full_macs / reduction["mean_macs"],
    }


def reduction_ladder(
    points: Sequence[SweepPoint],
    reference_accuracy: float,
    reference_macs: float,
    full_macs: float,
    levels: Sequence[float] = TOLERANCE_LEVELS,
) -> list[dict[str, Any]]:
    """The MAC reduction a model reaches for each level of accuracy given up (fractions).

    One dict per level: :func:`mac_reduction_at_equal_accuracy` at that tolerance, split by
    :func:`split_reduction` into network x exits (``full_macs``: the model's own last exit), or
    ``{"tolerance": t, "reduction": None}`` where no point stays that close. One operating
    point rarely tells a reader what a deployment can buy; the ladder shows how the saving grows
    as accuracy is given up.
    """
    out = []
    for tolerance in levels:
        red = mac_reduction_at_equal_accuracy(points, reference_accuracy, reference_macs, tolerance)
        out.append(split_reduction(red, full_macs) or {"tolerance": tolerance, "reduction": None})
    return out


def _rule_thresholds(
    thresholds: Sequence[float] | Mapping[str, Sequence[float]] | None, rule: str
) -> Sequence[float] | None:
    """Thresholds for ``rule``: one grid for every rule, or a grid per rule name."""
    if isinstance(thresholds, Mapping):
        return thresholds.get(rule)
    return thresholds


def model_report(
    name: str,
    exit_logits: Tensor,
    labels: Tensor,
    macs_per_exit: Sequence[float],
    params_per_exit: Sequence[int],
    thresholds: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    rules: Sequence[str] = ("entropy", "max_softmax"),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything the report needs about one model, as plain JSON-ready data.

    ``thresholds``: None for each rule's default grid, one grid for all rules, or
    {rule: grid}. ``extra`` keys (e.g. training method) are merged in last.
    """
    _check_inputs(exit_logits, labels, macs_per_exit)
    num_exits, n, num_classes = exit_logits.shape
    if len(params_per_exit) != num_exits:
        raise ValueError(f"expected {num_exits} parameter counts, got {len(params_per_exit)}")
    points = [
        p.to_dict()
        for rule in rules
        for p in sweep(exit_logits, labels, macs_per_exit, _rule_thresholds(thresholds, rule), rule)
    ]
    report = {
        "name": name,
        "num_exits": num_exits,
        "num_classes": num_classes,
        "num_samples": n,
        "macs_per_exit": [_plain(m) for m in macs_per_exit],
        "params_per_exit": [_plain(p) for p in params_per_exit],
        "exit_accuracy": exit_accuracy(exit_logits, labels),
        "exit_ece": exit_calibration_error(exit_logits, labels),
        "exit_reliability": exit_reliability(exit_logits, labels),
        "sweep": points,
    }
    report.update(extra or {})
    return report


def reference_point(report: Mapping[str, Any]) -> tuple[float, float]:
    """(accuracy, MACs) of a model report's last exit: the 'full model' operating point."""
    return float(report["exit_accuracy"][-1]), float(report["macs_per_exit"][-1])


def precision_agreement(reference: Tensor, other: Tensor, labels: Tensor) -> dict[str, list[float]]:
    """How far a lower-precision forward changes a model's answers, per exit.

    ``reference`` and ``other`` are exit logits (E, N, K) of the same images, e.g.
    fp32 and bf16; ``labels`` (N,). Returns, per exit: ``same_class`` (share of
    images with the same argmax), ``same_correctness`` (share whose right/wrong
    verdict is unchanged: what splits ERDE's KL and entropy terms) and
    ``max_abs_diff`` of the logits.
    """
    if reference.shape != other.shape or reference.ndim != 3:
        raise ValueError(
            f"need two (E, N, K) tensors of one shape, got {tuple(reference.shape)} "
            f"and {tuple(other.shape)}"
        )
    a, b = reference.float().argmax(-1), other.float().argmax(-1)  # (E, N)
    right_a, right_b = a == labels, b == labels
    return {
        "same_class": (a == b).float().mean(dim=1).tolist(),
        "same_correctness": (right_a == right_b).float().mean(dim=1).tolist(),
        "max_abs_diff": (reference.float() - other.float()).abs().amax(dim=(1, 2)).tolist(),
    }


__all__ = [
    "SweepPoint",
    "Simulation",
    "collect_exit_logits",
    "default_thresholds",
    "exit_accuracy",
    "mac_reduction_at_equal_accuracy",
    "model_report",
    "precision_agreement",
    "reference_point",
    "simulate",
    "sweep",
]
