"""Feature snapshots of a run: the features of the same test images before and after unlearning,
stored for the report's 2-D projection plot. Only numpy here: the runner writes snapshots without
importing matplotlib (:mod:`scar.experiments.plots` draws them).

Snapshots (for :func:`~scar.experiments.plots.plot_feature_projection`, the paper's Figure 1C
idea: the forgotten class's points move into other classes) are ``.npz`` files under
``<run_dir>/features/``, named by :func:`feature_snapshot_path` (``<method>_<forget_id>.npz``)
and written by :func:`save_feature_snapshot`. Arrays (loaded with ``allow_pickle=False``):

- ``before``  float32 [N, D]: the original model's features (classifier-head inputs) of N images;
- ``after``   float32 [N, D]: the unlearned model's features of the same images, same order;
- ``labels``  int64 [N]: their true classes;
- ``removed`` int64 [K]: the removed class ids (CR; empty for HR);
- ``title``   optional 0-d unicode string shown above the figure.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np

from scar.errors import ConfigError
from scar.utils import atomic_write_bytes

FEATURES_SUBDIR = "features"
SNAPSHOT_KEYS = ("before", "after", "labels", "removed")


def feature_snapshot_path(run_dir: str | Path, method: str, forget_id: str) -> Path:
    """``<run_dir>/features/<method>_<forget_id>.npz`` (file-name-safe)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{method}_{forget_id}").strip("-")
    return Path(run_dir) / FEATURES_SUBDIR / f"{stem}.npz"


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_snapshot(
    before: np.ndarray, after: np.ndarray, labels: np.ndarray, removed: np.ndarray
) -> None:
    if before.ndim != 2 or before.shape != after.shape:
        raise ConfigError(
            "feature snapshot: 'before' and 'after' must be [N, D] arrays of the same shape; "
            f"got {before.shape} and {after.shape}."
        )
    if labels.shape != (before.shape[0],):
        raise ConfigError(
            f"feature snapshot: 'labels' must have shape ({before.shape[0]},) to match the "
            f"features; got {labels.shape}."
        )
    if removed.ndim != 1:
        raise ConfigError(f"feature snapshot: 'removed' must be 1-D; got shape {removed.shape}.")


def save_feature_snapshot(
    path: str | Path, before: Any, after: Any, labels: Any, removed: Any, title: str | None = None
) -> Path:
    """Write a feature snapshot (format in the module docstring) atomically; returns the path."""
    arrays = {
        "before": _to_numpy(before).astype(np.float32),
        "after": _to_numpy(after).astype(np.float32),
        "labels": _to_numpy(labels).astype(np.int64).reshape(-1),
        "removed": _to_numpy(removed).astype(np.int64).reshape(-1),
    }
    _check_snapshot(*(arrays[k] for k in SNAPSHOT_KEYS))
    if title is not None:
        arrays["title"] = np.array(str(title))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def load_feature_snapshot(path: str | Path) -> dict[str, Any]:
    """The snapshot's arrays (validated), plus ``title`` (str or None)."""
    with np.load(Path(path), allow_pickle=False) as data:
        missing = [k for k in SNAPSHOT_KEYS if k not in data.files]
        if missing:
            raise ConfigError(
                f"feature snapshot {path} lacks arrays {missing}; expected {list(SNAPSHOT_KEYS)} "
                f"(see scar.experiments.snapshots); got {sorted(data.files)}."
            )
        out: dict[str, Any] = {k: np.asarray(data[k]) for k in SNAPSHOT_KEYS}
        out["title"] = str(data["title"]) if "title" in data.files else None
    _check_snapshot(*(out[k] for k in SNAPSHOT_KEYS))
    return out
