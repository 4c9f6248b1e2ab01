"""ℓ1-sparse unlearning (Jia et al., NeurIPS 2023): the linearly decaying ℓ1 schedule, the norm,
and the penalty's effect on the tiny synthetic fixtures (plain fine-tuning does not forget)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scar.errors import ConfigError
from scar.methods import UnlearnData, access_profile, build_method
from scar.methods.base import accuracy_on
from scar.methods.l1_sparse import l1_norm, l1_weight


def test_schedule_decays_linearly_per_epoch():
    assert [l1_weight(e, 5, 1.0) for e in range(5)] == pytest.approx([1, 0.8, 0.6, 0.4, 0.2])
    # The last no_l1_epochs run without the penalty; the decay spans the others.
    assert [l1_weight(e, 5, 1.0, 2) for e in range(5)] == pytest.approx([1, 2 / 3, 1 / 3, 0, 0])
    assert l1_weight(0, 1, 5e-4) == 5e-4


def test_l1_norm_sums_every_parameter():
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -2.0]]))
        lin.bias.fill_(-0.5)
    assert float(l1_norm(lin).detach()) == pytest.approx(3.5)


def make_data(synth, splits, scenario="CR") -> UnlearnData:
    return UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                       scenario=scenario, removed_classes=splits.removed_classes,
                       forget=splits.train_forget, retain=splits.train_retain,
                       original_test_acc=0.95, seed=0)


def acc(model, data, images) -> float:
    return accuracy_on(model, data.loader(images, 256, shuffle=False))


def test_the_penalty_makes_retain_fine_tuning_forget(tiny_model, synth, cr_splits):
    """Same loop, same seed: without the penalty the well-separated tiny model keeps the removed
    class; with α = 3e-3 (lr 0.05, 10 epochs) it forgets it and keeps the others."""
    data = make_data(synth, cr_splits)
    hp = {"lr": 0.05, "epochs": 10, "batch_size": 32}
    plain = build_method("l1_sparse", alpha=0.0, **hp).unlearn(tiny_model, data)
    assert acc(plain, data, cr_splits.train_forget) > 0.9
    method = build_method("l1_sparse", alpha=3e-3, **hp)
    new = method.unlearn(tiny_model, make_data(synth, cr_splits))
    assert acc(new, data, cr_splits.train_forget) < 0.05
    assert acc(new, data, cr_splits.train_retain) > 0.9
    assert l1_norm(new) < l1_norm(tiny_model)
    alphas = {int(r["epoch"]): r["alpha"] for r in method.history_}
    assert [alphas[e] for e in range(1, 11)] == pytest.approx([3e-3 * (1 - k / 10)
                                                               for k in range(10)])
    assert method.access_.get("forget", 0) == 0 and method.access_["retain"] > 0
    assert "retain-free: no" in access_profile(method)


def test_random_removal_runs(tiny_model, synth, hr_splits):
    method = build_method("l1_sparse", epochs=1, batch_size=64)
    method.unlearn(tiny_model, make_data(synth, hr_splits, "HR"))
    assert method.history_


@pytest.mark.parametrize("bad", [{"alpha": -1.0}, {"no_l1_epochs": 5}, {"no_l1_epochs": -1},
                                 {"lr": 0.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        build_method("l1_sparse", **bad)
