"""Per-image records of a test pass: what each exit answered, compactly, as evidence.

For every model and every exit, per test image: the predicted class (uint8, or
uint16 beyond 256 classes), the softmax entropy (float32, exactly as the exit
rule computes it, so that replaying a threshold on the records gives the very
same exits as on the logits) and the top probability (float16). Saved as a
compressed ``.npz`` (numpy's zip of ``.npy`` arrays, read with
``allow_pickle=False``), about 200 kB per model for 10,000 images and 3 exits.

The records are enough to recompute a threshold sweep (:func:`sweep_records`),
so published tables can be re-derived without the checkpoints or the data.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from erde import exits
from erde.errors import ErdeError
from erde.evaluation import SweepPoint, envelope_arrays, sweep_scores

MAX_RECORDS_FILE_BYTES = 64 << 20  # a compressed records file; published ones are a few MB
MAX_RECORDS_ARRAY_BYTES = 256 << 20  # one array once decompressed (checked before reading)
MAX_RECORD_ENTRIES = 4096  # arrays in one file
FIELDS = ("pred", "entropy", "max_prob")
QUANTILES = 1000  # thresholds of a dense curve, besides "none leaves" and "all leave first"
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,128}(/[A-Za-z0-9_.-]{1,128}){0,2}")


class RecordsError(ErdeError, ValueError):
    """A records file that is unreadable, too large, or does not match what it should hold."""


@dataclass(frozen=True)
class ExitRecords:
    """One model's records: ``pred`` (E, N) int, ``entropy`` (E, N) float32, ``max_prob`` (E, N)."""

    pred: np.ndarray
    entropy: np.ndarray
    max_prob: np.ndarray

    @property
    def num_exits(self) -> int:
        return int(self.pred.shape[0])


def exit_records(exit_logits: torch.Tensor) -> ExitRecords:
    """(E, N, K) logits -> the model's records (classes as uint8 where K <= 256)."""
    logits = exit_logits.detach().float().cpu()
    k = logits.shape[-1]
    pred = logits.argmax(dim=-1).numpy().astype(np.uint8 if k <= 256 else np.uint16)
    entropy = exits.rule_score(logits, "entropy").numpy().astype(np.float32)
    max_prob = exits.rule_score(logits, "max_softmax").numpy().astype(np.float16)
    return ExitRecords(pred, entropy, max_prob)


def sweep_records(
    records: ExitRecords,
    labels: np.ndarray,
    macs_per_exit: Sequence[float],
    thresholds: Sequence[float],
) -> list[SweepPoint]:
    """The entropy-rule sweep of :func:`erde.evaluation.sweep`, replayed on records.

    The same routing loop (:func:`erde.evaluation.sweep_scores`) on the same float32
    entropies and the same argmax classes, so every point equals the one computed from
    the logits.
    """
    scores = torch.from_numpy(records.entropy[:-1].astype(np.float32))  # (E-1, N)
    correct = torch.from_numpy(records.pred.astype(np.int64) == labels.astype(np.int64)[None])
    return sweep_scores(scores, correct, macs_per_exit, thresholds, "entropy")


