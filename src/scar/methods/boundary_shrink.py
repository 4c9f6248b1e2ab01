"""Boundary Shrink (Chen et al., "Boundary Unlearning: Rapid Forgetting of Deep Networks via
Shifting the Decision Boundary", CVPR 2023, §4.1): relabel every forget image with its *nearest
but incorrect* class and fine-tune on those labels.

1. Neighbour search: an untargeted FGSM step of size ``bound`` (in [0, 1] pixel units, the
   images' own scale) on the *original* model (eval mode, fixed) moves each forget image across
   its nearest decision boundary; the original's prediction for the perturbed image is the
   neighbour label y_nbi. When the attack fails, y_nbi is the true label (as in the official code,
   which trains on it anyway; ``attack_success`` in the history counts the failures).
2. Shrink: cross-entropy of the unlearned model on (x_f, y_nbi), SGD with momentum.

Retain-free: it reads only the forget set. Defaults are the official code's (Boundary-Unlearning
code released with the paper, CIFAR-10 class removal with AllCNN / ResNet-18): FGSM bound 0.1,
SGD lr 1e-5, momentum 0.9, 10 epochs over the forget set, no schedule, model in train mode. The
batch size of its loaders is a command-line setting; 64 here.

Where we deviate, and why:

- The official code stops after the 10 epochs; here the epochs are an upper bound and the run
  stops at the toolkit's forget-accuracy target (CR < 0.01, HR < A_test − hr_margin; see
  :mod:`scar.methods._loops`), as every forget-driven method does, so that methods are compared
  at the same stopping rule.
- The neighbour label of each image is searched once (first time its batch is seen) and cached:
  the official code repeats the search every epoch, but with the same fixed original model in
  eval mode and a deterministic FGSM step it finds the same label each time.
- The paper defines the method for class removal; random removal (HR) runs the same per-image
  step (nothing in it is class-level). That is our extension, not a setting of the paper.
- With lr 1e-5 the method moves slowly (the paper reports a few percent forget accuracy left on
  CIFAR-10); raise ``lr`` (e.g. 1e-3) when the stopping target has to be reached within the
  epochs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scar.data.base import Batch, InputSpec
from scar.errors import check_range
from scar.methods import _loops
from scar.methods.base import UnlearnData, register, seeded


def _pixel_scale(spec: InputSpec, like: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(spec.mean, device=like.device, dtype=like.dtype)[None, :, None, None]
    std = torch.tensor(spec.std, device=like.device, dtype=like.dtype)[None, :, None, None]
    return mean, std


def fgsm_neighbour_labels(original: nn.Module, x: Tensor, y: Tensor, spec: InputSpec,
                          bound: float) -> Tensor:
    """Nearest-but-incorrect labels by one untargeted FGSM step (Chen et al. 2023, Eq. 4).

    ``x`` is normalised with ``spec``; the step is taken in [0, 1] pixel space (where the
    official code attacks, and where ``bound`` is defined), clamped to valid pixels and rounded to
    8-bit values, then normalised again. Returns the original model's predictions for the
    perturbed images (the true label where the attack fails).
    """
    mean, std = _pixel_scale(spec, x)
    pixels = (x.detach() * std + mean).requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(original((pixels - mean) / std), y)
        (grad,) = torch.autograd.grad(loss, pixels)
    # Ascend the true-label loss: the sign step crosses the nearest boundary first.
    adv = (pixels.detach() + bound * grad.sign()).clamp_(0, 1)
    adv = torch.round(adv * 255) / 255  # images are 8-bit: stay on their grid, as the code does
    with torch.no_grad():
        return original((adv - mean) / std).argmax(1)


@register
@dataclass(kw_only=True)
class BoundaryShrink(_loops.SGDForgetMethod):
    """Boundary Shrink: fine-tune forget images on their FGSM nearest-wrong labels (Chen et al.)."""

    name = "boundary_shrink"
    requires = frozenset({"forget"})

    lr: float = 1e-5
    epochs: int = 10
    batch_size: int = 64
    bound: float = 0.1  # FGSM step in [0, 1] pixel units

    def validate(self) -> None:
        super().validate()
        check_range("bound", self.bound, 0, 1, low_inclusive=False)

    def _unlearn(self, model: nn.Module, original: nn.Module, data: UnlearnData) -> nn.Module:
        n = len(data.forget)
        labels = torch.full((n,), -1, dtype=torch.long, device=data.device)

        def step(batch: Batch, _k: int) -> _loops.StepOut:
            new = labels[batch.idx] < 0
            if bool(new.any()):
                labels[batch.idx[new]] = fgsm_neighbour_labels(
                    original, batch.x[new], batch.y[new], data.input_spec, self.bound)
            target = labels[batch.idx]
            logits = model(batch.x)
            loss = F.cross_entropy(logits, target)
            moved = float((target != batch.y).float().mean())
            return _loops.StepOut(loss, logits, {"ce_neighbour": float(loss.detach()),
                                                 "attack_success": moved})

        with seeded(data):
            opt = _loops.make_optimizer(self.optimizer, model.parameters(), self.lr,
                                        self.momentum, self.weight_decay)
            _loops.run_until_forgotten(self, model, data, step, optimizer=opt,
                                       epochs=self.epochs, batch_size=self.batch_size,
                                       milestones=self.milestones, stop_check=self.stop_check)
        known = labels >= 0
        self.neighbour_labels_ = labels.cpu()
        self.attack_success_ = float((labels[known] != data.forget.labels.to(data.device)[known])
                                     .float().mean()) if bool(known.any()) else float("nan")
        return model
