"""Batched augmentation and normalisation, run on whatever device the batch lives on.

Images stay uint8 until the last moment; a random crop with zero padding and a
horizontal flip are done for the whole batch with one gather each, so there is
no per-sample Python work and the same code runs on CPU and CUDA.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from erde.data.types import AugmentSpec


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """n uniforms in [0, 1) drawn from a CPU generator, so results do not depend on the device."""
    return torch.rand(n, generator=generator).to(device, non_blocking=True)


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut a random window of the original size per image.

    (B, C, H, W) -> (B, C, H, W), any dtype; one advanced-indexing gather.
    """
    if padding <= 0:
        return images
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    span = 2 * padding + 1
    offsets = torch.randint(0, span, (2, b), generator=generator).to(images.device)
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2: (B, C, H, W) -> same."""
    flip = _uniform(images.shape[0], generator, images.device) < 0.5  # (B,)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def augment(
    images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply the data set's train-time augmentation to a uint8 batch."""
    images = random_crop(images, spec.crop_padding, generator)
    if spec.flip:
        images = random_flip(images, generator)
    return images


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float, per-channel standardised."""
    m = torch.tensor(mean, dtype=dtype, device=images.device).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=dtype, device=images.device).view(1, -1, 1, 1) * 255.0
    return (images.to(dtype) - m) / s


def channel_stats(
    images: torch.Tensor, chunk: int = 8192
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] units of a uint8 (N, C, H, W) set, in chunks."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):
        x = images[start : start + chunk].to(torch.float64) / 255.0
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
        count += x.numel() // c
    if count == 0:
        return (0.5,) * c, (0.25,) * c
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    std = torch.where(std < 1e-3, torch.ones_like(std), std)  # constant channel: do not blow up
    return tuple(mean.tolist()), tuple(std.tolist())
