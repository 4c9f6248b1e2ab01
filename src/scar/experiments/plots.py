"""Report plots, drawn only from stored rows (and optional feature snapshots), with Agg.

Every plot uses a fixed figure size and dpi and writes PNGs without the "Software" stamp, so
rebuilding from the same inputs gives the same image with the same matplotlib. Each function
returns the written path, or ``None`` (with an info log) when there is not enough data to draw.

Feature snapshots (for :func:`plot_feature_projection`) are written by
:mod:`scar.experiments.snapshots` (format there).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from scar.evaluation.audit import AUS_KEYS
from scar.evaluation.aus import AUS_PER_RUN_LABEL
from scar.experiments.labels import ORIGINAL, RETRAIN, method_labels, method_order, natural_key
from scar.experiments.snapshots import (  # noqa: F401 - re-exported (older imports)
    FEATURES_SUBDIR,
    SNAPSHOT_KEYS,
    feature_snapshot_path,
    load_feature_snapshot,
    save_feature_snapshot,
)
from scar.experiments.store import ok_rows
from scar.utils import atomic_write_bytes

if TYPE_CHECKING:
    from scar.experiments.report import GroupSummary

log = logging.getLogger(__name__)

DPI = 120
FIGSIZE = (6.4, 4.8)
WIDE_FIGSIZE = (11.0, 4.8)
#: At most this many points per panel in a projection (a fixed random subset, seed 0).
MAX_PROJECTION_POINTS = 3000


# ---------------------------------------------------------------- shared helpers
def _figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)  # Agg explicitly; no pyplot global state
    return fig


def _save(fig: Figure, path: str | Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    log.info("wrote plot %s", path)
    return path


def _colour(i: int, n: int) -> Any:
    if n <= 10:
        return colormaps["tab10"](i % 10)
    if n <= 20:
        return colormaps["tab20"](i % 20)
    return colormaps["turbo"](i / max(n - 1, 1))


def _marker(method: str) -> tuple[str, float]:
    if method == ORIGINAL:
        return "*", 14.0
    if method == RETRAIN:
        return "s", 9.0
    return "o", 8.0


def _skip(what: str, why: str) -> None:
    log.info("skipping %s plot: %s", what, why)


# ---------------------------------------------------------------- label placement
def _unit(values: Sequence[float], log: bool = False) -> list[float]:
    v = [math.log10(x) if log else x for x in values]
    lo, hi = min(v), max(v)
    return [(x - lo) / (hi - lo) if hi > lo else 0.5 for x in v]


#: Rough size of the plot area and of an 8-point label, in points (for label placement).
_AREA_PT = (470.0, 350.0)
_CHAR_PT, _LINE_PT = 5.0, 9.0
_DYS = (6, -5, 17, -16, 28, -27)


def _label_box(x: float, y: float, dx: float, dy: float, width: float
               ) -> tuple[float, float, float, float]:
    """A label's approximate box in data-range units, from its anchor and offset in points."""
    px, py = 1 / _AREA_PT[0], 1 / _AREA_PT[1]
    return (x + dx * px, y + dy * py, x + (dx + width) * px, y + (dy + _LINE_PT) * py)


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def label_offsets(xs: Sequence[float], ys: Sequence[float], names: Sequence[str], *,
                  log_x: bool = False) -> list[tuple[float, float]]:
    """Text offsets (points) for point labels, placed one by one: the first of a few positions
    right of the point (then left of it) whose approximate text box overlaps no label placed
    before, so that labels of nearby points do not print over each other."""
    ux, uy = _unit(xs, log_x), _unit(ys)
    placed: list[tuple[float, float, float, float]] = []
    out: list[tuple[float, float]] = []
    for x, y, name in zip(ux, uy, names):
        width = _CHAR_PT * len(name)
        candidates = [(6.0, float(dy)) for dy in _DYS] + [(-6.0 - width, float(dy))
                                                          for dy in _DYS]
        free = (c for c in candidates
                if not any(_overlap(_label_box(x, y, *c, width), q) for q in placed))
        chosen = next(free, candidates[0])  # crowded everywhere: the default place
        placed.append(_label_box(x, y, *chosen, width))
        out.append(chosen)
    return out


# ---------------------------------------------------------------- AUS vs time
def _aus_time_points(groups: Sequence[GroupSummary]) -> list[tuple[GroupSummary, float, float]]:
    points = []
    for g in groups:
        time = g.stats.get("time/unlearn_s")
        if g.aus_per_run is None or time is None or not time.mean > 0:
            continue
        points.append((g, time.mean, time.std))
    return points


