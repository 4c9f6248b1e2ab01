"""Distance to the oracle (JS divergence), forget destination and relearn time: known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from scar.data.base import BatchLoader, InputSpec, TensorImages
from scar.errors import ConfigError
from scar.evaluation.metrics import (
    DEST_SHARES,
    DEST_TOP_CLASS,
    DEST_TOP_SHARE,
    destination_metrics,
    forget_destination,
    js_divergence,
    mean_js_divergence,
    oracle_distance,
)
from scar.evaluation.outputs import Outputs
from scar.evaluation.relearn import RelearnSettings, relearn_metrics, relearn_steps
from scar.methods.scar_method import js_divergence as scar_js_loss

LN2 = math.log(2)


# ---------------------------------------------------------------- JS divergence
def test_js_of_identical_logits_is_zero():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(js_divergence(logits, logits), torch.zeros(7), atol=1e-7)
    assert mean_js_divergence(logits, logits.clone()) == pytest.approx(0.0, abs=1e-12)


def test_js_of_disjoint_one_hot_distributions_is_ln2_in_nats():
    p = torch.tensor([[50.0, 0.0, 0.0], [0.0, 0.0, 50.0]])
    q = torch.tensor([[0.0, 50.0, 0.0], [50.0, 0.0, 0.0]])
    assert torch.allclose(js_divergence(p, q), torch.full((2,), LN2), atol=1e-6)
    assert mean_js_divergence(p, q) == pytest.approx(LN2, abs=1e-9)


def test_js_is_symmetric_bounded_and_per_example():
    g = torch.Generator().manual_seed(1)
    p, q = torch.randn(20, 4, generator=g) * 3, torch.randn(20, 4, generator=g) * 3
    a, b = js_divergence(p, q), js_divergence(q, p)
    assert a.shape == (20,)
    assert torch.allclose(a, b, atol=1e-7)
    assert bool(((a >= 0) & (a <= LN2 + 1e-6)).all())


def test_js_known_value_of_two_coins():
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); JS = 1/2 [ln(4/3)] + 1/2 [1/2 ln(2/3) + 1/2 ln 2]
    p = torch.tensor([[100.0, 0.0]])
    q = torch.tensor([[0.0, 0.0]])
    expected = 0.5 * math.log(4 / 3) + 0.25 * (math.log(2 / 3) + math.log(2))
    assert float(js_divergence(p, q)[0]) == pytest.approx(expected, abs=1e-6)


def test_js_needs_same_shapes_and_empty_mean_is_nan():
    with pytest.raises(ConfigError):
        js_divergence(torch.zeros(2, 3), torch.zeros(2, 4))
    assert math.isnan(mean_js_divergence(torch.zeros(0, 3), torch.zeros(0, 3)))


def test_scar_js_loss_is_the_batch_mean_of_the_evaluation_js():
    g = torch.Generator().manual_seed(2)
    t, s = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    assert torch.allclose(scar_js_loss(t, s, 2.0), js_divergence(t / 2.0, s).mean())


def test_oracle_distance_keys_skip_empty_splits_and_check_images():
    labels = torch.tensor([0, 1])
    mine = {"train_forget": Outputs(torch.tensor([[50.0, 0.0], [0.0, 50.0]]), labels),
            "test_forget": Outputs.empty(2),
            "test": Outputs(torch.zeros(2, 2), labels)}
    oracle = {"train_forget": Outputs(torch.tensor([[0.0, 50.0], [50.0, 0.0]]), labels),
              "test_forget": Outputs.empty(2),
              "test": Outputs(torch.zeros(2, 2), labels)}
    got = oracle_distance(mine, oracle)
    assert set(got) == {"js/train_forget", "js/test"}
    assert got["js/train_forget"] == pytest.approx(LN2, abs=1e-9)
    assert got["js/test"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="same images"):
        oracle_distance(mine, {"test": Outputs(torch.zeros(2, 2), torch.tensor([1, 1]))})


# ---------------------------------------------------------------- forget destination
def test_forget_destination_of_a_hand_made_prediction_vector():
    shares = forget_destination(torch.tensor([6, 6, 2, 6, 0, 2, 6, 6]), 10)
    expected = np.zeros(10)
    expected[[6, 2, 0]] = [5 / 8, 2 / 8, 1 / 8]
    np.testing.assert_allclose(shares, expected)
    assert shares.sum() == pytest.approx(1.0)


def test_forget_destination_edge_cases():
    assert np.isnan(forget_destination(torch.zeros(0, dtype=torch.long), 3)).all()
    with pytest.raises(ConfigError):
        forget_destination(torch.tensor([3]), 3)
    with pytest.raises(ConfigError):
        forget_destination(torch.tensor([0]), 0)


def test_destination_metrics_top_class_and_share():
    logits = torch.zeros(4, 3)
    logits[[0, 1, 2], 2] = 5.0  # three go to class 2, one (all-zero row) to class 0
    got = destination_metrics(Outputs(logits, torch.ones(4, dtype=torch.long)))
    assert got[DEST_TOP_CLASS] == 2
    assert got[DEST_TOP_SHARE] == pytest.approx(0.75)
    assert got[DEST_SHARES] == pytest.approx([0.25, 0.0, 0.75])
    assert destination_metrics(Outputs.empty(3)) == {}


# ---------------------------------------------------------------- relearn time
SPEC = InputSpec(channels=1, size=2, mean=(0.5,), std=(0.5,))


def two_class_images(n: int = 64) -> TensorImages:
    """Class 0: dark images, class 1: bright images (linearly separable)."""
    labels = torch.arange(n) % 2
    images = torch.where(labels[:, None, None, None] == 1, 230, 20).to(torch.uint8)
    return TensorImages(images.expand(n, 1, 2, 2).contiguous(), labels)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.fc(x.flatten(1)))


def loaders(data: TensorImages):
    return (BatchLoader(data, SPEC, batch_size=16, shuffle=True, seed=0),
            BatchLoader(data, SPEC, batch_size=64))


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def wrong_model() -> Tiny:
    """Predicts class 0 for bright and class 1 for dark images: forget accuracy 0."""
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.fc.weight.copy_(torch.tensor([[1.0] * 4, [-1.0] * 4]))
        model.fc.bias.zero_()
    return model


def test_a_model_at_the_target_takes_zero_steps_and_is_untouched():
    model = wrong_model()
    model.eval()
    model.bn.train()  # a mixed mode must come back as it was
    before, modes = snapshot(model), [m.training for m in model.modules()]
    result = relearn_steps(model, *loaders(two_class_images()), target=0.0, max_steps=5)
    assert (result.steps, result.censored) == (0, False)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_fine_tuning_relearns_and_leaves_the_caller_model_unchanged():
    model = wrong_model()
    model.eval()
    before = snapshot(model)
    result = relearn_steps(model, *loaders(two_class_images()), target=0.9, lr=0.5,
                           max_steps=200)
    assert not result.censored
    assert 1 <= result.steps < 200
    assert result.accuracy >= 0.9
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not model.training and not model.bn.training


def test_relearn_is_censored_at_max_steps():
    model = wrong_model()
    result = relearn_steps(model, *loaders(two_class_images()), target=1.0, lr=1e-9,
                           max_steps=3)
    assert (result.steps, result.censored) == (3, True)
    m = result.to_metrics()
    assert m["relearn/steps"] == 3 and m["relearn/censored"] == 1


def test_relearn_metrics_target_from_the_original_and_settings():
    data = two_class_images(32)
    m = relearn_metrics(wrong_model(), data, SPEC, RelearnSettings(max_steps=2, eval_images=8),
                        original_forget_acc=0.0)
    assert m["relearn/steps"] == 0 and m["relearn/target"] == 0.0
    assert relearn_metrics(wrong_model(), data.subset(torch.arange(0)), SPEC,
                           RelearnSettings(), 1.0) == {}
    with pytest.raises(ConfigError):
        RelearnSettings().target_for(None)
    assert RelearnSettings(target=0.3).target_for(None) == 0.3


def test_relearn_settings_parse():
    assert RelearnSettings.parse(None) is None and RelearnSettings.parse(False) is None
    assert RelearnSettings.parse(True) == RelearnSettings()
    got = RelearnSettings.parse({"max_steps": "50", "optimizer": "adam", "fraction": "0.8"})
    assert (got.max_steps, got.optimizer, got.fraction) == (50, "adam", 0.8)
    for bad in ({"max_step": 5}, {"optimizer": "lbfgs"}, {"max_steps": 0}, "yes",
                {"lr": "fast"}):
        with pytest.raises(ConfigError):
            RelearnSettings.parse(bad)
