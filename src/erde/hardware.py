"""What this machine's CPU can do, read at run time (never assumed from the model name).

bf16 is worth using on a CPU only where the hardware computes in it (AVX-512
BF16 or AMX); elsewhere PyTorch emulates it and it runs slower than fp32.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of hardware bf16 arithmetic


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


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
