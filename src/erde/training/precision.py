"""How a step computes: mixed precision (bf16/fp16/fp32) and memory format (NHWC/NCHW)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from erde.hardware import NHWC_MIN_STRIDED_1X1_INPUTS, cpu_has_bf16, nhwc_unsafe_convs


def amp_dtype(device: torch.device, amp: bool | None) -> torch.dtype | None:
    """Autocast dtype, or None for full fp32.

    ``amp=None`` (the default) means bf16 where the hardware computes in it: CUDA,
    and CPUs with AVX-512 BF16 or AMX (read from the CPU's flags at run time);
    fp32 on other CPUs, where bf16 is emulated and slower than fp32. fp16 on GPUs
    without bf16.
    """
    enabled = (device.type == "cuda" or cpu_has_bf16()) if amp is None else amp
    if not enabled:
        return None
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def precision_name(dtype: torch.dtype | None) -> str:
    """'bf16', 'fp16' or 'fp32': the arithmetic a step runs in (``amp_dtype``'s answer)."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``, or nothing at all for fp32 (``dtype`` None)."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def memory_format_name(memory_format: torch.memory_format) -> str:
    """``NHWC`` for channels_last, else ``NCHW``: as start lines and metrics.jsonl say it."""
    return "NHWC" if memory_format == torch.channels_last else "NCHW"


def memory_format_for(
    wanted: torch.memory_format, device: torch.device, model: nn.Module, name: str, say: bool
) -> torch.memory_format:
    """``wanted`` (the loop's format), except NCHW for a model PyTorch cannot train in NHWC on a
    CPU; ``say`` prints why (rank 0), naming the model ``name``."""
    if wanted != torch.channels_last or device.type != "cpu":
        return wanted
    unsafe = nhwc_unsafe_convs(model)
    if not unsafe:
        return wanted
    if say:
        print(
            f"{name}: trained in NCHW, not channels_last: PyTorch's CPU backward of a strided "
            f"1x1 convolution with under {NHWC_MIN_STRIDED_1X1_INPUTS} input channels corrupts "
            f"memory in channels_last ({', '.join(unsafe[:3])}{' ...' if len(unsafe) > 3 else ''})",
            flush=True,
        )
    return torch.contiguous_format
