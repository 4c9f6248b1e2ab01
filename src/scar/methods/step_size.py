"""Step size from the model, not from the user: the Adam learning rate whose first step moves the
model's predictions by a set amount.

Why. Adam's first step moves *every* parameter by ``lr`` in the direction of its gradient's sign,
so how much one step changes the function depends on the architecture: the same ``lr = 5e-4``
that barely changes a small CNN wrecks a ResNet-18. Measured on Fashion-MNIST (class 3 removed,
the first SCAR step, KL(original ‖ stepped model) on 512 held-out surrogate images):

============== ========== ========== ==========
lr             fastcnn    ResNet-18  AllCNN
============== ========== ========== ==========
3e-5           0.0003     0.010      0.042
1e-4           0.0027     0.092      0.32
5e-4           0.054      0.65       2.7
============== ========== ========== ==========

ResNet-18 at 5e-4 lost 10–24 points of retain-test accuracy within 2–3 steps (classes 0, 3, 7),
at 1e-4 at most 0.3. So instead of one learning rate for every model, SCAR fixes the *function
change* of a step: :func:`calibrate_lr` finds the learning rate whose first Adam step (the sign of
the first gradient) moves the predictions on held-out surrogate images by ``target_kl`` nats (KL
from the original's softmax). It costs a handful of forward passes over those images.

SCAR caps that rate at a multiple of the one found along :func:`random_label_gradients`, a
direction that does not depend on the removed class: the first step's own direction can hurt kept
classes the surrogate images barely show, which the probe then cannot see (ResNet-18, class 9:
uncapped 4.0e-4 lost 11.4 points of retain-test accuracy in 2 steps; capped 1.8e-4, 0.2).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from scar.models.base import eval_mode

log = logging.getLogger(__name__)

#: Bounds of the search (a learning rate outside them means something else is wrong).
LR_MIN, LR_MAX = 1e-7, 1e-1


def sign_step_divergence(model: nn.Module, params: Sequence[nn.Parameter],
                         grads: Sequence[torch.Tensor], lr: float,
                         divergence: Callable[[], float]) -> float:
    """``divergence()`` with every parameter moved by ``−lr·sign(grad)`` (Adam's first step),
    then the parameters restored exactly. The model runs in eval mode (flags restored)."""
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(lr * torch.sign(g))
        with eval_mode(model):
            return divergence()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def calibrate_lr(probe: Callable[[float], float], target_kl: float, *,
                 start: float = 5e-4, factor: float = 2.0, max_probes: int = 24) -> float:
    """The learning rate at which ``probe(lr)`` (a divergence that grows with ``lr``) equals
    ``target_kl``.

    Walks from ``start`` by ``factor`` until the target is bracketed, then interpolates on the
    straight line through the two brackets in log(lr)–log(divergence) coordinates (the divergence
    grows like a power of ``lr`` over a factor of 2). Returns the lower bracket if the divergence
    is zero or flat there (no interpolation possible), and the last rate tried, with a warning, if
    no rate in [LR_MIN, LR_MAX] reaches the target.
    """
    lr, kl = start, probe(start)
    probes = 1
    if not math.isfinite(kl):
        kl = math.inf
    going_down = kl > target_kl
    while probes < max_probes:
        nxt = lr / factor if going_down else lr * factor
        if not LR_MIN <= nxt <= LR_MAX:
            log.warning("step size: no learning rate in [%g, %g] gives a first-step change of "
                        "%g (at %g: %g); using %g", LR_MIN, LR_MAX, target_kl, lr, kl, lr)
            return lr
        kl_next = probe(nxt)
        kl_next = kl_next if math.isfinite(kl_next) else math.inf
        probes += 1
        if (kl_next <= target_kl) == going_down:  # bracketed
            (lo, klo), (hi, khi) = sorted([(lr, kl), (nxt, kl_next)])
            if not (0 < klo < khi < math.inf):
                return lo
            # log kl = a + slope·log lr between the brackets: solve for the target.
            slope = (math.log(khi) - math.log(klo)) / (math.log(hi) - math.log(lo))
            return float(math.exp(math.log(lo) + (math.log(target_kl) - math.log(klo)) / slope))
        lr, kl = nxt, kl_next
    return lr


def random_label_gradients(model: nn.Module, params: Sequence[nn.Parameter], x: torch.Tensor,
                           generator: torch.Generator) -> list[torch.Tensor]:
    """Gradients of the cross-entropy of ``model(x)`` towards random *wrong* labels (each image
    a class other than the one the model predicts), in eval mode.

    A class-independent direction that moves every decision boundary at once: the step size it
    calibrates is the model's, whatever is being forgotten. ``p.grad`` is left as it was.
    """
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        with eval_mode(model), torch.enable_grad():
            logits = model(x)
            c = logits.shape[1]
            shift = torch.randint(1, c, (len(x),), generator=generator).to(logits.device)
            wrong = (logits.detach().argmax(1) + shift) % c
            torch.nn.functional.cross_entropy(logits, wrong).backward()
        return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
                for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g

