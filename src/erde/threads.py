"""How many CPU threads PyTorch may use: ``--threads``, ``ERDE_THREADS``, or a small default.

PyTorch starts one intra-op thread per core. For the small models erde trains
on a CPU (digits, CIFAR ResNets at batch 64-128) each convolution is too small
to split well, and on a machine whose cores are also busy with other work the
threads wait on each other: the same two-epoch digits teacher took 116 s with
2 threads and 22-24 s with 1 on a loaded 2-core VM (docs/LOG.md, measured with
benchmarks/threads.py). So, unless told otherwise (``--threads``, ``ERDE_THREADS``,
``OMP_NUM_THREADS``), erde uses at most ``DEFAULT_MAX_THREADS`` threads, and
fewer when the cores are busy right now. "Right now" is sampled from
``/proc/stat`` over a tenth of a second, not read from the load average: the
1-minute load average still counts a ``pip install`` that finished seconds ago,
and chose 1 thread on an idle 2-core machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from erde.errors import ConfigError

ENV_VAR = "ERDE_THREADS"
DEFAULT_MAX_THREADS = 4  # more rarely pays for models of a few million MACs per image


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the whole machine)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


PROC_STAT = "/proc/stat"
SAMPLE_SECONDS = (
    0.1  # 10 clock ticks per CPU at Linux's usual 100 Hz: enough to tell busy from idle
)


def cpu_ticks(cpus: Iterable[int] | None = None, path: str = PROC_STAT) -> tuple[int, int] | None:
    """(busy, total) clock ticks so far of ``cpus`` (all when None), from ``/proc/stat``.

    Idle and iowait ticks are idle; everything else (user, nice, system, irq,
    softirq, steal) is busy. None where there is no such file (not Linux).
    """
    wanted = None if cpus is None else {f"cpu{c}" for c in cpus}
    busy = total = 0
    try:
        with open(path) as stat:
            for line in stat:
                name, *fields = line.split()
                if not (name.startswith("cpu") and name != "cpu"):
                    continue
                if wanted is not None and name not in wanted:
                    continue
                ticks = [int(f) for f in fields[:8]]  # guest time is already in user
                total += sum(ticks)
                busy += sum(ticks) - ticks[3] - ticks[4]
    except (OSError, ValueError, IndexError):
        return None
    return (busy, total) if total else None


def busy_cores(seconds: float = SAMPLE_SECONDS, cpus: Iterable[int] | None = None) -> float | None:
    """How many of ``cpus`` (default: this process's) other work keeps busy now, e.g. 1.0 of 2.

    Sampled over ``seconds`` while this process sleeps; None where ``/proc/stat``
    cannot be read.
    """
    if cpus is None and hasattr(os, "sched_getaffinity"):
        cpus = os.sched_getaffinity(0)
    cpus = None if cpus is None else sorted(cpus)
    before = cpu_ticks(cpus)
    time.sleep(seconds)
    after = cpu_ticks(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])
    return share * (len(cpus) if cpus is not None else available_cores())


def idle_cores(cores: int | None = None, busy: float | None = None) -> int:
    """Cores left over by other work now: ``cores`` minus the busy ones, rounded, >= 1.

    ``busy`` None: sampled by :func:`busy_cores` (all cores count as free where it
    cannot be sampled).
    """
    cores = available_cores() if cores is None else cores
    if busy is None:
        busy = busy_cores() or 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def parse_threads(value: str | int, source: str, capped: bool = True) -> int:
    """A positive thread count, or one ``ConfigError`` naming where the bad value came from.

    ``capped``: also at most :func:`max_threads` (``--threads 256`` on two cores is a typo).
    """
    try:
        threads = int(value)
    except (TypeError, ValueError):
        shown = repr(value)[:40]
        raise ConfigError(f"{source} must be a positive whole number, got {shown}") from None
    if threads < 1:
        raise ConfigError(f"{source} must be at least 1, got {threads}")
    cap = max_threads()
    if capped and threads > cap:
        raise ConfigError(
            f"{source} must be at most {cap} (4 per core this process may use), got {threads}; "
            "threads beyond the cores only wait on each other"
        )
    return threads


def max_threads() -> int:
    """The most threads erde accepts: 4 per usable core (hyper-threads and a little slack)."""
    return 4 * available_cores()


def default_threads() -> int:
    """``ERDE_THREADS``, else ``OMP_NUM_THREADS``, else the cores idle now, up to ``DEFAULT_MAX_THREADS``.

    ``OMP_NUM_THREADS`` is honoured because it is how a user, or torchrun for
    each of its processes, has already said how many threads to use.
    """
    for name in (ENV_VAR, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value:  # OMP_NUM_THREADS is set for other programs too: held to the cap, not refused
            return min(parse_threads(value, name, capped=name == ENV_VAR), max_threads())
    return min(DEFAULT_MAX_THREADS, idle_cores())


def set_threads(threads: int | None = None, source: str = "threads") -> int:
    """Set PyTorch's CPU threads (``None``: :func:`default_threads`) and return the count used.

    >>> import erde
    >>> erde.set_threads(1)
    1
    """
    import torch

    count = default_threads() if threads is None else parse_threads(threads, source)
    torch.set_num_threads(count)
    return count
