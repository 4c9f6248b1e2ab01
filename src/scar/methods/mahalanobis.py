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

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scar.errors import CheckpointError, ConfigError, check_choice, check_range

logger = logging.getLogger(__name__)

TUKEY_MODES = ("signed", "clamp")

#: Below this magnitude ``|f|^δ`` (δ < 1) is replaced by the straight line through 0 and
#: ``(eps, eps^δ)``: the derivative ``δ·|f|^(δ−1)`` is infinite at 0, the line's slope
#: ``eps^(δ−1)`` is not (1e3 for δ = 0.5). Values with ``|f| ≥ eps`` are exact (no bias, unlike
#: ``(|f| + eps)^δ − eps^δ``), and the deviation below eps is < eps^δ = 1e-3 for δ = 0.5.
TUKEY_EPS = 1e-6

#: Variances below this are treated as this when dividing by σσᵀ. After shrinkage a zero diagonal
#: entry only occurs for an all-zero matrix (a PSD matrix with zero variance has a zero row), so
#: the guard turns 0/0 into 0 instead of NaN and changes nothing else.
VARIANCE_EPS = 1e-12

_FORMAT = "scar.class_stats"
_FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------
# Tukey transform
# --------------------------------------------------------------------------------------------


def tukey(f: Tensor, delta: float, mode: str = "signed", eps: float = TUKEY_EPS) -> Tensor:
    """Tukey's power transform ``f^δ``, element-wise, never NaN, with finite gradients.

    ``mode="signed"``: ``sign(f)·|f|^δ`` (equals ``f^δ`` on non-negative features);
    ``mode="clamp"``: ``max(f, 0)^δ``. ``delta == 1`` returns ``f`` unchanged in both modes.
    For ``δ < 1`` the power is linearised on ``|f| < eps`` (see :data:`TUKEY_EPS`) so that the
    gradient at ``f = 0`` is ``eps^(δ−1)``, not ``inf``.
    """
    check_range("delta", delta, 0.0, None, low_inclusive=False)
    check_choice("tukey mode", mode, TUKEY_MODES)
    if delta == 1:
        return f
    if mode == "clamp":
        f = f.clamp_min(0.0)  # clamp's gradient passes at exactly 0, so f = 0 still gets one
    a = f.abs()
    if delta > 1:
        # δ·|f|^(δ−1) is finite (0) at 0: the plain power is safe.
        return torch.sign(f) * a.pow(delta)
    # clamp_min inside the unused branch matters: torch.where back-propagates 0 · (branch grad),
    # and 0 · inf = NaN, so the pow branch must never see |f| < eps.
    power = torch.sign(f) * a.clamp_min(eps).pow(delta)
    linear = f * eps ** (delta - 1.0)
    return torch.where(a < eps, linear, power)


def inverse_tukey(g: Tensor, delta: float, mode: str = "signed") -> Tensor:
    """Features whose Tukey transform is ``g``: ``sign(g)·|g|^(1/δ)`` (``signed``) or
    ``max(g, 0)^(1/δ)`` (``clamp``, whose features are never negative). Inverts :func:`tukey`
    away from its linearised ``|f| < eps`` band."""
    check_range("delta", delta, 0.0, None, low_inclusive=False)
    check_choice("tukey mode", mode, TUKEY_MODES)
    if mode == "clamp":
        g = g.clamp_min(0.0)
    return torch.sign(g) * g.abs().pow(1.0 / delta)


# --------------------------------------------------------------------------------------------
# Class statistics
# --------------------------------------------------------------------------------------------


