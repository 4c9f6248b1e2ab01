"""Per-example likelihood-ratio membership attacks with reference models (RMIA, LiRA), and their
ROC metrics with bootstrap confidence intervals. Pure numpy: no model is run here.

Setting (both attacks, *offline*): K reference models are trained on random halves of a known
pool of training images (:mod:`scar.experiments.references`), so for every audited example we
know which reference models did **not** train on it ("OUT" models). The attack statistic of an
example x under a target model θ is computed from the target's and the OUT reference models'
confidence in x's true label; nothing else about the models is used.

The signal of one model on one example is the *logit-scaled confidence* of the true label,
``φ = log p_y − log(1 − p_y) = z_y − logsumexp_{y' ≠ y} z_{y'}`` (LiRA's logit scaling, Carlini
et al. 2022), computed from the logits so that it stays finite when ``p_y`` rounds to 1
(:func:`true_label_logodds`); RMIA uses the probability ``p_y = sigmoid(φ)`` itself.

- **RMIA** (Zarifzadeh, Liu, Chang, Shokri: "Low-Cost High-Power Membership Inference Attacks",
  ICML 2024), offline variant: ``LR(x, z) = (p_θ(x) / p(x)) / (p_θ(z) / p(z))`` and
  ``score(x) = Pr_z[LR(x, z) ≥ γ]`` over population samples z, with ``p(x)`` from the OUT
  reference models rescaled as in the paper's offline approximation
  ``p(x) = ½((1 + a)·p_OUT(x) + (1 − a))``. As the authors' code (privacy_meter) does, as far as
  we know, we apply the same rescaling to ``p(z)``. Defaults ``a = 0.3``, ``γ = 1``.
- **LiRA** (Carlini, Chien, Nasr, Song, Terzis, Tramèr: "Membership Inference Attacks From
  First Principles", IEEE S&P 2022), offline variant: the OUT reference models' φ(x) are fitted
  with a Gaussian ``N(μ_OUT(x), σ²)`` and the score is the one-sided ``Pr[Z < φ_θ(x)]``
  (Algorithm 1 without the IN half). With few reference models (fewer than
  :data:`LIRA_PER_EXAMPLE_VARIANCE_MIN` OUT models per example) σ is one global value over all
  examples, as the paper recommends for small shadow-model counts ("fixed variance").

Deviations: one query per example (no augmented queries); OUT models only (the *online* variants
need IN models for the non-members too, which would mean training on the test images).

Metrics (:func:`roc_metrics`): ROC-AUC and the TPR at a fixed FPR (1 % and 0.1 %, the numbers both
papers report), each with a percentile bootstrap confidence interval over examples (members and
non-members resampled separately, seeded). TPR at FPR α is the largest TPR over thresholds with
FPR ≤ α; with fewer than 1/α non-members that is the TPR at FPR 0 (``n_nonmembers`` is reported).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from scar.errors import ConfigError, check_range
from scar.registry import Registry

log = logging.getLogger(__name__)

#: The FPRs at which the TPR is reported (metric keys ``tpr@1%``, ``tpr@0.1%``).
FPR_LEVELS: tuple[float, ...] = (0.01, 0.001)
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CI_LEVEL = 0.95
#: RMIA's offline scaling ``a`` and threshold ``γ`` (Zarifzadeh et al. 2024, offline variant).
RMIA_A = 0.3
RMIA_GAMMA = 1.0
#: Below this many OUT models per example LiRA uses one global variance (Carlini et al.'s
#: "fixed variance" for few shadow models).
LIRA_PER_EXAMPLE_VARIANCE_MIN = 16
#: Reference models trained by default: two complementary pairs (RMIA needs few; LiRA offline
#: with a global variance works with them too).
DEFAULT_REFERENCES = 4
#: A separating attack: original − oracle AUC at least this, with disjoint CIs (issue 14).
MIN_AUC_GAP = 0.1
#: Probabilities are clipped to [eps, 1 − eps] before ratios (float64).
_EPS = 1e-12


# ---------------------------------------------------------------- signals
def true_label_logodds(logits: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor
                       ) -> np.ndarray:
    """φ = z_y − logsumexp_{y'≠y} z_{y'} per row (= log p_y − log(1 − p_y)), float64 [N]."""
    z = torch.as_tensor(logits).detach().to("cpu", torch.float64)
    y = torch.as_tensor(labels).detach().to("cpu", torch.int64)
    if z.dim() != 2 or y.shape != (z.shape[0],):
        raise ConfigError(f"logits must be [N, C] with labels [N]; got {tuple(z.shape)} and "
                          f"{tuple(y.shape)}.")
    if z.shape[1] < 2:
        raise ConfigError(f"a membership attack needs at least 2 classes; got {z.shape[1]}.")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= z.shape[1]):
        raise ConfigError(f"labels must be in [0, {z.shape[1] - 1}]; got {int(y.min())} to "
                          f"{int(y.max())}.")
    true = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], float("-inf"))
    return (true - torch.logsumexp(others, dim=1)).numpy()


def _prob(logodds: np.ndarray) -> np.ndarray:
    # sigmoid, stable for large |φ|
    return np.clip(np.exp(-np.logaddexp(0.0, -logodds)), _EPS, 1.0 - _EPS)


def _check_signals(target: np.ndarray, refs: np.ndarray, out: np.ndarray, what: str
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    target = np.asarray(target, dtype=np.float64)
    refs = np.asarray(refs, dtype=np.float64)
    out = np.asarray(out, dtype=bool)
    if target.ndim != 1 or refs.ndim != 2 or refs.shape[1] != target.shape[0] \
            or out.shape != refs.shape:
        raise ConfigError(
            f"{what}: target signals must be [N], reference signals and their OUT mask [K, N]; "
            f"got {target.shape}, {refs.shape} and {out.shape}."
        )
    if not (np.all(np.isfinite(target)) and np.all(np.isfinite(refs))):
        raise ConfigError(f"{what}: the signals contain NaN or infinite values (a diverged "
                          "model?); they cannot be attacked.")
    missing = int((~out.any(axis=0)).sum())
    if missing:
        raise ConfigError(
            f"{what}: {missing} of {target.shape[0]} examples have no OUT reference model; the "
            "offline attacks need at least one reference model that did not train on each "
            "example (train reference models in complementary pairs)."
        )
    return target, refs, out


def _out_mean(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    return (values * out).sum(axis=0) / out.sum(axis=0)


# ---------------------------------------------------------------- the attacks
def rmia_scores(target_x: np.ndarray, refs_x: np.ndarray, out_x: np.ndarray,
                target_z: np.ndarray, refs_z: np.ndarray, out_z: np.ndarray | None = None, *,
                a: float = RMIA_A, gamma: float = RMIA_GAMMA) -> np.ndarray:
    """RMIA offline score of each x: the fraction of population samples z with
    ``LR(x, z) ≥ γ`` (see the module docstring). Inputs are logit-scaled confidences φ:
    ``target_x`` [N], ``refs_x`` [K, N] with ``out_x`` [K, N] (True where the reference model
    did not train on x); ``target_z`` [M], ``refs_z`` [K, M] (``out_z`` None: all OUT)."""
    check_range("RMIA a", a, 0.0, 1.0)
    check_range("RMIA gamma", gamma, 0.0, None, low_inclusive=False)
    target_x, refs_x, out_x = _check_signals(target_x, refs_x, out_x, "RMIA candidates")
    out_z = np.ones(np.shape(refs_z), dtype=bool) if out_z is None else out_z
    target_z, refs_z, out_z = _check_signals(target_z, refs_z, out_z, "RMIA population z")
    if target_z.size == 0:
        raise ConfigError("RMIA needs at least one population sample z; got none.")

    def ratio(target: np.ndarray, refs: np.ndarray, out: np.ndarray) -> np.ndarray:
        p_out = _out_mean(_prob(refs), out)
        p_marginal = 0.5 * ((1.0 + a) * p_out + (1.0 - a))  # offline approximation of p(x)
        return _prob(target) / p_marginal

    ratio_x = ratio(target_x, refs_x, out_x)
    ratio_z = np.sort(ratio(target_z, refs_z, out_z))
    # LR(x, z) >= γ  ⇔  ratio_z <= ratio_x / γ: count with one sorted search per x.
    return np.searchsorted(ratio_z, ratio_x / gamma, side="right") / ratio_z.size


def lira_scores(target_x: np.ndarray, refs_x: np.ndarray, out_x: np.ndarray,
                target_z: np.ndarray | None = None, refs_z: np.ndarray | None = None,
                out_z: np.ndarray | None = None, *, global_variance: bool | None = None
                ) -> np.ndarray:
    """LiRA offline score of each x: ``Pr[Z < φ_θ(x)]`` for ``Z ~ N(μ_OUT(x), σ²)``, as a log
    probability (monotone in the probability, and finite deep in the tail). Population samples
    are not used (accepted for a common signature). ``global_variance`` None: global when some
    example has fewer than :data:`LIRA_PER_EXAMPLE_VARIANCE_MIN` OUT models."""
    from scipy.stats import norm

    target_x, refs_x, out_x = _check_signals(target_x, refs_x, out_x, "LiRA candidates")
    counts = out_x.sum(axis=0)
    mu = _out_mean(refs_x, out_x)
    resid = (refs_x - mu) * out_x
    if global_variance is None:
        global_variance = bool(counts.min() < LIRA_PER_EXAMPLE_VARIANCE_MIN)
    if global_variance:
        dof = max(int(counts.sum() - counts.size), 1)
        sigma = np.full_like(mu, math.sqrt(float((resid**2).sum()) / dof))
    else:
        sigma = np.sqrt((resid**2).sum(axis=0) / np.maximum(counts - 1, 1))
    sigma = np.maximum(sigma, 1e-6)
    return norm.logcdf(target_x, loc=mu, scale=sigma)


class AttackFn(Protocol):
    def __call__(self, target_x: np.ndarray, refs_x: np.ndarray, out_x: np.ndarray,
                 target_z: np.ndarray, refs_z: np.ndarray, out_z: np.ndarray | None = None
                 ) -> np.ndarray: ...


#: name → attack statistic (higher = more likely a member); ``scar evaluate --audit NAME``.
ATTACKS: Registry[AttackFn] = Registry("membership audit")
ATTACKS.register("rmia", "RMIA offline (Zarifzadeh et al. 2024), a=0.3, gamma=1")(rmia_scores)
ATTACKS.register("lira", "LiRA offline (Carlini et al. 2022), Gaussian fit of OUT models")(
    lira_scores)


# ---------------------------------------------------------------- ROC metrics
def auc_score(members: np.ndarray, nonmembers: np.ndarray) -> float:
    """ROC-AUC = Pr[score(member) > score(non-member)] + ½ Pr[tie] (Mann-Whitney)."""
    m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    both = np.concatenate([m, n])
    order = both.argsort(kind="mergesort")
    ranks = np.empty(both.size, dtype=np.float64)
    ranks[order] = np.arange(1, both.size + 1)
    # average ranks of ties
    sorted_vals = both[order]
    _, first, counts = np.unique(sorted_vals, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[: m.size].sum() - m.size * (m.size + 1) / 2.0) / (m.size * n.size))


def tpr_at_fpr(members: np.ndarray, nonmembers: np.ndarray, fpr: float) -> float:
    """Largest TPR over thresholds t ("member" when score > t) with FPR ≤ ``fpr``."""
    n = np.sort(np.asarray(nonmembers, np.float64))[::-1]
    allowed = int(math.floor(fpr * n.size + 1e-9))  # false positives allowed
    threshold = n[allowed] if allowed < n.size else -np.inf
    return float(np.mean(np.asarray(members, np.float64) > threshold))


def _metric_fns() -> dict[str, Callable[[np.ndarray, np.ndarray], float]]:
    fns: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {"auc": auc_score}
    for level in FPR_LEVELS:
        fns[tpr_key(level)] = lambda m, n, level=level: tpr_at_fpr(m, n, level)
    return fns


def tpr_key(level: float) -> str:
    """``tpr@1%``, ``tpr@0.1%``."""
    return f"tpr@{100 * level:g}%"


def bootstrap_ci(members: np.ndarray, nonmembers: np.ndarray,
                 stat: Callable[[np.ndarray, np.ndarray], float], *,
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(members, nonmembers)``: both groups resampled with
    replacement (separately, keeping their sizes), ``resamples`` times, seeded."""
    check_range("bootstrap level", level, 0, 1, low_inclusive=False, high_inclusive=False)
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ConfigError(f"bootstrap resamples must be an integer >= 1; got {resamples!r}.")
    m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    rng = np.random.default_rng(seed)
    values = np.empty(resamples)
    for b in range(resamples):
        values[b] = stat(m[rng.integers(0, m.size, m.size)], n[rng.integers(0, n.size, n.size)])
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(values, [tail, 1.0 - tail])
    return float(lo), float(hi)


