"""JiT (Foster et al., 2024): the Lipschitz loss on known inputs, and forgetting on the tiny
synthetic fixtures with the forget set only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scar.errors import ConfigError
from scar.methods import UnlearnData, build_method
from scar.methods.base import accuracy_on
from scar.methods.jit import SIGMA, lipschitz_loss


def scaled_identity(c: float) -> nn.Module:
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(c * torch.eye(4))
    return nn.Sequential(nn.Flatten(), lin)


def test_lipschitz_loss_of_a_linear_map_is_its_scale_per_image():
    """f(x) = 3x: every ratio ‖f(x) − f(x')‖ / ‖x − x'‖ is exactly 3, whatever the noise and the
    clamp, so the loss is 3 per image in the batch."""
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 0.5, 2.5]]).view(2, 1, 2, 2)
    loss, out = lipschitz_loss(scaled_identity(3.0), x, sigma=0.5, n_samples=7,
                               generator=torch.Generator().manual_seed(0))
    assert float(loss.detach()) == pytest.approx(2 * 3.0, rel=1e-5)
    assert torch.allclose(out, 3 * x.flatten(1))


def test_lipschitz_loss_pulls_only_the_clean_output():
    """The copies' outputs are constants: the gradient is that of Σ_i ‖f(x) − c_i‖ / ‖x − x'_i‖
    with respect to f(x) only. For f(x) = w·x (one weight) and one copy this is known in closed
    form: d/dw |w x − w x'| / |x − x'| with x' fixed in the second term = sign · x / |x − x'|."""
    lin = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        lin.weight.fill_(2.0)
    model = nn.Sequential(nn.Flatten(), lin)
    x = torch.tensor([[[[1.0]]], [[[3.0]]]])  # two images: the clamp range is [1, 3]
    g = torch.Generator().manual_seed(0)
    loss, _ = lipschitz_loss(model, x, sigma=0.3, n_samples=1, generator=g)
    loss.backward()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    copy = (x + 0.3 * noise).clamp(1, 3)
    d = (x - copy).flatten()
    keep = d.abs() > 0  # an image whose copy was clamped back onto it adds nothing
    want = (torch.sign(d) * x.flatten() / d.abs())[keep].sum()
    assert float(lin.weight.grad) == pytest.approx(float(want), rel=1e-5)


def make_data(synth, splits, scenario="CR") -> UnlearnData:
    return UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                       scenario=scenario, removed_classes=splits.removed_classes,
                       forget=splits.train_forget, retain=splits.train_retain,
                       original_test_acc=0.95, seed=0)


def test_jit_forgets_with_the_forget_set_only(tiny_model, synth, cr_splits):
    data = make_data(synth, cr_splits)
    loader = data.loader(cr_splits.train_forget, 256, shuffle=False)
    assert accuracy_on(tiny_model, loader) > 0.9
    method = build_method("jit", lr=1e-3, epochs=5, batch_size=32)
    new = method.unlearn(tiny_model, data)
    assert accuracy_on(new, loader) < 0.01
    assert method.access_.get("retain", 0) == 0


def test_only_the_gradient_through_the_copies_descends_the_lipschitz_ratio(tiny_model, synth,
                                                                          cr_splits):
    """Measured, and documented in jit.py: the official detached copies make the ratio grow on
    this model; differentiating through the copies makes it fall."""
    data = make_data(synth, cr_splits)
    ratios = {}
    for through in (False, True):
        method = build_method("jit", lr=1e-4, epochs=20, batch_size=32, n_samples=5,
                              grad_through_copies=through)
        method.unlearn(tiny_model, data)
        ratios[through] = [r["lipschitz"] for r in method.history_]
    assert ratios[False][-1] > 2 * ratios[False][0]
    assert ratios[True][-1] < 0.9 * ratios[True][0]


def test_jit_leaves_batchnorm_statistics_alone(tiny_model, synth, cr_splits):
    """Eval mode for every pass (a documented deviation): running statistics do not move."""
    method = build_method("jit", lr=1e-4, batch_size=32, n_samples=2)
    new = method.unlearn(tiny_model, make_data(synth, cr_splits))
    before, after = tiny_model.state_dict(), new.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(before[k], after[k]) for k in stats)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))


def test_sigma_follows_the_scenario_unless_given():
    assert build_method("jit").noise_std("CR") == SIGMA["CR"] == 0.5
    assert build_method("jit").noise_std("HR") == SIGMA["HR"] == 0.01
    assert build_method("jit", sigma=0.2).noise_std("HR") == 0.2
    assert build_method("jit", sigma="none").sigma is None


def test_jit_runs_in_random_removal(tiny_model, synth, hr_splits):
    method = build_method("jit", batch_size=16, n_samples=2)
    method.unlearn(tiny_model, make_data(synth, hr_splits, "HR"))
    assert method.history_ and method.access_.get("retain", 0) == 0


@pytest.mark.parametrize("bad", [{"sigma": 0.0}, {"n_samples": 0}, {"lr": -1.0},
                                 {"stop_check": "batch"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        build_method("jit", **bad)
