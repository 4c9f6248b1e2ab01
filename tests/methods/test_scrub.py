"""SCRUB (Kurmanji et al., NeurIPS 2023): the distillation loss, the sign of its max- and
min-steps, the learning-rate schedule, and forgetting on the tiny synthetic fixtures."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from scar.errors import ConfigError
from scar.methods import UnlearnData, access_profile, build_method
from scar.methods.base import accuracy_on
from scar.methods.scrub import distill_kl, scrub_loss


def test_distill_kl_is_the_official_temperature_scaled_kl():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    temp = 4.0
    p_t = torch.softmax(t / temp, 1)
    want = (p_t * (p_t.log() - torch.log_softmax(s / temp, 1))).sum() / 2 * temp ** 2
    assert float(distill_kl(s, t, temp)) == pytest.approx(float(want), rel=1e-5)
    assert float(distill_kl(t, t, temp)) == pytest.approx(0.0, abs=1e-5)


def test_min_loss_weights_cross_entropy_and_kl():
    s = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([0, 1])
    loss, terms = scrub_loss("min", s, t, y, gamma=0.99, alpha=0.001, temperature=4.0)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert float(loss) == pytest.approx(0.99 * float(ce) + 0.001 * float(distill_kl(s, t, 4.0)))
    assert terms["ce_retain"] == pytest.approx(float(ce))
    loss, terms = scrub_loss("max", s, t, y, gamma=0.99, alpha=0.001, temperature=4.0)
    assert float(loss) == pytest.approx(-terms["kl_forget"]) and terms["kl_forget"] > 0


def test_a_max_step_moves_the_student_away_from_the_teacher_and_a_min_step_back():
    torch.manual_seed(0)
    teacher = nn.Linear(4, 3).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student.weight.add_(0.1 * torch.randn_like(student.weight))  # KL > 0: a gradient
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    with torch.no_grad():
        t = teacher(x)

    def kl() -> float:
        with torch.no_grad():
            return float(distill_kl(student(x), t, 4.0))

    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    for phase, moves in (("max", 1), ("min", -1)):
        before = kl()
        loss, _ = scrub_loss(phase, student(x), t, y, gamma=0.0, alpha=1.0, temperature=4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert (kl() - before) * moves > 0, phase


def test_learning_rate_decays_after_the_official_epochs():
    m = build_method("scrub", lr=1.0, lr_decay_epochs=(3, 5), lr_decay_rate=0.1)
    assert [m.lr_at(e) for e in (1, 3, 4, 5, 6)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])


def make_data(synth, splits, scenario="CR") -> UnlearnData:
    return UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                       scenario=scenario, removed_classes=splits.removed_classes,
                       forget=splits.train_forget, retain=splits.train_retain,
                       original_test_acc=0.95, seed=0)


def acc(model, data, images) -> float:
    return accuracy_on(model, data.loader(images, 256, shuffle=False))


def test_one_epoch_forgets_the_class_and_keeps_the_rest(tiny_model, synth, cr_splits):
    """One max-pass and one min-pass with the official rates: forget 0 %, retain kept. (More
    max-passes keep growing the forget KL; on this tiny model two of them collapse the retain
    accuracy too — the paper tunes msteps per setting.)"""
    data = make_data(synth, cr_splits)
    assert acc(tiny_model, data, cr_splits.train_forget) > 0.9
    method = build_method("scrub", epochs=1, msteps=1)
    new = method.unlearn(tiny_model, data)
    assert acc(new, data, cr_splits.train_forget) < 0.05
    assert acc(new, data, cr_splits.train_retain) > 0.9
    kl = [r["kl_forget"] for r in method.history_ if r["max_step"]]
    assert kl and kl[-1] > kl[0]  # the max-steps push the divergence up
    assert method.access_["retain"] > 0 and "retain-free: no" in access_profile(method)


def test_the_fixed_budget_and_the_optional_stop(tiny_model, synth, cr_splits):
    data = make_data(synth, cr_splits)
    full = build_method("scrub", epochs=2, msteps=1)
    full.unlearn(tiny_model, data)
    assert {r["epoch"] for r in full.history_} == {1.0, 2.0}
    assert sum(r["max_step"] for r in full.history_) == 3  # 3 forget batches of 32, epoch 1 only
    early = build_method("scrub", epochs=2, msteps=1, stop_at_target=True)
    early.unlearn(tiny_model, data)
    assert early.reached_ and {r["epoch"] for r in early.history_} == {1.0}


def test_random_removal_runs(tiny_model, synth, hr_splits):
    method = build_method("scrub", epochs=1, msteps=1)
    method.unlearn(tiny_model, make_data(synth, hr_splits, "HR"))
    assert method.history_


@pytest.mark.parametrize("bad", [{"msteps": -1}, {"kd_t": 0.0}, {"alpha": -1.0},
                                 {"lr_decay_rate": 0.0}, {"optimizer": "rmsprop"}])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ConfigError, match=next(iter(bad))):
        build_method("scrub", **bad)
