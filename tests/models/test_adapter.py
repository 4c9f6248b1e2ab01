"""The head finder and the feature hook, on small hand-made models."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from scar.errors import ConfigError, HeadNotFoundError
from scar.models import FeatureModel, features_and_logits, find_head

X = torch.randn(3, 8)


class Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 6), nn.ReLU())
        self.norm = nn.BatchNorm1d(6)


class Averaged(Backbone):
    """Two parallel heads whose outputs are averaged: no single Linear produces the output."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.h1 = nn.Linear(6, 4)
        self.h2 = nn.Linear(6, 4)
        if tied:  # identical heads: both produce exactly the output -> genuinely ambiguous
            self.h2.load_state_dict(self.h1.state_dict())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.norm(self.body(x))
        return torch.stack([self.h1(f), self.h2(f)]).mean(0)


class HeadFirst(Backbone):
    """The head is registered before an auxiliary Linear that does not feed the output."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(6, 4)
        self.aux = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.norm(self.body(x))
        self.aux(f)
        return self.head(f)


class TimmLike(HeadFirst):
    def get_classifier(self) -> nn.Module:
        return self.head


class TokenHead(nn.Module):
    """A Linear applied to tokens [B, T, d], then averaged: its input is not a feature matrix."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.view(x.shape[0], 2, 4).repeat(1, 1, 2)).mean(1)


class DictOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict:
        return {"logits": self.fc(x)}


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def test_sequential_picks_last_linear_with_and_without_example() -> None:
    assert find_head(mlp()) == "2"
    assert find_head(mlp(), example=X) == "2"


def test_probe_restores_train_mode_and_batchnorm_statistics() -> None:
    model = HeadFirst().train()
    before = model.norm.running_mean.clone()
    assert find_head(model, example=X) == "head"
    assert model.training and model.norm.training
    torch.testing.assert_close(model.norm.running_mean, before)


def test_output_identity_beats_registration_order() -> None:
    # Without an example only the registration order is known (the aux Linear comes last).
    assert find_head(HeadFirst()) == "aux"
    assert find_head(HeadFirst(), example=X) == "head"


def test_get_classifier_is_used() -> None:
    assert find_head(TimmLike()) == "head"


def test_averaged_heads_are_rejected_with_candidates() -> None:
    with pytest.raises(HeadNotFoundError) as info:
        find_head(Averaged(), example=X)
    msg = str(info.value)
    assert "None of the nn.Linear modules of Averaged produces the model output" in msg
    assert "'h1' (in 6, out 4)" in msg and "'h2' (in 6, out 4)" in msg and "head=" in msg


def test_identical_heads_are_ambiguous() -> None:
    with pytest.raises(HeadNotFoundError) as info:
        find_head(Averaged(tied=True), example=X)
    msg = str(info.value)
    assert "ambiguous" in msg and "'h1'" in msg and "'h2'" in msg and "--head" in msg
    assert "'body.0'" not in msg


def test_explicit_head_resolves_ambiguity() -> None:
    fm = FeatureModel(Averaged(tied=True), head="h1", example=X)
    features, logits = fm(X)
    assert fm.head_name == "h1" and features.shape == (3, 6)
    torch.testing.assert_close(fm.head(features), logits)
    torch.testing.assert_close(fm.logits(X), logits)


def test_explicit_head_that_does_not_produce_the_output_fails_verification() -> None:
    with pytest.raises(HeadNotFoundError, match="is not 'h1'\\(features\\)"):
        FeatureModel(Averaged(), head="h1", example=X)


def test_explicit_head_must_exist_and_be_linear() -> None:
    with pytest.raises(HeadNotFoundError, match=r"head='fc' is not a module.*'head' \(in 6"):
        find_head(HeadFirst(), head="fc")
    with pytest.raises(HeadNotFoundError, match="head='norm' is a BatchNorm1d.*nn.Linear"):
        find_head(HeadFirst(), head="norm")


def test_headless_model_is_explained() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with pytest.raises(HeadNotFoundError, match="has no nn.Linear module"):
        find_head(conv, example=torch.randn(2, 3, 4, 4))


def test_non_tensor_output_is_explained() -> None:
    with pytest.raises(ConfigError, match="must return a logits tensor.*returned dict"):
        find_head(DictOutput(), example=X)
    fm = FeatureModel(DictOutput())  # no example: found by registration, fails on use
    with pytest.raises(ConfigError, match="returned dict"):
        fm(X)


def test_head_on_tokens_is_rejected() -> None:
    with pytest.raises(HeadNotFoundError, match=r"shape \(3, 2, 8\).*\[batch, d\]"):
        FeatureModel(TokenHead(), head="proj", example=X)


def test_hooks_do_not_leak() -> None:
    model = mlp()
    fm = FeatureModel(model, example=X)
    fm(X)
    assert not model[2]._forward_hooks
    with pytest.raises(RuntimeError):
        fm(torch.randn(3, 5))  # wrong input width fails inside the forward pass
    assert not model[2]._forward_hooks
    clone = copy.deepcopy(fm)  # deep copies work (no hook or lock is attached to the model)
    torch.testing.assert_close(clone(X)[1], fm(X)[1])


def test_no_grad_and_grad() -> None:
    fm = FeatureModel(mlp())
    with torch.no_grad():
        features, _ = fm(X)
    assert not features.requires_grad
    features, _ = fm(X)
    assert features.grad_fn is not None
    features.sum().backward()
    assert fm.model[0].weight.grad is not None


def test_state_dict_of_wrapped_model_is_plain() -> None:
    model = mlp()
    fm = FeatureModel(model)
    assert fm.model.state_dict().keys() == model.state_dict().keys()
    assert set(fm.state_dict()) == {f"model.{k}" for k in model.state_dict()}


def test_threads_capture_their_own_features() -> None:
    model = mlp()
    inputs = [torch.randn(2 + i, 8) for i in range(4)]
    results: dict[int, torch.Tensor] = {}

    def work(i: int) -> None:
        for _ in range(20):
            features, _ = features_and_logits(model, inputs[i], "2")
            results[i] = features

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, x in enumerate(inputs):
        torch.testing.assert_close(results[i], model[1](model[0](x)))


def test_head_called_twice_is_rejected() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    with pytest.raises(HeadNotFoundError, match="'fc' was called 2 times"):
        FeatureModel(Twice())(X)
