"""Exit thresholds with a statistical guarantee (Learn-then-Test), and its check by simulation.

Plain calibration (:mod:`erde.calibration`) picks the cheapest thresholds whose
*validation* accuracy drop is within ε; on new data the drop then exceeds ε
about half the time. Here the thresholds carry a guarantee instead, as in
Learn-then-Test (Angelopoulos et al. 2021) and CALM (Schuster et al. 2022):

    with probability at least 1 - δ over the draw of the n calibration images,
    the risk of the chosen thresholds on new images from the same
    distribution is at most ε.

Two risks, both a 0/1 event per image, so an exact binomial tail gives valid
p-values (Hoeffding-Bentkus bounds are for losses in [0, 1]; for 0/1 losses
the binomial tail is exact and tighter):

- ``drop``: the early-exit answer is wrong where the last exit's is right.
  The accuracy drop against the last exit equals this rate minus the rate of
  images the early answer gets right and the last exit wrong, so a guarantee on
  this rate is a guarantee on the drop (slightly conservative).
- ``consistency``: the early-exit answer differs from the last exit's (CALM);
  it bounds the ``drop`` rate in turn.

The procedure: candidate settings ordered from conservative (no image leaves
early) to aggressive, the order fixed before the calibration images are seen;
for each, p = P(Binomial(n, ε) <= k), k the calibration images with the risk
event; fixed-sequence testing walks the order while p <= δ. Every candidate
passed that way is valid at once (family-wise error <= δ), so the cheapest of
them (fewest calibration MACs) is chosen.

- One shared threshold: the candidates are a fixed grid over the rule's range,
  log-spaced from the conservative end (scores of sure predictions are tiny).
- Per-exit thresholds: a random part of the calibration images (``PATH_FRACTION``)
  learns a path of per-exit settings (the plain coordinate search at rising
  risk levels), the rest tests along it (Pareto Testing, Laufer-Goldshtein et
  al. 2022); the split is random, never chosen from the data.
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from erde import exits
from erde.calibration.thresholds import (
    Target,
    evaluate_thresholds,
    outcome,
    search_thresholds,
)
from erde.errors import CalibrationError, ConfigError
from erde.inference.policy import ExitPolicy, apply_temperatures, float32_within

RISKS = ("drop", "consistency")
RISK_WORDS = {
    "drop": "share of images the early-exit model gets wrong while its last exit gets them "
    "right (an upper bound on the accuracy drop against the last exit)",
    "consistency": "share of images whose early-exit answer differs from the last exit's answer",
}
GRID_SIZE = 256  # shared-threshold candidates (fixed, data-independent)
MIN_DELTA = 1e-9  # a confidence closer to 1 is no statement a finite sample can support
PATH_FRACTION = 0.3  # share of the calibration images that learns the per-exit path
PATH_LEVELS = 17  # per-exit path: plain searches at risk levels 0, ε/8, ..., 2ε on the path images


@dataclass(frozen=True)
class RiskTarget:
    """What the guarantee bounds: ``risk`` at most ``epsilon`` with probability ``1 - delta``."""

    risk: str
    epsilon: float
    delta: float

    @classmethod
    def create(cls, risk: str, max_risk: float, confidence: float) -> RiskTarget:
        """Validated target; ε and 1 - δ must lie strictly inside (0, 1)."""
        if risk not in RISKS:
            raise ConfigError(f"unknown risk {str(risk)[:40]!r}; valid risks: {', '.join(RISKS)}")
        eps, conf = _real(max_risk), _real(confidence)  # numpy scalars are numbers too
        if eps is None or not 0 < eps < 1:
            raise ConfigError(
                f"the guaranteed {risk} must be in (0, 1) (0.01 = 1 point), got {max_risk!r:.40}"
            )
        if conf is None or not 0 < conf <= 1 - MIN_DELTA:
            raise ConfigError(
                f"confidence (1 - δ) must be in (0, {1 - MIN_DELTA:.9g}], e.g. 0.9, got "
                f"{confidence!r:.40}"
            )
        return cls(risk, eps, max(MIN_DELTA, round(1.0 - conf, 12)))


def _real(value: Any) -> float | None:
    """``value`` as a float when it is a real number (Python or NumPy, not bool), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- statistics


