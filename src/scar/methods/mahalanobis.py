"""SCAR's metric-forgetting term: class statistics, shrunk precisions, Mahalanobis distances.

Pure math only (spec ``scar-method.md`` sections 1–3); the training loop lives elsewhere.

Pipeline
--------
1. Class distributions Q_c (section 1): features ``f`` of class ``c`` go through the Tukey
   transform ``g = f^δ`` (:func:`tukey`), and :class:`StatsAccumulator` collects the per-class mean
   ``μ_c`` and unbiased covariance ``S_c`` of ``g`` in float64 → :class:`ClassStats`.
2. Precision (section 1, steps 4–6, :func:`precision_matrices`):
   ``P_c = pinv(corr(shrink^k(S_c)))`` with ``k = 2`` by default (the reference code shrinks twice;
   ``shrink_times=1`` is the paper's version).
3. Distance (section 2, :class:`MahalanobisHead`): ``u = L2normalize(f^δ)``,
   ``m_c = L2normalize(μ_c)``, ``d_c = (u − m_c)ᵀ P_c (u − m_c)`` (squared form). ``P_c`` is
   factored once as ``W_c W_cᵀ`` (:func:`precision_factors`), so ``d_c = ‖W_cᵀu − W_cᵀm_c‖²`` for
   all classes is one GEMM ``[B, d] @ [d, C·r]``: cost ``O(B·C·d·r)``, never a ``B × B`` matrix
   (the reference code builds one per class and keeps its diagonal).
4. Nearest wrong class (section 3, :meth:`MahalanobisHead.nearest_wrong_class`): argmin over kept
   classes ``c ≠ label``, returned as *class ids* (the reference code mixes up the position in the
   list of kept classes with the class id, which is wrong as soon as a class is skipped).

Negative features (ViT CLS tokens): ``f^δ`` is undefined for ``f < 0`` and ``δ < 1``. The default
``tukey_mode="signed"`` uses the odd extension ``sign(f)·|f|^δ`` (keeps the information carried by
the sign); ``"clamp"`` maps negatives to 0 first. ``δ = 1`` is the identity in both modes.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scar.errors import ConfigError, check_choice, check_range

# Class statistics live below the methods and the training code (both use them); re-exported
# here, where the math of this module starts from them.
from scar.statistics import (  # noqa: F401
    TUKEY_EPS,
    TUKEY_MODES,
    ClassStats,
    StatsAccumulator,
    inverse_tukey,
    tukey,
)

logger = logging.getLogger(__name__)

#: Shrinkage defaults (spec section 1): γ1 = γ2 = 3, applied twice as in the reference code
#: (once is the paper's text). SCAR's hyperparameters gamma_1, gamma_2, shrink_times default
#: to these.
DEFAULT_GAMMA = 3.0
DEFAULT_SHRINK_TIMES = 2

#: Variances below this are treated as this when dividing by σσᵀ. After shrinkage a zero diagonal
#: entry only occurs for an all-zero matrix (a PSD matrix with zero variance has a zero row), so
#: the guard turns 0/0 into 0 instead of NaN and changes nothing else.
VARIANCE_EPS = 1e-12

# --------------------------------------------------------------------------------------------
# Shrinkage, normalisation, precision
# --------------------------------------------------------------------------------------------


def shrink(s: Tensor, gamma_1: float, gamma_2: float) -> Tensor:
    """``S + γ1·V1·I + γ2·V2·(11ᵀ − I)``, batched over leading dims ``[..., d, d]``.

    ``V1`` = mean of diag(S); ``V2`` = mean of the *non-zero* off-diagonal entries (0 if there are
    none). Zero off-diagonals are exact structural zeros (e.g. dead ReLU units, whose rows and
    columns vanish), which would otherwise dilute V2.
    """
    d = s.shape[-1]
    if s.dim() < 2 or s.shape[-2] != d:
        raise ConfigError(f"shrink needs square matrices [..., d, d]; got {tuple(s.shape)}.")
    eye = torch.eye(d, dtype=torch.bool, device=s.device)
    v1 = torch.diagonal(s, dim1=-2, dim2=-1).mean(-1)
    off = s.masked_fill(eye, 0.0)
    nonzero = (off != 0).sum((-2, -1))
    v2 = off.sum((-2, -1)) / nonzero.clamp_min(1)  # no non-zero entry → sum is 0 → V2 = 0
    eye_f = eye.to(s.dtype)
    return (s + (gamma_1 * v1)[..., None, None] * eye_f
            + (gamma_2 * v2)[..., None, None] * (1 - eye_f))


def correlation_normalize(s: Tensor) -> Tensor:
    """``S / (σσᵀ)`` with ``σ = sqrt(diag S)``: unit diagonal (batched ``[..., d, d]``).

    Variances are floored at :data:`VARIANCE_EPS` so a zero-variance row (necessarily all zero in
    a PSD matrix) stays zero instead of becoming NaN.
    """
    sigma = torch.diagonal(s, dim1=-2, dim2=-1).clamp_min(VARIANCE_EPS).sqrt()
    return s / (sigma[..., :, None] * sigma[..., None, :])


def precision_matrices(
    covs: Tensor, gamma_1: float = DEFAULT_GAMMA, gamma_2: float = DEFAULT_GAMMA,
    shrink_times: int = DEFAULT_SHRINK_TIMES,
) -> Tensor:
    """``P = pinv(corr(shrink^k(S)))`` per class, float64, ``[C, d, d]`` → ``[C, d, d]``.

    ``shrink_times=2`` is the reference code (V1, V2 recomputed on the shrunk matrix);
    ``shrink_times=1`` is the paper; 0 skips shrinkage (ablation only). When all off-diagonals
    are non-zero, shrinking twice equals shrinking once with ``γ' = γ(2 + γ)`` (15 for γ = 3).
    """
    check_range("gamma_1", gamma_1, 0.0, None)
    check_range("gamma_2", gamma_2, 0.0, None)
    if isinstance(shrink_times, bool) or not isinstance(shrink_times, int) or shrink_times < 0:
        raise ConfigError(f"shrink_times must be an integer >= 0; got {shrink_times!r}.")
    s = covs.to(torch.float64)
    for _ in range(shrink_times):
        s = shrink(s, gamma_1, gamma_2)
    s = correlation_normalize(s)
    return torch.linalg.pinv(s, hermitian=True)


def precision_factors(p: Tensor) -> Tensor:
    """``W`` with ``P = W Wᵀ`` (batched ``[..., d, d]`` → ``[..., d, d]``), by eigendecomposition.

    ``P`` is PSD in exact arithmetic; rounding can leave eigenvalues like −1e-17, which are clamped
    to 0 before the square root (their directions then contribute nothing to the distance).
    """
    p = 0.5 * (p + p.transpose(-1, -2))  # eigh reads one triangle; make both agree
    evals, evecs = torch.linalg.eigh(p)
    return evecs * evals.clamp_min(0.0).sqrt()[..., None, :]


# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------


class MahalanobisHead(nn.Module):
    """Batched SCAR distances ``d_c(x) = ‖W_cᵀ(u − m_c)‖²`` to every kept class (no parameters).

    Built once from :class:`ClassStats`; buffers (float64 unless moved with ``.to``):
    ``class_ids`` [K] (position → class id), ``means`` [K, d] (``m_c = μ_c/‖μ_c‖``),
    ``factors_flat`` [d, K·r] (``W_c`` side by side, so all classes are one GEMM) and
    ``proj_means`` [K, r] (``W_cᵀ m_c``). Inputs are cast to the features' dtype and device on
    each call; call ``head.to(device, dtype)`` once to make that a no-op.
    """

    def __init__(
        self,
        stats: ClassStats,
        *,
        gamma_1: float = DEFAULT_GAMMA,
        gamma_2: float = DEFAULT_GAMMA,
        shrink_times: int = DEFAULT_SHRINK_TIMES,
        delta: float | None = None,
        tukey_mode: str | None = None,
    ):
        super().__init__()
        delta = stats.delta if delta is None else delta
        tukey_mode = stats.tukey_mode if tukey_mode is None else tukey_mode
        check_choice("tukey_mode", tukey_mode, TUKEY_MODES)
        if abs(delta - stats.delta) > 1e-12:
            # Means and covariances live in the stats' Tukey space; another δ would compare
            # features and statistics in different spaces.
            raise ConfigError(
                f"delta={delta} does not match the statistics' delta={stats.delta}; recompute "
                "the statistics or pass delta=None."
            )
        if stats.classes.numel() == 0:
            raise ConfigError("No class has statistics; cannot build a Mahalanobis head.")
        if tukey_mode != stats.tukey_mode:
            # Identical on non-negative features; on negative ones the statistics were taken in
            # another space than the one the distances will use.
            logger.warning(
                "tukey_mode=%r differs from the statistics' %r; distances of negative features "
                "will not match the statistics' space.",
                tukey_mode,
                stats.tukey_mode,
            )
        self.delta, self.tukey_mode = float(delta), tukey_mode
        self.gamma_1, self.gamma_2, self.shrink_times = gamma_1, gamma_2, shrink_times
        self.num_classes, self.dim = stats.num_classes, stats.dim

        class_ids = stats.classes.clone()
        position_of = torch.full((stats.num_classes,), -1, dtype=torch.long)
        position_of[class_ids] = torch.arange(class_ids.numel())
        p = precision_matrices(stats.covs[class_ids], gamma_1, gamma_2, shrink_times)
        w = precision_factors(p)  # [K, d, r]
        means = F.normalize(stats.means[class_ids].to(torch.float64), dim=-1)
        k, d, r = w.shape
        self.rank = r
        self.register_buffer("class_ids", class_ids)
        self.register_buffer("position_of", position_of)
        self.register_buffer("means", means)
        self.register_buffer("factors_flat", w.permute(1, 0, 2).reshape(d, k * r).contiguous())
        self.register_buffer("proj_means", torch.einsum("cdr,cd->cr", w, means))

    @property
    def factors(self) -> Tensor:
        """``W`` as [K, d, r] (a view of ``factors_flat``)."""
        k = self.class_ids.numel()
        return self.factors_flat.view(self.dim, k, self.rank).permute(1, 0, 2)

    def extra_repr(self) -> str:
        return (
            f"classes={self.class_ids.tolist()}, dim={self.dim}, delta={self.delta}, "
            f"tukey_mode={self.tukey_mode!r}, gamma=({self.gamma_1}, {self.gamma_2}), "
            f"shrink_times={self.shrink_times}"
        )

    def embed(self, features: Tensor) -> Tensor:
        """``u = L2normalize(tukey(f))`` (differentiable)."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ConfigError(f"features must be [B, {self.dim}]; got {tuple(features.shape)}.")
        return F.normalize(tukey(features, self.delta, self.tukey_mode), dim=-1)

    def distances(self, features: Tensor) -> Tensor:
        """``[B, K]`` squared distances to the kept classes (column j ↔ ``class_ids[j]``).

        Difference form ``‖W_cᵀu − W_cᵀm_c‖²`` (not the expanded three-term sum, which cancels
        badly in float32 when u ≈ m_c). Memory: one ``[B, K·r]`` projection.
        """
        u = self.embed(features)
        w = self.factors_flat.to(device=u.device, dtype=u.dtype)
        pm = self.proj_means.to(device=u.device, dtype=u.dtype)
        proj = (u @ w).view(u.shape[0], pm.shape[0], pm.shape[1])  # [B, K, r]
        return (proj - pm).square().sum(-1)

    def positions(self, class_ids: Tensor) -> Tensor:
        """Positions (columns of :meth:`distances`) of class ids; ConfigError if any is missing."""
        ids = torch.as_tensor(class_ids).to(self.position_of.device, torch.long).reshape(-1)
        in_range = (ids >= 0) & (ids < self.num_classes)
        pos = torch.where(in_range, self.position_of[ids.clamp(0, self.num_classes - 1)], -1)
        if bool((pos < 0).any()):
            bad = sorted(set(ids[pos < 0].tolist()))
            raise ConfigError(
                f"Classes {bad} have no statistics in this Mahalanobis head; "
                f"classes with statistics: {self.class_ids.tolist()}."
            )
        return pos

    def distance_to(self, features: Tensor, target_class_ids: Tensor,
                    points: Tensor | None = None) -> Tensor:
        """``[B]``: distance of each sample to its own target class (differentiable).

        With ``points`` ([B, d], in the embedded space of :meth:`embed`), the distance of each
        sample to its own point instead of the class mean, in its target class's metric.
        """
        target = torch.as_tensor(target_class_ids).reshape(-1)
        if target.numel() != features.shape[0]:
            raise ConfigError(
                f"target_class_ids needs one entry per sample ({features.shape[0]}); "
                f"got {target.numel()}."
            )
        pos = self.positions(target).to(features.device)
        u = self.embed(features)
        if points is not None:
            # (u − p)ᵀ P_c (u − p) = ‖W_cᵀu − W_cᵀp‖²: shift u by p − m_c and reuse W_cᵀm_c.
            u = u - points.to(device=u.device, dtype=u.dtype) + self.means[pos].to(u.dtype)
        w = self.factors.to(device=u.device, dtype=u.dtype)  # [K, d, r]
        pm = self.proj_means.to(device=u.device, dtype=u.dtype)  # [K, r]
        # Only each sample's own target: group the batch by target class, so the cost is
        # B·d·r (not B·K·d·r as with the full distance matrix) and memory stays O(B·r).
        order = torch.argsort(pos)
        sorted_pos = pos[order]
        classes, counts = torch.unique_consecutive(sorted_pos, return_counts=True)
        pieces = []
        for c, rows in zip(classes.tolist(), order.split(counts.tolist())):
            pieces.append((u[rows] @ w[c] - pm[c]).square().sum(-1))
        out = torch.cat(pieces)
        return out[torch.argsort(order)]

    @torch.no_grad()
    def nearest_wrong_class(self, features: Tensor, labels: Tensor) -> Tensor:
        """``[B]`` class ids: argmin over kept classes ``c ≠ label`` of ``d_c`` (section 3).

        Labels may be classes without statistics (e.g. the removed class in class removal): then
        every kept class is a candidate. Ties go to the lowest class id.
        """
        labels = torch.as_tensor(labels).reshape(-1).to(features.device, torch.long)
        if labels.numel() != features.shape[0]:
            raise ConfigError(
                f"labels need one entry per sample ({features.shape[0]}); got {labels.numel()}."
            )
        dist = self.distances(features)
        ids = self.class_ids.to(features.device)
        own = ids[None, :] == labels[:, None]  # compare class ids with class ids, not positions
        if bool(own.all(1).any()):
            raise ConfigError(
                f"No wrong class to move towards: the only class with statistics is "
                f"{ids.tolist()}, which is the label of some samples. At least two classes need "
                "statistics."
            )
        pos = dist.masked_fill(own, float("inf")).argmin(1)
        return ids[pos]


def direct_distances(
    features: Tensor,
    stats: ClassStats,
    *,
    gamma_1: float = DEFAULT_GAMMA,
    gamma_2: float = DEFAULT_GAMMA,
    shrink_times: int = DEFAULT_SHRINK_TIMES,
    tukey_mode: str | None = None,
) -> Tensor:
    """Slow, obviously correct reference: ``(u − m_c)ᵀ P_c (u − m_c)`` by explicit loops.

    float64, ``[B, K]`` with columns in ``stats.classes`` order. For tests and benchmarks only.
    """
    mode = stats.tukey_mode if tukey_mode is None else tukey_mode
    ids = stats.classes
    p = precision_matrices(stats.covs[ids], gamma_1, gamma_2, shrink_times)
    f = features.detach().to("cpu", torch.float64)
    out = torch.empty(f.shape[0], ids.numel(), dtype=torch.float64)
    for i in range(f.shape[0]):
        g = tukey(f[i], stats.delta, mode)
        u = g / g.norm().clamp_min(1e-12)
        for j, c in enumerate(ids.tolist()):
            mu = stats.means[c].to(torch.float64)
            m = mu / mu.norm().clamp_min(1e-12)
            diff = u - m
            out[i, j] = diff @ p[j] @ diff
    return out
