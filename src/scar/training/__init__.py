"""Training of original and oracle (retrained) models."""

from scar.training.recipes import RECIPES, Recipe
from scar.training.trainer import TrainResult, evaluate_accuracy, train_model

__all__ = ["RECIPES", "Recipe", "TrainResult", "evaluate_accuracy", "train_model"]
