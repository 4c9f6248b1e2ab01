"""Training recipes: per-dataset defaults for the original and oracle models.

Defaults live here once. Each field can be overridden from the CLI (``--set epochs=3``) or a grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from scar.data.base import Augment
from scar.errors import ConfigError, check_choice, check_range
from scar.registry import Registry

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "onecycle", "multistep", "constant")


@dataclass(frozen=True)
class Recipe:
    epochs: int = 50
    batch_size: int = 256
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-5
    schedule: str = "cosine"
    milestones: tuple[int, ...] = (25, 40)  # for schedule="multistep" (×0.5 at each)
    label_smoothing: float = 0.0
    crop_padding: int = 0  # random crop with this zero padding (0 = off)
    hflip: bool = False
    model: str = "resnet18"  # default architecture for this dataset

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, 1)
        check_range("batch_size", self.batch_size, 1)
        check_range("lr", self.lr, 0, low_inclusive=False)
        check_range("momentum", self.momentum, 0, 1, high_inclusive=False)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("label_smoothing", self.label_smoothing, 0, 1, high_inclusive=False)
        check_range("crop_padding", self.crop_padding, 0)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("schedule", self.schedule, SCHEDULES)

    def augment(self) -> Augment:
        """The training augmentation (random crop with zero padding, horizontal flip)."""
        return Augment(self.crop_padding, self.hflip)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        """Return a copy with ``overrides`` applied; strings are coerced to the field's type."""
        known = {f.name: f for f in fields(self)}
        clean: dict[str, Any] = {}
        for key, value in overrides.items():
            if key not in known:
                raise ConfigError(
                    f"Unknown training option {key!r}. Allowed: {', '.join(sorted(known))}."
                )
            clean[key] = coerce(key, value, getattr(self, key))
        return replace(self, **clean)


def coerce(key: str, value: Any, like: Any) -> Any:
    """Coerce a CLI string to the type of ``like`` (bool, int, float, tuple[int], str)."""
    if not isinstance(value, str):
        return tuple(value) if isinstance(like, tuple) else value
    try:
        if isinstance(like, bool):
            low = value.lower()
            if low not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return low in ("true", "1", "yes")
        if isinstance(like, int):
            return int(value)
        if isinstance(like, float):
            return float(value)
        if isinstance(like, tuple):
            return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise ConfigError(
            f"{key} expects a {type(like).__name__} value; got {value!r}."
        ) from exc
    return value


RECIPES: Registry[Recipe] = Registry("training recipe")

# Reference recipe of the SCAR paper's code for CIFAR/TinyImageNet: SGD 0.1, wd 5e-5, cosine,
# 50 epochs, batch 256, label smoothing 0.4, random crop + flip (crop padding 8 at 64 px).
# ``scar train --preset reference`` applies it to any dataset (methods/presets.py).
PAPER_RECIPE = Recipe(epochs=50, batch_size=256, lr=0.1, weight_decay=5e-5, label_smoothing=0.4,
                      crop_padding=4, hflip=True, model="resnet18")
PAPER_CROP_64PX = 8
RECIPES.register("cifar10", "paper recipe, ResNet-18")(PAPER_RECIPE)
RECIPES.register("cifar100", "paper recipe, ResNet-18")(PAPER_RECIPE)
RECIPES.register("tinyimagenet", "paper recipe, ResNet-18, 64 px")(
    replace(PAPER_RECIPE, crop_padding=PAPER_CROP_64PX))
RECIPES.register("imagefolder", "paper recipe for your own images")(PAPER_RECIPE)
# Fashion-MNIST / MNIST on 2 CPU cores: the compact `fastcnn`, one-cycle SGD, a few epochs.
# Mild label smoothing (0.1) keeps the softmax informative for the membership-inference attack;
# no horizontal flip for digits, small crops only.
_SMALL = Recipe(epochs=6, batch_size=128, lr=0.1, nesterov=True, weight_decay=5e-4,
                schedule="onecycle", label_smoothing=0.1, crop_padding=2, hflip=True,
                model="fastcnn")
RECIPES.register("fashion-mnist", "fastcnn, 6 epochs one-cycle (CPU friendly)")(_SMALL)
RECIPES.register("mnist", "fastcnn, 4 epochs, no flip")(replace(_SMALL, epochs=4, hflip=False))
# The membership audit's setting (issue 14; evaluation/lr_attack.py): fastcnn trained to overfit,
# so that membership leaks and the attack has something to detect. With the dataset option
# train_subset=5000 (5,000 Fashion-MNIST images) it reaches 99.5% train / 87% test accuracy;
# no augmentation and no label smoothing (both hide membership), 20 epochs. Chosen with
# `--set recipe=audit` (CLI) or `train: {recipe: audit}` (grids).
AUDIT_RECIPE = Recipe(epochs=20, batch_size=128, lr=0.1, nesterov=True, weight_decay=5e-4,
                      schedule="onecycle", label_smoothing=0.0, crop_padding=0, hflip=False,
                      model="fastcnn")
RECIPES.register("audit", "membership-audit setting: fastcnn overfit, 20 epochs, no "
                 "augmentation (use with dataset option train_subset=5000)")(AUDIT_RECIPE)
#: The recipe-override key that picks another registered recipe as the base (``recipe=audit``).
RECIPE_KEY = "recipe"
# Tiny synthetic data for tests.
RECIPES.register("synthetic", "tests only")(
    Recipe(epochs=3, batch_size=64, lr=0.05, weight_decay=0.0, schedule="constant", model="fastcnn")
)


def recipe_from(base: str | None, overrides: dict[str, Any] | None) -> Recipe:
    """Registered recipe ``base`` (None: the field defaults), or the one the override
    ``recipe`` names (e.g. ``audit``), with the other overrides set over it."""
    overrides = dict(overrides or {})
    named = overrides.pop(RECIPE_KEY, None) or base
    if named is not None and not isinstance(named, str):
        raise ConfigError(f"training option {RECIPE_KEY!r} must be a recipe name "
                          f"({', '.join(RECIPES.names())}); got {named!r}.")
    return (RECIPES.get(named) if named else Recipe()).with_overrides(overrides)


def recorded_augment(recipe: dict[str, Any] | None) -> Augment | None:
    """The training augmentation of a recipe recorded in a checkpoint's sidecar (``to_dict``);
    None when the checkpoint records no recipe (one trained elsewhere)."""
    if not recipe:
        return None
    return Augment(int(recipe.get("crop_padding", 0)), bool(recipe.get("hflip", False)))
