"""Class statistics Q_c of the original model's features (spec §1), from any source.

Sources (SCAR's ``stats`` option): ``retain`` (a pass over retain images at unlearning time, the
reference code's behaviour), ``stored`` (recorded by ``scar train`` next to the checkpoint, the
paper's description: unlearning then reads no retain image), ``surrogate`` (surrogate images
grouped by the original model's predicted class: data-free).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from scar.data.base import Augment, BatchLoader, ImageSet, InputSpec
from scar.methods.mahalanobis import ClassStats, StatsAccumulator
from scar.models.adapter import FeatureModel
from scar.models.base import eval_mode

log = logging.getLogger(__name__)

#: Tukey exponent used when statistics are recorded at training time (spec default δ = 0.5).
STORED_DELTA = 0.5


@torch.no_grad()
def class_statistics(
    model: nn.Module | FeatureModel,
    data: ImageSet,
    input_spec: InputSpec,
    *,
    num_classes: int,
    by: str = "labels",
    delta: float = STORED_DELTA,
    tukey_mode: str = "signed",
    head: str | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    augment: Augment | None = None,
    seed: int = 0,
) -> ClassStats:
    """One eval-mode pass over ``data``: per-class Tukey-space mean and covariance. Every
    module's train/eval flag is as the caller left it afterwards.

    ``augment`` (with ``seed``) passes the images through a training augmentation first, as
    the reference code's retain loader does.

    ``by="labels"`` groups by the true labels, ``by="predictions"`` by the model's predicted
    class (used for surrogate images, which have no labels of the model's classes).
    """
    fm = model if isinstance(model, FeatureModel) else FeatureModel(model, head=head)
    acc = StatsAccumulator(num_classes, fm.feature_dim, delta, tukey_mode)
    with eval_mode(fm):
        for batch in BatchLoader(data, input_spec, batch_size=batch_size, device=device,
                                 augment=augment, seed=seed):
            feats, logits = fm(batch.x)
            groups = batch.y if by == "labels" else logits.argmax(1)
            acc.update(feats, groups)
    return acc.finalize()


def record_class_statistics(
    model: nn.Module,
    model_spec,
    train: ImageSet,
    input_spec: InputSpec,
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
) -> ClassStats:
    """Record statistics of a freshly trained model over its own training data (``stored``)."""
    stats = class_statistics(model, train, input_spec, num_classes=model_spec.num_classes,
                             head=model_spec.head, device=device)
    stats.save(path)
    log.info("stored class statistics for %d classes in %s", stats.classes.numel(), path)
    return stats