def risk_free(exit_logits: Tensor, labels: Tensor, risk: str) -> Tensor:
    """(E, N) bool: True where an image leaving at exit e is *not* a risk event.

    The last row is all True (leaving at the last exit is the reference).
    """
    preds = exit_logits.argmax(dim=-1)  # (E, N)
    if risk == "drop":
        correct = preds == labels.to(preds.device)
        return correct | ~correct[-1]
    return preds == preds[-1]


def binomial_p_values(events: Tensor, n: int, epsilon: float) -> Tensor:
    """p = P(Binomial(n, ε) <= k) per candidate, for H0 "risk > ε"; events (C,) int -> (C,)."""
    from scipy.special import bdtr  # the binomial CDF (scipy.stats takes seconds to import)

    k = events.cpu().double().numpy()
    return torch.from_numpy(bdtr(k, n, epsilon)).double()


def images_needed(rate: float, epsilon: float, delta: float, limit: int = 10**9) -> int | None:
    """About how many calibration images a setting with this observed risk rate needs to pass.

    The smallest n with P(Binomial(n, ε) <= floor(n * rate)) <= δ; None when
    ``rate >= ε`` (no number of images makes such a setting pass).
    """
    from scipy.special import bdtr

    if rate >= epsilon:
        return None

    def passes(n: int) -> bool:
        return bool(bdtr(math.floor(n * rate + 1e-9), n, epsilon) <= delta)

    low = max(1, math.ceil(math.log(delta) / math.log1p(-epsilon)))  # even with no event at all
    high = low
    while not passes(high):
        low, high = high, 2 * high
        if high > limit:
            return None
    while low < high:  # smallest passing n in (low, high] (monotone up to floor rounding)
        mid = (low + high) // 2
        low, high = (low, mid) if passes(mid) else (mid + 1, high)
    return high


def fixed_sequence(p_values: Tensor, delta: float) -> int:
    """How many leading hypotheses fixed-sequence testing rejects: the prefix with p <= δ."""
    fails = (p_values > delta).nonzero()
    return int(fails[0]) if len(fails) else len(p_values)


# --------------------------------------------------------------------------- candidates


def shared_grid(rule: str, num_classes: int, size: int = GRID_SIZE) -> Tensor:
    """Shared thresholds (C,) float32 from conservative (no early exit) to aggressive.

    Fixed before any data is seen; log-spaced away from the conservative end,
    where the scores of sure predictions crowd.
    """
    low, high = exits.rule_range(rule, num_classes)
    steps = torch.logspace(-6, 0, size - 1, dtype=torch.float64) * (high - low)
    if exits.get_rule(rule).leaves_below:  # e.g. entropy < θ: θ = 0 lets nothing out
        values = torch.cat([torch.tensor([low], dtype=torch.float64), low + steps])
    else:  # max_softmax leaves when p_max >= θ: θ = 1 is the strictest
        values = torch.cat([torch.tensor([high], dtype=torch.float64), high - steps])
    return torch.tensor([float32_within(v, low, high) for v in values.tolist()])


def _per_exit_path(
    scores: Tensor, free: Tensor, macs: Tensor, shape: ExitPolicy, num_classes: int,
    epsilon: float, learn: Tensor,
) -> Tensor:  # fmt: skip
    """Per-exit settings (C, E-1) ordered conservative -> aggressive, learned on ``learn`` only."""
    num_early = scores.shape[0]
    first = shared_grid(shape.rule, num_classes)[:1].expand(num_early)
    settings = [first]
    for level in torch.linspace(0, 2 * epsilon, PATH_LEVELS).tolist():
        policy = search_thresholds(
            scores[:, learn], free[:, learn], macs, Target("max_drop", level), shape,
            num_classes, True, 512,
        )  # fmt: skip
        settings.append(torch.tensor(policy.thresholds, dtype=torch.float32))
    path = torch.stack(settings)
    _, learn_macs = evaluate_thresholds(scores[:, learn], free[:, learn], macs, path, shape.rule)
    order = sorted(range(len(path)), key=lambda i: (-learn_macs[i].item(), i))
    return path[order]


# --------------------------------------------------------------------------- calibration


