"""Evaluation: infer once per (model, split) → :class:`Outputs`; pure metrics; MIA; AUS.

All accuracies are fractions in [0, 1]; reports print them as percentages.
"""

from scar.evaluation.aus import (
    AUS_ON_MEANS_LABEL,
    AUS_ON_MEANS_STD_LABEL,
    AUS_PER_RUN_LABEL,
    aus,
    aus_cr,
    aus_hr,
    aus_on_means,
    aus_per_run,
    mean_with_sem,
)
from scar.evaluation.metrics import SPLITS, accuracy, per_class_accuracy, split_accuracies
from scar.evaluation.mia import (
    MIAResult,
    attack_separates,
    mia_cr,
    mia_hr,
    separation_note,
)
from scar.evaluation.outputs import Outputs, compute_outputs, evaluate_splits

__all__ = [
    "AUS_ON_MEANS_LABEL",
    "AUS_ON_MEANS_STD_LABEL",
    "AUS_PER_RUN_LABEL",
    "SPLITS",
    "MIAResult",
    "Outputs",
    "accuracy",
    "attack_separates",
    "aus",
    "aus_cr",
    "aus_hr",
    "aus_on_means",
    "aus_per_run",
    "compute_outputs",
    "evaluate_splits",
    "mean_with_sem",
    "mia_cr",
    "mia_hr",
    "per_class_accuracy",
    "separation_note",
    "split_accuracies",
]
