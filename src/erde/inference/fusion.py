"""An inference-optimised copy of an early-exit network: BatchNorm folded, NHWC, lower precision.

Training graphs keep every BatchNorm as its own op: at inference each one is a
full extra pass over a feature map, and on a CPU the first stages (few
channels, large maps) are bound by memory, not arithmetic. Folding each
BatchNorm into the convolution before it (``w' = w * g / s``, ``b' = (b - mu) *
g / s + beta``) removes those passes without changing the function beyond float
round-off. Folding uses ``torch.fx`` on each stage; a stage fx cannot trace (a
user's own block with data-dependent control flow) is kept as it is, and
:func:`inference_copy` says which.

The exit heads keep their BatchNorm: it follows a ReLU and a residual sum, so
there is no convolution to fold it into (and it is tiny).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from erde.errors import ErdeError
from erde.hardware import cpu_has_bf16


class PrecisionError(ErdeError):
    """The requested inference precision is not available on this device."""


def check_precision(dtype: torch.dtype | None, device: torch.device) -> None:
    """Refuse a reduced precision the device cannot run fast (one clear line)."""
    if dtype in (None, torch.float32):
        return
    if dtype not in (torch.bfloat16, torch.float16):
        raise PrecisionError(f"inference precision must be fp32, bf16 or fp16, got {dtype}")
    if device.type == "cpu":
        if dtype == torch.float16:
            raise PrecisionError(
                "fp16 inference is for CUDA; on a CPU use bf16 (with bf16 hardware)"
            )
        if not cpu_has_bf16():
            raise PrecisionError(
                "this CPU has no bf16 hardware (no avx512_bf16 or amx_bf16 flag): bf16 would be "
                "emulated and slower than fp32; use fp32"
            )
    elif device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise PrecisionError(f"{torch.cuda.get_device_name(device)} has no bf16; use fp16")


def fold_batchnorm(stage: nn.Module) -> tuple[nn.Module, bool]:
    """``stage`` with every Conv -> BatchNorm pair folded (eval mode); (module, folded?)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(stage.eval(), inplace=False), True
    except Exception:  # fx cannot trace it: keep the stage as it is
        return stage, False


def count_batchnorms(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def inference_copy(
    model: nn.Module,
    *,
    fold_bn: bool = True,
    channels_last: bool = True,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A copy of ``model`` (an EarlyExitNet) for routing: eval mode, folded, NHWC, ``dtype``.

    The copy has the same ``stages``, ``exits`` and ``num_exits`` interface, so
    the router and the MAC counter use it unchanged; its fp32 logits equal the
    original's up to float round-off (tested). ``dtype`` bf16/fp16 converts the
    weights (inputs must then be of that dtype; the router casts them).
    """
    out = copy.deepcopy(model).eval()
    if fold_bn:
        unfolded = []
        for i, stage in enumerate(out.stages):
            out.stages[i], folded = fold_batchnorm(stage)
            if not folded:
                unfolded.append(i)
        if unfolded:
            warnings.warn(
                f"stages {unfolded} could not be traced by torch.fx; their BatchNorms stay "
                "unfolded (results are unchanged, only slower)",
                stacklevel=2,
            )
    if channels_last:
        out = out.to(memory_format=torch.channels_last)
    if dtype is not None and dtype != torch.float32:
        out = out.to(dtype)
    for p in out.parameters():
        p.requires_grad_(False)
    return out


__all__ = [
    "PrecisionError",
    "check_precision",
    "count_batchnorms",
    "fold_batchnorm",
    "inference_copy",
]
