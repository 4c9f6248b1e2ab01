"""``scar demo``: the whole workflow on Fashion-MNIST with the default CPU model.

Trains (or reuses) the original model and the oracle for one removed class, runs SCAR, SCAR
self-forget and every baseline of the reference code (the field's other methods, e.g.
``boundary_shrink``, run with ``scar run`` / ``scar unlearn``), evaluates them all
(accuracies, membership-inference attack, AUS, time) and writes the report with plots. It is an
ordinary grid run, so a second call reuses the cached checkpoints and the finished rows.

After the grid it also writes the audit page of its SCAR request (:func:`write_demo_audit_page`):
SCAR is run once more through the same request pipeline, on the grid's cached original, with the
cached oracle as the retrained reference, keeping the outputs the page plots (the grid's rows keep
none), and the original, the oracle and the unlearned model are audited again (with the default
model SCAR takes seconds, the three audits most of the step's minute or two on 2 CPU cores). The
unlearned checkpoint it audits is saved beside the page; each file is replaced atomically on every
call; the original and the oracle are never retrained.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from scar.experiments.grid import Grid, RunSpec
    from scar.experiments.request import RequestResult

log = logging.getLogger(__name__)

#: The demo grid. Baselines run with their defaults except fine-tuning, which gets one epoch
#: (its default of 5 epochs over the retain set alone would take most of the demo's budget on
#: 2 CPU cores).
DEMO_GRID: dict[str, Any] = {
    "name": "demo",
    "dataset": "fashion-mnist",
    "scenario": "CR",
    "classes": [0],
    "seeds": [0],
    "surrogate": "natural-objects",
    "mia": True,
    "methods": {
        "scar": {},
        "scar_self_forget": {},
        "finetune": {"epochs": 1},
        "negative_gradient": {},
        "random_labels": {},
        "duck": {},
    },
}
DEFAULT_DEMO_DIR = Path("runs") / "demo"
#: The method whose request gets the demo's audit page.
AUDIT_METHOD = "scar"


def demo_grid(forget_class: int = 0, device: str = "auto",
              overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The demo grid for ``forget_class`` on ``device``; ``overrides`` replace top-level grid keys
    (e.g. a tiny dataset, model and methods for the tests; the class and device still win)."""
    grid = copy.deepcopy(DEMO_GRID)
    grid.update(copy.deepcopy(dict(overrides or {})))
    grid["classes"] = [forget_class]
    grid["device"] = device
    return grid


def audit_page_paths(run_dir: str | Path, method: str = AUDIT_METHOD) -> tuple[Path, Path]:
    """(audit page, unlearned checkpoint it audits) of ``method``'s request, in the run's report
    folder."""
    from scar.experiments.report import DEFAULT_OUT_SUBDIR

    out = Path(run_dir) / DEFAULT_OUT_SUBDIR
    return out / f"{method}_audit.html", out / f"{method}_unlearned.safetensors"


def audit_spec(grid: Grid, method: str = AUDIT_METHOD) -> RunSpec:
    """The grid's first run of ``method`` (the demo has one: its one class and seed)."""
    from scar.errors import ConfigError
    from scar.experiments.grid import expand

    spec = next((s for s in expand(grid) if s.method == method), None)
    if spec is None:
        raise ConfigError(f"the grid has no {method!r} run to write the audit page of")
    return spec


def audit_checkpoints(run_dir: str | Path, grid: Grid, method: str = AUDIT_METHOD
                      ) -> dict[str, Path]:
    """The cached checkpoints of the request of ``method`` in ``run_dir`` (a run of ``grid``):
    ``"original"``, and ``"oracle"`` when the grid gives the request one."""
    from scar.experiments.grid import has_oracle
    from scar.experiments.runner import checkpoint_path

    spec = audit_spec(grid, method)
    roles = ("original", "oracle") if has_oracle(grid, spec.forget) else ("original",)
    return {role: checkpoint_path(run_dir, spec, role) for role in roles}


def write_demo_audit_page(run_dir: str | Path, grid: Grid, *, method: str = AUDIT_METHOD,
                          progress: bool = False) -> tuple[Path, RequestResult]:
    """The audit page of the request of ``grid``'s ``method`` run (:func:`audit_spec`) in
    ``run_dir`` (a run of ``grid``): :func:`~scar.experiments.runner.run_spec_request` on the
    original cached by the run, audited with the original and, when the request has one, the
    cached oracle (``retrain``); the page and the unlearned checkpoint go to
    :func:`audit_page_paths`. Returns (page, the request's result)."""
    from scar.checkpoint import checkpoint_exists, load_checkpoint
    from scar.errors import ScarError
    from scar.experiments.html_report import write_request_page
    from scar.experiments.labels import ORIGINAL, RETRAIN
    from scar.experiments.runner import (
        Settings,
        cached_dataset,
        clear_caches,
        load_original,
        run_spec_request,
    )
    from scar.utils import resolve_device

    spec = audit_spec(grid, method)
    paths = audit_checkpoints(run_dir, grid, method)
    # (an original the grid gives, key 'checkpoint', may be a plain state dict: no sidecar)
    missing = [f"{role} {path}" for role, path in paths.items()
               if not (checkpoint_exists(path) or (role == "original" and spec.checkpoint))]
    if missing:
        raise ScarError(f"no audit page of {method}: the run {run_dir} lacks the cached "
                        f"{' and '.join(missing)}; run the grid first.")
    settings = Settings(run_dir=str(run_dir), data_dir=grid.data_dir, download=grid.download,
                        device=grid.device, progress=progress)
    device = resolve_device(grid.device)
    page, out = audit_page_paths(run_dir, method)
    try:
        bundle = cached_dataset(spec, settings)
        ck = load_original(spec, str(paths["original"]), bundle)
        references = {ORIGINAL: ck.model}
        oracle = None
        if "oracle" in paths:
            oracle = load_checkpoint(paths["oracle"])
            references[RETRAIN] = oracle.model
        result = run_spec_request(spec, ck, bundle, settings, device, references=references,
                                  out=out, keep_outputs=True)
        write_request_page(page, result, bundle, retrain=oracle, device=device)
    finally:
        clear_caches()
    return page, result


def run_demo(run_dir: str | Path = DEFAULT_DEMO_DIR, *, forget_class: int = 0,
             device: str = "auto", data_dir: str | None = None, progress: bool = True,
             overrides: Mapping[str, Any] | None = None):
    """Run the demo grid (:func:`demo_grid`), write its report and the audit page of its SCAR
    request; returns (summary, groups, written files: the report's, and ``"audit"``, the page,
    unless the SCAR run failed)."""
    from scar.experiments.grid import load_grid
    from scar.experiments.report import build_report
    from scar.experiments.runner import run_grid
    from scar.experiments.store import ResultsStore

    spec = demo_grid(forget_class, device, overrides)
    if data_dir:
        spec["data_dir"] = data_dir
    grid = load_grid(spec)
    summary = run_grid(grid, run_dir, progress=progress)
    groups, written = build_report(run_dir)
    if audit_spec(grid).run_id in ResultsStore(run_dir).finished_ids():
        written["audit"] = write_demo_audit_page(run_dir, grid, progress=progress)[0]
    else:
        log.warning("the %s run failed (see results.jsonl): no audit page", AUDIT_METHOD)
    return summary, groups, written
