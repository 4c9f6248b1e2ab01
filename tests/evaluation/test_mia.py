"""Membership-inference attack: chance on identical distributions, high on separable ones,
variant group sizes, no duplicated rows, and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scar.errors import ConfigError
from scar.evaluation import mia
from scar.evaluation.mia import MIAResult, attack_separates, mia_cr, mia_hr, separation_note


def _dirichlet(n: int, alpha: float, seed: int, classes: int = 10) -> np.ndarray:
    return np.random.default_rng(seed).dirichlet(np.full(classes, alpha), size=n)


def _one_hot_ish(n: int, seed: int, classes: int = 10) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(classes, 0.5), size=n) * 0.05
    p[np.arange(n), rng.integers(0, classes, n)] += 0.95
    return p


def test_near_chance_on_same_distribution():
    members, nonmembers = _dirichlet(300, 1.0, seed=1), _dirichlet(300, 1.0, seed=2)
    res = mia_hr(members, nonmembers, repeats=3, seed=0)
    assert abs(res.accuracy - 0.5) <= 0.1
    assert abs(res.auc - 0.5) <= 0.12
    assert res.chance_distance <= 0.1
    assert res.variant == "balanced" and res.n_members == res.n_nonmembers == 300


def test_high_on_separable_distributions():
    members = _one_hot_ish(200, seed=3)  # confident: the model has seen these
    nonmembers = _dirichlet(200, 20.0, seed=4)  # flat
    res = mia_cr(torch.from_numpy(members), torch.from_numpy(nonmembers), repeats=2)
    assert res.accuracy >= 0.9 and res.auc >= 0.9 and res.f1 >= 0.9
    assert res.chance_distance >= 0.4


def test_results_are_seeded():
    a, b = _dirichlet(60, 1.0, seed=5), _dirichlet(60, 0.5, seed=6)
    assert mia_hr(a, b, repeats=2, seed=3) == mia_hr(a, b, repeats=2, seed=3)


@pytest.fixture
def captured(monkeypatch):
    """Replace the SVC attack by a recorder of the attack data (fast; checks the sampling)."""
    calls: list[tuple[np.ndarray, np.ndarray]] = []

    def fake_attack(x, y, seed, variant="balanced"):
        calls.append((x, y))
        return 0.5, 0.5, 0.5

    monkeypatch.setattr(mia, "_attack_once", fake_attack)
    return calls


def test_reference_variant_is_three_to_one(captured):
    res = mia_cr(_dirichlet(200, 1.0, 7), _dirichlet(50, 1.0, 8), variant="reference", repeats=2)
    assert (res.n_members, res.n_nonmembers, res.variant) == (150, 50, "reference")
    x, y = captured[0]
    # As the reference code: members (the first 150 rows) labelled 0, non-members 1.
    assert len(x) == 200 and (y[:150] == 0).all() and (y[150:] == 1).all()
    assert res.to_metrics()["mia/variant"] == "reference"


def test_balanced_variant_labels_members_1(captured):
    mia_cr(_dirichlet(60, 1.0, 7), _dirichlet(50, 1.0, 8), repeats=1)
    _, y = captured[0]
    assert (y[:50] == 1).all() and (y[50:] == 0).all()


def test_reference_scores_use_micro_f1_balanced_the_member_f1():
    # Known answer: 4 attack samples, one non-member (label 1 in the reference) misclassified.
    y_true, pred = np.array([0, 0, 0, 1]), np.array([0, 0, 1, 1])
    decision = np.array([-2.0, -1.0, 0.5, 1.0])
    acc, f1, auc = mia.scores(y_true, pred, decision, "reference")
    assert (acc, f1, auc) == (0.75, 0.75, 1.0)  # micro F1 equals the accuracy
    acc, f1, _ = mia.scores(y_true, pred, decision, "balanced")
    assert acc == 0.75 and f1 == pytest.approx(2 / 3)  # binary F1 of label 1: P 1/2, R 1


def test_reference_variant_uses_every_sample(captured):
    members, nonmembers = _dirichlet(3000, 1.0, 7), _dirichlet(1100, 1.0, 8)
    ref = mia_cr(members, nonmembers, variant="reference", repeats=1)
    assert (ref.n_members, ref.n_nonmembers) == (3000, 1100)  # no 1,000 cap
    hr = mia_hr(members, nonmembers, balanced=False, repeats=1)
    assert (hr.n_members, hr.n_nonmembers) == (1100, 1100)  # members subsampled to the test size
    balanced = mia_cr(members, nonmembers, repeats=1)
    assert (balanced.n_members, balanced.n_nonmembers) == (1000, 1000)


def test_balanced_cr_subsamples_larger_group(captured):
    res = mia_cr(_dirichlet(40, 1.0, 7), _dirichlet(90, 1.0, 8), repeats=1)
    assert (res.n_members, res.n_nonmembers, res.variant) == (40, 40, "balanced")


def test_cap_keeps_ratio(captured):
    res = mia_cr(
        _dirichlet(400, 1.0, 7),
        _dirichlet(100, 1.0, 8),
        variant="reference",
        repeats=1,
        max_samples_per_group=60,
    )
    assert (res.n_members, res.n_nonmembers) == (60, 20)


def test_hr_subsample_has_no_duplicates_and_comes_from_members(captured):
    forget, test = _dirichlet(500, 1.0, 9), _dirichlet(120, 1.0, 10)
    res = mia_hr(forget, test, repeats=3, seed=1)
    assert (res.n_members, res.n_nonmembers) == (120, 120)
    forget_rows = {row.tobytes() for row in forget}
    for x, y in captured:
        assert np.unique(x, axis=0).shape[0] == len(x) == 240
        assert all(row.tobytes() in forget_rows for row in x[y == 1])
    # different repetitions draw different member subsets
    assert not np.array_equal(captured[0][0], captured[1][0])


def test_hr_unbalanced_keeps_all_test(captured):
    res = mia_hr(_dirichlet(50, 1.0, 9), _dirichlet(120, 1.0, 10), repeats=1, balanced=False)
    assert (res.n_members, res.n_nonmembers, res.variant) == (50, 120, "reference")


def test_bad_inputs_raise_config_error():
    good = _dirichlet(30, 1.0, 11)
    nan = good.copy()
    nan[3, 2] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        mia_hr(nan, good)
    with pytest.raises(ConfigError, match="at least 10"):
        mia_hr(good[:5], good)
    with pytest.raises(ConfigError, match="same number of classes"):
        mia_cr(good, _dirichlet(30, 1.0, 12, classes=5))
    with pytest.raises(ConfigError, match="variant"):
        mia_cr(good, good, variant="imbalanced")
    with pytest.raises(ConfigError, match="shape"):
        mia_hr(good[:, 0], good)
    with pytest.raises(ConfigError, match="repeats"):
        mia_hr(good, good, repeats=0)
    with pytest.raises(ConfigError, match="max_samples_per_group"):
        mia_hr(good, good, max_samples_per_group=5)


def _result(acc: float, auc: float, variant: str = "balanced") -> MIAResult:
    return MIAResult(acc, 0.01, acc, 0.01, auc, 0.01, abs(acc - 0.5), 100, 100, variant)


def test_to_metrics_keys():
    keys = set(_result(0.6, 0.65).to_metrics())
    assert {"mia/acc", "mia/f1", "mia/auc", "mia/chance_dist", "mia/acc_std"} <= keys
    assert "mia_forget/acc" in _result(0.6, 0.65).to_metrics(prefix="mia_forget")


def test_separation():
    original, oracle = _result(0.80, 0.86), _result(0.52, 0.50)
    assert attack_separates(original, oracle)
    assert "NOT" not in separation_note(original, oracle)
    # the reference CR flaw: majority-class answers for every model
    flat_original, flat_oracle = _result(0.75, 0.51, "reference"), _result(0.75, 0.50, "reference")
    assert not attack_separates(flat_original, flat_oracle)
    note = separation_note(flat_original, flat_oracle)
    assert "does NOT separate" in note and "reference" in note
    with pytest.raises(ConfigError, match="same variant"):
        attack_separates(original, flat_oracle)
