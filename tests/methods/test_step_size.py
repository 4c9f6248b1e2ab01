"""The step size from the model (step_size.py): known answers and the exact restore."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scar.methods.step_size import (
    LR_MAX,
    calibrate_lr,
    random_label_gradients,
    sign_step_divergence,
)


@pytest.mark.parametrize("power", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("answer", [3e-6, 2e-4, 5e-4, 0.02])
def test_calibrate_finds_the_rate_of_a_power_law(power, answer):
    """divergence = c·lr^p: the log-log interpolation between the brackets is exact."""
    target = 0.05
    c = target / answer ** power
    calls = []

    def probe(lr):
        calls.append(lr)
        return c * lr ** power

    assert calibrate_lr(probe, target) == pytest.approx(answer, rel=1e-9)
    assert len(calls) <= 2 + abs(math.log2(answer / 5e-4))  # one probe per factor of 2


def test_calibrate_on_a_curved_divergence_lands_between_the_brackets():
    """Not a power law (saturating): the answer stays inside the bracket a factor of 2 wide."""
    def probe(lr):
        return 1 - math.exp(-(lr / 1e-3) ** 2)

    target = 0.3
    exact = 1e-3 * math.sqrt(-math.log(1 - target))
    lr = calibrate_lr(probe, target)
    assert exact / 2 < lr < exact * 2
    assert probe(lr) == pytest.approx(target, rel=0.25)


def test_calibrate_treats_a_blown_up_divergence_as_too_large():
    lr = calibrate_lr(lambda lr: math.nan if lr > 1e-4 else (lr / 1e-4) ** 2, 0.25)
    assert lr == pytest.approx(5e-5, rel=1e-9)


def test_calibrate_gives_up_at_the_bound_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        lr = calibrate_lr(lambda lr: 0.0, 0.05)  # a model the step cannot change
    assert lr <= LR_MAX
    assert "no learning rate" in caplog.text


def test_sign_step_divergence_moves_by_the_sign_and_restores_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    running = model[1].running_mean.clone()
    grads = [torch.randn_like(p) for p in params]
    seen = {}

    def divergence():
        seen["training"] = model.training
        seen["moved"] = [float((b - p).detach().abs().max()) for b, p in zip(before, params)]
        seen["sign_ok"] = all(torch.equal(torch.sign(b - p), torch.sign(g))
                              for b, p, g in zip(before, params, grads))
        model(torch.randn(5, 3))  # in eval: must not touch the running statistics
        return 1.5

    assert sign_step_divergence(model, params, grads, 0.01, divergence) == 1.5
    assert seen["training"] is False
    assert seen["moved"] == pytest.approx([0.01] * len(params))
    assert seen["sign_ok"]
    assert model.training is True
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert torch.equal(model[1].running_mean, running)


def test_random_label_gradients_leave_grads_and_mode_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    model.train()
    params = list(model.parameters())
    model(torch.randn(6, 3)).sum().backward()
    before = [p.grad.clone() for p in params]
    running = model[1].running_mean.clone()
    x = torch.randn(32, 3)
    grads = random_label_gradients(model, params, x, torch.Generator().manual_seed(0))
    assert all(torch.equal(p.grad, b) for p, b in zip(params, before))
    assert model.training and torch.equal(model[1].running_mean, running)
    assert all(g.shape == p.shape for g, p in zip(grads, params))
    assert float(sum(g.abs().sum() for g in grads)) > 0
    # the direction lowers the probability of what the model predicts (labels are wrong ones)
    with torch.no_grad():
        model.eval()
        pred = model(x).argmax(1)
        p0 = model(x).softmax(1)[torch.arange(32), pred].mean()
        for p, g in zip(params, grads):
            p.sub_(1e-2 * g)
        p1 = model(x).softmax(1)[torch.arange(32), pred].mean()
    assert p1 < p0
