"""Measured compute and parameter costs of each exit.

MACs are counted with :class:`torch.utils.flop_counter.FlopCounterMode`, which
reports convolutions, linear layers and matmuls as 2 FLOPs per multiply-add;
we halve that to get MACs. BatchNorm, ReLU, pooling, dropout and residual
additions are not counted, as is conventional (BN folds into the preceding
conv at deployment and the rest is negligible next to the convs). Bias
additions are not counted either.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


class StagedNet(Protocol):
    """What :func:`measure_exit_costs` reads of an :class:`~erde.models.early_exit.EarlyExitNet`
    (a protocol, so this module needs no import of the model it measures)."""

    stages: nn.ModuleList
    exits: nn.ModuleList


class PlainNet(Protocol):
    """What :func:`block_boundary_macs` reads of a :class:`~erde.models.backbone.Backbone`."""

    stem: nn.Module
    blocks: nn.ModuleList
    classifier: nn.Module


@dataclass
class ExitCosts:
    """Per-image cost of answering at each exit of an :class:`EarlyExitNet`.

    ``macs_per_exit[i]`` sums stages 0..i and heads 0..i: an image leaving at
    exit i paid for every head evaluated on the way. ``params_per_exit[i]`` is
    the parameters needed to answer at exit i (same sum).
    """

    macs_per_exit: list[int]
    params_per_exit: list[int]
    stage_macs: list[int]
    head_macs: list[int]
    input_shape: tuple[int, int, int]


@contextmanager
def _measuring(module: nn.Module) -> Iterator[torch.device]:
    """Eval mode, no grad, on CPU; restores every submodule's mode and the device after.

    A module on the meta device (built to check a checkpoint's sizes before
    allocating anything) is measured there: MACs depend on shapes only.
    """
    modes = [(m, m.training) for m in module.modules()]
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    moved = device.type not in ("cpu", "meta")
    try:
        if moved:
            module.to("cpu")
        module.eval()
        with torch.no_grad():
            yield torch.device("meta") if device.type == "meta" else torch.device("cpu")
    finally:
        for m, training in modes:
            m.training = training
        if moved:
            module.to(device)


def _count(module: nn.Module, *inputs: torch.Tensor) -> tuple[int, object]:
    """(MACs, output) of one forward call; the caller sets mode, grad and device."""
    with FlopCounterMode(display=False) as counter:
        out = module(*inputs)
    return counter.get_total_flops() // 2, out


def count_macs(module: nn.Module, *inputs: torch.Tensor) -> int:
    """Multiply-accumulates (1 multiply-add = 1 MAC) of ``module(*inputs)``, measured.

    Counts the whole batch given: pass batch size 1 for a per-image figure.
    BN, activations, pooling, additions and biases are not counted (see module
    docstring). Runs in eval mode under ``no_grad`` on CPU and leaves the
    module's training modes and device as they were.
    """
    with _measuring(module) as device:
        return _count(module, *(x.to(device) for x in inputs))[0]


def _dtype(module: nn.Module) -> torch.dtype:
    """The module's floating dtype, so the probe input matches its weights."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def _cumulative(values: list[int]) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def measure_exit_costs(model: StagedNet, input_shape: tuple[int, int, int]) -> ExitCosts:
    """Measure per-image MACs and parameters of every stage, head and exit.

    ``input_shape`` is (C, H, W). Each stage is measured on the feature map the
    previous stage actually produced and each head on its stage's output, so
    any input size works. Uses batch size 1 and leaves the model as it was.
    """
    stage_macs, head_macs = [], []
    with _measuring(model) as device:
        h = torch.zeros(1, *input_shape, dtype=_dtype(model), device=device)
        for stage, head in zip(model.stages, model.exits, strict=True):
            macs, h = _count(stage, h)  # (1, C_i, H_i, W_i)
            stage_macs.append(macs)
            head_macs.append(_count(head, h)[0])
    params = [
        _num_params(s) + _num_params(e) for s, e in zip(model.stages, model.exits, strict=True)
    ]
    return ExitCosts(
        macs_per_exit=_cumulative([s + e for s, e in zip(stage_macs, head_macs, strict=True)]),
        params_per_exit=_cumulative(params),
        stage_macs=stage_macs,
        head_macs=head_macs,
        input_shape=tuple(input_shape),
    )


def block_boundary_macs(backbone: PlainNet, input_shape: tuple[int, int, int]) -> list[int]:
    """Per-image MACs of the plain backbone up to each block boundary, then of the whole.

    Entry ``b - 1`` (b = 1 .. len(blocks)) is stem + blocks[:b]; the last entry
    adds the classifier, so ``[m / out[-1] for m in out[:-1]]`` are the
    fractions of the backbone's cost at which an exit after block b would sit.
    Leaves the backbone as it was (see :func:`count_macs`).
    """
    with _measuring(backbone) as device:
        h = torch.zeros(1, *input_shape, dtype=_dtype(backbone), device=device)
        total, h = _count(backbone.stem, h)
        out = []
        for block in backbone.blocks:
            macs, h = _count(block, h)  # (1, C_b, H_b, W_b)
            total += macs
            out.append(total)
        out.append(total + _count(backbone.classifier, h)[0])
    return out
