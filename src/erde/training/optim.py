"""Optimiser, learning-rate schedule and per-exit loss weights of a training run."""

from __future__ import annotations

import math

import torch
from torch import nn

from erde.config import TrainConfig
from erde.errors import ConfigError
from erde.recipe import parameter_groups


def build_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW; no weight decay on BN and bias parameters.

    Frozen parameters (a whitened stem) are left out; BN biases get their own
    learning rate with ``norm_bias_lr_scale`` (:func:`erde.recipe.parameter_groups`).
    """
    groups = parameter_groups(model, t.lr, t.weight_decay, t.norm_bias_lr_scale, t.decay_biases)
    if t.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.momentum, 0.999))


def build_scheduler(
    optimizer: torch.optim.Optimizer, t: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up, then cosine or linear decay to zero (or constant).

    ``linear`` is the one-cycle shape of fast CIFAR recipes (warm up, then anneal
    straight to zero); ``cosine`` spends longer near the peak.
    """
    total = max(1, t.epochs * steps_per_epoch)
    warmup = int(t.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if t.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if t.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def exit_weights(t: TrainConfig, num_exits: int, section: str) -> list[float]:
    """The loss weight of each exit: ``exit_weights`` from the config, else 1 for every exit."""
    if t.exit_weights is None:
        return [1.0] * num_exits
    if len(t.exit_weights) != num_exits:
        raise ConfigError(
            f"{section}.exit_weights has {len(t.exit_weights)} values but the model has {num_exits} exits"
        )
    return list(t.exit_weights)


def seed_everything(seed: int) -> None:
    """Seed the CPU and every GPU generator: models built after it start from the same weights."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
