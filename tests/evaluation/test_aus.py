"""AUS formulas by hand, uncertainty propagation, and the two aggregations over runs."""

from __future__ import annotations

import math

import pytest
from uncertainties import ufloat

from scar.errors import ConfigError
from scar.evaluation.aus import (
    AUS_ON_MEANS_LABEL,
    AUS_PER_RUN_LABEL,
    aus,
    aus_cr,
    aus_hr,
    aus_on_means,
    aus_per_run,
    mean_with_sem,
)


def test_cr_perfect_is_one():
    assert aus_cr(0.7, 0.7, 0.0) == pytest.approx(1.0)


def test_cr_by_hand():
    # (1 - (0.90 - 0.85)) / (1 + |0.02|) = 0.95 / 1.02 = 0.93137254...
    assert aus_cr(0.9, 0.85, 0.02) == pytest.approx(0.95 / 1.02)
    assert aus_cr(0.9, 0.85, 0.02) == pytest.approx(0.9313725490196)


def test_cr_better_than_original_exceeds_one():
    # (1 - (0.70 - 0.72)) / 1 = 1.02, as the paper's "Retrained" row (AUS 1.004) shows is possible
    assert aus_cr(0.7, 0.72, 0.0) == pytest.approx(1.02)


def test_hr_by_hand():
    # (1 - 0.05) / (1 + |0.02 - 0.85|) = 0.95 / 1.83 = 0.51912568...
    assert aus_hr(0.9, 0.85, 0.02) == pytest.approx(0.95 / 1.83)
    # forget accuracy equal to test accuracy is perfect: (1 - 0.02) / (1 + 0) = 0.98
    assert aus_hr(0.8, 0.78, 0.78) == pytest.approx(0.98)
    # forget above test: (1 - 0.02) / (1 + |0.80 - 0.78|) = 0.98 / 1.02 = 0.96078431...
    assert aus_hr(0.8, 0.78, 0.80) == pytest.approx(0.98 / 1.02)


def test_dispatcher_and_bad_scenario():
    assert aus("CR", 0.9, 0.85, 0.02) == aus_cr(0.9, 0.85, 0.02)
    assert aus("hr", 0.9, 0.85, 0.02) == aus_hr(0.9, 0.85, 0.02)
    with pytest.raises(ConfigError, match="allowed"):
        aus("XR", 0.9, 0.85, 0.02)


def test_ufloat_propagation_cr_matches_first_order():
    s_or, s_t, s_f = 0.01, 0.02, 0.005
    res = aus_cr(ufloat(0.9, s_or), ufloat(0.85, s_t), ufloat(0.02, s_f))
    n, d = 0.95, 1.02  # numerator and denominator at the nominal values
    # df/da_or = -1/d, df/da_t = 1/d, df/da_f = -n/d^2 (a_f > 0)
    expected = math.sqrt((s_or**2 + s_t**2) / d**2 + (n * s_f / d**2) ** 2)
    assert res.nominal_value == pytest.approx(n / d)
    assert res.std_dev > 0
    assert abs(res.std_dev - expected) < 1e-9


@pytest.mark.parametrize("a_f", [0.02, 0.95])  # both signs of (a_f - a_t)
def test_ufloat_propagation_hr_tracks_a_t_twice(a_f):
    s_or, s_t, s_f = 0.01, 0.02, 0.005
    a_or, a_t = 0.9, 0.85
    res = aus_hr(ufloat(a_or, s_or), ufloat(a_t, s_t), ufloat(a_f, s_f))
    sign = 1.0 if a_f >= a_t else -1.0
    n, d = 1 - (a_or - a_t), 1 + abs(a_f - a_t)
    # d depends on a_t through |a_f - a_t|: df/da_t = 1/d + sign * n/d^2, df/da_f = -sign * n/d^2
    g_or, g_t, g_f = -1 / d, 1 / d + sign * n / d**2, -sign * n / d**2
    expected = math.sqrt((g_or * s_or) ** 2 + (g_t * s_t) ** 2 + (g_f * s_f) ** 2)
    assert res.nominal_value == pytest.approx(n / d)
    assert abs(res.std_dev - expected) < 1e-9


def test_mean_with_sem():
    m = mean_with_sem([1.0, 2.0, 3.0])  # std (ddof=1) = 1, SEM = 1/sqrt(3)
    assert m.nominal_value == pytest.approx(2.0)
    assert m.std_dev == pytest.approx(1 / math.sqrt(3))
    one = mean_with_sem([0.4])
    assert one.nominal_value == pytest.approx(0.4) and one.std_dev == 0.0
    with pytest.raises(ConfigError):
        mean_with_sem([])
    with pytest.raises(ConfigError, match="finite"):
        mean_with_sem([0.1, float("nan")])


ROWS = [
    {"a_or": 0.90, "a_t": 0.88, "a_f": 0.00},  # CR AUS = 0.98 / 1.00 = 0.98
    {"a_or": 0.90, "a_t": 0.84, "a_f": 0.10},  # CR AUS = 0.94 / 1.10 = 0.85454545...
]


def test_aus_on_means_vs_per_run_by_hand():
    # means: a_or 0.90 (SEM 0), a_t 0.86 (SEM 0.02), a_f 0.05 (SEM 0.05)
    # on means: (1 - 0.04) / 1.05 = 0.96 / 1.05 = 0.9142857...
    on_means = aus_on_means(ROWS, "CR")
    assert on_means.nominal_value == pytest.approx(0.96 / 1.05)
    expected_sd = math.sqrt((0.02 / 1.05) ** 2 + (0.96 * 0.05 / 1.05**2) ** 2)
    assert on_means.std_dev == pytest.approx(expected_sd)
    # per run: mean (0.98 + 0.854545) / 2 = 0.917272..., std (ddof=1) = |diff| / sqrt(2)
    mean, std = aus_per_run(ROWS, "CR")
    assert mean == pytest.approx((0.98 + 0.94 / 1.1) / 2)
    assert std == pytest.approx(abs(0.98 - 0.94 / 1.1) / math.sqrt(2))
    assert mean != pytest.approx(on_means.nominal_value)  # the two aggregations differ
    assert AUS_ON_MEANS_LABEL != AUS_PER_RUN_LABEL
    # The reference's error bar: the same AUS with the stds (ddof=1) propagated, not the SEMs:
    # std a_t = 0.02 * sqrt(2), std a_f = 0.05 * sqrt(2), so the bar is sqrt(2) times wider.
    ref = aus_on_means(ROWS, "CR", spread="std")
    assert ref.nominal_value == pytest.approx(on_means.nominal_value)
    assert ref.std_dev == pytest.approx(math.sqrt(2) * expected_sd)
    with pytest.raises(ConfigError, match="spread"):
        aus_on_means(ROWS, "CR", spread="var")


def test_aggregations_single_run_and_bad_rows():
    mean, std = aus_per_run(ROWS[:1], "HR")
    assert mean == pytest.approx(aus_hr(0.9, 0.88, 0.0)) and std == 0.0
    assert aus_on_means(ROWS[:1], "HR").std_dev == 0.0
    with pytest.raises(ConfigError, match="a_f"):
        aus_per_run([{"a_or": 0.9, "a_t": 0.8}], "CR")
    with pytest.raises(ConfigError, match="at least one row"):
        aus_on_means([], "CR")
    with pytest.raises(ConfigError):
        aus_on_means(ROWS, "XR")
