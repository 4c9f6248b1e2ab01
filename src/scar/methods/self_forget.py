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
def removed_class_scores(teacher: FeatureModel, data: UnlearnData, batch_size: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per surrogate image: (teacher argmax, best removed class, its softmax probability)."""
    removed = torch.tensor(data.removed_classes, device=data.device)
    preds, best, prob = [], [], []
    for b in data.loader("surrogate", batch_size, shuffle=False):
        logits = teacher.logits(b.x)
        p = logits.softmax(1)[:, removed]
        top = p.max(1)
        preds.append(logits.argmax(1).cpu())
        best.append(removed[top.indices].cpu())
        prob.append(top.values.cpu())
    return torch.cat(preds), torch.cat(best), torch.cat(prob)


def select_proxies(preds: torch.Tensor, best: torch.Tensor, prob: torch.Tensor,
                   removed: tuple[int, ...], min_proxies: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(proxy indices, their removed-class labels, the other indices).

    Proxies are the images the teacher predicts as a removed class (the reference); when there
    are fewer than ``min_proxies`` of them, the images with the highest removed-class
    probability fill up to ``min_proxies`` (labelled with that most probable removed class).
    """
    hit = torch.isin(preds, torch.tensor(removed))
    if int(hit.sum()) < min_proxies:
        order = torch.argsort(prob, descending=True, stable=True)
        hit = torch.zeros_like(hit)
        hit[order[:min(min_proxies, len(prob))]] = True
    idx = torch.arange(len(preds))
    return idx[hit], best[hit], idx[~hit]


@register
@dataclass(kw_only=True)
class SCARSelfForget(SCAR):
    """SCAR self-forget: class removal from surrogate images alone (no forget, no retain set)."""

    name: ClassVar[str] = "scar_self_forget"
    requires: ClassVar[frozenset[str]] = frozenset({"surrogate"})
    scenarios: ClassVar[tuple[str, ...]] = ("CR",)

    min_forget_images: int = 10
    # 0 = the reference: only images predicted as a removed class are proxies.
    min_proxies: int = 0

    def validate(self) -> None:
        super().validate()
        if self.stats == "retain":
            raise ConfigError(
                "scar_self_forget cannot use stats='retain' (it sees no retain images); "
                "allowed: 'stored', 'surrogate'."
            )

    def prepare(self, teacher: FeatureModel, data: UnlearnData
                ) -> tuple[ImageSet, ImageSet, float]:
        preds, best, prob = removed_class_scores(teacher, data, self.batch_size)
        hit, labels, rest = select_proxies(preds, best, prob, data.removed_classes,
                                           self.min_proxies)
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
