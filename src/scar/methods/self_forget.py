"""SCAR self-forget (spec §6): class removal with neither forget nor retain images.

Surrogate images that the original model predicts as a removed class play the forget set (their
features go into L_M, labelled with the predicted class); the rest are the distillation batches
(with the CR teacher target). Statistics must come from ``stored`` or ``surrogate``. The stopping
rule only uses what the method may see: the fraction of surrogate-forget images still predicted
as their removed class (the reference code reads the real forget set here; we do not).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from scar.data.base import ImageSet
from scar.errors import ConfigError, MissingRequirementError
from scar.methods.base import UnlearnData, register
from scar.methods.scar_method import SCAR
from scar.models.adapter import FeatureModel

log = logging.getLogger(__name__)


@torch.no_grad()
def split_by_prediction(teacher: FeatureModel, data: UnlearnData, batch_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices predicted as a removed class, their predicted labels, the other indices)."""
    preds = torch.cat([teacher.logits(b.x).argmax(1).cpu()
                       for b in data.loader("surrogate", batch_size, shuffle=False)])
    removed = torch.tensor(data.removed_classes)
    hit = torch.isin(preds, removed)
    idx = torch.arange(len(preds))
    return idx[hit], preds[hit], idx[~hit]


@register
@dataclass(kw_only=True)
class SCARSelfForget(SCAR):
    """SCAR self-forget: class removal from surrogate images alone (no forget, no retain set)."""

    name: ClassVar[str] = "scar_self_forget"
    requires: ClassVar[frozenset[str]] = frozenset({"surrogate"})
    scenarios: ClassVar[tuple[str, ...]] = ("CR",)

    min_forget_images: int = 10

    def validate(self) -> None:
        super().validate()
        if self.stats == "retain":
            raise ConfigError(
                "scar_self_forget cannot use stats='retain' (it sees no retain images); "
                "allowed: 'stored', 'surrogate'."
            )

    def prepare(self, teacher: FeatureModel, data: UnlearnData
                ) -> tuple[ImageSet, ImageSet, float]:
        hit, labels, rest = split_by_prediction(teacher, data, self.batch_size)
        log.info("self-forget: %d of %d surrogate images are predicted as removed classes %s",
                 len(hit), len(hit) + len(rest), list(data.removed_classes))
        if len(hit) < self.min_forget_images:
            raise MissingRequirementError(
                f"only {len(hit)} surrogate images are predicted as the removed classes "
                f"{list(data.removed_classes)} (need at least {self.min_forget_images} to play the "
                "forget set); use a larger or closer surrogate set."
            )
        if len(rest) == 0:
            raise MissingRequirementError(
                "every surrogate image is predicted as a removed class; none is left for "
                "distillation."
            )
        forget = data.surrogate.subset(hit, labels)
        surrogate = data.surrogate.subset(rest)
        # Same threshold as CR: < 1% of the surrogate-forget images still predicted as removed.
        return forget, surrogate, 0.01
