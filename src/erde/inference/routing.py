"""Per-sample early-exit routing: skipped MACs become skipped time.

After each stage the exit head runs only on the images still in flight; those
the exit rule lets go are answered and dropped, and the next stage runs on the
compacted batch. Answers are written back in input order. The rule is the one
in :mod:`erde.exits` (the evaluation sweep replays the same functions on
recorded logits), so routing gives exactly the exits the sweep predicts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from erde import exits
from erde.errors import ErdeError
from erde.inference.policy import ExitPolicy, scale_logits

H = TypeVar("H")  # what flows between stages: a torch tensor, or a numpy array for ONNX Runtime


class ImageInputError(ErdeError):
    """Images of the wrong shape for the model, or an image file that cannot be used."""


# --------------------------------------------------------------------------- routing


@dataclass
class Routed:
    """Answers for a batch, in input order. Every tensor lives where the batch did."""

    classes: Tensor  # (N,) int64, argmax of the answering exit
    probabilities: Tensor  # (N, K) float32, softmax of the answering exit (temperature-scaled)
    exit_index: Tensor  # (N,) int64, exit each image left at
    scores: Tensor  # (N,) float32, the rule's score at that exit
    macs: Tensor  # (N,) int64, MACs actually spent on the image (macs_per_exit[exit])

    def __len__(self) -> int:
        return int(self.classes.shape[0])

    def cpu(self) -> Routed:
        return Routed(*(t.cpu() for t in self._tensors()))

    def _tensors(self) -> tuple[Tensor, ...]:
        return (self.classes, self.probabilities, self.exit_index, self.scores, self.macs)

    @staticmethod
    def concat(parts: Sequence[Routed]) -> Routed:
        """Join per-batch answers into one."""
        return Routed(*(torch.cat(ts) for ts in zip(*(p._tensors() for p in parts), strict=True)))

    def records(self, class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """One plain dict per image: class, class_name, probability, exit, score, macs."""
        out = self.cpu()
        top = out.probabilities.gather(1, out.classes.unsqueeze(1)).squeeze(1)
        rows = []
        for c, p, e, s, m in zip(
            out.classes.tolist(), top.tolist(), out.exit_index.tolist(), out.scores.tolist(),
            out.macs.tolist(), strict=True,
        ):  # fmt: skip
            row: dict[str, Any] = {"class": c}
            if class_names is not None:
                row["class_name"] = class_names[c]
            row.update({"probability": p, "exit": e, "score": s, "macs": m})
            rows.append(row)
        return rows


def route_stages(
    run_stage: Callable[[int, H], tuple[H, Tensor]],
    select: Callable[[H, Tensor], H],
    x: H,
    n: int,
    policy: ExitPolicy,
    num_exits: int,
    macs_per_exit: Tensor,
    device: torch.device,
) -> Routed:
    """The routing loop shared by the PyTorch router and the ONNX Runtime runtime.

    ``run_stage(i, h)`` returns (features after stage i, logits (B, K) of exit i)
    for the in-flight batch ``h``; ``select(h, keep)`` keeps rows ``keep``
    (int64 positions, on ``device``) of ``h``. Every in-flight image's answer is
    written at every exit; an image that goes on is overwritten later, so the
    last write is the exit it left at. One host synchronisation per stage (to
    size the compacted batch), none per image.
    """
    classes = torch.empty(n, dtype=torch.long, device=device)
    exit_index = torch.empty(n, dtype=torch.long, device=device)
    scores = torch.empty(n, dtype=torch.float32, device=device)
    probabilities: Tensor | None = None
    where: Tensor | None = None  # input positions of in-flight images; None = all, in order
    h = x
    for i in range(num_exits):
        h, logits = run_stage(i, h)
        z = scale_logits(logits, policy.temperature(i))  # (B, K)
        score = exits.rule_score(z, policy.rule)  # (B,)
        if probabilities is None:
            probabilities = torch.empty(n, z.shape[-1], dtype=torch.float32, device=device)
        predicted, p = logits.float().argmax(dim=-1), F.softmax(z, dim=-1)  # (B,), (B, K)
        if where is None:
            classes.copy_(predicted)
            probabilities.copy_(p)
            scores.copy_(score)
            exit_index.fill_(i)
        else:
            classes.index_copy_(0, where, predicted)
            probabilities.index_copy_(0, where, p)
            scores.index_copy_(0, where, score)
            exit_index.index_fill_(0, where, i)
        if i == num_exits - 1:
            break
        keep = (~exits.may_exit(score, policy.thresholds[i], policy.rule)).nonzero().squeeze(1)
        remaining = keep.numel()  # the stage's one host synchronisation
        if remaining == 0:
            break
        if remaining < score.numel():
            h = select(h, keep)
            where = keep if where is None else where.index_select(0, keep)
    assert probabilities is not None
    return Routed(classes, probabilities, exit_index, scores, macs_per_exit[exit_index])


class StageWithExit(nn.Module):
    """Stage ``i`` followed by exit ``i``: what one ONNX graph or one compiled unit holds."""

    def __init__(self, model: nn.Module, i: int) -> None:
        super().__init__()
        self.stage = model.stages[i]
        self.exit = model.exits[i]

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:  # -> (features, logits (B, K))
        h = self.stage(h)
        return h, self.exit(h)


class EarlyExitRouter:
    """Routes each image through an :class:`~erde.models.EarlyExitNet` only as far as it needs.

    ``image_shape`` (C, H, W), when given, is checked on every batch (a clear
    :class:`ImageInputError` instead of a shape error deep in a conv).
    ``optimize=True`` routes through :func:`erde.inference.fusion.inference_copy` of the
    model (BatchNorm folded into the convolutions, NHWC, ``dtype`` weights)
    instead of the training graph. ``compile=True`` wraps each stage (with its
    exit head) in ``torch.compile`` with dynamic batch sizes. The model is put
    in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        policy: ExitPolicy,
        *,
        image_shape: Sequence[int] | None = None,
        compile: bool = False,
        optimize: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        if len(policy.thresholds) != model.num_exits - 1:
            raise ValueError(
                f"policy has {len(policy.thresholds)} thresholds, the model has "
                f"{model.num_exits - 1} early exits"
            )
        self.model = model.eval()
        self.policy = policy
        self.num_exits = model.num_exits
        self.image_shape = tuple(image_shape) if image_shape is not None else None
        self.dtype = dtype if dtype not in (None, torch.float32) else None
        self.channels_last = optimize
        graph = model
        if optimize or self.dtype is not None:
            from erde.inference.fusion import check_precision, inference_copy

            device = next(model.parameters()).device
            check_precision(self.dtype, device)
            graph = inference_copy(
                model, fold_bn=optimize, channels_last=optimize, dtype=self.dtype
            )
        self.graph = graph
        stages = [StageWithExit(graph, i).eval() for i in range(self.num_exits)]
        if compile:
            stages = [torch.compile(s, dynamic=True) for s in stages]
        self._stages = stages
        self._macs: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}

    def macs_per_exit(self, image_shape: Sequence[int], device: torch.device) -> Tensor:
        """Measured cumulative MACs per exit (int64 (E,) on ``device``), cached per input shape."""
        key = (tuple(image_shape), device)
        if key not in self._macs:
            from erde.models import measure_exit_costs

            costs = measure_exit_costs(self.model, tuple(image_shape))
            self._macs[key] = torch.tensor(costs.macs_per_exit, dtype=torch.long, device=device)
        return self._macs[key]

    def __call__(self, x: Tensor) -> Routed:
        """Route a normalised float batch (B, C, H, W); answers come back in input order."""
        check_image_batch(x.shape, self.image_shape)
        macs = self.macs_per_exit(x.shape[1:], x.device)
        if self.dtype is not None:
            x = x.to(self.dtype)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)

        def run(i: int, h: Tensor) -> tuple[Tensor, Tensor]:
            h, logits = self._stages[i](h)
            return h, logits.float()  # scores and probabilities in fp32 whatever the graph's dtype

        with torch.inference_mode():
            out = route_stages(
                run, compact_rows, x, x.shape[0], self.policy, self.num_exits, macs, x.device
            )
        return Routed(*(t.clone() for t in out._tensors()))  # ordinary tensors for the caller


