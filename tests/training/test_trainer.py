import pytest
import torch

from scar.errors import ConfigError
from scar.models.base import ModelSpec, build_model
from scar.training.recipes import RECIPES, Recipe
from scar.training.trainer import evaluate_accuracy, train_model


def _train(synth, tiny_spec, seed):
    torch.manual_seed(123)  # the model init is seeded by the caller, not train_model
    model = build_model(tiny_spec)
    recipe = Recipe(epochs=1, batch_size=64, lr=0.05, schedule="cosine", crop_padding=2,
                    hflip=True, model="fastcnn")
    return train_model(model, synth.train, synth.info.input_spec, recipe, seed=seed,
                       progress=False)


def test_training_is_deterministic_on_cpu(synth, tiny_spec):
    a = _train(synth, tiny_spec, seed=3).model.state_dict()
    b = _train(synth, tiny_spec, seed=3).model.state_dict()
    c = _train(synth, tiny_spec, seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_trained_model_beats_chance(tiny_model, synth):
    acc = evaluate_accuracy(tiny_model, synth.test, synth.info.input_spec, torch.device("cpu"))
    assert acc > 0.8


def test_recipe_overrides_are_typed_and_validated():
    r = RECIPES.get("fashion-mnist").with_overrides({"epochs": "3", "lr": "0.01",
                                                      "hflip": "false"})
    assert (r.epochs, r.lr, r.hflip) == (3, 0.01, False)
    with pytest.raises(ConfigError, match="Unknown training option 'epoch'"):
        r.with_overrides({"epoch": 3})
    with pytest.raises(ConfigError, match="lr"):
        r.with_overrides({"lr": "-1"})
    with pytest.raises(ConfigError, match="optimizer must be one of"):
        r.with_overrides({"optimizer": "lbfgs"})


def test_resnet18_training_step_on_cifar_shaped_data():
    spec = ModelSpec("resnet18", 10, 3, 32)
    model = build_model(spec)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    before = model.fc.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, model.fc.weight)


@pytest.mark.parametrize("field", ["lr", "momentum", "weight_decay", "label_smoothing"])
@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_recipe_refuses_non_finite_numbers(field, bad):
    """`scar train --set lr=nan` once trained and saved NaN weights."""
    with pytest.raises(ConfigError, match=field):
        Recipe().with_overrides({field: bad})


def test_diverged_training_is_an_error(synth, tiny_spec):
    from scar.errors import DivergedError

    torch.manual_seed(0)
    model = build_model(tiny_spec)
    recipe = Recipe(epochs=1, batch_size=64, lr=1e30, momentum=0.0, schedule="constant")
    with pytest.raises(DivergedError, match="training.*diverged after 1 epochs"):
        train_model(model, synth.train, synth.info.input_spec, recipe, device="cpu",
                    progress=False)
