"""Class statistics Q_c of a model's features: the Tukey transform, :class:`ClassStats` (per-class
mean and covariance, saved next to a checkpoint) and how they are computed from any source.

Used by the training code (``scar train`` records them: :func:`record_class_statistics`) and by
the methods (SCAR's Mahalanobis head: :mod:`scar.methods.mahalanobis`), so they live below both.

Sources (SCAR's ``stats`` option): ``retain`` (a pass over retain images at unlearning time, the
reference code's behaviour), ``stored`` (recorded by ``scar train`` next to the checkpoint, the
paper's description: unlearning then reads no retain image), ``surrogate`` (surrogate images
grouped by the original model's predicted class: data-free).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from scar.data.base import Augment, BatchLoader, ImageSet, InputSpec
from scar.errors import CheckpointError, ConfigError, check_choice, check_range
from scar.models.adapter import FeatureModel
from scar.models.base import eval_mode

log = logger = logging.getLogger(__name__)

TUKEY_MODES = ("signed", "clamp")

#: Below this magnitude ``|f|^δ`` (δ < 1) is replaced by the straight line through 0 and
#: ``(eps, eps^δ)``: the derivative ``δ·|f|^(δ−1)`` is infinite at 0, the line's slope
#: ``eps^(δ−1)`` is not (1e3 for δ = 0.5). Values with ``|f| ≥ eps`` are exact (no bias, unlike
#: ``(|f| + eps)^δ − eps^δ``), and the deviation below eps is < eps^δ = 1e-3 for δ = 0.5.
TUKEY_EPS = 1e-6

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



#: Tukey exponent used when statistics are recorded at training time (spec default δ = 0.5).
STORED_DELTA = 0.5


@torch.no_grad()
def class_statistics(
    model: nn.Module | FeatureModel,
    data: ImageSet,
    input_spec: InputSpec,
    *,
    num_classes: int,
    by: str = "labels",
    delta: float = STORED_DELTA,
    tukey_mode: str = "signed",
    head: str | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 1024,
    augment: Augment | None = None,
    seed: int = 0,
) -> ClassStats:
    """One eval-mode pass over ``data``: per-class Tukey-space mean and covariance. Every
    module's train/eval flag is as the caller left it afterwards.

    ``augment`` (with ``seed``) passes the images through a training augmentation first, as
    the reference code's retain loader does.

    ``by="labels"`` groups by the true labels, ``by="predictions"`` by the model's predicted
    class (used for surrogate images, which have no labels of the model's classes).
    """
    fm = model if isinstance(model, FeatureModel) else FeatureModel(model, head=head)
    acc = StatsAccumulator(num_classes, fm.feature_dim, delta, tukey_mode)
    with eval_mode(fm):
        for batch in BatchLoader(data, input_spec, batch_size=batch_size, device=device,
                                 augment=augment, seed=seed):
            feats, logits = fm(batch.x)
            groups = batch.y if by == "labels" else logits.argmax(1)
            acc.update(feats, groups)
    return acc.finalize()


def record_class_statistics(
    model: nn.Module,
    model_spec,
    train: ImageSet,
    input_spec: InputSpec,
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
) -> ClassStats:
    """Record statistics of a freshly trained model over its own training data (``stored``)."""
    stats = class_statistics(model, train, input_spec, num_classes=model_spec.num_classes,
                             head=model_spec.head, device=device)
    stats.save(path)
    log.info("stored class statistics for %d classes in %s", stats.classes.numel(), path)
    return stats