def compact_rows(h: Tensor, keep: Tensor) -> Tensor:
    """Rows ``keep`` of ``h``, in the memory format ``h`` had (NHWC stays NHWC)."""
    rows = h.index_select(0, keep)
    if (
        h.dim() == 4
        and not h.is_contiguous()
        and h.is_contiguous(memory_format=torch.channels_last)
    ):
        rows = rows.contiguous(memory_format=torch.channels_last)
    return rows


def check_image_batch(shape: Sequence[int], image_shape: Sequence[int] | None) -> None:
    """A batch must be (B, C, H, W) with the model's (C, H, W) when that is known."""
    if len(shape) != 4:
        raise ImageInputError(f"expected a batch of images (B, C, H, W), got shape {tuple(shape)}")
    if image_shape is not None and tuple(shape[1:]) != tuple(image_shape):
        c, h, w = image_shape
        raise ImageInputError(
            f"images are {shape[1]}x{shape[2]}x{shape[3]} (C x H x W) but the model expects "
            f"{c}x{h}x{w}; resize them first (see load_image)"
        )


def plain_forward(model: nn.Module, x: Tensor) -> Tensor:
    """The full network without early heads (stages, then the last exit): (B, K) logits.

    The baseline an early-exit deployment competes with.
    """
    with torch.inference_mode():
        h = x
        for stage in model.stages:
            h = stage(h)
        return model.exits[-1](h)


def route_whole_batch(
    model: nn.Module, x: Tensor, policy: ExitPolicy, macs_per_exit: Tensor
) -> Routed:
    """Batch-level routing, for comparison: the batch stops only where every image may leave.

    What a toolkit that routes a batch by its hardest image does; with batch
    size 1 it equals per-sample routing.
    """
    with torch.inference_mode():
        h = x
        for i in range(model.num_exits):
            h, logits = model.forward_stage(i, h)
            z = scale_logits(logits, policy.temperature(i))
            score = exits.rule_score(z, policy.rule)
            last = i == model.num_exits - 1
            if last or bool(exits.may_exit(score, policy.thresholds[i], policy.rule).all()):
                index = torch.full_like(score, i, dtype=torch.long)
                return Routed(
                    logits.float().argmax(-1), F.softmax(z, -1), index, score, macs_per_exit[index]
                )
    raise AssertionError("unreachable: the last exit always answers")
