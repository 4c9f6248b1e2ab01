"""Pure accuracy metrics over :class:`~scar.evaluation.outputs.Outputs`.

All accuracies are **fractions in [0, 1]**; reports print them as percentages. An empty split has
no accuracy: it is NaN, never 0, so that a missing number cannot pass for a perfect forget score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from scar.errors import ConfigError
from scar.evaluation.outputs import Outputs

#: Split names with a stable accuracy key ``acc/<split>``.
#: HR reports train_forget / train_retain / test; CR reports train_* / test_forget / test_retain.
SPLITS: tuple[str, ...] = ("train_forget", "train_retain", "test", "test_forget", "test_retain")


def accuracy_key(split: str) -> str:
    """Stable metric key of a split's accuracy, e.g. ``acc/test_forget``."""
    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r} for an accuracy key; allowed: {list(SPLITS)}.")
    return f"acc/{split}"


def accuracy(outputs: Outputs) -> float:
    """Top-1 accuracy as a fraction in [0, 1]; NaN for an empty split."""
    if len(outputs) == 0:
        return math.nan
    return float((outputs.preds() == outputs.labels).double().mean())


def per_class_accuracy(outputs: Outputs, num_classes: int) -> np.ndarray:
    """Accuracy of each class as fractions, float64 [num_classes].

    NaN where a class has no samples (e.g. the removed class in a retain split).
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1; got {num_classes}.")
    labels = outputs.labels
    if len(outputs) and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ConfigError(
            f"Labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}; "
            f"got labels in [{int(labels.min())}, {int(labels.max())}]."
        )
    correct = (outputs.preds() == labels).to(torch.float64)
    hits = torch.bincount(labels, weights=correct, minlength=num_classes).numpy()
    counts = torch.bincount(labels, minlength=num_classes).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def split_accuracies(outputs_by_split: Mapping[str, Outputs]) -> dict[str, float]:
    """``{"acc/<split>": accuracy}`` for each split (names must be in :data:`SPLITS`)."""
    return {accuracy_key(split): accuracy(out) for split, out in outputs_by_split.items()}


# ---------------------------------------------------------------- distance to the oracle
#: Probabilities are clamped to this before a logarithm (0 · log 0 counts as 0).
_EPS = 1e-12


def js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Jensen–Shannon divergence between softmax(p_logits) and softmax(q_logits), one value per
    row, **in nats**: symmetric, 0 for equal distributions, at most ln 2 ≈ 0.693 (disjoint
    supports). Differentiable (SCAR's ``divergence: js`` loss is its batch mean)."""
    if p_logits.shape != q_logits.shape or p_logits.dim() != 2:
        raise ConfigError(f"js_divergence needs two [N, C] logit tensors of one shape; got "
                          f"{tuple(p_logits.shape)} and {tuple(q_logits.shape)}.")
    p = torch.softmax(p_logits, dim=1)
    q = torch.softmax(q_logits, dim=1)
    log_m = (0.5 * (p + q)).clamp_min(_EPS).log()
    kl_pm = (p * (p.clamp_min(_EPS).log() - log_m)).sum(1)
    kl_qm = (q * (q.clamp_min(_EPS).log() - log_m)).sum(1)
    return 0.5 * (kl_pm + kl_qm)


def mean_js_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    """The mean of :func:`js_divergence` over the rows, in nats; NaN for zero rows."""
    if len(p_logits) == 0:
        return math.nan
    return float(js_divergence(p_logits.double(), q_logits.double()).mean())


#: Splits on which the distance to the oracle is measured (those present and non-empty).
JS_SPLITS: tuple[str, ...] = ("train_forget", "test_forget", "test")


def js_key(split: str) -> str:
    """Stable metric key of the mean JS divergence to the oracle on a split, ``js/<split>``."""
    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r} for a JS key; allowed: {list(SPLITS)}.")
    return f"js/{split}"


def oracle_distance(outputs: Mapping[str, Outputs], oracle: Mapping[str, Outputs],
                    splits: tuple[str, ...] = JS_SPLITS) -> dict[str, float]:
    """``{"js/<split>": mean JS divergence (nats)}`` of a model's outputs to the oracle's on the
    same images, for each of ``splits`` that both have and that is not empty."""
    out: dict[str, float] = {}
    for split in splits:
        mine, theirs = outputs.get(split), oracle.get(split)
        if mine is None or theirs is None or len(mine) == 0:
            continue
        if len(mine) != len(theirs) or not torch.equal(mine.labels, theirs.labels):
            raise ConfigError(f"the oracle's outputs on {split!r} are not on the same images "
                              f"({len(theirs)} vs {len(mine)} rows).")
        out[js_key(split)] = mean_js_divergence(mine.logits, theirs.logits)
    return out


# ---------------------------------------------------------------- where the forget images go
def forget_destination(pred: torch.Tensor | np.ndarray, num_classes: int) -> np.ndarray:
    """Share of the images predicted as each class, float64 [num_classes] summing to 1 (all NaN
    for no images): where the forget images go."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1; got {num_classes}.")
    pred = torch.as_tensor(pred, dtype=torch.int64).reshape(-1)
    if len(pred) == 0:
        return np.full(num_classes, math.nan)
    if int(pred.min()) < 0 or int(pred.max()) >= num_classes:
        raise ConfigError(f"predictions must lie in [0, {num_classes - 1}]; got "
                          f"[{int(pred.min())}, {int(pred.max())}].")
    return torch.bincount(pred, minlength=num_classes).double().numpy() / len(pred)


#: Metric keys of the forget destination (on the train-forget images).
DEST_SHARES = "dest/shares"  # list: share per class (not averaged by reports)
DEST_TOP_CLASS = "dest/top_class"  # int: the most frequent predicted class
DEST_TOP_SHARE = "dest/top_share"  # float: its share


def destination_metrics(forget: Outputs) -> dict[str, object]:
    """The forget destination of one model: shares per class, the top class and its share
    (nothing for an empty forget split)."""
    if len(forget) == 0:
        return {}
    shares = forget_destination(forget.preds(), forget.num_classes)
    top = int(np.argmax(shares))
    return {DEST_SHARES: [float(s) for s in shares], DEST_TOP_CLASS: top,
            DEST_TOP_SHARE: float(shares[top])}