def plot_aus_vs_time(groups: Sequence[GroupSummary], path: str | Path) -> Path | None:
    """AUS (per-run mean ± std) against unlearning time (log scale), one labelled point per
    method; methods without a positive time (usually the original) are left out."""
    points = _aus_time_points(groups)
    if not points:
        _skip("AUS vs time", "no group has both an AUS and a positive unlearning time")
        return None
    fig = _figure()
    ax = fig.add_subplot()
    offsets = label_offsets([t for _, t, _ in points], [g.aus_per_run.mean for g, _, _ in points],
                            [g.method for g, _, _ in points], log_x=True)
    for i, (g, t, t_std) in enumerate(points):
        marker, size = _marker(g.method)
        # Log axis: keep the lower error bar above zero.
        xerr = [[min(t_std, 0.9 * t)], [t_std]]
        ax.errorbar(
            [t],
            [g.aus_per_run.mean],
            xerr=xerr,
            yerr=[g.aus_per_run.std],
            fmt=marker,
            markersize=size,
            color=_colour(i, len(points)),
            capsize=3,
        )
        ax.annotate(
            g.method, (t, g.aus_per_run.mean), textcoords="offset points", xytext=offsets[i],
            fontsize=8
        )
    ax.set_xscale("log")
    ax.set_xlabel("unlearning time (s, log scale)")
    ax.set_ylabel(AUS_PER_RUN_LABEL)
    ax.set_title(_groups_title(groups, "AUS vs unlearning time"))
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _groups_title(groups: Sequence[GroupSummary], what: str) -> str:
    keys = sorted({g.table_key for g in groups})
    return f"{what}: " + "; ".join(" / ".join(k) for k in keys) if keys else what


# ---------------------------------------------------------------- forget vs retain
def _accuracy_pair(g: GroupSummary) -> tuple[Any, Any] | None:
    keys = AUS_KEYS.get(g.scenario)
    if keys is None:
        return None
    a_t, a_f = g.stats.get(keys["a_t"]), g.stats.get(keys["a_f"])
    return (a_t, a_f) if a_t is not None and a_f is not None else None


