"""Random labels: cross-entropy on the forget set towards random wrong labels (spec §8).

Retain-free: it reads only the forget set. Every step draws fresh labels (as the reference does)
from a generator seeded with ``data.seed``:

- class removal (CR): uniformly among the *kept* classes (the removed classes are what we want the
  model to stop predicting);
- random removal (HR): uniformly among all classes *except the sample's true label*. The
  reference draws from all classes, so about 1/C of its "random" targets are the true label and
  push the wrong way; excluding it is the intended behaviour. ``allow_true_label=True`` draws
  as the reference does (the ``reference`` preset sets it).

Optimiser, schedule and stopping rule as :mod:`scar.methods.negative_gradient` (same setting
as measured there, SGD 0.01: 11 steps to the CR target, retain-test 0.908 → 0.903).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scar.data.base import Batch
from scar.errors import ConfigError
from scar.methods import _loops
from scar.methods.base import UnlearnData, register, seeded


def random_targets(labels: Tensor, data: UnlearnData, generator: torch.Generator,
                   allow_true_label: bool = False) -> Tensor:
    """Random labels for a batch: kept classes (CR); in HR any class but the true one, or any
    class at all with ``allow_true_label`` (the reference)."""
    n = labels.numel()
    if data.scenario == "CR":
        kept = torch.tensor(data.kept_classes(), dtype=torch.long)
        picks = kept[torch.randint(len(kept), (n,), generator=generator)]
        return picks.to(labels.device)
    if allow_true_label:
        return torch.randint(data.num_classes, (n,), generator=generator).to(labels.device)
    # Draw from C − 1 values and skip over the true label: uniform over the wrong classes.
    r = torch.randint(data.num_classes - 1, (n,), generator=generator).to(labels.device)
    return r + (r >= labels).long()


@register
@dataclass(kw_only=True)
class RandomLabels(_loops.SGDForgetMethod):
    """Cross-entropy on the forget set with random labels (kept classes in CR); stops at target."""

    name = "random_labels"
    requires = frozenset({"forget"})

    allow_true_label: bool = False  # HR: may a drawn label be the true one (reference: yes)

    def _unlearn(self, model: nn.Module, original: nn.Module, data: UnlearnData) -> nn.Module:
        if data.num_classes < 2 or not data.kept_classes():
            raise ConfigError("random_labels needs at least one class that is not removed.")
        with seeded(data) as gen:
            def step(batch: Batch, _k: int) -> _loops.StepOut:
                logits = model(batch.x)
                targets = random_targets(batch.y, data, gen, self.allow_true_label)
                loss = F.cross_entropy(logits, targets)
                return _loops.StepOut(loss, logits, {"ce_random": float(loss.detach())})

            opt = _loops.make_optimizer(self.optimizer, model.parameters(), self.lr,
                                        self.momentum, self.weight_decay)
            _loops.run_until_forgotten(self, model, data, step, optimizer=opt,
                                       epochs=self.epochs, batch_size=self.batch_size,
                                       milestones=self.milestones,
                                       stop_check=self.stop_check)
        return model
