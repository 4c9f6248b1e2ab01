"""Named hyperparameter presets: one setting of several methods under one name.

``scar unlearn --preset reference``, ``preset: reference`` in a grid (for every method, or inside
one method's mapping) and ``scar list presets`` all read :data:`PRESETS`. A preset gives values
for some hyperparameters of the methods it covers; the rest keep the method's defaults, and
values given explicitly (``--set``, a grid's method mapping) override the preset's.

A few reference values depend on the dataset (the reference code picks them by dataset name):
``by_dataset`` holds them, keyed by the dataset's registry name, and they are set over the
method's values when that dataset is named. An image folder holding the same images is not
recognised as that dataset; set such values explicitly there.

A preset may also hold a training recipe (``recipe``, with ``recipe_by_dataset`` on top) that
``scar train --preset`` applies to the original and oracle models.

The ``reference`` preset holds the settings of the authors' code, spec ``scar-method.md`` §7, §8
and §10, and its training recipe (protocol.md). The README (Presets) lists the reference
behaviours it does not reproduce.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scar.errors import ConfigError
from scar.registry import Registry
from scar.training.recipes import PAPER_CROP_64PX, PAPER_RECIPE

Values = Mapping[str, Any]


@dataclass(frozen=True)
class Preset:
    """Hyperparameter values per method (``methods``), and per dataset on top (``by_dataset``:
    dataset name → method → values)."""

    name: str
    summary: str
    methods: Mapping[str, Values]
    by_dataset: Mapping[str, Mapping[str, Values]] = field(default_factory=dict)
    recipe: Values = field(default_factory=dict)  # training recipe fields (scar train)
    recipe_by_dataset: Mapping[str, Values] = field(default_factory=dict)

    def recipe_values(self, dataset: str | None = None) -> dict[str, Any]:
        """The preset's training-recipe fields (on ``dataset``, when given); ConfigError when
        the preset has none."""
        if not self.recipe:
            with_recipe = [n for n in PRESETS.names() if PRESETS.get(n).recipe]
            raise ConfigError(
                f"preset {self.name!r} has no training recipe; presets with one: "
                f"{', '.join(with_recipe) or '(none)'}."
            )
        return {**self.recipe, **self.recipe_by_dataset.get(dataset or "", {})}

    def values(self, method: str, dataset: str | None = None) -> dict[str, Any]:
        """The preset's values for ``method`` (on ``dataset``, when given); ConfigError when the
        preset does not cover the method."""
        if method not in self.methods:
            raise ConfigError(
                f"preset {self.name!r} has no settings for method {method!r}; it covers "
                f"{', '.join(sorted(self.methods))}. Presets of {method!r}: "
                f"{', '.join(presets_of(method)) or '(none)'}."
            )
        extra = self.by_dataset.get(dataset, {}) if dataset else {}
        return {**self.methods[method], **extra.get(method, {})}


def describe(preset: Preset) -> list[str]:
    """Lines for ``scar list presets``: each method's values, then the per-dataset ones."""
    entries = [(method, values) for method, values in sorted(preset.methods.items())]
    entries += [(f"{method} on {dataset}", values)
                for dataset, methods in sorted(preset.by_dataset.items())
                for method, values in sorted(methods.items())]
    if preset.recipe:
        entries.append(("training recipe (scar train)", preset.recipe))
        entries += [(f"training recipe on {dataset}", values)
                    for dataset, values in sorted(preset.recipe_by_dataset.items())]
    return [textwrap.fill(f"{what}: {_format(values)}", width=100, initial_indent="    ",
                          subsequent_indent="      ", break_on_hyphens=False)
            for what, values in entries]


def _format(values: Values) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(values.items())) or "(the defaults)"


PRESETS: Registry[Preset] = Registry("preset", describe=describe)


def register_preset(preset: Preset) -> Preset:
    PRESETS.register(preset.name, preset.summary)(preset)
    return preset


def presets_of(method: str) -> list[str]:
    """Names of the presets that cover ``method``."""
    return [name for name in PRESETS.names() if method in PRESETS.get(name).methods]


def with_preset(method: str, hparams: Values, preset: str | None,
                dataset: str | None = None) -> dict[str, Any]:
    """``hparams`` over the values of ``preset`` for ``method`` (``hparams`` win); unknown preset
    names and presets that do not cover the method → ConfigError."""
    if preset is None:
        return dict(hparams)
    return {**PRESETS.get(preset).values(method, dataset), **hparams}


