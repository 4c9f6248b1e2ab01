"""Presets: every value names a hyperparameter of its method and builds; the reference preset pins
the settings of spec scar-method.md §7-§10; explicit values win; unknown names are clear errors."""

from __future__ import annotations

from dataclasses import fields

import pytest

from scar.errors import ConfigError, UnknownComponentError
from scar.methods import METHODS, build_method
from scar.methods.presets import PRESETS, Preset, describe, presets_of, with_preset

#: SCAR knobs the reference preset leaves at their defaults, and why (test below).
SCAR_INERT = {
    "step_kl": "only used when lr is None; the preset gives lr",
    "stop_slack": "only used by stop_check 'auto'",
    "stop_window": "only used by stop_check 'auto'",
    "cover_steps": "cover_per_class is 0",
    "cover_lr": "cover_per_class is 0",
    "forget_distill_on": "forget_distill is 0",
    "tukey_mode": "equal on the non-negative features of a ReLU net; no reference rule otherwise",
}
SELF_FORGET_INERT = {
    **SCAR_INERT,
    "hr_gate": "class removal only",
    "hr_margin": "class removal only",
    "hr_gate_from": "class removal only",
    "targets_from": "the fixed-proxy loop only; proxies='per_batch' recomputes them every step",
    "min_forget_images": "a guard against too few proxies; no reference counterpart",
    "synth_lr": "synth_steps is 0",
    "synth_beta": "synth_steps is 0",
    "synth_target": "synth_steps is 0",
    "replay_per_class": "replay_steps is 0",
    "replay_lr": "replay_steps is 0",
}


def hyperparameters(method: str) -> set[str]:
    return {f.name for f in fields(METHODS.get(method)) if f.init}


def preset_cases():
    for name in PRESETS.names():
        preset = PRESETS.get(name)
        for method in preset.methods:
            yield name, method, None
            for dataset, methods in preset.by_dataset.items():
                if method in methods:
                    yield name, method, dataset


@pytest.mark.parametrize(("preset", "method", "dataset"), list(preset_cases()))
def test_every_preset_value_names_a_hyperparameter_and_builds(preset, method, dataset):
    values = PRESETS.get(preset).values(method, dataset)
    assert set(values) <= hyperparameters(method), set(values) - hyperparameters(method)
    built = build_method(method, **values).hparams()
    assert {k: built[k] for k in values} == values


def test_every_preset_covers_registered_methods_only():
    for name in PRESETS.names():
        preset = PRESETS.get(name)
        covered = set(preset.methods).union(*preset.by_dataset.values())
        assert covered <= set(METHODS.names())


@pytest.mark.parametrize(("method", "inert"), [("scar", SCAR_INERT),
                                               ("scar_self_forget", SELF_FORGET_INERT)])
def test_reference_sets_every_scar_hyperparameter_that_the_reference_has(method, inert):
    """A new SCAR hyperparameter must get a reference value here, or a reason to be inert."""
    values = PRESETS.get("reference").values(method)
    assert not set(values) & set(inert)
    missing = hyperparameters(method) - set(values) - set(inert)
    assert not missing, f"reference preset of {method}: no value for {sorted(missing)}"


def test_reference_values_of_spec_section_10():
    ref = PRESETS.get("reference")
    scar = ref.values("scar")
    assert scar["surrogate_steps"] == 6  # `n_batch_ret > 5` lets 6 surrogate steps through
    assert (scar["stop_check"], scar["stop_from_epoch"]) == ("step", 2)
    assert (scar["hr_margin"], scar["hr_gate"], scar["stats"]) == (0.015, 0.8, "retain")
    assert (scar["lr"], scar["beta2"], scar["batch_size"], scar["lambda_2"]) == \
        (5e-4, 0.999, 1024, 5.0)
    assert scar["bn_train"] and scar["surrogate_batch_size"] is None and scar["shrink_times"] == 2
    assert scar["augment"] and (scar["targets_from"], scar["hr_gate_from"]) == \
        ("current", "full")
    self_forget = ref.values("scar_self_forget")
    assert self_forget["shrink_times"] == 1  # the reference shrinks once in self-forget
    assert self_forget["replay_steps"] == self_forget["synth_steps"] == 0
    for name in ("negative_gradient", "random_labels"):
        values = ref.values(name)
        assert (values["optimizer"], values["lr"], values["batch_size"], values["stop_check"]) \
            == ("sgd", 5e-4, 1024, "epoch")
    assert ref.values("random_labels")["allow_true_label"]
    assert ref.values("finetune")["epochs"] == 30 and ref.values("finetune")["weight_decay"] == 0
    duck = ref.values("duck")
    assert (duck["lr"], duck["lambda_2"], duck["temperature"], duck["batch_size"]) == \
        (5e-4, 5.0, 1.0, 1024)
    assert not duck["shuffle_forget"] and duck["label_smoothing"] == 0.0


def test_reference_values_depend_on_the_dataset():
    ref = PRESETS.get("reference")
    assert ref.values("scar", "tinyimagenet")["surrogate_steps"] == 91
    assert ref.values("scar", "tinyimagenet")["hr_gate"] == 0.4
    assert ref.values("scar_self_forget", "tinyimagenet")["surrogate_steps"] == 91
    assert ref.values("duck", "tinyimagenet")["label_smoothing"] == 0.2
    assert ref.values("scar", "cifar10") == ref.values("scar")


def test_explicit_values_override_the_preset():
    values = with_preset("scar", {"lr": "1e-3", "epochs": 2}, "reference")
    assert values["lr"] == "1e-3" and values["epochs"] == 2 and values["batch_size"] == 1024
    method = build_method("scar", **values)
    assert (method.lr, method.epochs, method.surrogate_steps) == (1e-3, 2, 6)
    assert with_preset("scar", {"lr": 1.0}, None) == {"lr": 1.0}


def test_unknown_preset_and_uncovered_method_are_clear_errors():
    with pytest.raises(UnknownComponentError, match="refrence.*Did you mean 'reference'"):
        with_preset("scar", {}, "refrence")
    with pytest.raises(ConfigError, match="no settings for method 'retrain'.*covers.*scar"):
        with_preset("retrain", {}, "reference")
    fake = Preset("fake", "", {"scar": {}})
    with pytest.raises(ConfigError, match="Presets of 'duck': reference"):
        fake.values("duck")
    assert presets_of("duck") == ["reference"] and presets_of("retrain") == []


def test_describe_lists_every_method_and_dataset_value():
    text = "\n".join(describe(PRESETS.get("reference")))
    assert "scar: " in text and "surrogate_steps=6" in text
    assert "scar on tinyimagenet: hr_gate=0.4, surrogate_steps=91" in text
    assert "duck on tinyimagenet: label_smoothing=0.2" in text


def test_reference_training_recipe_is_the_paper_codes():
    ref = PRESETS.get("reference")
    recipe = ref.recipe_values("fashion-mnist")
    assert (recipe["epochs"], recipe["batch_size"], recipe["lr"], recipe["weight_decay"],
            recipe["label_smoothing"], recipe["schedule"], recipe["crop_padding"],
            recipe["hflip"]) == (50, 256, 0.1, 5e-5, 0.4, "cosine", 4, True)
    assert "model" not in recipe  # the architecture is the user's (--model)
    assert ref.recipe_values("tinyimagenet")["crop_padding"] == 8
    assert "training recipe (scar train): " in "\n".join(describe(ref))
    with pytest.raises(ConfigError, match="no training recipe; presets with one: reference"):
        Preset("fake", "", {"scar": {}}).recipe_values()
