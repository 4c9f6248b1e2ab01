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
from scar.experiments.labels import (
    ORIGINAL,
    RETRAIN,
    forget_label,
    method_labels,
    method_order,
    natural_key,
    removed_names,
)
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


def png_bytes(fig: Figure) -> bytes:
    """The figure as PNG bytes (no "Software" stamp: same inputs, same bytes)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    atomic_write_bytes(path, png_bytes(fig))
    log.info("wrote plot %s", path)
    return path


def _colour(i: int, n: int) -> Any:
    if n <= 10:
        return colormaps["tab10"](i % 10)
    if n <= 20:
        return colormaps["tab20"](i % 20)
    return colormaps["turbo"](i / max(n - 1, 1))


#: Fixed colours of the reference rows; methods take the others in order (tab10 without grey).
REFERENCE_COLOURS: dict[str, str] = {ORIGINAL: "#7f7f7f", RETRAIN: "#000000"}
_METHOD_PALETTE = tuple(c for i, c in enumerate(colormaps["tab10"].colors) if i != 7)


def method_colours(labels: Sequence[str]) -> dict[str, str]:
    """One colour per row label, the same in every plot of a table: original grey, retrain
    black, the other methods in order of ``labels`` (the table's row order) through tab10
    without its grey, then tab20, then turbo. Hex strings."""
    from matplotlib.colors import to_hex

    others = [m for m in method_order(labels) if m not in REFERENCE_COLOURS]
    colours = {m: REFERENCE_COLOURS[m] for m in labels if m in REFERENCE_COLOURS}
    for i, m in enumerate(others):
        if len(others) <= len(_METHOD_PALETTE):
            colour = _METHOD_PALETTE[i]
        else:
            colour = _colour(i, len(others))
        colours[m] = to_hex(colour)
    return colours


def _marker(method: str) -> tuple[str, float]:
    if method == ORIGINAL:
        return "*", 14.0
    if method == RETRAIN:
        return "s", 9.0
    return "o", 8.0


def _skip(what: str, why: str) -> None:
    log.info("skipping %s plot: %s", what, why)


# ---------------------------------------------------------------- AUS vs time
def _aus_time_points(groups: Sequence[GroupSummary]) -> list[tuple[GroupSummary, float, float]]:
    points = []
    for g in groups:
        time = g.stats.get("time/unlearn_s")
        if g.aus_per_run is None or time is None or not time.mean > 0:
            continue
        points.append((g, time.mean, time.std))
    return points


def plot_aus_vs_time(groups: Sequence[GroupSummary], path: str | Path,
                     colours: Mapping[str, str] | None = None) -> Path | None:
    """AUS (per-run mean ± std) against unlearning time (log scale), one point per method,
    named in the legend (beside the axes: no label prints over another); methods without a
    positive time (usually the original) are left out. ``colours``: label → colour (default
    :func:`method_colours` of ``groups``)."""
    points = _aus_time_points(groups)
    if not points:
        _skip("AUS vs time", "no group has both an AUS and a positive unlearning time")
        return None
    colours = colours or method_colours([g.method for g in groups])
    fig = _figure(WIDE_FIGSIZE)
    ax = fig.add_subplot()
    for g, t, t_std in points:
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
            color=colours[g.method],
            capsize=3,
            label=g.method,
        )
    ax.set_xscale("log")
    ax.set_xlabel("unlearning time (s, log scale)")
    ax.set_ylabel(AUS_PER_RUN_LABEL)
    ax.set_title(_groups_title(groups, "AUS vs unlearning time"))
    ax.grid(True, which="both", alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    return _save(fig, path)


def _legend_outside(ax: Axes) -> None:
    """The legend right of the axes (never over the points)."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)


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


def plot_forget_vs_retain(groups: Sequence[GroupSummary], path: str | Path,
                          colours: Mapping[str, str] | None = None) -> Path | None:
    """Forget accuracy (CR test-forget, HR train-forget) against kept-data accuracy (CR
    retain-test, HR test), in %, one point per method named in the legend; original ★ and
    retrain ■ marked. ``colours``: as :func:`plot_aus_vs_time`."""
    points = [(g, pair) for g in groups if (pair := _accuracy_pair(g)) is not None]
    if not points:
        _skip("forget vs retain", "no group has both accuracies")
        return None
    colours = colours or method_colours([g.method for g in groups])
    scenarios = sorted({g.scenario for g, _ in points})
    fig = _figure(WIDE_FIGSIZE)
    ax = fig.add_subplot()
    for g, (a_t, a_f) in points:
        marker, size = _marker(g.method)
        ax.errorbar(
            [100 * a_t.mean],
            [100 * a_f.mean],
            xerr=[100 * a_t.std],
            yerr=[100 * a_f.std],
            fmt=marker,
            markersize=size,
            color=colours[g.method],
            capsize=3,
            label=g.method,
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
    _legend_outside(ax)
    fig.tight_layout()
    return _save(fig, path)


# ---------------------------------------------------------------- per class
def _per_class_values(
    rows: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[str], dict[tuple[str, str], float], dict[str, str]]:
    """(methods, forget ids, mean forget-test accuracy by (method, forget id), forget id →
    class names) of one CR table."""
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
    names: dict[str, str] = {}
    labels = method_labels(cr)
    for row, label in zip(cr, labels):
        value = (row.get("metrics") or {}).get("acc/test_forget")
        if isinstance(value, (int, float)) and math.isfinite(value):
            sums.setdefault((label, str(row.get("forget_id"))), []).append(float(value))
            names.setdefault(str(row.get("forget_id")), forget_label(row))
    values = {k: math.fsum(v) / len(v) for k, v in sums.items()}
    methods = [m for m in method_order(labels) if any(k[0] == m for k in values)]
    classes = sorted({k[1] for k in values}, key=natural_key)
    return methods, classes, values, names


def plot_per_class(rows: Sequence[Mapping[str, Any]], path: str | Path,
                   colours: Mapping[str, str] | None = None) -> Path | None:
    """CR: per removed class (by name), forget-test accuracy of the original (before) and of
    each method (after), as grouped bars in %. ``colours``: as :func:`plot_aus_vs_time`."""
    methods, classes, values, names = _per_class_values(rows)
    if not classes or not methods:
        _skip("per-class", "no class-removal rows with a forget-test accuracy")
        return None
    colours = colours or method_colours(methods)
    fig = _figure(WIDE_FIGSIZE)
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
            color=colours.get(method, "#17becf"),
            edgecolor="black" if method == ORIGINAL else None,
        )
    ax.set_xticks(x, [names.get(c, c) for c in classes], rotation=30 if len(classes) > 4 else 0,
                  ha="right" if len(classes) > 4 else "center", fontsize=8)
    ax.set_xlabel("removed class (forget request)")
    ax.set_ylabel("forget-test accuracy (%)")
    ax.set_title("forget-test accuracy per removed class (original = before)")
    _legend_outside(ax)
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def class_accuracy_figure(class_names: Sequence[str], accuracies: Mapping[str, Sequence[float]],
                          removed: Sequence[int] = (),
                          colours: Mapping[str, str] | None = None) -> Figure:
    """Per-class test accuracy (%) of a few models (e.g. original, unlearned, retrain) as
    grouped bars over the class names; the removed classes' names are marked "(removed)"."""
    models = list(accuracies)
    colours = colours or method_colours(models)
    fig = _figure(WIDE_FIGSIZE)
    ax = fig.add_subplot()
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(class_names))
    for i, name in enumerate(models):
        ax.bar(x - 0.4 + width * (i + 0.5), 100 * np.asarray(accuracies[name], dtype=float),
               width, label=name, color=colours.get(name, "#17becf"))
    ticks = [f"{n} (removed)" if c in set(removed) else str(n)
             for c, n in enumerate(class_names)]
    ax.set_xticks(x, ticks, rotation=30 if len(ticks) > 4 else 0,
                  ha="right" if len(ticks) > 4 else "center", fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("test accuracy per class")
    ax.grid(True, axis="y", alpha=0.3)
    _legend_outside(ax)
    fig.tight_layout()
    return fig


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
    class_names: Sequence[str] | None = None,
    marked: np.ndarray | None = None,
    marked_as: str = "removed",
) -> None:
    is_removed = np.isin(labels, removed) if marked is None else marked

    def name(c: Any) -> str:
        return removed_names([int(c)], class_names)[0] if class_names else f"class {c}"

    for i, c in enumerate(classes):
        kept = (labels == c) & ~is_removed
        if not kept.any():
            continue
        ax.scatter(
            xy[kept, 0],
            xy[kept, 1],
            s=6,
            color=_colour(i, len(classes)),
            alpha=0.6,
            linewidths=0,
            label=name(c) if len(classes) <= 10 else None,
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
                label=f"{name(c)} ({marked_as})",
            )
    ax.set_title(title)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")