def routed_curve(
    records: ExitRecords,
    labels: np.ndarray,
    macs_per_exit: Sequence[float],
    thresholds: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """(mean MACs, accuracy) at each of ``thresholds`` (T,), both (T,): the entropy rule's
    sweep of :func:`sweep_records`, all thresholds at once.

    An image leaves at the first exit ``k`` whose entropy is below ``t``, that is, at
    or before ``k`` exactly when the smallest entropy among exits ``0..k`` is below
    ``t``; so sorting those prefix minima once per exit gives every threshold's counts
    by binary search. Compared in float32, like the routing itself, so every point
    equals the one the loop computes (tested).
    """
    entropy = records.entropy.astype(np.float32)  # (E, N)
    num_exits, n = entropy.shape
    correct = (records.pred.astype(np.int64) == labels.astype(np.int64)[None]).astype(np.float64)
    t = np.asarray(thresholds, dtype=np.float32)
    prefix_min = np.minimum.accumulate(entropy[:-1], axis=0)  # (E-1, N)

    def below(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """For each threshold: the sum of ``weights`` over the images whose value is below it."""
        order = np.argsort(values, kind="stable")
        summed = np.concatenate([[0.0], np.cumsum(weights[order])])
        return summed[np.searchsorted(values[order], t, side="left")]

    ones = np.ones(n)
    gone = [below(prefix_min[k], ones) for k in range(num_exits - 1)] + [np.full(len(t), n)]
    hits = correct[-1].sum() - np.zeros(len(t))
    mean_macs = np.zeros(len(t))
    for k in range(num_exits):
        before = gone[k - 1] if k else 0.0
        mean_macs += (gone[k] - before) * float(macs_per_exit[k]) / n
        if k < num_exits - 1:  # leaving at k: counted by exit k's answer, not the next's
            hits += below(prefix_min[k], correct[k]) - below(prefix_min[k], correct[k + 1])
    return mean_macs, hits / n


def dense_curve(
    records: ExitRecords, labels: np.ndarray, macs_per_exit: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """One model's curve of one seed: (MACs ascending, best accuracy within them), (P,) each.

    Thresholds at the :data:`QUANTILES` quantiles of its early exits' entropies
    (``records.entropy[:-1]``, (E-1, N)), plus 0 (every image at the last exit) and one
    above every entropy (every image at the first exit), routed as the evaluation
    routes them (:func:`routed_curve`).
    """
    early = records.entropy[:-1].astype(np.float64).ravel()
    levels = np.quantile(early, np.linspace(0.0, 1.0, QUANTILES)) if early.size else []
    top = float(early.max()) + 1.0 if early.size else 1.0
    thresholds = sorted({0.0, *(float(v) for v in levels), top})
    macs, accuracy = routed_curve(records, labels, macs_per_exit, thresholds)
    xs, ys = envelope_arrays(list(zip(macs.tolist(), accuracy.tolist(), strict=True)))
    keep = np.append(xs[1:] != xs[:-1], True)  # one point per MACs value: the best
    return xs[keep], ys[keep]


def save_records(
    path: str | Path, models: Mapping[str, ExitRecords], labels: np.ndarray | torch.Tensor
) -> str:
    """Write ``{key: records}`` and the labels to a compressed .npz; returns its sha256.

    Keys name a model (``student_kd``) or a seed and model (``seed_3/student_kd``);
    written atomically (a reader never sees half a file).
    """
    from erde.io import atomic_write_bytes

    labels = labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    arrays: dict[str, np.ndarray] = {
        "labels": labels.astype(np.uint8 if labels.max(initial=0) < 256 else np.uint16)
    }
    for key, rec in models.items():
        _check_key(key)
        for field in FIELDS:
            arrays[f"{key}/{field}"] = getattr(rec, field)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    data = buffer.getvalue()
    atomic_write_bytes(Path(path), data)
    return hashlib.sha256(data).hexdigest()


def _check_key(key: str) -> None:
    if not _KEY.fullmatch(key):
        raise RecordsError(
            f"records key {key[:80]!r} must be NAME or SEED/NAME (letters, digits, _ . -)"
        )


def load_records(path: str | Path) -> tuple[np.ndarray, dict[str, ExitRecords]]:
    """(labels (N,), ``{key: records}``) from a file :func:`save_records` wrote.

    Untrusted input: the file and every array are size-bounded before anything is
    decompressed, nothing is unpickled, and every array is checked for its dtype
    and its shape against the labels.
    """
    path = Path(path)
    if not path.is_file():
        raise RecordsError(f"records file not found: {path}")
    if path.stat().st_size > MAX_RECORDS_FILE_BYTES:
        raise RecordsError(f"{path}: over {MAX_RECORDS_FILE_BYTES >> 20} MiB, not a records file")
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if len(infos) > MAX_RECORD_ENTRIES:
                raise RecordsError(f"{path}: {len(infos)} arrays, more than {MAX_RECORD_ENTRIES}")
            big = [i.filename for i in infos if i.file_size > MAX_RECORDS_ARRAY_BYTES]
            if big:
                raise RecordsError(f"{path}: array {big[0][:80]} would decompress past the limit")
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        if isinstance(exc, RecordsError):
            raise
        raise RecordsError(f"{path}: not a readable records file ({str(exc)[:200]})") from None
    return _unpack(path, arrays)


def _unpack(path: Path, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, ExitRecords]]:
    labels = arrays.pop("labels", None)
    if labels is None or labels.ndim != 1 or labels.dtype.kind != "u":
        raise RecordsError(f"{path}: no labels array (N,) of unsigned integers")
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, array in arrays.items():
        key, _, field = name.rpartition("/")
        if field not in FIELDS or not key:
            raise RecordsError(f"{path}: unexpected array {name[:80]!r}")
        _check_key(key)
        groups.setdefault(key, {})[field] = array
    out = {}
    kinds = {"pred": "u", "entropy": "f", "max_prob": "f"}
    for key, fields in groups.items():
        missing = [f for f in FIELDS if f not in fields]
        if missing:
            raise RecordsError(f"{path}: {key} lacks {', '.join(missing)}")
        shape = fields["pred"].shape
        for field, array in fields.items():
            if array.ndim != 2 or array.shape != shape or array.shape[1] != len(labels):
                raise RecordsError(
                    f"{path}: {key}/{field} has shape {array.shape}, expected (exits, {len(labels)})"
                )
            if array.dtype.kind != kinds[field]:
                raise RecordsError(f"{path}: {key}/{field} has dtype {array.dtype}")
        out[key] = ExitRecords(fields["pred"], fields["entropy"], fields["max_prob"])
    return labels, out
