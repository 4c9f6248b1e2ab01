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
