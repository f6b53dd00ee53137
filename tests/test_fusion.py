"""The inference copy: BatchNorm folded, NHWC; parity with the training graph; precision checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from erde import exits
from erde.checkpoints import load_checkpoint, model_from_checkpoint
from erde.data import load_splits
from erde.inference import EarlyExitRouter, ExitPolicy
from erde.inference.fusion import PrecisionError, check_precision, count_batchnorms, inference_copy

TOL = 1e-4  # fp32 logits of the folded graph vs the training graph (relative to their scale)


@pytest.fixture(scope="module")
def trained(tiny_run, one_thread):
    """The tiny trained teacher and a batch of its normalised test images."""
    from erde.config import config_from_dict
    from erde.data import prepare_batch

    ckpt = load_checkpoint(tiny_run["teacher"])
    model = model_from_checkpoint(ckpt).eval()
    splits = load_splits(config_from_dict(ckpt["config"]))
    x = prepare_batch(splits.test.images, splits, train=False)
    return model, x


def test_folded_copy_has_no_stage_batchnorm_and_the_same_logits(trained) -> None:
    model, x = trained
    fast = inference_copy(model)
    assert all(count_batchnorms(s) == 0 for s in fast.stages)
    assert sum(count_batchnorms(s) for s in model.stages) > 0  # the original is untouched
    with torch.no_grad():
        ref = model(x)
        out = fast(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, out, strict=True):
        assert (a - b).abs().max().item() <= TOL * max(1.0, a.abs().max().item())


def test_routing_on_the_copy_leaves_exits_unchanged_but_at_the_threshold(trained) -> None:
    """Exits may differ only for images whose score is within float tolerance of a threshold."""
    model, x = trained
    with torch.no_grad():
        logits = model(x)
    scores = [exits.rule_score(z, "entropy") for z in logits[:-1]]
    threshold = [float(s.median()) for s in scores]  # half the images leave at each exit
    policy = ExitPolicy.create(threshold, "entropy", logits[0].shape[-1], len(logits))
    plain = EarlyExitRouter(model, policy)(x)
    fast = EarlyExitRouter(model, policy, optimize=True)(x)
    near = torch.zeros(len(x), dtype=torch.bool)
    for s, t in zip(scores, threshold, strict=True):
        near |= (s - t).abs() <= 1e-4
    differ = plain.exit_index != fast.exit_index
    assert not (differ & ~near).any()
    print(
        f"{int(differ.sum())} of {len(x)} images changed exit, {int(near.sum())} near a threshold"
    )
    same = ~differ
    assert torch.equal(plain.classes[same], fast.classes[same])
    assert torch.equal(plain.macs, fast.macs) or differ.any()


def test_a_stage_fx_cannot_trace_stays_unfolded_with_a_warning(trained) -> None:
    model, x = trained

    class DataDependent(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, h):
            if h.sum() > -1e30:  # control flow on a value: fx cannot trace it
                return self.inner(h)
            return h

    import copy

    odd = copy.deepcopy(model)
    odd.stages[0] = DataDependent(odd.stages[0])
    with pytest.warns(UserWarning, match=r"stages \[0\] could not be traced"):
        fast = inference_copy(odd)
    assert count_batchnorms(fast.stages[0]) > 0 and count_batchnorms(fast.stages[1]) == 0
    with torch.no_grad():
        assert torch.allclose(odd(x)[-1], fast(x)[-1], atol=1e-4, rtol=1e-4)


def test_reduced_precision_is_refused_where_it_would_be_emulated(monkeypatch) -> None:
    from erde.inference import fusion

    cpu = torch.device("cpu")
    monkeypatch.setattr(fusion, "cpu_has_bf16", lambda: False)
    with pytest.raises(PrecisionError, match="no bf16 hardware"):
        check_precision(torch.bfloat16, cpu)
    with pytest.raises(PrecisionError, match="fp16 inference is for CUDA"):
        check_precision(torch.float16, cpu)
    check_precision(None, cpu)
    check_precision(torch.float32, cpu)
    monkeypatch.setattr(fusion, "cpu_has_bf16", lambda: True)
    check_precision(torch.bfloat16, cpu)


def test_bf16_router_returns_fp32_answers(trained, monkeypatch) -> None:
    from erde.inference import fusion

    monkeypatch.setattr(fusion, "cpu_has_bf16", lambda: True)  # emulated here: correct, not fast
    model, x = trained
    policy = ExitPolicy.create(0.0, "entropy", 10, model.num_exits)  # everything to the last exit
    out = EarlyExitRouter(model, policy, optimize=True, dtype=torch.bfloat16)(x[:32])
    assert out.probabilities.dtype == torch.float32 and out.scores.dtype == torch.float32
    with torch.no_grad():
        ref = model(x[:32])[-1].argmax(-1)
    assert (out.classes == ref).float().mean() >= 0.9  # bf16 rounding may flip a few
