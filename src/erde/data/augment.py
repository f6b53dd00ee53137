"""Batched augmentation and normalisation, run on whatever device the batch lives on.

Images stay uint8 until the last moment; a random crop (zero or mirrored padding) and a
horizontal flip are done for the whole batch with one gather each, so there is
no per-sample Python work and the same code runs on CPU and CUDA.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch

from erde.config.schema import CROP_PADDING_MODES
from erde.data.types import AugmentSpec


class AugmentDraws(NamedTuple):
    """The random numbers of one batch's augmentation, drawn on the CPU.

    ``offsets`` (2, B) int64: crop row and column offsets in [0, 2 * padding]
    (None without cropping); ``flip`` (B,) float uniforms in [0, 1), an image is
    mirrored where < 0.5 (None without flipping). Drawn from a CPU generator so
    a batch does not depend on the device; the training loop draws a whole
    epoch's at once and copies them to the GPU in one transfer, because a
    blocking copy from host memory makes the host wait for the GPU's queue.
    """

    offsets: torch.Tensor | None
    flip: torch.Tensor | None

    def to(self, device: torch.device | str) -> AugmentDraws:
        return AugmentDraws(*(None if t is None else t.to(device) for t in self))


def draw_augment(
    batch: int, spec: AugmentSpec, generator: torch.Generator | None = None
) -> AugmentDraws:
    """The draws of :func:`augment` for a batch of ``batch`` images, in its order (crop, flip)."""
    offsets = flip = None
    if spec.crop_padding > 0:
        offsets = torch.randint(0, 2 * spec.crop_padding + 1, (2, batch), generator=generator)
    if spec.flip:
        flip = torch.rand(batch, generator=generator)
    return AugmentDraws(offsets, flip)


def crop_at(
    images: torch.Tensor, padding: int, offsets: torch.Tensor, mode: str = "zeros"
) -> torch.Tensor:
    """Pad by ``padding`` and cut the window at ``offsets`` (2, B) from each image.

    (B, C, H, W) -> (B, C, H, W), any dtype; one advanced-indexing gather. ``mode``
    ``zeros`` fills the border with black, ``reflect`` mirrors the image's edge into
    it (no black band in a shifted image; needs ``padding`` < H and W).
    """
    b, c, h, w = images.shape
    pad = (padding, padding, padding, padding)
    if mode == "reflect":
        padded = torch.nn.functional.pad(images, pad, mode="reflect")
    elif mode == "zeros":
        padded = torch.nn.functional.pad(images, pad)
    else:
        raise ValueError(
            f"crop padding mode must be one of {', '.join(CROP_PADDING_MODES)}, got {mode!r}"
        )
    rows = offsets[0, :, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=images.device)  # (B, W)
    batch = torch.arange(b, device=images.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def flip_where(images: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Mirror left-right the images whose uniform (B,) is < 0.5: (B, C, H, W) -> same."""
    return torch.where((uniforms < 0.5)[:, None, None, None], images.flip(3), images)


def apply_augment(images: torch.Tensor, spec: AugmentSpec, draws: AugmentDraws) -> torch.Tensor:
    """The augmentation of ``draws`` (on the images' device) applied to a uint8 batch."""
    if draws.offsets is not None:
        images = crop_at(images, spec.crop_padding, draws.offsets, spec.crop_padding_mode)
    if draws.flip is not None:
        images = flip_where(images, draws.flip)
    return images


def random_crop(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut a random window of the original size per image."""
    if padding <= 0:
        return images
    spec = AugmentSpec(crop_padding=padding, flip=False)
    return apply_augment(images, spec, draw_augment(len(images), spec, generator).to(images.device))


def random_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mirror each image left-right with probability 1/2: (B, C, H, W) -> same."""
    return flip_where(images, torch.rand(len(images), generator=generator).to(images.device))


def augment(
    images: torch.Tensor, spec: AugmentSpec, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply the data set's train-time augmentation to a uint8 batch (draws, then applies)."""
    return apply_augment(images, spec, draw_augment(len(images), spec, generator).to(images.device))


@functools.lru_cache(maxsize=64)
def _channel_constants(
    values: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(1, C, 1, 1) ``values * 255`` on ``device``, made once: building it per batch is a
    blocking copy from host memory, which on a GPU makes the host wait for its queue."""
    with torch.inference_mode(False):  # a plain tensor, usable later outside inference mode
        return torch.tensor(values, dtype=dtype, device=device).view(1, -1, 1, 1) * 255.0


def normalize(
    images: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """uint8 (B, C, H, W) in [0, 255] -> float, per-channel standardised."""
    m = _channel_constants(tuple(map(float, mean)), dtype, images.device)
    s = _channel_constants(tuple(map(float, std)), dtype, images.device)
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