@dataclass
class ClassStats:
    """Per-class Tukey-space statistics, indexed by class id.

    ``means`` [C, d] and ``covs`` [C, d, d] (float64, unbiased covariance) hold zeros for classes
    without statistics; ``counts`` [C] is the number of samples seen per class; ``classes`` (sorted
    int64) lists the class ids that *have* statistics. ``delta`` / ``tukey_mode`` record the
    transform the means and covariances live in.
    """

    means: Tensor
    covs: Tensor
    counts: Tensor
    classes: Tensor
    delta: float
    tukey_mode: str = "signed"

    def __post_init__(self) -> None:
        check_range("delta", self.delta, 0.0, None, low_inclusive=False)
        check_choice("tukey_mode", self.tukey_mode, TUKEY_MODES)
        if self.means.dim() != 2:
            raise ConfigError(f"ClassStats.means must be [C, d]; got {tuple(self.means.shape)}.")
        c, d = self.means.shape
        if tuple(self.covs.shape) != (c, d, d):
            raise ConfigError(
                f"ClassStats.covs must be [{c}, {d}, {d}] to match means; "
                f"got {tuple(self.covs.shape)}."
            )
        if tuple(self.counts.shape) != (c,):
            raise ConfigError(f"ClassStats.counts must be [{c}]; got {tuple(self.counts.shape)}.")
        self.classes = torch.as_tensor(self.classes, dtype=torch.long).reshape(-1)
        self.classes = torch.unique(self.classes)  # sorted, no duplicates
        if self.classes.numel() and (self.classes.min() < 0 or self.classes.max() >= c):
            raise ConfigError(
                f"ClassStats.classes must be class ids in [0, {c}); got {self.classes.tolist()}."
            )

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def subset(self, keep_classes: Tensor | list[int]) -> ClassStats:
        """Statistics of ``keep_classes`` only (e.g. the kept classes in class removal).

        Dropped classes get zero means, covariances and counts, so a saved subset carries
        nothing about them. Asking to keep a class without statistics raises ConfigError.
        """
        keep = torch.unique(torch.as_tensor(keep_classes, dtype=torch.long).reshape(-1))
        missing = sorted(set(keep.tolist()) - set(self.classes.tolist()))
        if missing:
            raise ConfigError(
                f"Cannot keep classes {missing}: they have no statistics. "
                f"Classes with statistics: {self.classes.tolist()}."
            )
        mask = torch.zeros(self.num_classes, dtype=torch.bool)
        mask[keep] = True
        return ClassStats(
            means=torch.where(mask[:, None], self.means, torch.zeros_like(self.means)),
            covs=torch.where(mask[:, None, None], self.covs, torch.zeros_like(self.covs)),
            counts=torch.where(mask, self.counts, torch.zeros_like(self.counts)),
            classes=keep,
            delta=self.delta,
            tukey_mode=self.tukey_mode,
        )

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (tensors + JSON metadata in the header; no pickle)."""
        from safetensors.torch import save_file

        tensors = {
            "means": self.means.detach().to("cpu", torch.float64).contiguous(),
            "covs": self.covs.detach().to("cpu", torch.float64).contiguous(),
            "counts": self.counts.detach().to("cpu", torch.long).contiguous(),
            "classes": self.classes.detach().to("cpu", torch.long).contiguous(),
        }
        meta = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "delta": float(self.delta),
            "tukey_mode": self.tukey_mode,
            "num_classes": self.num_classes,
            "dim": self.dim,
        }
        save_file(tensors, str(path), metadata={"scar": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | Path) -> ClassStats:
        """Read a file written by :meth:`save`; CheckpointError if it is not one."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                header = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except FileNotFoundError as exc:
            raise CheckpointError(f"Class statistics file {path} does not exist.") from exc
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}).") from exc
        try:
            meta = json.loads(header["scar"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise CheckpointError(
                f"{path} has no SCAR class-statistics metadata; it was not written by "
                "ClassStats.save."
            ) from exc
        if meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
            raise CheckpointError(
                f"{path} holds format {meta.get('format')!r} version {meta.get('version')!r}; "
                f"expected {_FORMAT!r} version {_FORMAT_VERSION}."
            )
        missing = {"means", "covs", "counts", "classes"} - set(tensors)
        if missing:
            raise CheckpointError(f"{path} lacks tensors {sorted(missing)}.")
        return cls(
            means=tensors["means"],
            covs=tensors["covs"],
            counts=tensors["counts"],
            classes=tensors["classes"],
            delta=float(meta["delta"]),
            tukey_mode=str(meta["tukey_mode"]),
        )


class StatsAccumulator:
    """Streaming per-class mean and covariance of Tukey-transformed features, in float64.

    Each batch is reduced per class to (count, mean, centred scatter M2) and merged into the
    running state with Chan et al.'s parallel update
    ``M2 = M2_a + M2_b + δδᵀ·n_a·n_b/n`` (δ = mean_b − mean_a). Unlike raw sums of outer
    products, this never subtracts two large, nearly equal numbers (``Σggᵀ − n·μμᵀ``), so it stays
    accurate even when the mean is large compared with the spread. The result does not depend on
    how the features are split into batches (up to rounding).
    State is ``C·d²`` float64 numbers (e.g. 100 classes × 512² → 210 MB) on the device of the
    first batch.
    """

    def __init__(self, num_classes: int, dim: int, delta: float, tukey_mode: str = "signed"):
        check_range("num_classes", num_classes, 1, None)
        check_range("dim", dim, 1, None)
        check_range("delta", delta, 0.0, None, low_inclusive=False)
        check_choice("tukey_mode", tukey_mode, TUKEY_MODES)
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.delta, self.tukey_mode = float(delta), tukey_mode
        self._count: Tensor | None = None  # [C] int64
        self._mean: Tensor | None = None  # [C, d] float64
        self._m2: Tensor | None = None  # [C, d, d] float64

    def _init_state(self, device: torch.device) -> None:
        c, d = self.num_classes, self.dim
        self._count = torch.zeros(c, dtype=torch.long, device=device)
        self._mean = torch.zeros(c, d, dtype=torch.float64, device=device)
        self._m2 = torch.zeros(c, d, d, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, features: Tensor, labels: Tensor) -> None:
        """Add a batch of raw (not yet transformed) features [B, d] with class ids [B]."""
        if features.dim() != 2 or features.shape[1] != self.dim:
            raise ConfigError(f"features must be [B, {self.dim}]; got {tuple(features.shape)}.")
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != features.shape[0]:
            raise ConfigError(
                f"labels must have one entry per feature row ({features.shape[0]}); "
                f"got {labels.numel()}."
            )
        if labels.numel() == 0:
            return
        labels = labels.to(features.device, torch.long)
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ConfigError(
                f"labels must be class ids in [0, {self.num_classes}); got values in "
                f"[{int(labels.min())}, {int(labels.max())}]."
            )
        if self._count is None:
            self._init_state(features.device)
        assert self._count is not None and self._mean is not None and self._m2 is not None
        g = tukey(
            features.detach().to(self._mean.device, torch.float64), self.delta, self.tukey_mode
        )
        labels = labels.to(self._mean.device)
        for c in torch.unique(labels).tolist():
            x = g[labels == c]
            n_b = x.shape[0]
            mean_b = x.mean(0)
            xc = x - mean_b
            m2_b = xc.T @ xc
            n_a = int(self._count[c])
            n = n_a + n_b
            diff = mean_b - self._mean[c]
            self._mean[c] += diff * (n_b / n)
            self._m2[c] += m2_b + torch.outer(diff, diff) * (n_a * n_b / n)
            self._count[c] = n

    def finalize(self, min_count: int = 2) -> ClassStats:
        """Unbiased statistics; classes with fewer than ``min_count`` samples get none.

        Such classes are left out of ``ClassStats.classes`` (the caller decides whether that is
        an error): a warning names classes seen fewer than ``min_count`` times, an info message
        names classes never seen (expected for removed classes in class removal).
        """
        check_range("min_count", min_count, 2, None)  # n − 1 ≥ 1 for the unbiased estimate
        c, d = self.num_classes, self.dim
        if self._count is None:
            count = torch.zeros(c, dtype=torch.long)
            mean = torch.zeros(c, d, dtype=torch.float64)
            m2 = torch.zeros(c, d, d, dtype=torch.float64)
        else:
            count, mean, m2 = self._count.cpu(), self._mean.cpu(), self._m2.cpu()
        ok = count >= min_count
        few = ((count > 0) & ~ok).nonzero().flatten().tolist()
        unseen = (count == 0).nonzero().flatten().tolist()
        if few:
            logger.warning(
                "Classes %s have fewer than %d samples (counts %s): no statistics for them.",
                few,
                min_count,
                count[few].tolist(),
            )
        if unseen:
            logger.info("Classes %s had no samples: no statistics for them.", unseen)
        denom = (count - 1).clamp_min(1).to(torch.float64)
        covs = m2 / denom[:, None, None]
        covs = 0.5 * (covs + covs.transpose(-1, -2))  # exact symmetry for eigh / pinv later
        covs = torch.where(ok[:, None, None], covs, torch.zeros_like(covs))
        means = torch.where(ok[:, None], mean, torch.zeros_like(mean))
        return ClassStats(
            means=means,
            covs=covs,
            counts=count.clone(),
            classes=ok.nonzero().flatten(),
            delta=self.delta,
            tukey_mode=self.tukey_mode,
        )


# --------------------------------------------------------------------------------------------
# Shrinkage, normalisation, precision
# --------------------------------------------------------------------------------------------


def shrink(s: Tensor, gamma1: float, gamma2: float) -> Tensor:
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
    return s + (gamma1 * v1)[..., None, None] * eye_f + (gamma2 * v2)[..., None, None] * (1 - eye_f)


def correlation_normalize(s: Tensor) -> Tensor:
    """``S / (σσᵀ)`` with ``σ = sqrt(diag S)``: unit diagonal (batched ``[..., d, d]``).

    Variances are floored at :data:`VARIANCE_EPS` so a zero-variance row (necessarily all zero in
    a PSD matrix) stays zero instead of becoming NaN.
    """
    sigma = torch.diagonal(s, dim1=-2, dim2=-1).clamp_min(VARIANCE_EPS).sqrt()
    return s / (sigma[..., :, None] * sigma[..., None, :])


def precision_matrices(
    covs: Tensor, gamma1: float = 3.0, gamma2: float = 3.0, shrink_times: int = 2
) -> Tensor:
    """``P = pinv(corr(shrink^k(S)))`` per class, float64, ``[C, d, d]`` → ``[C, d, d]``.

    ``shrink_times=2`` is the reference code (V1, V2 recomputed on the shrunk matrix);
    ``shrink_times=1`` is the paper; 0 skips shrinkage (ablation only). When all off-diagonals
    are non-zero, shrinking twice equals shrinking once with ``γ' = γ(2 + γ)`` (15 for γ = 3).
    """
    check_range("gamma1", gamma1, 0.0, None)
    check_range("gamma2", gamma2, 0.0, None)
    if isinstance(shrink_times, bool) or not isinstance(shrink_times, int) or shrink_times < 0:
        raise ConfigError(f"shrink_times must be an integer >= 0; got {shrink_times!r}.")
    s = covs.to(torch.float64)
    for _ in range(shrink_times):
        s = shrink(s, gamma1, gamma2)
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
        gamma1: float = 3.0,
        gamma2: float = 3.0,
        shrink_times: int = 2,
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
        self.gamma1, self.gamma2, self.shrink_times = gamma1, gamma2, shrink_times
        self.num_classes, self.dim = stats.num_classes, stats.dim

        class_ids = stats.classes.clone()
        position_of = torch.full((stats.num_classes,), -1, dtype=torch.long)
        position_of[class_ids] = torch.arange(class_ids.numel())
        p = precision_matrices(stats.covs[class_ids], gamma1, gamma2, shrink_times)
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
            f"tukey_mode={self.tukey_mode!r}, gamma=({self.gamma1}, {self.gamma2}), "
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
    gamma1: float = 3.0,
    gamma2: float = 3.0,
    shrink_times: int = 2,
    tukey_mode: str | None = None,
) -> Tensor:
    """Slow, obviously correct reference: ``(u − m_c)ᵀ P_c (u − m_c)`` by explicit loops.

    float64, ``[B, K]`` with columns in ``stats.classes`` order. For tests and benchmarks only.
    """
    mode = stats.tukey_mode if tukey_mode is None else tukey_mode
    ids = stats.classes
    p = precision_matrices(stats.covs[ids], gamma1, gamma2, shrink_times)
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
