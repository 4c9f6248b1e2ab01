"""JiT, "Just in Time" zero-shot unlearning by Lipschitz regularisation (Foster, Fogarty,
Schoepf, Öztireli, Brintrup, "Zero-Shot Machine Unlearning at Scale via Lipschitz
Regularization", arXiv 2402.01401, 2024).

For every forget image x the model's output is made *smooth* around x: with N Gaussian-perturbed
copies x'_i = clip(x + ε_i), ε_i ~ N(0, σ²), the loss

    L(x) = 1/N · Σ_i ‖f(x) − f(x'_i)‖₂ / ‖x − x'_i‖₂

(an empirical local Lipschitz constant of the output f, the logits) is minimised with plain SGD,
one step per forget batch (the loss sums over the batch, as the official code does). Flattening
the function around the forget images erases what was specific to them.

Zero-shot and retain-free: it reads only the forget set. Defaults are the official code's
(``lipschitz.py`` and ``forget_*_main.py`` of github.com/jwf40/Zeroshot-Unlearning-At-Scale,
CNN setting, VGG16 on CIFAR): N = 25 copies, one epoch, SGD (no momentum) lr η = 3e-4, batch
128; σ = 0.5 for class removal and σ = 0.01 for random removal (``sigma=None`` picks by
scenario). The copies are clamped to the batch's value range as in the code, and the perturbed
outputs carry no gradient (the code computes them under ``no_grad``): only f(x) is pulled.

Where we deviate, and why:

- Eval mode for every pass (BatchNorm running statistics frozen, dropout off). The official code
  runs the model in the mode it was loaded in — train mode — so its 25 noisy copies per step also
  shift the BatchNorm running statistics towards noisy images; the method, as the paper states
  it, is a loss on the network function, which eval mode keeps.
- Measured on the tiny synthetic fixtures (tests/methods/test_jit.py): with the official
  detached copies, SGD does not descend the Lipschitz ratio (pulling f(x) towards the copies'
  outputs also moves those outputs), the ratio *grows* over steps and the forget accuracy falls
  only as the model collapses (retain accuracy to chance). ``grad_through_copies=True``
  differentiates through both outputs: the ratio then falls (0.28 → 0.06 in 60 steps, lr 1e-3)
  but that well-separated toy model keeps classifying the forget images. The default stays the
  official one; the option is there for the comparison.
- The epoch is an upper bound: the run stops early once the forget accuracy is below the
  toolkit's target (CR < 0.01, HR < A_test − hr_margin). The paper runs exactly one epoch and
  has no stopping rule; JiT does not aim at a forget accuracy, so it rarely stops early.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scar.data.base import Batch
from scar.errors import check_range
from scar.methods import _loops
from scar.methods.base import HR_MARGIN, Method, UnlearnData, register, seeded

#: The official σ for a CNN per scenario (forget_full_class_main.py / forget_random_main.py).
SIGMA = {"CR": 0.5, "HR": 0.01}


def lipschitz_loss(model: nn.Module, x: Tensor, sigma: float, n_samples: int,
                   generator: torch.Generator,
                   through_copies: bool = False) -> tuple[Tensor, Tensor]:
    """(loss, f(x)): Σ over the batch of the mean over ``n_samples`` noisy copies of
    ‖f(x) − f(x')‖ / ‖x − x'‖.

    Copies are clamped to the batch's [min, max] (as the official code does); the copies'
    outputs are constants (no gradient, as in the official code) unless ``through_copies``."""
    out = model(x)
    lo, hi = x.min(), x.max()
    flat = x.flatten(1)
    total = x.new_zeros(())
    for _ in range(n_samples):
        noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
        copy = (x + sigma * noise).clamp(lo, hi)
        with torch.set_grad_enabled(through_copies and torch.is_grad_enabled()):
            out_copy = model(copy)
        d_in = torch.linalg.vector_norm(flat - copy.flatten(1), dim=1)
        d_out = torch.linalg.vector_norm(out - out_copy, dim=1)
        # The clamp can cancel the noise of a saturated image; such a pair says nothing.
        total = total + (d_out / d_in.clamp_min(1e-12)).sum()
    return total / n_samples, out


@register
@dataclass(kw_only=True)
class JiT(Method):
    """JiT: zero-shot unlearning by minimising the forget images' local Lipschitz constant."""

    name = "jit"
    requires = frozenset({"forget"})

    lr: float = 3e-4
    sigma: float | None = None  # noise std in normalised input units; None: 0.5 CR, 0.01 HR
    n_samples: int = 25
    epochs: int = 1
    batch_size: int = 128
    hr_margin: float = HR_MARGIN  # HR stops below A_test − hr_margin (reference 0.015)
    stop_check: str = "auto"  # when the forget set is evaluated (_loops.STOP_CHECKS)
    grad_through_copies: bool = False  # official code: the copies' outputs are constants

    def validate(self) -> None:
        from scar.errors import check_choice

        check_range("lr", self.lr, 0, low_inclusive=False)
        if self.sigma is not None:
            check_range("sigma", self.sigma, 0, low_inclusive=False)
        _loops.check_count("n_samples", self.n_samples)
        _loops.check_count("epochs", self.epochs)
        _loops.check_count("batch_size", self.batch_size)
        check_range("hr_margin", self.hr_margin, 0, 1)
        check_choice("stop_check", self.stop_check, _loops.STOP_CHECKS)

    def noise_std(self, scenario: str) -> float:
        return SIGMA[scenario] if self.sigma is None else self.sigma

    def _unlearn(self, model: nn.Module, original: nn.Module, data: UnlearnData) -> nn.Module:
        sigma = self.noise_std(data.scenario)
        with seeded(data) as gen:
            def step(batch: Batch, _k: int) -> _loops.StepOut:
                model.eval()  # the loop sets train mode; JiT works on the eval-mode function
                loss, logits = lipschitz_loss(model, batch.x, sigma, self.n_samples, gen,
                                              self.grad_through_copies)
                return _loops.StepOut(loss, logits, {"lipschitz": float(loss.detach())
                                                     / len(batch.y)})

            opt = torch.optim.SGD(model.parameters(), lr=self.lr)
            _loops.run_until_forgotten(self, model, data, step, optimizer=opt,
                                       epochs=self.epochs, batch_size=self.batch_size,
                                       stop_check=self.stop_check)
        return model
