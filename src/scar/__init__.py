"""SCAR: retain-free machine unlearning for image classifiers.

Public entry points live in the sub-packages: :mod:`scar.data`, :mod:`scar.models`,
:mod:`scar.training`, :mod:`scar.methods`, :mod:`scar.evaluation`, :mod:`scar.experiments`.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
