"""Model zoo and the architecture-agnostic head / feature adapter.

Importing this package registers the zoo's builders in :data:`MODELS`.
"""

from scar.models import zoo  # noqa: F401  (registers the builders)
from scar.models.adapter import FeatureModel, features_and_logits, find_head
from scar.models.base import MODELS, ModelSpec, build_model

__all__ = ["MODELS", "FeatureModel", "ModelSpec", "build_model", "features_and_logits", "find_head"]
