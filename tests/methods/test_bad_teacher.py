"""Bad Teacher (Chundawat et al., AAAI 2023): the two-teacher KL, the incompetent teacher, the
retain subset it reads, and forgetting on the tiny synthetic fixtures."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scar.errors import ConfigError
from scar.methods import UnlearnData, access_profile, build_method
from scar.methods.bad_teacher import bad_teacher_loss, random_teacher
from scar.methods.base import accuracy_on


def test_each_row_is_distilled_from_its_own_teacher():
    good = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    bad = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    is_forget = torch.tensor([False, True])
    # The student copies the competent teacher on the retain row and the incompetent one on the
    # forget row: zero loss.
    student = torch.tensor([[3.0, 0.0], [1.0, 1.0]])
    assert float(bad_teacher_loss(student, good, bad, is_forget, 1.0)) == pytest.approx(0, abs=1e-6)
    # The original's confident forget row pays KL(uniform ‖ p_student) / batch.
    student = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
    p = F.softmax(student[1], 0)
    want = float((0.5 * (math.log(0.5) - p.log())).sum()) / 2
    assert float(bad_teacher_loss(student, good, bad, is_forget, 1.0)) == pytest.approx(want)


def test_the_incompetent_teacher_is_a_fresh_frozen_copy(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    torch.manual_seed(0)
    bad, kept = random_teacher(tiny_model)
    torch.manual_seed(0)
    again, _ = random_teacher(tiny_model)
    assert kept == 0.0 and not bad.training
    assert all(not p.requires_grad for p in bad.parameters())
    new, old = dict(bad.named_parameters()), dict(tiny_model.named_parameters())
    assert all(not torch.equal(new[k], old[k]) for k in new if new[k].numel() > 1
               and "bn" not in k and old[k].std() > 0)
    assert all(torch.equal(a, b) for a, b in zip(bad.state_dict().values(),
                                                 again.state_dict().values()))
    assert all(torch.equal(v, before[k]) for k, v in tiny_model.state_dict().items())


def make_data(synth, splits, scenario="CR") -> UnlearnData:
    return UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                       scenario=scenario, removed_classes=splits.removed_classes,
                       forget=splits.train_forget, retain=splits.train_retain,
                       original_test_acc=0.95, seed=0)


def acc(model, data, images) -> float:
    return accuracy_on(model, data.loader(images, 256, shuffle=False))


def test_forgets_the_class_and_reads_a_retain_subset(tiny_model, synth, cr_splits):
    """One epoch, with a 10× rate and batches of 32 (the tiny sets make one batch of 256)."""
    data = make_data(synth, cr_splits)
    assert acc(tiny_model, data, cr_splits.train_forget) > 0.9
    method = build_method("bad_teacher", lr=1e-3, batch_size=32)
    new = method.unlearn(tiny_model, data)
    assert acc(new, data, cr_splits.train_forget) < 0.05
    assert acc(new, data, cr_splits.train_retain) > 0.9
    k = math.floor(0.3 * len(cr_splits.train_retain))
    assert method.retain_used_ == k
    assert method.access_["retain"] == k  # one epoch: each picked retain image once
    assert method.access_["forget"] == len(cr_splits.train_forget)
    assert sum(r["forget_in_batch"] for r in method.history_) == len(cr_splits.train_forget)
    assert "30% of the retain set" in access_profile(method)


def test_random_removal_runs(tiny_model, synth, hr_splits):
    method = build_method("bad_teacher", batch_size=32)
    method.unlearn(tiny_model, make_data(synth, hr_splits, "HR"))
    assert method.history_


@pytest.mark.parametrize("bad", [{"retain_fraction": 1.5}, {"kd_t": 0.0}, {"epochs": 0}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        build_method("bad_teacher", **bad)