# ---------------------------------------------------------------- the reference code's settings
# SCAR and self-forget (spec §7, §10). Knobs absent here have no counterpart in the reference or
# are inert with these values (step_kl: lr is given; stop_slack, stop_window: stop_check is
# "step"; cover_steps, cover_lr: no cover; tukey_mode: equal for the non-negative features of a
# ReLU network, the reference has no rule for negative ones).
_SCAR_COMMON: dict[str, Any] = {
    "lr": 5e-4,
    "beta1": 0.9,  # torch's Adam defaults, which the reference keeps
    "beta2": 0.999,
    "weight_decay": 0.0,
    "epochs": 30,
    "batch_size": 1024,
    "surrogate_batch_size": None,  # = batch_size
    "lambda_1": 1.0,
    "lambda_2": 5.0,
    "temperature": 1.0,
    "delta": 0.5,
    "gamma_1": 3.0,
    "gamma_2": 3.0,
    "surrogate_steps": 6,  # its `n_batch_ret > 5` check lets 6 surrogate steps through
    "divergence": "kl",
    "bn_train": True,
    "stop_check": "step",  # full forget-set check after every step ...
    "stop_from_epoch": 2,  # ... from epoch index 2 on
    "balance_surrogate": False,  # CR samples surrogates uniformly (HR always balances)
    "cover_per_class": 0,
    "revisit_share": 0.0,  # shuffled forget batches only
    "mask_min": "kept",  # the CR mask value: minimum over the kept rows
    "augment": True,  # retain and CR surrogate images through the training augmentation
    "forget_distill": 0.0,  # no distillation on the forget images
    "destination": "mahalanobis",  # Q*(x): the nearest wrong class's Gaussian
}
_SCAR: dict[str, Any] = {
    **_SCAR_COMMON,
    "shrink_times": 2,
    "stats": "retain",  # class statistics from the retain set (the reference's loader)
    "hr_gate": 0.8,
    "hr_margin": 0.015,
    "targets_from": "current",  # Q*(x) from the student at the first step on each forget batch
    "hr_gate_from": "full",  # the HR gate from an eval-mode pass over the forget set every step
}
# Self-forget: the reference shrinks once, reads retain statistics, and takes as proxies the
# images of each augmented surrogate batch that the teacher predicts as a removed class
# (unsynthesised, no head replay), with targets every step; it stops on the real forget set, so
# this preset's self-forget reads the retain and the forget set (its access profile says so).
_SELF_FORGET: dict[str, Any] = {
    **_SCAR_COMMON,
    "shrink_times": 1,
    "stats": "retain",
    "proxies": "per_batch",
    "stop_on": "forget",
    "min_proxies": 0,
    "max_proxies": None,
    "synth_steps": 0,
    "replay_steps": 0,
    "proxy_target": 0.01,
}
# Baselines (spec §8, §10). NegativeGradient / RandomLabels: SGD 5e-4, batches of 1024, the
# forget accuracy checked once per epoch; RandomLabels in HR draws from every class.
_FORGET_SGD: dict[str, Any] = {
    "optimizer": "sgd",
    "lr": 5e-4,
    "momentum": 0.9,
    "batch_size": 1024,
    "stop_check": "epoch",
    "hr_margin": 0.015,
}

register_preset(Preset(
    name="reference",
    summary="the authors' code (spec scar-method.md §7-§10); README, Presets: what it does "
            "not reproduce",
    methods={
        "scar": _SCAR,
        "scar_self_forget": _SELF_FORGET,
        "negative_gradient": _FORGET_SGD,
        "random_labels": {**_FORGET_SGD, "allow_true_label": True},
        "finetune": {"epochs": 30, "weight_decay": 0.0, "momentum": 0.9,
                     "milestones": (25, 40)},
        "duck": {"lr": 5e-4, "lambda_2": 5.0, "temperature": 1.0, "batch_size": 1024,
                 "label_smoothing": 0.0, "shuffle_forget": False, "hr_margin": 0.015},
    },
    by_dataset={
        "tinyimagenet": {
            "scar": {"surrogate_steps": 91, "hr_gate": 0.4},
            "scar_self_forget": {"surrogate_steps": 91},
            "duck": {"label_smoothing": 0.2},
        },
    },
    # The reference's recipe for the original and oracle models, any architecture (--model).
    recipe={k: v for k, v in PAPER_RECIPE.to_dict().items() if k != "model"},
    recipe_by_dataset={"tinyimagenet": {"crop_padding": PAPER_CROP_64PX}},
))