@dataclass(frozen=True)
class AuditResult:
    """One model's membership audit: point values and bootstrap CIs of AUC and TPR@FPR."""

    attack: str
    values: dict[str, float]  # "auc", "tpr@1%", "tpr@0.1%"
    ci: dict[str, tuple[float, float]]
    n_members: int
    n_nonmembers: int
    n_references: int
    n_population: int = 0

    @property
    def auc(self) -> float:
        return self.values["auc"]

    def to_metrics(self, prefix: str = "audit") -> dict[str, Any]:
        """``audit/auc``, ``audit/auc_lo``, ``audit/auc_hi``, ``audit/tpr@1%`` (+ ``_lo``/``_hi``),
        …, ``audit/attack``, ``audit/n_members``, …"""
        out: dict[str, Any] = {}
        for key, value in self.values.items():
            lo, hi = self.ci[key]
            out.update({f"{prefix}/{key}": value, f"{prefix}/{key}_lo": lo,
                        f"{prefix}/{key}_hi": hi})
        out.update({f"{prefix}/attack": self.attack, f"{prefix}/n_members": self.n_members,
                    f"{prefix}/n_nonmembers": self.n_nonmembers,
                    f"{prefix}/n_references": self.n_references,
                    f"{prefix}/n_population": self.n_population})
        return out

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], prefix: str = "audit") -> AuditResult | None:
        """The inverse of :meth:`to_metrics` (None when the metrics hold no audit)."""
        if f"{prefix}/auc" not in metrics:
            return None
        keys = list(_metric_fns())
        return cls(
            attack=str(metrics.get(f"{prefix}/attack", "likelihood-ratio")),
            values={k: float(metrics[f"{prefix}/{k}"]) for k in keys},
            ci={k: (float(metrics[f"{prefix}/{k}_lo"]), float(metrics[f"{prefix}/{k}_hi"]))
                for k in keys},
            n_members=int(metrics.get(f"{prefix}/n_members", 0)),
            n_nonmembers=int(metrics.get(f"{prefix}/n_nonmembers", 0)),
            n_references=int(metrics.get(f"{prefix}/n_references", 0)),
            n_population=int(metrics.get(f"{prefix}/n_population", 0)),
        )


