"""Seeded index selection for validation carving, fixed test splits and subsampling."""

from __future__ import annotations

import numpy as np
import torch


def stratified_split(
    labels: torch.Tensor, fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into (kept, taken) with ``fraction`` of every class taken.

    Per-class rounding keeps class balance in both parts, which matters for small
    data sets such as digits; numpy's generator makes the split identical on every
    platform for a given seed. Both index tensors are sorted.
    """
    labels_np = labels.cpu().numpy()
    rng = np.random.default_rng(seed)
    taken_parts = [np.zeros(0, dtype=np.int64)]
    for cls in np.unique(labels_np):
        idx = np.flatnonzero(labels_np == cls)
        n_take = int(np.floor(len(idx) * fraction + 0.5))
        taken_parts.append(rng.permutation(idx)[:n_take])
    taken = np.sort(np.concatenate(taken_parts))
    mask = np.ones(len(labels_np), dtype=bool)
    mask[taken] = False
    kept = np.flatnonzero(mask)
    return torch.from_numpy(kept.astype(np.int64)), torch.from_numpy(taken.astype(np.int64))


def random_subset(n: int, size: int, seed: int) -> torch.Tensor:
    """Sorted random indices of ``min(size, n)`` samples, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.permutation(n)[: min(size, n)])
    return torch.from_numpy(picked.astype(np.int64))
