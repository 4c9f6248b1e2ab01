"""Class statistics: moved to :mod:`scar.statistics` (below the methods and the training code,
which both use them); these names stay importable from here."""

from scar.statistics import (  # noqa: F401
    STORED_DELTA,
    class_statistics,
    record_class_statistics,
)
