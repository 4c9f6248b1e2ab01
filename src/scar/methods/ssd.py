"""Selective Synaptic Dampening, SSD (Foster, Schoepf, Brintrup, "Fast Machine Unlearning
Without Retraining Through Selective Synaptic Dampening", AAAI 2024).

Retraining-free and single-shot: no optimiser, one pass to measure importances, one edit.

1. Importances (the diagonal of the Fisher information, estimated as in the official code): for
   a loader, the squared gradient of the batch-mean cross-entropy, summed over batches and
   divided by their number. []_D over the whole training data D = retain ∪ forget, []_Df over
   the forget set; model in eval mode.
2. Selection and dampening (paper Eq. 3–4): every parameter θ_i with []_Df,i > α·[]_D,i is
   multiplied by β_i = min(λ·[]_D,i / []_Df,i, 1); all others are left alone.

Defaults are the official code's (github.com/if-loops/selective-synaptic-dampening,
``forget_*_main.py`` for ResNet-18 on CIFAR): α = 10 (``selection_weighting``), λ = 1
(``dampening_constant``), batches of 64, the forget loader and the full-train loader in a fixed
order (retain images first, then forget images, as its ``ConcatDataset``). The paper uses α = 50,
λ = 0.1 on PinsFaceRecognition and halves α for ViT; here one default serves every model.

Data access, honestly: D is the *full* training set, so SSD reads every retain image (once, for
the importances). It is not retain-free. The paper notes D's importances can be computed at
training time and stored; this toolkit does not store them, so they are computed here.

No iterative loop, so no stopping rule: the edit is what it is (the history holds one row with
the number of dampened parameters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scar.data.base import BatchLoader, ConcatImages
from scar.errors import check_range
from scar.methods import _loops
from scar.methods.base import Method, UnlearnData, register, seeded
from scar.models.base import eval_mode


def importances(model: nn.Module, batches) -> dict[str, Tensor]:
    """Mean over batches of the squared gradient of the batch-mean cross-entropy, per parameter
    (SSD's []; eval mode). Parameters that get no gradient have importance 0."""
    imp = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    count = 0
    with eval_mode(model):
        for b in batches:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(b.x), b.y).backward()
            for n, p in model.named_parameters():
                if p.grad is not None:
                    imp[n] += p.grad.detach() ** 2
            count += 1
    model.zero_grad(set_to_none=True)
    return {n: v / max(count, 1) for n, v in imp.items()}


@torch.no_grad()
def dampen(model: nn.Module, full: dict[str, Tensor], forget: dict[str, Tensor], alpha: float,
           lam: float) -> int:
    """Scale each parameter with forget importance > α·full importance by
    min(λ·full / forget, 1) (SSD Eq. 3–4), in place. Returns how many were scaled."""
    changed = 0
    for n, p in model.named_parameters():
        selected = forget[n] > alpha * full[n]
        # forget > alpha·full >= 0 where selected, so the division is safe there.
        beta = (lam * full[n] / torch.where(selected, forget[n], 1)).clamp(max=1)
        p.mul_(torch.where(selected, beta, 1).to(p.dtype))
        changed += int(selected.sum())
    return changed


@register
@dataclass(kw_only=True)
class SSD(Method):
    """Selective Synaptic Dampening: scale down parameters far more important to the forget set."""

    name = "ssd"
    requires = frozenset({"forget", "retain"})

    alpha: float = 10.0  # selection weighting: select where []_Df > alpha · []_D
    dampening: float = 1.0  # lambda: beta = min(lambda · []_D / []_Df, 1)
    batch_size: int = 64

    def validate(self) -> None:
        check_range("alpha", self.alpha, 0, low_inclusive=False)
        check_range("dampening", self.dampening, 0, low_inclusive=False)
        _loops.check_count("batch_size", self.batch_size)

    def access_note(self) -> str | None:
        return "importances over the full training set (retain + forget)"

    def _unlearn(self, model: nn.Module, original: nn.Module, data: UnlearnData) -> nn.Module:
        with seeded(data):
            forget_imp = importances(model, data.loader("forget", self.batch_size,
                                                        shuffle=False))
            full = ConcatImages([data.retain, data.forget])
            full_imp = importances(model, BatchLoader(full, data.input_spec,
                                                      batch_size=self.batch_size,
                                                      device=data.device))
            changed = dampen(model, full_imp, forget_imp, self.alpha, self.dampening)
        total = sum(p.numel() for p in model.parameters())
        self.dampened_ = changed
        self.record(step=1, dampened=changed, dampened_share=changed / max(total, 1))
        return model
