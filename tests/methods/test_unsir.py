"""UNSIR (Tarun et al., TNNLS 2023): the learnt noise raises the removed class's loss, the retain
subset, and impair-repair forgetting on the tiny synthetic fixtures without a forget image."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scar.errors import ConfigError
from scar.methods import UnlearnData, access_profile, build_method
from scar.methods.base import accuracy_on
from scar.methods.unsir import error_maximizing_noise, first_per_class, noise_objective


def test_objective_is_minus_ce_plus_the_l2_leash():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.zero_()  # uniform outputs: CE = log 2
    noise = torch.ones(3, 1, 2, 2)
    obj, ce = noise_objective(model, noise, 1, l2=0.1)
    assert float(ce.detach()) == pytest.approx(torch.log(torch.tensor(2.0)).item())
    assert float(obj.detach()) == pytest.approx(-float(ce.detach()) + 0.1 * 4)


def test_noise_raises_the_loss_of_the_removed_class(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    grads = [None if p.grad is None else p.grad.clone() for p in tiny_model.parameters()]
    noise, trace = error_maximizing_noise(
        tiny_model, 1, (32, 1, 16, 16), steps=40, lr=0.1, l2=0.1,
        generator=torch.Generator().manual_seed(0), device=torch.device("cpu"))
    assert trace[-1] > trace[0] + 1.0 and len(trace) == 41
    with torch.no_grad():
        assert float((tiny_model.eval()(noise).argmax(1) == 1).float().mean()) < 0.05
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())
    # autograd.grad on the noise only: the model's .grad fields are left as they were.
    assert all((g is None and p.grad is None) or torch.equal(g, p.grad)
               for g, p in zip(grads, tiny_model.parameters()))


def test_first_per_class_keeps_dataset_order():
    labels = torch.tensor([2, 0, 2, 3, 0, 2, 3])
    assert first_per_class(labels, [0, 2], 2).tolist() == [0, 1, 2, 4]
    assert first_per_class(labels, [3], 5).tolist() == [3, 6]


def make_data(synth, splits, scenario="CR") -> UnlearnData:
    return UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                       scenario=scenario, removed_classes=splits.removed_classes,
                       forget=splits.train_forget, retain=splits.train_retain,
                       original_test_acc=0.95, seed=0)


def acc(model, data, images) -> float:
    return accuracy_on(model, data.loader(images, 256, shuffle=False))


SMALL = {"noise_batch": 32, "noise_copies": 4, "batch_size": 32}


def test_impair_repair_forgets_the_class_without_reading_it(tiny_model, synth, cr_splits):
    """Noise and retain scaled to the tiny sets (official: 20 × 256 noise images per class
    against 1000 retain images per kept class; here 4 × 32 against 96)."""
    data = make_data(synth, cr_splits)
    assert acc(tiny_model, data, cr_splits.train_forget) > 0.9
    method = build_method("unsir", **SMALL)
    new = method.unlearn(tiny_model, data)
    assert acc(new, data, cr_splits.train_forget) < 0.05
    assert acc(new, data, cr_splits.train_retain) > 0.9
    assert method.access_.get("forget", 0) == 0
    assert method.access_["retain"] == 2 * method.retain_used_ == 2 * len(cr_splits.train_retain)
    assert sum(r["noise_in_batch"] for r in method.history_) == 4 * 32
    assert method.noise_ce_[1][-1] > method.noise_ce_[1][0]
    assert "first 1000 retain images" in access_profile(method)


def test_the_retain_subset_is_bounded(tiny_model, synth, cr_splits):
    method = build_method("unsir", samples_per_class=10, **SMALL)
    method.unlearn(tiny_model, make_data(synth, cr_splits))
    assert method.retain_used_ == 30  # 3 kept classes
    assert method.access_["retain"] == 60  # impair + repair


def test_random_removal_is_refused(tiny_model, synth, hr_splits):
    with pytest.raises(ConfigError, match="scenarios"):
        build_method("unsir").unlearn(tiny_model, make_data(synth, hr_splits, "HR"))


@pytest.mark.parametrize("bad", [{"noise_lr": 0.0}, {"noise_l2": -1.0}, {"noise_copies": 0},
                                 {"repair_epochs": -1}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        build_method("unsir", **bad)
