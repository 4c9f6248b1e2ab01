"""Retrain: the oracle as a method — train the same architecture from scratch on the retain set.

It is the gold standard every other method is compared with, listed as one more row. It needs
the full retain set (not retain-free) and costs a whole training run; the experiment runner
normally reuses a cached oracle checkpoint instead of calling it.

The training recipe comes from the hyperparameters below, whose defaults are the Fashion-MNIST
recipe of :mod:`scar.training.recipes` (read from there, so they cannot drift apart); the
recipe's other fields (momentum, Nesterov, milestones) are taken from it too. For CIFAR-sized
runs pass the paper's recipe values (``epochs=50 lr=0.1 schedule=cosine ...``).

"From scratch" means every module with ``reset_parameters()`` is re-initialised (seeded with
``data.seed``). Parameters owned by modules without one (e.g. a ViT's position embedding or class
token) keep the original model's values; they are listed in a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from torch import nn

from scar.errors import ConfigError, check_choice
from scar.methods import _loops
from scar.methods.base import Method, UnlearnData, register, seeded
from scar.training.recipes import OPTIMIZERS, RECIPES, SCHEDULES, Recipe
from scar.training.trainer import train_model

log = logging.getLogger(__name__)

#: Source of the defaults (and of the recipe fields that are not hyperparameters here).
BASE_RECIPE = "fashion-mnist"
_BASE: Recipe = RECIPES.get(BASE_RECIPE)


def reinitialize(model: nn.Module) -> list[str]:
    """Re-initialise ``model`` in place; return the names of parameters nothing reset."""
    covered: set[int] = set()
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if reset is None:  # nn.MultiheadAttention keeps its reset private
            reset = getattr(module, "_reset_parameters", None)
        if callable(reset):
            reset()
            covered.update(id(p) for p in module.parameters(recurse=False))
    return [name for name, p in model.named_parameters() if id(p) not in covered]


@register
@dataclass(kw_only=True)
class Retrain(Method):
    """Oracle: retrain the architecture from scratch on the retain set (training recipe)."""

    name = "retrain"
    requires = frozenset({"retain"})

    epochs: int = _BASE.epochs
    lr: float = _BASE.lr
    batch_size: int = _BASE.batch_size
    optimizer: str = _BASE.optimizer
    schedule: str = _BASE.schedule
    label_smoothing: float = _BASE.label_smoothing
    crop_padding: int = _BASE.crop_padding
    hflip: bool = _BASE.hflip
    weight_decay: float = _BASE.weight_decay
    amp: bool = True  # bfloat16 autocast on CUDA (ignored on CPU), as for the original model

    def validate(self) -> None:
        _loops.check_count("epochs", self.epochs)
        _loops.check_count("batch_size", self.batch_size)
        _loops.check_count("crop_padding", self.crop_padding, low=0)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if not isinstance(self.hflip, bool) or not isinstance(self.amp, bool):
            raise ConfigError(
                f"hflip and amp must be true or false; got hflip={self.hflip!r}, amp={self.amp!r}."
            )
        self.recipe()  # Recipe checks the ranges of lr, weight_decay and label_smoothing

    def recipe(self) -> Recipe:
        return replace(_BASE, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                       optimizer=self.optimizer, schedule=self.schedule,
                       label_smoothing=self.label_smoothing, crop_padding=self.crop_padding,
                       hflip=self.hflip, weight_decay=self.weight_decay)

    def _unlearn(self, model: nn.Module, original: nn.Module, data: UnlearnData) -> nn.Module:
        # ``model`` is already the caller's private deep copy: re-initialise it in place.
        with seeded(data):  # forked: train_model reseeds the global generator
            kept = reinitialize(model)
            if kept:
                log.warning("retrain: %d parameter(s) have no reset_parameters() and keep the "
                            "original values: %s", len(kept), ", ".join(kept[:8]))
            result = train_model(model, data.retain, data.input_spec, self.recipe(),
                                 device=data.device, seed=data.seed, amp=self.amp,
                                 progress=data.progress, desc=self.name)
        for row in result.history:  # one row per epoch: train_model reports per epoch
            self.record(**row)
        return result.model
