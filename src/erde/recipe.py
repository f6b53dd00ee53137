"""The ingredients of fast CIFAR training that the loop can switch on, each on its own.

From the airbench recipe (Jordan 2024, arXiv 2404.00498), as config switches of
``TrainConfig`` / ``DataConfig`` so that each can be measured with and without:

- ``whiten_init``: layers that can be set from the training images
  (:class:`~erde.models.fastnet.WhiteningStem`) are, before the first step;
- ``norm_bias_lr_scale``: BatchNorm biases learn at this multiple of the learning
  rate (the paper's 64);
- ``decay_biases``: biases and BatchNorm biases are weight-decayed too, by as much
  per step as the weights (the paper's rule; erde's default leaves 1-d parameters
  undecayed, the usual choice for ResNets);
- ``lookahead``: every ``LOOKAHEAD_EVERY`` steps the weights are pulled towards an
  exponential moving average of themselves, and replaced by it at the end
  (:class:`Lookahead`);
- ``alternating_flip`` (data): each image is mirrored in every other epoch instead
  of at random, so two consecutive epochs see both views (:func:`alternating_flips`).
"""

from __future__ import annotations

import torch
from torch import nn

from erde.errors import ConfigError

LOOKAHEAD_EVERY = 5  # steps between two pulls towards the average
LOOKAHEAD_DECAY = 0.95  # per-step keep rate of the average at the end of training
WHITEN_IMAGES = 5000  # training images whose patches set a whitening layer


def data_init_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that can be initialised from training images."""
    return [m for m in model.modules() if callable(getattr(m, "init_from_data", None))]


def init_from_data(model: nn.Module, images: torch.Tensor, arch: str) -> None:
    """Call ``init_from_data(images)`` on every layer that has it; images normalised (N, C, H, W).

    Refuses a model with no such layer: ``whiten_init`` on, say, a ResNet would
    otherwise do nothing without a word.
    """
    layers = data_init_layers(model)
    if not layers:
        raise ConfigError(
            f"whiten_init: {arch} has no layer that is set from data (fastnet's stem is); "
            "turn whiten_init off for this model"
        )
    for layer in layers:
        layer.init_from_data(images)


def norm_bias_params(model: nn.Module) -> list[nn.Parameter]:
    """Trainable biases of the BatchNorm layers of ``model``."""
    return [
        m.bias
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.bias is not None
        and m.bias.requires_grad
    ]


def parameter_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    norm_bias_lr_scale: float = 1.0,
    decay_biases: bool = False,
) -> list[dict]:
    """Optimizer groups: decayed weights, 1-d parameters, and BN biases.

    No weight decay on BN and bias parameters unless ``decay_biases``. With a
    ``norm_bias_lr_scale`` other than 1 the BN biases get their own group at that
    multiple of the learning rate, and their decay coefficient is divided by it so
    that the decay per step (lr x coefficient) equals the weights', as in the paper.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    biases = {id(p) for p in norm_bias_params(model)} if norm_bias_lr_scale != 1.0 else set()
    decay = [p for p in params if p.ndim > 1]
    flat = [p for p in params if p.ndim <= 1 and id(p) not in biases]
    flat_decay = weight_decay if decay_biases else 0.0
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": lr},
        {"params": flat, "weight_decay": flat_decay, "lr": lr},
    ]
    if biases:
        scaled = [p for p in params if id(p) in biases]
        groups.append(
            {
                "params": scaled,
                "weight_decay": flat_decay / norm_bias_lr_scale,
                "lr": lr * norm_bias_lr_scale,
            }
        )
    return groups


class Lookahead:
    """An average of the weights that the weights are pulled back to every few steps.

    Every ``LOOKAHEAD_EVERY`` steps: ``avg = decay * avg + (1 - decay) * w`` and then
    ``w = avg``, with ``decay = LOOKAHEAD_DECAY ** every * (step / total) ** 3``: no
    averaging early on, more towards the end; after the last step the weights are the
    average. Covers every float tensor of the state dict (BN running statistics
    too). All tensor ops on the model's device; nothing waits for it.
    """

    def __init__(self, model: nn.Module, total_steps: int) -> None:
        self.total = max(1, int(total_steps))
        self.average = {k: v.detach().clone() for k, v in self._floats(model).items()}

    @staticmethod
    def _floats(model: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """Called with the global step just finished (1-based)."""
        if step >= self.total:
            decay = 1.0  # the final weights are the average
        elif step % LOOKAHEAD_EVERY == 0:
            decay = LOOKAHEAD_DECAY**LOOKAHEAD_EVERY * (step / self.total) ** 3
        else:
            return
        for name, w in self._floats(model).items():
            avg = self.average[name]
            avg.lerp_(w, 1.0 - decay)
            w.copy_(avg)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.average.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.average) - set(state)
        if missing:
            raise KeyError(f"lookahead state lacks {sorted(missing)[:3]}")
        for k, v in self.average.items():
            v.copy_(state[k])


def alternating_flips(first: torch.Tensor, epoch: int) -> torch.Tensor:
    """Flip uniforms (as :class:`~erde.data.augment.AugmentDraws` takes them) for one epoch.

    ``first`` (N,) bool says which images are mirrored in epoch 0 (drawn once per
    run); each later epoch mirrors the others: an image is flipped in epoch ``e``
    where ``first xor (e odd)``. Returns (N,) floats, 0.25 for "flip" and 0.75 for
    "keep" (the augmentation flips where the uniform is < 0.5).
    """
    flip = first ^ bool(epoch % 2)
    return torch.where(flip, 0.25, 0.75)
