"""Does the guarantee hold? Draw calibration sets from a pool, calibrate each, count violations.

:func:`simulate_guarantee` measures how often thresholds from
:func:`erde.calibration.guaranteed.calibrate_guaranteed` break their promised
risk on the rest of the pool: at most the promised 1 - confidence of the draws
should.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from erde.calibration.guaranteed import (
    RiskTarget,
    calibrate_guaranteed,
    measure_risk,
)
from erde.calibration.thresholds import calibrate
from erde.errors import ConfigError


def simulate_guarantee(
    pool_logits: Tensor,
    pool_labels: Tensor,
    macs_per_exit: Sequence[float],
    *,
    max_risk: float,
    confidence: float,
    calibration_images: int,
    draws: int = 200,
    risk: str = "drop",
    rule: str = "entropy",
    per_exit: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Draw random calibration/test splits of a pool of recorded logits (E, N, K) and count
    how often the test risk exceeds ε, for guaranteed and for plain calibration.

    Plain calibration is :func:`erde.calibration.calibrate` with ``max_drop=ε``
    (it controls the validation accuracy drop; with ``risk="consistency"`` its
    violations are still counted on the consistency rate). Returns violation
    rates, the binomial noise of the guaranteed one (its standard error at δ),
    and mean test MACs as a fraction of the full network's.
    """
    pool_logits, pool_labels = pool_logits.detach().float().cpu(), pool_labels.detach().long().cpu()
    n = pool_labels.numel()
    if not 0 < calibration_images < n:
        raise ConfigError(f"calibration_images must be in (0, {n}), got {calibration_images}")
    target = RiskTarget.create(risk, max_risk, confidence)
    full = float(macs_per_exit[-1])
    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list[tuple[bool, float]]] = {"guaranteed": [], "plain": []}
    passed = 0
    for _ in range(draws):
        order = torch.randperm(n, generator=g)
        cal, test = order[:calibration_images], order[calibration_images:]
        val = (pool_logits[:, cal], pool_labels[cal])
        held = (pool_logits[:, test], pool_labels[test])
        guaranteed = calibrate_guaranteed(
            *val, macs_per_exit, max_risk=max_risk, confidence=confidence, risk=risk, rule=rule,
            per_exit=per_exit, seed=int(torch.randint(0, 2**31 - 1, (1,), generator=g)),
        )  # fmt: skip
        passed += guaranteed.passed
        plain = calibrate(
            *val, macs_per_exit, max_drop=max_risk, rule=rule, per_exit=per_exit, warn=False
        ).policy
        for name, policy in (("guaranteed", guaranteed.policy), ("plain", plain)):
            outcome = measure_risk(*held, macs_per_exit, policy, risk)
            value = outcome["accuracy_drop"] if risk == "drop" else outcome["risk"]
            rows[name].append((value > target.epsilon, outcome["mean_macs"] / full))
    out: dict[str, Any] = {
        "epsilon": target.epsilon,
        "delta": target.delta,
        "risk": risk,
        "rule": rule,
        "per_exit": per_exit,
        "pool_images": n,
        "calibration_images": calibration_images,
        "test_images": n - calibration_images,
        "draws": draws,
        "guaranteed_passed": passed / draws,
        "noise": math.sqrt(target.delta * (1 - target.delta) / draws),
    }
    for name, values in rows.items():
        out[f"{name}_violation_rate"] = sum(v for v, _ in values) / draws
        out[f"{name}_macs_fraction"] = sum(f for _, f in values) / draws
    return out


__all__ = ["simulate_guarantee"]
