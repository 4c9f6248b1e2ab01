"""Negative gradient: gradient *ascent* of the cross-entropy on the forget set (spec §8).

Retain-free: it reads only the forget set. Like the reference baseline it uses SGD with momentum
0.9 and a per-epoch MultiStepLR (milestones 25, 40, ×0.5), and stops as soon as the forget
accuracy is below the target of the stopping rule (CR < 0.01, HR < original test acc − hr_margin);
see :mod:`scar.methods._loops` for how the check is kept cheap.

The reference sets the learning rate per run on the command line. Measured on Fashion-MNIST
(``fastcnn``, 3 training epochs, test acc 0.904, class 0 removed, CPU): SGD 0.01 reached the CR
target after 6 steps (forget-test 0.004, retain-test 0.908 → 0.882); SGD 0.001 needed 18 steps and
hurt the retain-test accuracy more (0.854). Ascent is unbounded, so a step that makes the loss
non-finite ends the run with the last finite model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from scar.data.base import Batch
from scar.methods import _loops
from scar.methods.base import UnlearnData, register, seeded


@register
@dataclass(kw_only=True)
class NegativeGradient(_loops.SGDForgetMethod):
    """Gradient ascent on the forget set (−cross-entropy); stops at the forget-accuracy target."""

    name = "negative_gradient"
    requires = frozenset({"forget"})

    def _unlearn(self, model: nn.Module, original: nn.Module, data: UnlearnData) -> nn.Module:
        def step(batch: Batch, _k: int) -> _loops.StepOut:
            logits = model(batch.x)
            ce = F.cross_entropy(logits, batch.y)
            # The sign is the method: maximise the forget loss by minimising its negative.
            return _loops.StepOut(-ce, logits, {"ce_forget": float(ce.detach())})

        with seeded(data):
            opt = _loops.make_optimizer(self.optimizer, model.parameters(), self.lr,
                                        self.momentum, self.weight_decay)
            _loops.run_until_forgotten(self, model, data, step, optimizer=opt,
                                       epochs=self.epochs, batch_size=self.batch_size,
                                       milestones=self.milestones,
                                       stop_check=self.stop_check)
        return model