def plot_forget_vs_retain(groups: Sequence[GroupSummary], path: str | Path) -> Path | None:
    """Forget accuracy (CR test-forget, HR train-forget) against kept-data accuracy (CR
    retain-test, HR test), in %, one point per method; original ★ and retrain ■ marked."""
    points = [(g, pair) for g in groups if (pair := _accuracy_pair(g)) is not None]
    if not points:
        _skip("forget vs retain", "no group has both accuracies")
        return None
    scenarios = sorted({g.scenario for g, _ in points})
    fig = _figure()
    ax = fig.add_subplot()
    offsets = label_offsets([a_t.mean for _, (a_t, _) in points],
                            [a_f.mean for _, (_, a_f) in points], [g.method for g, _ in points])
    for i, (g, (a_t, a_f)) in enumerate(points):
        marker, size = _marker(g.method)
        ax.errorbar(
            [100 * a_t.mean],
            [100 * a_f.mean],
            xerr=[100 * a_t.std],
            yerr=[100 * a_f.std],
            fmt=marker,
            markersize=size,
            color=_colour(i, len(points)),
            capsize=3,
            label=g.method,
        )
        ax.annotate(
            g.method,
            (100 * a_t.mean, 100 * a_f.mean),
            textcoords="offset points",
            xytext=offsets[i],
            fontsize=8,
        )
    single = scenarios[0] if len(scenarios) == 1 else None
    ax.set_xlabel(
        {"CR": "retain-test accuracy (%)", "HR": "test accuracy (%)"}.get(
            single, "retain / test accuracy (%)"
        )
    )
    ax.set_ylabel(
        {"CR": "forget-test accuracy (%)", "HR": "train-forget accuracy (%)"}.get(
            single, "forget accuracy (%)"
        )
    )
    ax.set_title(_groups_title(groups, "forget vs kept accuracy"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- per class
def _per_class_values(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[str], dict[tuple[str, str], float]]:
    """(methods, classes, mean forget-test accuracy by (method, class)) of one CR table."""
    cr = [r for r in ok_rows(rows) if str(r.get("scenario")).upper() == "CR"]
    tables = sorted({(str(r.get("dataset")), str(r.get("model"))) for r in cr})
    if len(tables) > 1:
        log.info(
            "per-class plot: rows of %d tables given; drawing %s only",
            len(tables),
            " / ".join(tables[0]),
        )
    cr = [r for r in cr if (str(r.get("dataset")), str(r.get("model"))) == tables[0]] if cr else []
    sums: dict[tuple[str, str], list[float]] = {}
    labels = method_labels(cr)
    for row, label in zip(cr, labels):
        value = (row.get("metrics") or {}).get("acc/test_forget")
        if isinstance(value, (int, float)) and math.isfinite(value):
            sums.setdefault((label, str(row.get("forget_id"))), []).append(float(value))
    values = {k: math.fsum(v) / len(v) for k, v in sums.items()}
    methods = [m for m in method_order(labels) if any(k[0] == m for k in values)]
    classes = sorted({k[1] for k in values}, key=natural_key)
    return methods, classes, values


def plot_per_class(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path | None:
    """CR: per removed class, forget-test accuracy of the original (before) and of each method
    (after), as grouped bars in %."""
    methods, classes, values = _per_class_values(rows)
    if not classes or not methods:
        _skip("per-class", "no class-removal rows with a forget-test accuracy")
        return None
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / len(methods)
    x = np.arange(len(classes))
    for i, method in enumerate(methods):
        heights = [100 * values.get((method, c), np.nan) for c in classes]
        ax.bar(
            x - 0.4 + width * (i + 0.5),
            heights,
            width,
            label=method,
            color=_colour(i, len(methods)),
            edgecolor="black" if method == ORIGINAL else None,
        )
    ax.set_xticks(x, classes, rotation=45 if len(classes) > 8 else 0, fontsize=8)
    ax.set_xlabel("removed class (forget request)")
    ax.set_ylabel("forget-test accuracy (%)")
    ax.set_title("forget-test accuracy per removed class (original = before)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], top-2 principal directions [D, 2]) of rows of ``x``, via SVD."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:2].T
    # SVD signs are arbitrary; fix them so the largest loading is positive (stable pictures).
    signs = np.sign(basis[np.abs(basis).argmax(axis=0), np.arange(basis.shape[1])])
    return mean, basis * np.where(signs == 0, 1.0, signs)


def _subset(n: int) -> np.ndarray:
    if n <= MAX_PROJECTION_POINTS:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, MAX_PROJECTION_POINTS, replace=False))


def _scatter_panel(
    ax: Axes,
    xy: np.ndarray,
    labels: np.ndarray,
    removed: np.ndarray,
    classes: np.ndarray,
    title: str,
) -> None:
    is_removed = np.isin(labels, removed)
    for i, c in enumerate(classes):
        kept = (labels == c) & ~is_removed
        ax.scatter(
            xy[kept, 0],
            xy[kept, 1],
            s=6,
            color=_colour(i, len(classes)),
            alpha=0.6,
            linewidths=0,
            label=f"class {c}" if len(classes) <= 10 else None,
        )
    for i, c in enumerate(classes):
        gone = (labels == c) & is_removed
        if gone.any():
            ax.scatter(
                xy[gone, 0],
                xy[gone, 1],
                s=22,
                marker="X",
                color=_colour(i, len(classes)),
                edgecolors="black",
                linewidths=0.6,
                label=f"class {c} (removed)",
            )
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")


def plot_feature_projection(npz_path: str | Path, path: str | Path) -> Path | None:
    """Features before and after unlearning side by side, projected on one shared 2-D PCA basis
    (fitted on both sets together, so the axes are comparable); points coloured by class, the
    removed class drawn as black-edged crosses."""
    snap = load_feature_snapshot(npz_path)
    before, after, labels = snap["before"], snap["after"], snap["labels"]
    if before.shape[0] < 3 or before.shape[1] < 2:
        _skip(
            "feature projection",
            f"{npz_path} holds {before.shape[0]} points of "
            f"{before.shape[1]} dims; need >= 3 points and >= 2 dims",
        )
        return None
    idx = _subset(before.shape[0])
    before, after, labels = before[idx], after[idx], labels[idx]
    mean, basis = pca_2d(np.concatenate([before, after]))
    classes = np.unique(labels)
    fig = _figure(WIDE_FIGSIZE)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    _scatter_panel(
        axes[0],
        (before - mean) @ basis,
        labels,
        snap["removed"],
        classes,
        "before unlearning (original)",
    )
    _scatter_panel(
        axes[1], (after - mean) @ basis, labels, snap["removed"], classes, "after unlearning"
    )
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), markerscale=2)
    fig.suptitle(snap["title"] or f"feature projection (PCA): {Path(npz_path).stem}")
    fig.tight_layout()
    return _save(fig, path)