def roc_metrics(members: np.ndarray, nonmembers: np.ndarray, *, attack: str = "?",
                n_references: int = 0, n_population: int = 0,
                resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
                ) -> AuditResult:
    """AUC and TPR at each of :data:`FPR_LEVELS`, each with its bootstrap CI."""
    m, n = np.asarray(members, np.float64), np.asarray(nonmembers, np.float64)
    if m.ndim != 1 or n.ndim != 1 or m.size == 0 or n.size == 0:
        raise ConfigError(f"membership scores must be two non-empty 1-D arrays; got shapes "
                          f"{m.shape} and {n.shape}.")
    values, ci = {}, {}
    for key, fn in _metric_fns().items():
        values[key] = fn(m, n)
        ci[key] = bootstrap_ci(m, n, fn, resamples=resamples, seed=seed)
    return AuditResult(attack=attack, values=values, ci=ci, n_members=int(m.size),
                       n_nonmembers=int(n.size), n_references=n_references,
                       n_population=n_population)


def audit_separates(original: AuditResult, oracle: AuditResult,
                    min_gap: float = MIN_AUC_GAP) -> bool:
    """The audit tells the original from the oracle: AUC gap ≥ ``min_gap`` and the two AUC
    confidence intervals do not overlap."""
    gap = original.auc - oracle.auc
    disjoint = original.ci["auc"][0] > oracle.ci["auc"][1] or \
        oracle.ci["auc"][0] > original.ci["auc"][1]
    return abs(gap) >= min_gap and disjoint


def audit_values(original: AuditResult, oracle: AuditResult) -> str:
    """``AUC 0.812 [0.79, 0.83] vs 0.503 [0.47, 0.53]`` for separation notes."""
    def fmt(r: AuditResult) -> str:
        lo, hi = r.ci["auc"]
        return f"{r.auc:.3f} [{lo:.3f}, {hi:.3f}]"

    return f"AUC {fmt(original)} vs {fmt(oracle)} ({100 * CI_LEVEL:g}% bootstrap CIs)"