@dataclass
class GuaranteedCalibration:
    """Thresholds with their guarantee, the test that gave it, and what they do on each split."""

    policy: ExitPolicy
    target: RiskTarget
    per_exit: bool
    calibration_images: int  # all calibration (validation) images
    tested_images: int  # those the tests ran on (all, or the ones not used for the per-exit path)
    candidates: int  # settings in the fixed sequence
    candidates_passed: int  # leading settings whose test passed
    passed: bool  # a setting that lets images leave early passed
    p_value: float  # of the chosen setting
    calibration_risk: float  # observed risk rate of the chosen setting on the tested images
    images_needed: int | None  # when nothing passed: about how many images would be needed
    message: str | None  # why nothing passed, in one line
    validation: dict[str, Any]
    test: dict[str, Any] | None

    def guarantee(self) -> str:
        """The guarantee in words, as the thresholds file records it."""
        t = self.target
        return (
            f"With probability at least {1 - t.delta:.4g} over the draw of the "
            f"{self.calibration_images} calibration images, the {RISK_WORDS[t.risk]} is at most "
            f"{t.epsilon:.4g} on new images from the same distribution (Learn-then-Test: binomial "
            f"tail p-values, fixed-sequence testing over {self.candidates} candidate settings)."
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": {
                "kind": "guaranteed",
                "risk": self.target.risk,
                "value": self.target.epsilon,
            },
            "guarantee": {
                "risk": self.target.risk,
                "epsilon": self.target.epsilon,
                "delta": self.target.delta,
                "confidence": 1 - self.target.delta,
                "calibration_images": self.calibration_images,
                "tested_images": self.tested_images,
                "per_exit": self.per_exit,
                "candidates": self.candidates,
                "candidates_passed": self.candidates_passed,
                "passed": self.passed,
                "p_value": self.p_value,
                "calibration_risk": self.calibration_risk,
                "images_needed": self.images_needed,
                "text": self.guarantee() if self.passed else self.message,
            },
            "feasible": self.passed,
            "warning": self.message,
            "validation": self.validation,
            "test": self.test,
        }


def _check_inputs(val_logits: Tensor, val_labels: Tensor, macs_per_exit: Sequence[float]) -> None:
    """Refuse what cannot be calibrated, or would make the guarantee say more than the data:
    wrong shapes, no images, one class only, one exit, labels outside the classes, non-finite
    logits (a NaN counts as no risk), MACs that are not finite, positive and rising."""
    if val_logits.dim() != 3:
        raise ConfigError(
            f"calibration logits must be (exits, images, classes), got shape {tuple(val_logits.shape)}"
        )
    num_exits, n, num_classes = val_logits.shape
    if val_labels.dim() != 1 or len(val_labels) != n:
        raise ConfigError(
            f"expected {n} labels (one per image), got shape {tuple(val_labels.shape)}"
        )
    if n == 0:
        raise ConfigError("calibration needs validation images; the validation split is empty")
    if len(macs_per_exit) != num_exits:
        raise ConfigError(
            f"expected {num_exits} MAC counts (one per exit), got {len(macs_per_exit)}"
        )
    if num_exits < 2:
        raise ConfigError("a model with a single exit has no thresholds to calibrate")
    macs = [_real(m) for m in macs_per_exit]
    if any(m is None or m <= 0 for m in macs) or any(a >= b for a, b in itertools.pairwise(macs)):
        raise ConfigError(
            f"MACs per exit must be finite, > 0 and rise with depth, got {list(macs_per_exit)[:8]}"
        )
    if int(val_labels.min()) < 0 or int(val_labels.max()) >= num_classes:
        raise ConfigError(
            f"labels must be class indices in [0, {num_classes - 1}], got values from "
            f"{int(val_labels.min())} to {int(val_labels.max())}"
        )
    bad = ~torch.isfinite(val_logits).all(dim=-1)  # (E, N)
    if bool(bad.any()):
        exit_i, image = (int(v) for v in bad.nonzero()[0])
        raise ConfigError(
            f"{int(bad.sum())} non-finite logit rows (NaN or inf), first at exit {exit_i}, "
            f"image {image}: they would count as risk-free and void the guarantee"
        )
    classes = torch.unique(val_labels)
    if len(classes) < 2:
        raise ConfigError(
            f"the {n} calibration images all belong to class {int(classes[0])}; a guarantee "
            "only holds for new images drawn like the calibration images, so calibrate on a "
            "split with the classes the model will see"
        )


