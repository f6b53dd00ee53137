"""How many CPU threads PyTorch may use: ``--threads``, ``ERDE_THREADS``, or a small default.

PyTorch starts one intra-op thread per core. For the small models erde trains
on a CPU (digits, CIFAR ResNets at batch 64-128) each convolution is too small
to split well, and on a machine whose cores are also busy with other work the
threads wait on each other: the same two-epoch digits teacher took 116 s with
2 threads and 22-24 s with 1 on a loaded 2-core VM (docs/LOG.md, measured with
benchmarks/threads.py). So, unless told otherwise (``--threads``, ``ERDE_THREADS``,
``OMP_NUM_THREADS``), erde uses at most ``DEFAULT_MAX_THREADS`` threads, and
fewer when the machine's load average says the cores are taken.
"""

from __future__ import annotations

import os

from erde.errors import ConfigError

ENV_VAR = "ERDE_THREADS"
DEFAULT_MAX_THREADS = 4  # more rarely pays for models of a few million MACs per image


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the whole machine)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not on Linux
        return max(1, os.cpu_count() or 1)


def idle_cores(cores: int | None = None, load: float | None = None) -> int:
    """Cores left over by other work: ``cores`` minus the 1-minute load average, rounded, >= 1."""
    cores = available_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average on this platform
            load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


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
    """``ERDE_THREADS``, else ``OMP_NUM_THREADS``, else the idle cores up to ``DEFAULT_MAX_THREADS``.

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
