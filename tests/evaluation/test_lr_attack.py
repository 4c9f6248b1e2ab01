"""Likelihood-ratio attacks (RMIA, LiRA offline) and their ROC metrics: known answers on
synthetic scores, simulated reference models, bootstrap CIs, input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from scar.errors import ConfigError
from scar.evaluation.lr_attack import (
    ATTACKS,
    AuditResult,
    auc_score,
    audit_separates,
    bootstrap_ci,
    lira_scores,
    rmia_scores,
    roc_metrics,
    tpr_at_fpr,
    true_label_logodds,
)


def test_gaussian_scores_give_the_analytic_auc_and_tpr():
    # Members N(1, 1) vs non-members N(0, 1): AUC = Φ(1/√2), TPR at FPR α = 1 − Φ(z_{1−α} − 1).
    rng = np.random.default_rng(0)
    members, nonmembers = rng.normal(1, 1, 20000), rng.normal(0, 1, 20000)
    res = roc_metrics(members, nonmembers, resamples=50)
    assert res.auc == pytest.approx(norm.cdf(1 / math.sqrt(2)), abs=0.01)
    assert res.values["tpr@1%"] == pytest.approx(1 - norm.cdf(norm.ppf(0.99) - 1), abs=0.015)
    assert res.values["tpr@0.1%"] == pytest.approx(1 - norm.cdf(norm.ppf(0.999) - 1), abs=0.01)
    lo, hi = res.ci["auc"]
    assert lo < res.auc < hi and hi - lo < 0.02


def test_perfect_separator():
    res = roc_metrics(np.linspace(2, 3, 500), np.linspace(0, 1, 2000), resamples=20)
    assert res.auc == 1.0 and res.values["tpr@1%"] == 1.0 and res.values["tpr@0.1%"] == 1.0
    assert res.ci["auc"] == (1.0, 1.0) and res.ci["tpr@0.1%"] == (1.0, 1.0)


def test_identical_distributions_give_chance_with_a_ci_around_it():
    rng = np.random.default_rng(1)
    res = roc_metrics(rng.normal(0, 1, 1000), rng.normal(0, 1, 1000))
    assert res.auc == pytest.approx(0.5, abs=0.04)
    lo, hi = res.ci["auc"]
    assert lo < 0.5 < hi
    assert res.values["tpr@1%"] < 0.05


def test_auc_counts_ties_as_half_and_matches_pairs():
    assert auc_score(np.ones(5), np.ones(7)) == 0.5
    m, n = np.array([0.1, 0.4, 0.4, 0.9]), np.array([0.2, 0.4, 0.5])
    pairs = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in m for b in n])
    assert auc_score(m, n) == pytest.approx(pairs)


def test_tpr_at_fpr_known_answer():
    nonmembers = np.arange(100, dtype=float)  # 0..99
    members = np.array([98.5, 99.5, 100.0, 50.0])
    # FPR ≤ 1%: one false positive allowed → threshold 98 (score > 98): 3 of 4 members.
    assert tpr_at_fpr(members, nonmembers, 0.01) == 0.75
    # FPR ≤ 0.1% with 100 non-members: none allowed → threshold 99: 2 of 4.
    assert tpr_at_fpr(members, nonmembers, 0.001) == 0.5


def test_bootstrap_ci_of_a_mean_has_the_normal_width():
    # Known case: the mean of 400 N(0, 1) draws has SE 1/20: 95% CI width ≈ 2·1.96/20.
    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, 400)
    lo, hi = bootstrap_ci(x, x, lambda m, _n: float(m.mean()), resamples=2000, seed=0)
    assert hi - lo == pytest.approx(2 * 1.96 / 20, rel=0.15)
    assert lo < x.mean() < hi
    assert bootstrap_ci(np.full(5, 3.0), np.ones(5), lambda m, _n: float(m.mean())) == (3.0, 3.0)
    # Seeded: the same CI twice.
    assert bootstrap_ci(x, x, lambda m, _n: float(m.mean()), seed=7) == bootstrap_ci(
        x, x, lambda m, _n: float(m.mean()), seed=7)


def _simulated(k: int = 8, n: int = 2000, gap: float = 1.5, noise: float = 0.5, seed: int = 0):
    """Per-example difficulty d ~ N(0, 2²); a model's φ on x is d + noise (+ gap when it
    trained on x). Half the examples are members of the target; reference models come in
    complementary pairs, so each example is OUT for k/2 of them."""
    rng = np.random.default_rng(seed)
    d = rng.normal(0, 2, n)
    is_member = np.arange(n) < n // 2
    target = d + gap * is_member + rng.normal(0, noise, n)
    ref_in = np.zeros((k, n), dtype=bool)
    for p in range(k // 2):
        half = rng.permutation(n)[: n // 2]
        ref_in[2 * p, half] = True
        ref_in[2 * p + 1] = ~ref_in[2 * p]
    refs = d + gap * ref_in + rng.normal(0, noise, (k, n))
    z_d = rng.normal(0, 2, 1000)  # population samples: OUT for everyone
    target_z, refs_z = z_d + rng.normal(0, noise, 1000), z_d + rng.normal(0, noise, (k, 1000))
    return target, refs, ~ref_in, target_z, refs_z, is_member


def test_reference_models_remove_the_per_example_difficulty():
    target, refs, out, tz, rz, member = _simulated()
    raw = auc_score(target[member], target[~member])
    # Analytic: raw AUC = Φ(gap / √(2(σ_d² + σ²))); LiRA with μ_OUT from k_out = 4 models:
    # Φ(gap / √(2(σ² + σ²/k_out))).
    assert raw == pytest.approx(norm.cdf(1.5 / math.sqrt(2 * (4 + 0.25))), abs=0.03)
    lira = lira_scores(target, refs, out)
    assert auc_score(lira[member], lira[~member]) == pytest.approx(
        norm.cdf(1.5 / math.sqrt(2 * (0.25 + 0.25 / 4))), abs=0.02)
    rmia = rmia_scores(target, refs, out, tz, rz)
    assert auc_score(rmia[member], rmia[~member]) > raw + 0.15


def test_attacks_are_at_chance_without_membership():
    target, refs, out, tz, rz, member = _simulated(gap=0.0, seed=3)
    for name in ATTACKS.names():
        scores = ATTACKS.get(name)(target, refs, out, tz, rz)
        res = roc_metrics(scores[member], scores[~member], resamples=200)
        assert res.ci["auc"][0] < 0.5 < res.ci["auc"][1], name


def test_rmia_score_is_the_fraction_of_population_beaten():
    # One reference model (OUT), a = 1 (p(x) = p_OUT(x)), γ = 1: LR(x, z) ≥ 1 ⇔ ratio_x ≥ ratio_z.
    phi = lambda p: np.log(p / (1 - p))  # noqa: E731
    target_x, refs_x = phi(np.array([0.9, 0.5])), phi(np.array([[0.5, 0.5]]))
    target_z, refs_z = phi(np.array([0.5, 0.6, 0.7, 0.95])), phi(np.full((1, 4), 0.5))
    s = rmia_scores(target_x, refs_x, np.ones((1, 2), bool), target_z, refs_z, a=1.0)
    # ratios: x = 1.8, 1.0; z = 1.0, 1.2, 1.4, 1.9
    assert s.tolist() == [0.75, 0.25]


def test_true_label_logodds_is_stable():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 100.0, -100.0]])
    phi = true_label_logodds(logits, torch.tensor([0, 1]))
    p = torch.softmax(logits[0].double(), 0)[0].item()
    assert phi[0] == pytest.approx(math.log(p / (1 - p)))
    assert np.isfinite(phi[1]) and phi[1] == pytest.approx(100.0)
    with pytest.raises(ConfigError, match="labels must be in"):
        true_label_logodds(logits, torch.tensor([0, 3]))


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError, match="no OUT reference model"):
        lira_scores(np.zeros(3), np.zeros((2, 3)), np.zeros((2, 3), bool))
    with pytest.raises(ConfigError, match=r"\[K, N\]"):
        rmia_scores(np.zeros(3), np.zeros((2, 4)), np.ones((2, 4), bool), np.zeros(2),
                    np.zeros((2, 2)))
    with pytest.raises(ConfigError, match="NaN"):
        lira_scores(np.array([np.nan]), np.zeros((1, 1)), np.ones((1, 1), bool))
    with pytest.raises(ConfigError, match="non-empty"):
        roc_metrics(np.array([]), np.ones(3))
    with pytest.raises(ConfigError, match="RMIA a"):
        rmia_scores(np.zeros(1), np.zeros((1, 1)), np.ones((1, 1), bool), np.zeros(1),
                    np.zeros((1, 1)), a=2.0)


def test_separation_needs_the_gap_and_disjoint_cis():
    def res(auc, lo, hi):
        return AuditResult("rmia", {"auc": auc, "tpr@1%": 0, "tpr@0.1%": 0},
                           {"auc": (lo, hi), "tpr@1%": (0, 0), "tpr@0.1%": (0, 0)}, 10, 10, 4)

    assert audit_separates(res(0.8, 0.75, 0.85), res(0.5, 0.45, 0.55))
    assert not audit_separates(res(0.8, 0.6, 0.9), res(0.65, 0.55, 0.75))  # CIs overlap
    assert not audit_separates(res(0.58, 0.57, 0.59), res(0.5, 0.49, 0.51))  # gap < 0.1
    round_trip = AuditResult.from_metrics(res(0.8, 0.75, 0.85).to_metrics())
    assert round_trip == res(0.8, 0.75, 0.85)
