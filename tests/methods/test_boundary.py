"""Boundary Shrink and Boundary Expand (Chen et al., CVPR 2023): the neighbour search, the shadow
class, and forgetting on the tiny synthetic fixtures."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scar.data.base import InputSpec
from scar.errors import ConfigError
from scar.methods import UnlearnData, build_method
from scar.methods.base import accuracy_on
from scar.methods.boundary_expand import shadow_neuron, widened_logits
from scar.methods.boundary_shrink import fgsm_neighbour_labels

PIXEL = InputSpec(1, 1, (0.0,), (1.0,))  # one-pixel images: normalised value = pixel value


def three_classes() -> nn.Module:
    """z0 = 0, z1 = 20 (x − 0.55), z2 = −20 (x − 0.325): class 0 on (0.325, 0.55), class 1
    above it, class 2 below."""
    lin = nn.Linear(1, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.0], [20.0], [-20.0]]))
        lin.bias.copy_(torch.tensor([0.0, -11.0, 6.5]))
    return nn.Sequential(nn.Flatten(), lin).eval()


def test_fgsm_finds_the_nearest_wrong_class():
    model = three_classes()
    x = torch.tensor([0.5, 0.4, 0.45]).view(3, 1, 1, 1)
    y = torch.zeros(3, dtype=torch.long)
    assert model(x).argmax(1).tolist() == [0, 0, 0]
    # 0.5 is nearer class 1's boundary (0.55): the step goes up to 0.6 → class 1; 0.4 is nearer
    # class 2's (0.325): down to 0.3 → class 2.
    got = fgsm_neighbour_labels(model, x[:2], y[:2], PIXEL, bound=0.1)
    assert got.tolist() == [1, 2]
    # Too small a step crosses nothing: the true label comes back (the attack failed).
    assert fgsm_neighbour_labels(model, x[2:], y[2:], PIXEL, bound=0.01).tolist() == [0]
    # Pixels stay valid: a step past 1 is clamped (0.95 + 0.1 → 1.0, still class 1).
    top = fgsm_neighbour_labels(model, torch.full((1, 1, 1, 1), 0.95), torch.ones(1).long(),
                                PIXEL, bound=0.1)
    assert top.tolist() == [1]


def test_widened_logits_append_the_shadow_class():
    features = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    logits = torch.tensor([[0.5, -0.5], [1.0, 2.0]])
    wide = widened_logits(features, logits, torch.tensor([1.0, 1.0]), torch.tensor(0.5))
    assert torch.allclose(wide, torch.tensor([[0.5, -0.5, 3.5], [1.0, 2.0, -0.5]]))


def test_shadow_neuron_is_xavier_normal_with_zero_bias():
    w, b = shadow_neuron(4000, 9, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert float(b.detach()) == 0.0 and w.shape == (4000,)
    assert float(w.detach().std()) == pytest.approx(math.sqrt(2 / (4000 + 10)), rel=0.05)


def make_data(synth, splits, scenario="CR") -> UnlearnData:
    return UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                       scenario=scenario, removed_classes=splits.removed_classes,
                       forget=splits.train_forget, retain=splits.train_retain,
                       original_test_acc=0.95, seed=0)


def forget_acc(model, data) -> float:
    return accuracy_on(model, data.loader(data.forget.inner, 256, shuffle=False))


# The tiny model is very confident: an FGSM step of 0.1 crosses no boundary on it, 0.3 does.
@pytest.mark.parametrize("name, hp", [
    ("boundary_shrink", {"lr": 1e-3, "bound": 0.3, "batch_size": 32}),
    ("boundary_expand", {"lr": 1e-3, "batch_size": 32}),
])
def test_class_removal_forgets_without_reading_retain(name, hp, tiny_model, synth, cr_splits):
    data = make_data(synth, cr_splits)
    assert forget_acc(tiny_model, data) > 0.9
    method = build_method(name, **hp)
    new = method.unlearn(tiny_model, data)
    assert forget_acc(new, data) < 0.01  # the stopping target (CR)
    assert method.access_.get("retain", 0) == 0 and method.access_["forget"] > 0
    assert len(method.history_) < 10 * math.ceil(len(cr_splits.train_forget) / 32)  # stopped
    assert new.state_dict().keys() == tiny_model.state_dict().keys()
    assert all(v.shape == tiny_model.state_dict()[k].shape for k, v in new.state_dict().items())


def test_shrink_trains_towards_the_neighbour_labels(tiny_model, synth, cr_splits):
    data = make_data(synth, cr_splits)
    method = build_method("boundary_shrink", lr=1e-3, bound=0.3, batch_size=32)
    new = method.unlearn(tiny_model, data)
    labels = method.neighbour_labels_
    assert bool((labels >= 0).all()) and method.attack_success_ > 0.9
    x = next(iter(data.loader(data.forget.inner, 1024, shuffle=False))).x
    with torch.no_grad():
        preds = new.eval()(x).argmax(1)
    moved = labels != 1
    assert float((preds[moved] == labels[moved]).float().mean()) > 0.9


def test_shrink_default_bound_is_too_small_for_the_tiny_model(tiny_model, synth, cr_splits):
    """The reference bound (0.1) finds no neighbour on this over-confident model: every label is
    the true one, and the step trains the forget images towards their own class."""
    method = build_method("boundary_shrink", epochs=1, batch_size=32)
    method.unlearn(tiny_model, make_data(synth, cr_splits))
    assert method.attack_success_ == 0.0
    assert all(r["attack_success"] == 0.0 for r in method.history_)


def test_expand_trains_the_shadow_and_returns_the_pruned_architecture(tiny_model, synth,
                                                                      cr_splits):
    data = make_data(synth, cr_splits)
    method = build_method("boundary_expand", lr=1e-3, batch_size=32)
    new = method.unlearn(tiny_model, data)
    w0, _ = shadow_neuron(32, 4, torch.Generator().manual_seed(0), torch.device("cpu"))
    w, b = method.shadow_
    assert not torch.allclose(w, w0) and float(b) != 0.0  # the shadow row was trained
    assert method.history_[-1]["in_shadow"] > 0.5
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        assert new.eval()(x).shape == (2, 4)


@pytest.mark.parametrize("name", ["boundary_shrink", "boundary_expand"])
def test_random_removal_runs(name, tiny_model, synth, hr_splits):
    method = build_method(name, lr=1e-3, epochs=1, batch_size=16)
    method.unlearn(tiny_model, make_data(synth, hr_splits, "HR"))
    assert method.history_ and method.access_.get("retain", 0) == 0


@pytest.mark.parametrize("bad", [{"bound": 0.0}, {"bound": 1.5}, {"lr": 0.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        build_method("boundary_shrink", **bad)
    if "lr" in bad:
        with pytest.raises(ConfigError, match="lr"):
            build_method("boundary_expand", **bad)