def _risk_rate(logits: Tensor, labels: Tensor, policy: ExitPolicy, risk: str) -> float:
    """Observed rate of the risk event under ``policy`` on recorded logits (E, N, K)."""
    chosen = exits.first_exit(
        apply_temperatures(logits, policy), list(policy.thresholds), policy.rule
    )
    free = risk_free(logits, labels, risk)
    return 1.0 - free[chosen, torch.arange(len(chosen))].double().mean().item()


def measure_risk(
    logits: Tensor, labels: Tensor, macs: Sequence[float], policy: ExitPolicy, risk: str
) -> dict:
    """What ``policy`` gives on one split, plus its accuracy drop and observed risk rate."""
    out = outcome(logits, labels, macs, policy)
    out["accuracy_drop"] = out["last_exit_accuracy"] - out["accuracy"]
    out["risk"] = _risk_rate(logits, labels, policy, risk)
    return out


def calibrate_guaranteed(
    val_logits: Tensor,
    val_labels: Tensor,
    macs_per_exit: Sequence[float],
    *,
    max_risk: float,
    confidence: float,
    risk: str = "drop",
    rule: str = "entropy",
    per_exit: bool = False,
    temperatures: Sequence[float] | None = None,
    test_logits: Tensor | None = None,
    test_labels: Tensor | None = None,
    seed: int = 0,
) -> GuaranteedCalibration:
    """Thresholds whose ``risk`` is at most ``max_risk`` with probability ``confidence``.

    val_logits (E, N, K) and val_labels (N,) are the calibration images;
    ``temperatures`` (E values) must come from elsewhere (fitting them on the
    same images would void the guarantee). When nothing that lets images leave
    early passes, the result says so (``passed`` False, ``message``,
    ``images_needed``) and holds the conservative setting (every image goes to
    the last exit). ``seed`` draws the per-exit path/test split.
    """
    target = RiskTarget.create(risk, max_risk, confidence)
    if rule not in exits.RULES:
        raise ConfigError(f"unknown exit rule {rule!r}; valid rules: {', '.join(exits.RULES)}")
    val_logits, val_labels = val_logits.detach().float().cpu(), val_labels.detach().long().cpu()
    _check_inputs(val_logits, val_labels, macs_per_exit)
    num_exits, n, num_classes = val_logits.shape
    shape = ExitPolicy.create(0.0, rule, num_classes, num_exits, temperatures)
    scores = exits.rule_score(apply_temperatures(val_logits, shape)[:-1], rule)  # (E-1, N)
    free = risk_free(val_logits, val_labels, risk)  # (E, N)
    macs = torch.tensor([float(m) for m in macs_per_exit], dtype=torch.float64)
    tested = torch.arange(n)
    if per_exit and num_exits > 2:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        split = max(1, round(PATH_FRACTION * n)) if n > 1 else 0
        learn, tested = order[:split], order[split:]
        if len(tested) == 0:
            tested = learn
        path = _per_exit_path(scores, free, macs, shape, num_classes, target.epsilon, learn)
    else:
        path = shared_grid(rule, num_classes).unsqueeze(1).expand(-1, num_exits - 1).contiguous()
    safe_rate, mean_macs = evaluate_thresholds(scores[:, tested], free[:, tested], macs, path, rule)
    m = len(tested)
    events = ((1.0 - safe_rate) * m).round().long()  # (C,) risk events per candidate
    p_values = binomial_p_values(events, m, target.epsilon)
    passed_count = fixed_sequence(p_values, target.delta)
    chosen = 0
    if passed_count:
        prefix = mean_macs[:passed_count]
        chosen = int((prefix == prefix.min()).nonzero()[0])  # cheapest; the earliest of ties
    early = bool(mean_macs[chosen] < macs[-1]) and passed_count > 0
    needed, message = None, None
    if not early:
        needed, message = _shortfall(events, mean_macs, macs, m, target, passed_count)
    # nothing passed: every image to the last exit, truly (a max-softmax threshold of 1.0
    # would still let images whose float32 top probability is exactly 1.0 leave)
    setting = (
        path[chosen].tolist()
        if early
        else [exits.never_threshold(rule, num_classes)] * (num_exits - 1)
    )
    policy = ExitPolicy.create(
        setting, rule, num_classes, num_exits, temperatures=shape.temperatures
    )
    test = None
    if test_logits is not None and test_labels is not None:
        test = measure_risk(test_logits.detach().float().cpu(), test_labels.detach().long().cpu(),
                        macs_per_exit, policy, risk)  # fmt: skip
    return GuaranteedCalibration(
        policy=policy, target=target, per_exit=bool(per_exit and num_exits > 2),
        calibration_images=n, tested_images=m, candidates=len(path),
        candidates_passed=passed_count, passed=early, p_value=float(p_values[chosen]),
        calibration_risk=float(events[chosen]) / m, images_needed=needed, message=message,
        validation=measure_risk(val_logits, val_labels, macs_per_exit, policy, risk), test=test,
    )  # fmt: skip


