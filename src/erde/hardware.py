"""What this machine's CPU can do, read at run time (never assumed from the model name).

bf16 is worth using on a CPU only where the hardware computes in it (AVX-512
BF16 or AMX); elsewhere PyTorch emulates it and it runs slower than fp32. And
one layer shape that PyTorch's CPU kernels cannot train in channels_last.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

from torch import nn

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of hardware bf16 arithmetic


def _cpuinfo_value(keys: tuple[str, ...], cpuinfo: str | None) -> str | None:
    """The first value of one of ``keys`` in /proc/cpuinfo (None where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in keys:
            return value.strip()
    return None


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    return set((_cpuinfo_value(("flags", "Features"), cpuinfo) or "").split())


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name as the OS reports it (a VM may show only the family)."""
    return _cpuinfo_value(("model name", "Model"), cpuinfo) or platform.processor() or "unknown"


def cpu_description() -> dict[str, object]:
    """What a result's speed depends on: model, the vector ISA PyTorch uses, bf16 flags."""
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_bf16_flags": sorted(cpu_flags() & set(BF16_FLAGS)),
    }


@functools.cache
def cpu_has_bf16() -> bool:
    """True when the CPU does bf16 arithmetic in hardware (AVX-512 BF16 or AMX)."""
    if platform.system() != "Linux":
        return False
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def cpu_precision_summary() -> str:
    """One line for logs and benchmarks: the bf16 flags found, or that there are none."""
    found = sorted(cpu_flags() & set(BF16_FLAGS))
    return f"CPU bf16 hardware: {', '.join(found)}" if found else "CPU bf16 hardware: none"


NHWC_MIN_STRIDED_1X1_INPUTS = 8


def nhwc_unsafe_convs(model: nn.Module) -> list[str]:
    """Names of the layers whose CPU weight gradient corrupts memory in channels_last.

    With PyTorch 2.13.0+cpu, the backward of a 1x1 convolution with a stride
    above 1 and fewer than 8 input channels, in channels_last, corrupts the heap
    ("free(): invalid next size", "double free or corruption", or a segfault),
    every time from 1 to 7 input channels and with 8 or more never (measured on
    a 2-core AVX2 EPYC; forward and input gradients are not affected). Such
    layers are the shortcut projections of ResNets narrower than a quarter of
    the usual width, or a strided 1x1 stem. Training keeps a model that has one
    in NCHW on the CPU (see :mod:`erde.training`).
    """
    return [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
        and m.kernel_size == (1, 1)
        and max(m.stride) > 1
        and m.in_channels < NHWC_MIN_STRIDED_1X1_INPUTS
    ]
