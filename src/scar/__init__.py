"""SCAR: retain-free machine unlearning for image classifiers.

The plain-data entry points (your own ``nn.Module`` and data)::

    import scar
    new_model, result = scar.unlearn(model, forget=forget_loader, surrogate=ood_loader,
                                     forget_classes=[3], stats=scar.class_statistics(model, train))

are :func:`unlearn`, :func:`evaluate` and :func:`class_statistics` (:mod:`scar.api`). The toolkit
itself lives in the sub-packages: :mod:`scar.data`, :mod:`scar.models`, :mod:`scar.training`,
:mod:`scar.methods`, :mod:`scar.evaluation`, :mod:`scar.experiments`. Names are imported lazily:
``import scar`` does not import torch.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

#: Public name → the module that defines it (imported on first use).
_EXPORTS = {
    "unlearn": "scar.api", "evaluate": "scar.api", "class_statistics": "scar.api",
    "ClassStatistics": "scar.api", "UnlearnResult": "scar.api",
    "InputSpec": "scar.data.base",
    "ScarError": "scar.errors", "ConfigError": "scar.errors",
    "MissingRequirementError": "scar.errors", "CheckpointError": "scar.errors",
}  # fmt: skip

__all__ = [
    "CheckpointError", "ClassStatistics", "ConfigError", "InputSpec", "MissingRequirementError",
    "ScarError", "UnlearnResult", "__version__", "class_statistics", "evaluate", "unlearn",
]  # fmt: skip

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from scar.api import ClassStatistics, UnlearnResult, class_statistics, evaluate, unlearn
    from scar.data.base import InputSpec
    from scar.errors import CheckpointError, ConfigError, MissingRequirementError, ScarError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scar' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
