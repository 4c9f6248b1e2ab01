"""Experiments: YAML grid → runs → append-only results store → reports.

``grid.py`` validates a grid and expands it into runs with stable ids, ``runner.py`` runs them
(cached original / oracle checkpoints, one task per method run) through an executor
(``executors.py``), ``store.py`` keeps one row per finished run, ``request.py`` is one
deletion request end to end (``run_request``: the one pipeline of ``scar unlearn``, the runner
and the demo) and ``unlearn.py`` holds its steps. Names are imported lazily: ``import
scar.experiments.report`` does not pull in the training stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Grid": "grid", "RunSpec": "grid", "load_grid": "grid", "expand": "grid",
    "ResultsStore": "store",
    "RunSummary": "runner", "run_grid": "runner",
    "UnlearnRequest": "request", "RequestResult": "request", "run_request": "request",
    "Executor": "executors", "LocalExecutor": "executors", "RayExecutor": "executors",
    "PipelinedExecutor": "executors", "TaskLost": "executors",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'scar.experiments' has no attribute {name!r}")
    return getattr(importlib.import_module(f"scar.experiments.{_EXPORTS[name]}"), name)