def feature_projection_figure(before: np.ndarray, after: np.ndarray, labels: np.ndarray,
                              removed: np.ndarray, title: str,
                              class_names: Sequence[str] | None = None,
                              marked: np.ndarray | None = None) -> Figure | None:
    """Features before and after unlearning side by side, projected on one shared 2-D PCA basis
    (fitted on both sets together, so the axes are comparable); points coloured by class (named
    when ``class_names`` is given), the removed classes drawn as black-edged crosses (or, with
    a boolean ``marked`` per point, those points: e.g. the forget set of a random removal).
    None when there are fewer than 3 points or 2 dimensions."""
    if before.shape[0] < 3 or before.shape[1] < 2:
        _skip("feature projection", f"{title}: {before.shape[0]} points of {before.shape[1]} "
              "dims; need >= 3 points and >= 2 dims")
        return None
    idx = _subset(before.shape[0])
    before, after, labels = before[idx], after[idx], labels[idx]
    marks = dict(marked=None if marked is None else np.asarray(marked, dtype=bool)[idx],
                 marked_as="removed" if marked is None else "forget set")
    mean, basis = pca_2d(np.concatenate([before, after]))
    classes = np.unique(labels)
    fig = _figure(WIDE_FIGSIZE)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    _scatter_panel(axes[0], (before - mean) @ basis, labels, removed, classes,
                   "before unlearning (original)", class_names, **marks)
    _scatter_panel(axes[1], (after - mean) @ basis, labels, removed, classes, "after unlearning",
                   class_names, **marks)
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), markerscale=2)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_feature_projection(npz_path: str | Path, path: str | Path,
                            class_names: Sequence[str] | None = None) -> Path | None:
    """:func:`feature_projection_figure` of a stored snapshot (:mod:`scar.experiments.snapshots`),
    written to ``path``."""
    snap = load_feature_snapshot(npz_path)
    fig = feature_projection_figure(
        snap["before"], snap["after"], snap["labels"], snap["removed"],
        snap["title"] or f"feature projection (PCA): {Path(npz_path).stem}", class_names)
    return None if fig is None else _save(fig, path)
