"""Adaptive Unlearning Score (AUS, introduced in DUCK) and its aggregation over runs.

With A_or the original model's test accuracy (CR: retain-test), A_t the unlearned model's test
accuracy (CR: retain-test) and A_f its forget accuracy (CR: test-forget; HR: train-forget), all
fractions in [0, 1]:

- CR: AUS = (1 − (A_or − A_t)) / (1 + |A_f|)
- HR: AUS = (1 − (A_or − A_t)) / (1 + |A_f − A_t|)

Inputs may be floats or ``uncertainties`` values; with the latter the standard error propagates
to first order (correlations such as A_t appearing twice in HR are tracked by the library).

Two aggregations over runs are reported, labelled:

- :data:`AUS_ON_MEANS_LABEL` — average each accuracy over runs, attach its standard error, and
  compute AUS once from the means (:func:`aus_on_means`);
- :data:`AUS_ON_MEANS_STD_LABEL` — the same AUS with the sample standard deviation propagated
  instead of the standard error: the reference code's error bar (spec scar-method.md §10);
- :data:`AUS_PER_RUN_LABEL` — AUS of every run, then mean ± sample std (:func:`aus_per_run`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from uncertainties import UFloat, nominal_value, ufloat

from scar.errors import ConfigError, check_choice

Number = float | UFloat

AUS_ON_MEANS_LABEL = "AUS (on means, propagated SE)"
AUS_ON_MEANS_STD_LABEL = "AUS (on means, propagated std)"
AUS_PER_RUN_LABEL = "AUS (per-run mean ± std)"
#: What each mean carries into AUS on means: its standard error, or the sample std (reference).
SPREADS = ("sem", "std")
ROW_KEYS: tuple[str, ...] = ("a_or", "a_t", "a_f")


def _abs(x: Number) -> Number:
    # ``abs()``/``umath.fabs`` on ufloats are deprecated in uncertainties 3.2; a sign flip is the
    # same first-order propagation (at exactly 0 we take the right derivative: σ passes unchanged).
    return -x if nominal_value(x) < 0 else x


def aus_cr(a_or: Number, a_t: Number, a_f: Number) -> Number:
    """Class-removal AUS: (1 − (A_or − A_t)) / (1 + |A_f|)."""
    return (1 - (a_or - a_t)) / (1 + _abs(a_f))


def aus_hr(a_or: Number, a_t: Number, a_f: Number) -> Number:
    """Homogeneous-removal AUS: (1 − (A_or − A_t)) / (1 + |A_f − A_t|)."""
    return (1 - (a_or - a_t)) / (1 + _abs(a_f - a_t))


AUS_FUNCTIONS: dict[str, Callable[[Number, Number, Number], Number]] = {
    "CR": aus_cr,
    "HR": aus_hr,
}


def _aus_function(scenario: str) -> Callable[[Number, Number, Number], Number]:
    key = scenario.upper() if isinstance(scenario, str) else scenario
    if key not in AUS_FUNCTIONS:
        raise ConfigError(
            f"Unknown AUS scenario {scenario!r}; allowed: {sorted(AUS_FUNCTIONS)} "
            "(CR = class removal, HR = homogeneous/random removal)."
        )
    return AUS_FUNCTIONS[key]


def aus(scenario: str, a_or: Number, a_t: Number, a_f: Number) -> Number:
    """AUS for ``scenario`` ("CR" or "HR", case-insensitive)."""
    return _aus_function(scenario)(a_or, a_t, a_f)


def mean_with_sem(values: Iterable[float], spread: str = "sem") -> UFloat:
    """Mean ± standard error of the mean (sample std with ddof=1 over √n; 0 for a single value);
    ± the sample std itself with ``spread="std"``."""
    check_choice("spread", spread, SPREADS)
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ConfigError(
            f"mean_with_sem needs a non-empty list of numbers; got {arr.size} values."
        )
    if not np.all(np.isfinite(arr)):
        raise ConfigError(f"mean_with_sem needs finite values; got {arr.tolist()}.")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    sem = std / math.sqrt(arr.size) if spread == "sem" else std
    with warnings.catch_warnings():
        # A zero SEM is legitimate here (one run, or A_or from one shared original model);
        # uncertainties warns about it on creation, which would only be noise in every report.
        warnings.filterwarnings("ignore", "Using UFloat objects with std_dev==0", UserWarning)
        return ufloat(float(arr.mean()), sem)


def _columns(rows: Sequence[Mapping[str, float]]) -> dict[str, list[float]]:
    if not rows:
        raise ConfigError("AUS aggregation needs at least one row; got none.")
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ConfigError(
                f"AUS row {i} lacks {missing}; each row needs keys {list(ROW_KEYS)}; "
                f"got keys {sorted(row)}."
            )
    return {k: [float(row[k]) for row in rows] for k in ROW_KEYS}


def aus_on_means(rows: Sequence[Mapping[str, float]], scenario: str, spread: str = "sem"
                 ) -> UFloat:
    """AUS from the per-column means (the reference's number), with their standard errors
    propagated, or their sample stds with ``spread="std"`` (the reference's error bar).

    Each of A_or, A_t, A_f is averaged over runs and given its SEM (or std); the three means are
    treated as independent (as in the reference), so the result's σ ignores their correlation
    across runs.
    """
    fn = _aus_function(scenario)
    cols = _columns(rows)
    return fn(*(mean_with_sem(cols[k], spread) for k in ROW_KEYS))


def aus_per_run(rows: Sequence[Mapping[str, float]], scenario: str) -> tuple[float, float]:
    """(mean, sample std with ddof=1; 0 for one run) of the AUS computed for every run."""
    fn = _aus_function(scenario)
    cols = _columns(rows)
    values = np.array([float(fn(*v)) for v in zip(*(cols[k] for k in ROW_KEYS))])
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return float(values.mean()), std
