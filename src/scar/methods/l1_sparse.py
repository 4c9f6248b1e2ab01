"""ℓ1-sparse unlearning (Jia, Liu, Ram, Yao, Liu, Liu, Sharma, Liu, "Model Sparsity Can Simplify
Machine Unlearning", NeurIPS 2023, §5 "sparsity-aware unlearning"): fine-tune on the retain set
with an ℓ1 penalty on the weights whose strength decays linearly to zero.

Loss at a step of epoch e (0-based, of E):  CE(f(x_r), y_r) + α_e · ‖θ‖₁, with
α_e = α · (1 − e / (E − no_l1_epochs)) while e < E − no_l1_epochs, else 0 (the official
``FT_l1``; the penalty is constant within an epoch). ‖θ‖₁ sums |θ| over every parameter,
BatchNorm affine parameters and biases included, as the code does. Forgetting comes from the
fine-tuning (catastrophic forgetting of what retain does not refresh) helped by the sparsity
prior; the method never reads the forget set.

Defaults are the official code's (github.com/OPTML-Group/Unlearn-Sparse, ``FT_l1`` in
``unlearn/FT.py``, ``arg_parser.py``; the ResNet-18 CIFAR-10 class-0 example of the SalUn
repository's README, which runs the same ``FT_prune``): α = 1e-4, 5 epochs, SGD lr 0.01,
momentum 0.9, weight decay 5e-4, batch 256, no_l1_epochs 0; the MultiStepLR milestones of the
code (91, 136) never fire within these epochs and are left out. The Unlearn-Sparse README's
random-forgetting example passes α = 0.2 for 10 epochs; on ‖θ‖₁ summed over a whole network
that shrinks every weight by α · lr = 2e-3 per step, which erases a ResNet-18 within an epoch,
so it is not the default.

A fixed epoch budget, as in the paper: there is no forget-accuracy target, since the method
does not look at the forget set (checking it would make it read forget images).

Where we deviate: nothing in the loss. The model trains in train mode (BatchNorm batch
statistics), as in the code. Random removal (HR) and class removal (CR) run the same loop, as in
the paper.

Measured on the tiny synthetic fixtures (tests/methods/test_l1_sparse.py, class removal, lr 0.05,
10 epochs, batches of 32): α = 0 (plain fine-tuning) keeps the removed class at 100 %; α = 3e-3
takes it to 0 % with retain kept at 100 %. The defaults (α = 1e-4, 5 epochs) leave that
well-separated toy model unchanged in its predictions.

Reads retain data only: not retain-free (it is forget-free).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from scar.errors import check_range
from scar.methods import _loops
from scar.methods.base import Method, UnlearnData, register, seeded


def l1_weight(epoch: int, epochs: int, alpha: float, no_l1_epochs: int = 0) -> float:
    """α_e of the official linear decay: α · (1 − e / (E − no_l1)) for 0-based epoch
    e < E − no_l1, else 0."""
    active = epochs - no_l1_epochs
    return alpha * (1 - epoch / active) if epoch < active else 0.0


def l1_norm(model: nn.Module) -> Tensor:
    """Σ |θ| over every parameter of ``model``."""
    return sum(p.abs().sum() for p in model.parameters())


@register
@dataclass(kw_only=True)
class L1Sparse(Method):
    """ℓ1-sparse: fine-tune on retain with a linearly decaying ℓ1 penalty (Jia et al.)."""

    name = "l1_sparse"
    requires = frozenset({"retain"})

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 5  # fixed budget
    batch_size: int = 256
    alpha: float = 1e-4  # initial ℓ1 strength
    no_l1_epochs: int = 0  # final epochs without the penalty

    def validate(self) -> None:
        from scar.errors import ConfigError

        check_range("lr", self.lr, 0, low_inclusive=False)
        check_range("momentum", self.momentum, 0, 1, high_inclusive=False)
        check_range("weight_decay", self.weight_decay, 0)
        _loops.check_count("epochs", self.epochs)
        _loops.check_count("batch_size", self.batch_size)
        check_range("alpha", self.alpha, 0)
        _loops.check_count("no_l1_epochs", self.no_l1_epochs, low=0)
        if self.no_l1_epochs >= self.epochs:
            raise ConfigError(f"no_l1_epochs must be below epochs ({self.epochs}); got "
                              f"{self.no_l1_epochs}.")

    def _unlearn(self, model: nn.Module, original: nn.Module, data: UnlearnData) -> nn.Module:
        with seeded(data):
            retain = data.loader("retain", self.batch_size, shuffle=True)
            opt = _loops.make_optimizer("sgd", model.parameters(), self.lr, self.momentum,
                                        self.weight_decay)
            bar = tqdm(total=self.epochs * len(retain), desc=self.name,
                       disable=not data.progress, dynamic_ncols=True, leave=False)
            model.train()
            for epoch in range(self.epochs):
                alpha = l1_weight(epoch, self.epochs, self.alpha, self.no_l1_epochs)
                for batch in retain:
                    logits = model(batch.x)
                    ce = F.cross_entropy(logits, batch.y)
                    l1 = l1_norm(model)
                    loss = ce + alpha * l1
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    acc = float((logits.detach().argmax(1) == batch.y).float().mean())
                    self.record(epoch=epoch + 1, step=len(self.history_) + 1,
                                loss=float(loss.detach()), ce_retain=float(ce.detach()),
                                l1=float(l1.detach()), alpha=alpha, retain_acc_batch=acc,
                                lr=opt.param_groups[0]["lr"])
                    bar.update(1)
            bar.close()
        return model