def _shortfall(
    events: Tensor, mean_macs: Tensor, macs: Tensor, m: int, target: RiskTarget, passed: int
) -> tuple[int | None, str]:
    """Why no setting that saves MACs passed, and about how many images would make one pass."""
    saving = (mean_macs < macs[-1]).nonzero()
    words = f"{target.risk} <= {target.epsilon:.4g} at confidence {1 - target.delta:.4g}"
    if len(saving) == 0:
        return None, f"no threshold lets any of the {m} tested images leave early; nothing to test"
    first = int(saving[0])
    rate = float(events[first]) / m
    needed = images_needed(rate, target.epsilon, target.delta)
    head = f"no threshold that lets images leave early passes the test for {words} with {m} images"
    if needed is None:
        return None, (
            f"{head}: even the most conservative such setting has a {target.risk} rate of "
            f"{rate:.4g} >= {target.epsilon:.4g} on them; raise the maximum or improve the early exits"
        )
    return needed, f"{head}; about {needed} images would be needed at its observed rate {rate:.4g}"


# --------------------------------------------------------------------------- checkpoints


def calibrate_checkpoint_guaranteed(
    checkpoint: str | Path,
    *,
    max_risk: float,
    confidence: float,
    risk: str = "drop",
    rule: str = "entropy",
    per_exit: bool = False,
    out: str | Path | None = None,
    cfg: Any = None,
    device: str | None = None,
    progress: bool = False,
    splits: Any = None,
) -> tuple[GuaranteedCalibration, Path]:
    """Guaranteed thresholds for a checkpoint from its validation split; writes its thresholds file.

    The data set is the checkpoint's own unless ``cfg`` or ``splits`` say otherwise.

    Raises :class:`CalibrationError` (nothing written) when no setting that
    lets images leave early passes, naming about how many images would be needed.
    """
    from erde.calibration.checkpoint import (
        check_thresholds_output,
        open_checkpoint,
        save_checkpoint_thresholds,
        val_and_test_logits,
    )

    RiskTarget.create(risk, max_risk, confidence)  # fail before loading anything
    check_thresholds_output(checkpoint, out)
    ckpt, cfg, splits, model, costs, dev = open_checkpoint(checkpoint, cfg, device, splits)
    val_logits, val_labels, test_logits, test_labels = val_and_test_logits(
        model, splits, dev, cfg.data.eval_batch_size, progress
    )
    result = calibrate_guaranteed(
        val_logits, val_labels, costs.macs_per_exit, max_risk=max_risk, confidence=confidence,
        risk=risk, rule=rule, per_exit=per_exit, test_logits=test_logits, test_labels=test_labels,
    )  # fmt: skip
    if not result.passed:
        raise CalibrationError(f"{result.message}; no thresholds file written")
    path = save_checkpoint_thresholds(ckpt, model, splits, costs, result, result.per_exit, out)
    return result, path


__all__ = [
    "RISKS",
    "GuaranteedCalibration",
    "RiskTarget",
    "binomial_p_values",
    "calibrate_checkpoint_guaranteed",
    "calibrate_guaranteed",
    "fixed_sequence",
    "images_needed",
    "risk_free",
    "shared_grid",
]
