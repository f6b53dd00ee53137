"""FastNet: a small VGG-like network built for fast CIFAR training, with an exit per group.

After the network of Keller Jordan's airbench94 ("94% on CIFAR-10 in 3.29 seconds
on a single GPU", arXiv 2404.00498), written from its published description:

- stem: a 2x2 convolution, no padding, 3 -> 24 channels (``whiten``), then GELU.
  Its weights can be set from the training images' 2x2 patches (PCA whitening,
  :func:`init_whitening`; the training loop does it with ``whiten_init``) and
  are then frozen, as in the paper;
- three groups, each conv3x3 -> max-pool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU,
  at widths 64 / 256 / 256 (times ``width``). Its convs are wide and few, so a
  training step costs about half the time per MAC of a ResNet-56 on a CPU;
- BatchNorm without a learned scale (the weight stays 1; only the bias learns);
- classifier: global max-pool, a linear layer without bias, logits times 1/9
  (``LOGIT_SCALE``: the paper's way to keep its high learning rate stable).

Each group is one block, so the default early-exit network has an exit after the
first and the second group and the classifier as the third. Exit heads take
the same 1/9 logit scale (``head_logit_scale``): with plain heads the early
exits pull too hard at this recipe's learning rate.
"""

from __future__ import annotations

import torch
from torch import nn

from erde.models.backbone import Backbone, ModelConfigError, scaled

WIDTHS = (64, 256, 256)
WHITEN_KERNEL = 2
LOGIT_SCALE = 1.0 / 9.0
MIN_WIDTH = 0.125  # 8 / 32 / 32 channels: below that the groups are too thin to learn CIFAR
BN_MOMENTUM = 0.4  # PyTorch's convention (the paper's 0.6 is the running average's keep rate)


class Scale(nn.Module):
    """Multiply by a constant: (B, K) -> (B, K). A module so that export and folding see it."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor:g}"


def norm(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with its scale fixed at 1 (not trained): only the bias learns."""
    bn = nn.BatchNorm2d(channels, momentum=BN_MOMENTUM)
    bn.weight.requires_grad_(False)
    return bn


def dirac_conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    """3x3 conv, no bias, PyTorch's default init plus an identity on the first ``in_ch`` outputs.

    The identity part (``nn.init.dirac_``) lets each group start close to passing its
    input through, which the paper found steadies the first steps.
    """
    conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: min(in_ch, out_ch)])
    return conv


class WhiteningStem(nn.Sequential):
    """2x2 conv (3 -> 24 channels, no padding) then GELU; ``init_from_data`` whitens it."""

    def __init__(self, in_channels: int) -> None:
        out = 2 * in_channels * WHITEN_KERNEL**2  # each whitening filter and its negative
        super().__init__(
            nn.Conv2d(in_channels, out, WHITEN_KERNEL, padding=0, bias=True), nn.GELU()
        )
        self.out_channels = out

    def init_from_data(self, images: torch.Tensor) -> None:
        """Whiten the 2x2 patches of normalised training images (N, C, H, W); freezes the weights.

        The training loop calls this before the first step when ``whiten_init`` is on.
        """
        init_whitening(self[0], images)


class ConvGroup(nn.Sequential):
    """conv -> max-pool 2 -> BN -> GELU -> conv -> BN -> GELU: (B, C, H, W) -> (B, C', H/2, W/2)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__(
            dirac_conv(in_ch, out_ch),
            nn.MaxPool2d(2),
            norm(out_ch),
            nn.GELU(),
            dirac_conv(out_ch, out_ch),
            norm(out_ch),
            nn.GELU(),
        )


class FastNet(Backbone):
    """``stem`` = whitening conv + GELU, ``blocks`` = the three groups, ``classifier`` = pool + FC."""

    head_logit_scale = LOGIT_SCALE  # read by EarlyExitNet for its exit heads
    min_input_side = 16  # the stem and three pools leave 1x1 at 16 pixels (read by build_model)

    def __init__(
        self,
        num_classes: int,
        *,
        width: float = 1.0,
        dropout: float = 0.0,
        in_channels: int = 3,
        widths: tuple[int, ...] = WIDTHS,
    ) -> None:
        super().__init__()
        if width < MIN_WIDTH:
            raise ModelConfigError(
                f"fastnet width must be >= {MIN_WIDTH} (groups of {scaled(widths[0], MIN_WIDTH)}/"
                f"{scaled(widths[1], MIN_WIDTH)}/{scaled(widths[2], MIN_WIDTH)} channels), got {width}"
            )
        if dropout:
            raise ModelConfigError("fastnet has no dropout inside the network; leave dropout at 0")
        self.arch, self.width, self.num_classes = "fastnet", float(width), num_classes
        self.stem = WhiteningStem(in_channels)
        stem_ch = self.stem.out_channels
        channels = [scaled(w, width) for w in widths]
        self.blocks = nn.ModuleList(
            ConvGroup(a, b) for a, b in zip([stem_ch, *channels[:-1]], channels, strict=True)
        )
        self.block_channels = channels
        self.classifier = nn.Sequential(
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(channels[-1], num_classes, bias=False),
            Scale(LOGIT_SCALE),
        )


def patches(images: torch.Tensor, size: int) -> torch.Tensor:
    """Every ``size x size`` patch of a float batch: (N, C, H, W) -> (N * (H-size+1)^2, C*size*size)."""
    c = images.shape[1]
    cut = images.unfold(2, size, 1).unfold(3, size, 1)  # (N, C, H', W', size, size)
    return cut.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * size * size)


def init_whitening(conv: nn.Conv2d, images: torch.Tensor, eps: float = 5e-4) -> None:
    """Set ``conv`` (out = 2 x C*k*k filters of k x k) to whiten the patches of ``images``.

    ``images`` are normalised float (N, C, H, W) training images. The filters are
    the eigenvectors of the patch covariance divided by the square root of their
    eigenvalue (largest first), then the same filters negated, so that the GELU
    after the stem keeps both signs. The weights are then frozen; the bias stays
    trainable.
    """
    k = conv.kernel_size[0]
    dim = conv.in_channels * k * k
    cov = torch.zeros(dim, dim, dtype=torch.float64)
    count = 0
    for chunk in images.split(512):  # ~24 MB of patches at a time, whatever N
        flat = patches(chunk.double(), k)
        cov += flat.T @ flat
        count += len(flat)
    cov /= max(count, 1)
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.T.flip(0)
    filters = eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)[:, None]
    weight = torch.cat([filters, -filters]).reshape(conv.weight.shape)
    if weight.shape[0] != conv.out_channels:
        raise ModelConfigError(
            f"the whitening conv needs 2 x {dim} output channels, has {conv.out_channels}"
        )
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype))
    conv.weight.requires_grad_(False)
