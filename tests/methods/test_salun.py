"""SalUn (Fan et al., ICLR 2024): the saliency mask keeps exactly the top fraction, only salient
weights move, and forgetting on the tiny synthetic fixtures."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scar.data.base import Batch
from scar.errors import ConfigError
from scar.methods import UnlearnData, access_profile, build_method
from scar.methods.base import accuracy_on
from scar.methods.salun import forget_gradients, saliency_mask


def test_mask_keeps_exactly_the_largest_magnitudes_over_all_tensors():
    grads = {"a": torch.tensor([0.1, -5.0, 2.0]), "b": torch.tensor([[3.0, -0.2]])}
    m = saliency_mask(grads, 0.4)  # ⌊0.4 · 5⌋ = 2 entries: |−5| and |3|
    assert m["a"].tolist() == [False, True, False] and m["b"].tolist() == [[True, False]]
    m = saliency_mask(grads, 0.6)  # 3 entries: + |2|
    assert m["a"].tolist() == [False, True, True] and m["b"].tolist() == [[True, False]]
    assert sum(int(v.sum()) for v in saliency_mask(grads, 0.1).values()) == 0  # ⌊0.5⌋
    assert sum(int(v.sum()) for v in saliency_mask(grads, 1.0).values()) == 5
    torch.manual_seed(0)
    big = {"w": torch.randn(1000), "v": torch.randn(10, 30)}
    m = saliency_mask(big, 0.5)
    kept = torch.cat([big[k].abs().flatten()[m[k].flatten()] for k in big])
    dropped = torch.cat([big[k].abs().flatten()[~m[k].flatten()] for k in big])
    assert len(kept) == 650 and float(kept.min()) >= float(dropped.max())


def test_forget_gradients_sum_the_batch_mean_gradients():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    xs = [torch.randn(4, 3), torch.randn(2, 3)]
    ys = [torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1])]
    got = forget_gradients(model, [Batch(x, y, torch.arange(len(y))) for x, y in zip(xs, ys)])
    want = sum(torch.autograd.grad(F.cross_entropy(model(x), y), model.weight)[0]
               for x, y in zip(xs, ys))
    assert torch.allclose(got["weight"], want) and model.weight.grad is None


def make_data(synth, splits, scenario="CR") -> UnlearnData:
    return UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                       scenario=scenario, removed_classes=splits.removed_classes,
                       forget=splits.train_forget, retain=splits.train_retain,
                       original_test_acc=0.95, seed=0)


def acc(model, data, images) -> float:
    return accuracy_on(model, data.loader(images, 256, shuffle=False))


def test_defaults_forget_the_class_moving_only_salient_weights(tiny_model, synth, cr_splits):
    data = make_data(synth, cr_splits)
    assert acc(tiny_model, data, cr_splits.train_forget) > 0.9
    method = build_method("salun")
    new = method.unlearn(tiny_model, data)
    assert acc(new, data, cr_splits.train_forget) < 0.01
    assert acc(new, data, cr_splits.train_retain) > 0.9
    # The same mask, recomputed from the original: every other entry is exactly unchanged.
    grads = forget_gradients(copy.deepcopy(tiny_model),
                             data.loader(cr_splits.train_forget, 256, shuffle=False))
    mask = saliency_mask(grads, 0.5)
    n = sum(p.numel() for p in tiny_model.parameters())
    assert method.salient_ == n // 2
    old, moved = dict(tiny_model.named_parameters()), 0
    for k, p in new.named_parameters():
        assert torch.equal(p.detach()[~mask[k]], old[k].detach()[~mask[k]]), k
        moved += int((p.detach() != old[k].detach()).sum())
    assert 0 < moved <= n // 2
    assert method.access_["retain"] > 0 and "retain-free: no" in access_profile(method)
    assert sum(r["forget_step"] for r in method.history_) == 10  # 1 forget batch × 10 epochs


def test_stop_at_target_ends_after_the_first_epoch_that_reaches_it(tiny_model, synth,
                                                                   cr_splits):
    method = build_method("salun", stop_at_target=True)
    method.unlearn(tiny_model, make_data(synth, cr_splits))
    assert method.reached_ and method.history_[-1]["epoch"] < 10
    assert method.history_[-1]["forget_acc"] < 0.01


def test_random_removal_runs(tiny_model, synth, hr_splits):
    method = build_method("salun", epochs=1, batch_size=64)
    method.unlearn(tiny_model, make_data(synth, hr_splits, "HR"))
    assert method.history_


@pytest.mark.parametrize("bad", [{"mask_ratio": 0.0}, {"mask_ratio": 1.5}, {"lr": 0.0},
                                 {"momentum": 1.0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        build_method("salun", **bad)
