"""Run a grid: cached original / oracle checkpoints, one task per method run, rows in a store.

A sweep has three phases of top-level task functions, each taking a frozen dataclass of plain
values (so a distributed executor can ship them; see ``executors.py``):

1. :func:`train_checkpoint` — every original (key: dataset, options, model, training overrides,
   seed 0) and oracle (the same + the forget request) checkpoint that is missing from
   ``run_dir/checkpoints/``; existing ones (weights + sidecar) are reused, across methods and
   across reruns. An oracle is trained for the requests the grid's ``oracles`` key selects (by
   default all of them).
2. :func:`evaluate_reference` — the ``original`` row (and the ``retrain`` row, where the request
   has an oracle) of each forget request, evaluated once per request with
   :func:`~scar.evaluation.audit.audit_models`; it also gives A_or, the original's accuracy that
   every AUS of the request is measured against (an oracle is not needed for it).
3. :func:`run_method` — one unlearning call + its evaluation per method run; the metrics come
   from the same functions ``audit_models`` uses, with the request's A_or (evaluating the original
   and the oracle again for every method would only repeat phase 2). The oracle's outputs, which
   each method run's distance to the oracle (``js/<split>``) needs, are kept by phase 2 beside the
   oracle's checkpoint (:func:`oracle_outputs_path`) and read by every method run.

With a :class:`~scar.experiments.executors.Executor` (``map``; the local default) the phases run
one after the other. With a :class:`~scar.experiments.executors.PipelinedExecutor` (Ray) they
overlap (:func:`_run_pipelined`): a method run is submitted as soon as its original and its
request's oracle exist (it measures its distance to the oracle's outputs), and a
reference evaluation as soon as its original and oracle exist; a method run submitted before its
request's A_or is known returns its metrics without AUS, the driver adds it when the reference
rows arrive (the same function on the same numbers) and only then stores the row. The rows and
run ids are the same as with the local executor.

Each finished run appends one row to ``run_dir/results.jsonl`` as soon as its result arrives. A
rerun skips run ids that already have an "ok" row (failed ones are retried); when a request's
reference rows are all stored, phase 2 is skipped and A_or is read from the stored original row.
Any exception inside a task becomes a "failed" row (type + message) and the sweep goes on; a
failed checkpoint or reference evaluation fails every pending run of its request.

Within a process each dataset is loaded once per sweep and each surrogate set once per
(dataset, source, n, seed); the caches are emptied when the sweep ends. Datasets are loaded with
the run's dataset options, which the cached checkpoints record; every checkpoint is checked
against the data it is evaluated on (:func:`~scar.experiments.unlearn.check_dataset_matches`).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from scar.checkpoint import Checkpoint, checkpoint_exists, load_checkpoint
from scar.checkpoint import file_slug as _slug
from scar.data.base import ImageSet
from scar.data.datasets import DatasetBundle, load_dataset
from scar.data.forget import make_splits
from scar.errors import ScarError
from scar.evaluation.audit import (
    MembershipAudit,
    add_aus,
    audit_models,
    original_reference,
    split_loaders,
)
from scar.evaluation.metrics import JS_SPLITS
from scar.evaluation.outputs import Outputs, evaluate_splits
from scar.experiments.executors import Executor, LocalExecutor, PipelinedExecutor, TaskLost
from scar.experiments.grid import (
    REFERENCE_METHODS,
    TRAIN_SEED,
    Grid,
    RunSpec,
    check_only,
    expand,
    matches,
    stable_hash,
)
from scar.experiments.labels import removed_names
from scar.experiments.request import RequestResult, UnlearnRequest, feature_pair, run_request
from scar.experiments.store import ResultsStore
from scar.experiments.unlearn import check_dataset_matches, given_checkpoint, load_surrogate_for
from scar.utils import (
    atomic_write_bytes,
    atomic_write_json,
    device_name,
    resolve_device,
    versions,
)

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


@dataclass(frozen=True)
class Settings:
    """Sweep-wide settings every task needs (plain values: picklable)."""

    run_dir: str
    data_dir: str | None = None
    download: bool = False
    device: str = "auto"
    progress: bool = False


@dataclass(frozen=True)
class TrainTask:
    spec: RunSpec  # any run of the request; only its dataset / model / train / forget fields count
    role: str  # "original" | "oracle"
    path: str
    settings: Settings


@dataclass(frozen=True)
class ReferenceTask:
    key: str
    specs: tuple[RunSpec, ...]  # the "original" run of one request, then its "retrain" run if any
    original: str
    oracle: str | None  # None: the request has no oracle (grid key 'oracles')
    settings: Settings


@dataclass(frozen=True)
class MethodTask:
    spec: RunSpec
    original: str
    a_or: float | None  # None: not known yet; the driver adds the AUS (pipelined sweeps)
    settings: Settings
    oracle: str | None = None  # the request's oracle checkpoint (distance to its outputs)


@dataclass(frozen=True)
class RunSummary:
    total: int
    skipped: int
    ok: int
    failed: int


# ---------------------------------------------------------------- per-process caches
_DATASETS: dict[tuple, DatasetBundle] = {}
_SURROGATES: dict[tuple, ImageSet] = {}


def cached_dataset(spec: RunSpec, settings: Settings) -> DatasetBundle:
    key = (spec.dataset, spec.dataset_options_items, settings.data_dir)
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(spec.dataset, data_dir=settings.data_dir,
                                      download=settings.download, **spec.dataset_options)
    return _DATASETS[key]


def cached_surrogate(ck: Checkpoint, spec: RunSpec, settings: Settings) -> ImageSet:
    key = (spec.dataset, spec.dataset_options_items, ck.input_spec.channels, ck.input_spec.size,
           spec.surrogate, spec.surrogate_n, spec.seed)
    if key not in _SURROGATES:
        _SURROGATES[key] = load_surrogate_for(ck, spec.surrogate, spec.surrogate_n, spec.seed,
                                              settings.data_dir)
    return _SURROGATES[key]


def clear_caches() -> None:
    _DATASETS.clear()
    _SURROGATES.clear()


# ---------------------------------------------------------------- rows
def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def make_row(spec: RunSpec, *, metrics: Mapping[str, Any] | None = None,
             error: BaseException | str | None = None, access: dict[str, Any] | None = None,
             device: torch.device | str | None = None, device_label: str | None = None,
             info: Mapping[str, Any] | None = None,
             class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """One results row (schema in ``store.py``); status "failed" when ``error`` is given.
    ``class_names``: the dataset's, to record the removed classes' names (``forget_names``)."""
    d = spec.to_dict()
    if device_label is None and isinstance(device, torch.device):
        device_label = device_name(device)
    return {
        "run_id": spec.run_id,
        "status": "ok" if error is None else "failed",
        "error": None if error is None else (error if isinstance(error, str) else describe(error)),
        "dataset": spec.dataset,
        "model": spec.model,
        "scenario": spec.scenario,
        "forget": d["forget"],
        "forget_id": spec.forget_id,
        "seed": spec.seed,
        "method": spec.method,
        "hparams": d["hparams"],
        "preset": spec.preset,
        "metrics": dict(metrics or {}),
        "access": access,
        "device": None if device is None else str(device),
        "device_name": device_label,
        "versions": versions(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "train": d["train"],
        "surrogate": spec.surrogate,
        "surrogate_n": spec.surrogate_n,
        "info": dict(info or {}),
        "forget_names": (removed_names(spec.forget.classes, class_names)
                         if class_names and spec.forget.kind == "class" else None),
    }


def log_failure(spec: RunSpec, exc: BaseException) -> None:
    log.error("run %s (%s, %s on %s, seed %s) failed: %s", spec.run_id, spec.method,
              spec.forget_id, spec.dataset, spec.seed, describe(exc),
              exc_info=not isinstance(exc, ScarError))


# ---------------------------------------------------------------- checkpoints
def checkpoint_path(run_dir: str | Path, spec: RunSpec, role: str) -> Path:
    """Cache path of the original (``role="original"``) or oracle checkpoint of ``spec``; the
    given original itself when the grid names one (key ``checkpoint``)."""
    if role == "original" and spec.checkpoint is not None:
        return Path(spec.checkpoint)
    d = spec.to_dict()
    key = {k: d[k] for k in ("dataset", "dataset_options", "model", "model_kwargs", "train")}
    key.update(seed=TRAIN_SEED, forget=d["forget"] if role == "oracle" else None)
    tag = "original" if role == "original" else f"oracle-{spec.forget_id}"
    name = f"{_slug(spec.dataset)}_{_slug(spec.model or 'default')}_{tag}_{stable_hash(key, 10)}"
    return Path(run_dir) / CHECKPOINT_DIR / f"{name}.safetensors"


def train_checkpoint(task: TrainTask) -> dict[str, Any]:
    """Train and save one cached checkpoint unless it exists. Returns {"path", "error"}."""
    from scar.training.workflow import TrainJob, run_train_job

    if checkpoint_exists(task.path):
        return {"path": task.path, "error": None}
    spec, settings = task.spec, task.settings
    job = TrainJob(dataset=spec.dataset, dataset_options=spec.dataset_options, model=spec.model,
                   forget=spec.forget if task.role == "oracle" else None,
                   recipe_overrides=spec.train, seed=TRAIN_SEED, model_kwargs=spec.model_kwargs)
    log.info("training the %s checkpoint %s", task.role, task.path)
    try:
        # run_train_job writes the class statistics before the checkpoint creates the folder.
        Path(task.path).parent.mkdir(parents=True, exist_ok=True)
        run_train_job(job, task.path, bundle=cached_dataset(spec, settings),
                      download=settings.download,  # pretrained weights, if asked for
                      device=settings.device, progress=settings.progress)
    except Exception as exc:  # noqa: BLE001 - recorded as failed rows by the driver
        log.error("training the %s checkpoint %s failed: %s", task.role, task.path,
                  describe(exc), exc_info=not isinstance(exc, ScarError))
        return {"path": task.path, "error": f"{task.role} checkpoint: {describe(exc)}"}
    return {"path": task.path, "error": None}


def load_original(spec: RunSpec, path: str, bundle: DatasetBundle) -> Checkpoint:
    """The original of ``spec``: a cached (or given) SCAR checkpoint, or a given plain state
    dict of the run's model."""
    if spec.checkpoint is None:
        return load_checkpoint(path)
    return given_checkpoint(path, bundle, spec.model, model_kwargs=spec.model_kwargs)


# ---------------------------------------------------------------- reference rows
def oracle_access(oracle: Checkpoint, n_retain: int) -> dict[str, Any]:
    """The oracle's data access: it trains on the whole retain set for every epoch."""
    from scar.methods import access_profile, build_method

    retrain = build_method("retrain")
    loaded = {"retain": n_retain * int((oracle.meta.get("recipe") or {}).get("epochs", 1))}
    return {"required": sorted(retrain.required_data()), "images_loaded": loaded,
            "profile": access_profile(retrain, loaded)}


def evaluate_reference(task: ReferenceTask) -> dict[str, Any]:
    """Rows of the original (and of the oracle, if any) of one request, and A_or. Never raises."""
    original_spec = task.specs[0]
    device = None
    try:
        device = resolve_device(task.settings.device)
        bundle = cached_dataset(original_spec, task.settings)
        checkpoints = {"original": load_original(original_spec, task.original, bundle)}
        if task.oracle is not None:
            checkpoints["retrain"] = load_checkpoint(task.oracle)
        for ck in checkpoints.values():
            check_dataset_matches(ck, bundle)
        splits = make_splits(bundle, original_spec.forget)
        results, outputs = audit_models(
            {name: ck.model for name, ck in checkpoints.items()}, splits,
            checkpoints["original"].input_spec, original_spec.scenario, device=device,
            mia=original_spec.mia, mia_variant=original_spec.mia_variant,
            seed=original_spec.seed,
            audit=membership_audit(original_spec, checkpoints["original"], bundle, splits,
                                   task.settings, device),
            relearn=original_spec.relearn)
        if task.oracle is not None:
            save_oracle_outputs(task.oracle, outputs["retrain"])
    except Exception as exc:  # noqa: BLE001 - becomes failed rows
        log_failure(original_spec, exc)
        rows = [make_row(s, error=exc, device=device) for s in task.specs]
        return {"key": task.key, "rows": rows, "a_or": None}
    results["original"]["time/unlearn_s"] = 0.0
    names = bundle.info.class_names
    rows = [make_row(original_spec, metrics=results["original"], device=device,
                     class_names=names)]
    if task.oracle is not None:
        oracle = checkpoints["retrain"]
        results["retrain"]["time/unlearn_s"] = float(oracle.meta.get("train_seconds", math.nan))
        # The oracle's time is its training run: record the device that ran it.
        rows.append(make_row(task.specs[1], metrics=results["retrain"],
                             access=oracle_access(oracle, len(splits.train_retain)),
                             device=oracle.meta.get("device"),
                             device_label=oracle.meta.get("device_name"), class_names=names))
    a_or = original_reference(results["original"], original_spec.scenario)
    return {"key": task.key, "rows": rows, "a_or": a_or}


def membership_audit(spec: RunSpec, original: Checkpoint, bundle: DatasetBundle, splits,
                     settings: Settings, device) -> MembershipAudit | None:
    """The membership audit of the run (grid key 'audit'), or None: its reference models are
    trained by the first task that needs them and cached with the other checkpoints (tasks
    running at the same time may each train a missing one; the last write wins, whole)."""
    if spec.audit is None:
        return None
    from scar.experiments.references import prepare_audit

    return prepare_audit(original, bundle, splits, spec.audit,
                         Path(settings.run_dir) / CHECKPOINT_DIR, count=spec.audit_references,
                         seed=TRAIN_SEED, device=device, data_dir=settings.data_dir,
                         progress=settings.progress)


# ---------------------------------------------------------------- the oracle's outputs
def oracle_outputs_path(oracle: str | Path) -> Path:
    """Where the outputs of a cached oracle on its request's splits are kept (beside it)."""
    oracle = Path(oracle)
    return oracle.with_name(oracle.name.split(".")[0] + ".outputs.pt")


def save_oracle_outputs(oracle: str | Path, outputs: Mapping[str, Outputs]) -> None:
    """Keep the oracle's outputs on the splits the distance to it is measured on, so that each
    method run reads them instead of running the oracle again."""
    buf = io.BytesIO()
    torch.save({k: {"logits": o.logits, "labels": o.labels} for k, o in outputs.items()
                if k in JS_SPLITS}, buf)
    atomic_write_bytes(oracle_outputs_path(oracle), buf.getvalue())


def oracle_outputs(oracle: str | None, splits, spec: RunSpec, settings: Settings,
                   device) -> dict[str, Outputs] | None:
    """The request's oracle outputs: kept by its reference evaluation (or by an earlier method
    run); computed and kept now when only the checkpoint exists; None without an oracle."""
    if oracle is None or not checkpoint_exists(oracle):
        return None
    path = oracle_outputs_path(oracle)
    if path.is_file():
        kept = torch.load(path, map_location="cpu", weights_only=True)
        return {k: Outputs(v["logits"], v["labels"]) for k, v in kept.items()}
    ck = load_checkpoint(oracle)
    loaders = split_loaders(splits, ck.input_spec, device, names=JS_SPLITS)
    outputs = evaluate_splits(ck.model.to(device), loaders)
    save_oracle_outputs(oracle, outputs)
    log.info("kept the outputs of oracle %s for %s", oracle, spec.forget_id)
    return outputs


# ---------------------------------------------------------------- method runs
def run_method(task: MethodTask) -> dict[str, Any]:
    """Unlearn with one method and evaluate the result (:func:`~scar.experiments.request.
    run_request`); returns its row. Never raises."""
    spec, settings = task.spec, task.settings
    device = None
    try:
        device = resolve_device(settings.device)
        bundle = cached_dataset(spec, settings)
        ck = load_original(spec, task.original, bundle)
        splits = make_splits(bundle, spec.forget)
        result = run_spec_request(spec, ck, bundle, settings, device, a_or=task.a_or,
                                  oracle_outputs=oracle_outputs(task.oracle, splits, spec,
                                                                settings, device))
    except Exception as exc:  # noqa: BLE001 - recorded as a failed row; the sweep goes on
        log_failure(spec, exc)
        return make_row(spec, error=exc, device=device)
    metrics = {**result.metrics, "time/unlearn_s": result.seconds}
    if spec.method in SNAPSHOT_METHODS:
        try:
            snapshot_features(ck, result.model, result.splits, spec, settings.run_dir, device)
        except Exception as exc:  # noqa: BLE001 - a missing plot must not lose the row
            log.warning("feature snapshot of %s failed: %s", spec.run_id, describe(exc))
    return make_row(spec, metrics=metrics, access=result.access, device=device,
                    info=result.outcome.info, class_names=bundle.info.class_names)


def run_spec_request(spec: RunSpec, ck: Checkpoint, bundle: DatasetBundle, settings: Settings,
                     device, **kwargs: Any) -> RequestResult:
    """:func:`~scar.experiments.request.run_request` of the grid run ``spec`` on its original
    ``ck`` (data ``bundle``): the sweep's cached surrogate set and the run's membership audit;
    ``kwargs`` go to ``run_request`` (``a_or``; ``references``, ``out``, ``keep_outputs`` for
    ``scar demo``'s audit page)."""
    membership = None
    if spec.audit is not None:
        membership = membership_audit(spec, ck, bundle, make_splits(bundle, spec.forget),
                                      settings, device)
    return run_request(ck, bundle, request_of(spec), device=device, progress=settings.progress,
                       surrogate=lambda ck: cached_surrogate(ck, spec, settings),
                       membership=membership, **kwargs)


def request_of(spec: RunSpec) -> UnlearnRequest:
    """The deletion request of a grid run (its hyperparameters are already resolved)."""
    return UnlearnRequest(forget=spec.forget, method=spec.method, hparams=spec.hparams,
                          preset=spec.preset, surrogate=spec.surrogate,
                          surrogate_n=spec.surrogate_n, seed=spec.seed, mia=spec.mia,
                          mia_variant=spec.mia_variant, relearn=spec.relearn)


#: Methods whose runs also store a feature snapshot (before/after features of test images) for
#: the report's 2-D projection plot; kept to SCAR to keep run folders small.
SNAPSHOT_METHODS = ("scar", "scar_self_forget")
SNAPSHOT_IMAGES = 600


def snapshot_features(ck: Checkpoint, unlearned: torch.nn.Module, splits, spec: RunSpec,
                      run_dir: str, device) -> None:
    """Features of the same test images under the original and the unlearned model."""
    from scar.experiments.snapshots import feature_snapshot_path, save_feature_snapshot

    test = splits.test
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(test), generator=g)[:SNAPSHOT_IMAGES].sort().values
    subset = test.subset(idx)
    before, after = feature_pair(ck, unlearned, subset, device)
    save_feature_snapshot(feature_snapshot_path(run_dir, spec.method, spec.forget_id),
                          before, after, subset.labels, list(splits.removed_classes),
                          title=f"{spec.method}, {spec.forget.describe()}")


# ---------------------------------------------------------------- the driver
def select(specs: list[RunSpec], only: Mapping[str, Any] | None) -> list[RunSpec]:
    """Runs passing ``only``, plus the reference rows of their requests (needed for AUS)."""
    chosen = [s for s in specs if matches(s, only)]
    requests = {s.request() for s in chosen}
    return [s for s in specs if matches(s, only) or (s.is_reference and s.request() in requests)]


def reference_specs(specs: Iterable[RunSpec]) -> dict[tuple, dict[str, RunSpec]]:
    out: dict[tuple, dict[str, RunSpec]] = {}
    for s in specs:
        if s.is_reference:
            out.setdefault(s.request(), {})[s.method] = s
    return out


class _Sweep:
    """Book-keeping of one :func:`run_grid` call: pending runs, the store, the counters."""

    def __init__(self, store: ResultsStore, pending: list[RunSpec], progress: bool):
        from tqdm.auto import tqdm

        self.store = store
        self.pending = {s.run_id for s in pending}
        self.ok = self.failed = 0
        self.bar = tqdm(total=len(pending), desc="runs", unit="run", disable=not progress)

    def record(self, row: dict[str, Any]) -> None:
        if row["run_id"] not in self.pending:
            return  # e.g. the stored half of a re-evaluated reference pair
        self.pending.discard(row["run_id"])
        self.store.append(row)
        if row["status"] == "ok":
            self.ok += 1
        else:
            self.failed += 1
        self.bar.update(1)

    def fail_all(self, specs: Iterable[RunSpec], error: str) -> None:
        for s in specs:
            self.record(make_row(s, error=error))


@dataclass
class _Request:
    """The pending runs of one forget request and what they need."""

    specs: list[RunSpec]
    reference: dict[str, RunSpec]  # "original", and "retrain" when the request has an oracle
    original: str
    evaluate: bool = False  # whether the reference rows are (re-)evaluated; else A_or is stored
    oracle: str | None = None  # None: no oracle, or none needed (its row is stored)
    a_or: float | None = None
    oracle_path: str | None = None  # the request's oracle checkpoint, whether trained now or not


def plan(pending: list[RunSpec], refs: dict[tuple, dict[str, RunSpec]],
         stored: dict[str, dict[str, Any]], finished: set[str], run_dir: str
         ) -> dict[tuple, _Request]:
    requests: dict[tuple, _Request] = {}
    for s in pending:
        if s.request() not in requests:
            requests[s.request()] = _Request([], refs[s.request()],
                                             str(checkpoint_path(run_dir, s, "original")))
        requests[s.request()].specs.append(s)
    for req in requests.values():
        if "retrain" in req.reference:
            req.oracle_path = str(checkpoint_path(run_dir, req.specs[0], "oracle"))
        if all(spec.run_id in finished for spec in req.reference.values()):
            row = stored[req.reference["original"].run_id]
            req.a_or = original_reference(row["metrics"], row["scenario"])
        else:
            req.evaluate = True
            req.oracle = req.oracle_path
    return requests


def _train_tasks(requests: dict[tuple, _Request], settings: Settings) -> dict[str, TrainTask]:
    """The checkpoints the requests need, each cached path once (whatever the number of requests
    sharing it); a checkpoint the grid gives is not trained."""
    train: dict[str, TrainTask] = {}
    for req in requests.values():
        if req.specs[0].checkpoint is None:
            train.setdefault(req.original, TrainTask(req.specs[0], "original", req.original,
                                                     settings))
        if req.oracle is not None:
            train.setdefault(req.oracle, TrainTask(req.specs[0], "oracle", req.oracle, settings))
    return train


def _key(req: _Request) -> str:
    return stable_hash(req.original + str(req.oracle) + req.specs[0].run_id)


def _reference_task(key: str, req: _Request, settings: Settings) -> ReferenceTask:
    return ReferenceTask(key, tuple(req.reference[m] for m in REFERENCE_METHODS
                                    if m in req.reference), req.original, req.oracle, settings)


def _method_tasks(req: _Request, sweep: _Sweep, settings: Settings) -> list[MethodTask]:
    return [MethodTask(s, req.original, req.a_or, settings, req.oracle_path) for s in req.specs
            if not s.is_reference and s.run_id in sweep.pending]


def _run(sweep: _Sweep, requests: dict[tuple, _Request], settings: Settings,
         executor: Executor) -> None:
    # 1. checkpoints
    todo = [t for t in _train_tasks(requests, settings).values() if not checkpoint_exists(t.path)]
    errors = {r["path"]: r["error"] for r in executor.map(train_checkpoint, todo) if r["error"]}
    live: dict[str, _Request] = {}
    for req in requests.values():
        broken = [errors[p] for p in (req.original, req.oracle) if p in errors]
        if broken:
            sweep.fail_all(req.specs, broken[0])
        else:
            live[_key(req)] = req

    # 2. reference rows, and A_or for the AUS of every method run of the request
    ref_tasks = [_reference_task(key, req, settings) for key, req in live.items() if req.evaluate]
    for result in executor.map(evaluate_reference, ref_tasks):
        req = live[result["key"]]
        for row in result["rows"]:
            sweep.record(row)
        if result["a_or"] is None:
            sweep.fail_all(req.specs, "reference evaluation: " + result["rows"][0]["error"])
        else:
            req.a_or = result["a_or"]

    # 3. method runs
    method_tasks = [t for req in live.values() if req.a_or is not None
                    for t in _method_tasks(req, sweep, settings)]
    for row in executor.map(run_method, method_tasks):
        sweep.record(row)


def lost_result(task: TrainTask | ReferenceTask | MethodTask, exc: TaskLost) -> Any:
    """What the task function would have returned had it failed with ``exc`` (its worker died
    on every try): the task's runs become failed rows."""
    if isinstance(task, TrainTask):
        return {"path": task.path, "error": f"{task.role} checkpoint: {describe(exc)}"}
    if isinstance(task, ReferenceTask):
        return {"key": task.key, "rows": [make_row(s, error=exc) for s in task.specs],
                "a_or": None}
    return make_row(task.spec, error=exc)


def _run_pipelined(sweep: _Sweep, requests: dict[tuple, _Request], settings: Settings,
                   executor: PipelinedExecutor) -> None:
    """The three phases overlapping (see the module docstring): each task is submitted as soon as
    the checkpoints it reads exist; the same rows as :func:`_run`."""
    live = {_key(req): req for req in requests.values()}
    train = _train_tasks(requests, settings)
    ready = {p for p in train if checkpoint_exists(p)}
    tickets: dict[int, tuple[str, Any]] = {}  # ticket -> (request key or None, task)
    methods_sent: set[str] = set()
    reference_sent: set[str] = set()
    held: dict[str, list[dict[str, Any]]] = {}  # method rows waiting for their request's A_or
    failed: set[str] = set()

    def exists(path: str | None) -> bool:
        return path is None or path not in train or path in ready

    def advance(key: str) -> None:
        req = live[key]
        if key in failed or not exists(req.original):
            return
        # Method runs wait for the oracle too (when it is being trained): they measure their
        # distance to its outputs, so that the rows are those of the local executor.
        if key not in methods_sent and exists(req.oracle_path):
            methods_sent.add(key)
            for task in _method_tasks(req, sweep, settings):
                tickets[executor.submit(run_method, task)] = (key, task)
        if req.evaluate and key not in reference_sent and exists(req.oracle):
            reference_sent.add(key)
            task = _reference_task(key, req, settings)
            tickets[executor.submit(evaluate_reference, task)] = (key, task)

    def fail(key: str, error: str) -> None:
        failed.add(key)
        held.pop(key, None)
        sweep.fail_all(live[key].specs, error)  # rows already stored are kept (record skips)

    def store_method_row(req: _Request, row: dict[str, Any]) -> None:
        if row["status"] == "ok" and "aus" not in row["metrics"]:
            add_aus(row["metrics"], req.a_or, row["scenario"])
        sweep.record(row)

    for task in train.values():
        if task.path not in ready:
            tickets[executor.submit(train_checkpoint, task)] = (None, task)
    for key in live:
        advance(key)
    try:
        while executor.pending():
            ticket, out = executor.next_done()
            key, task = tickets.pop(ticket)
            if isinstance(out, TaskLost):
                out = lost_result(task, out)
            if isinstance(task, TrainTask):
                users = [k for k, r in live.items() if task.path in (r.original, r.oracle)]
                if out["error"]:
                    for k in users:
                        if k not in failed:
                            fail(k, out["error"])
                else:
                    ready.add(task.path)
                    for k in users:
                        advance(k)
            elif key in failed:
                continue  # its checkpoint or reference evaluation failed: rows already stored
            elif isinstance(task, ReferenceTask):
                req = live[key]
                for row in out["rows"]:
                    sweep.record(row)
                if out["a_or"] is None:
                    fail(key, "reference evaluation: " + out["rows"][0]["error"])
                else:
                    req.a_or = out["a_or"]
                    for row in held.pop(key, []):
                        store_method_row(req, row)
            elif live[key].a_or is None:
                held.setdefault(key, []).append(out)
            else:
                store_method_row(live[key], out)
    finally:
        if executor.pending():
            executor.cancel_pending()
    assert not held, f"method rows never stored: {sorted(held)}"


def run_grid(grid: Grid, run_dir: str | Path, *,
             executor: Executor | PipelinedExecutor | None = None,
             only: Mapping[str, Any] | None = None, progress: bool = True) -> RunSummary:
    """Run every pending run of ``grid`` into ``run_dir`` (see the module docstring)."""
    check_only(only)
    executor = executor or LocalExecutor()
    if isinstance(executor, LocalExecutor):
        resolve_device(grid.device)  # e.g. cuda on a machine without: fail before anything runs
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "grid.json", asdict(grid))
    store = ResultsStore(run_dir)
    every = expand(grid)
    specs = select(every, only)
    stored = {r["run_id"]: r for r in store.rows() if r.get("status") == "ok"}
    finished = set(stored)
    pending = [s for s in specs if s.run_id not in finished]
    log.info("%d runs selected, %d already finished, %d to run", len(specs),
             len(specs) - len(pending), len(pending))
    settings = Settings(run_dir=str(run_dir), data_dir=grid.data_dir, download=grid.download,
                        device=grid.device, progress=progress)
    if isinstance(executor, PipelinedExecutor):
        # Workers on other machines start elsewhere: absolute paths (on the shared file system);
        # and they run many tasks at once: only the driver's bar (runs) shows.
        settings = replace(settings, run_dir=str(run_dir.absolute()), progress=False,
                           data_dir=None if grid.data_dir is None
                           else str(Path(grid.data_dir).absolute()))
    requests = plan(pending, reference_specs(every), stored, finished, str(run_dir))
    sweep = _Sweep(store, pending, progress)
    try:
        if isinstance(executor, PipelinedExecutor):
            _run_pipelined(sweep, requests, settings, executor)
        else:
            _run(sweep, requests, settings, executor)
    finally:
        sweep.bar.close()
        clear_caches()
    summary = RunSummary(total=len(specs), skipped=len(specs) - len(pending), ok=sweep.ok,
                         failed=sweep.failed)
    log.info("sweep done: %s", summary)
    return summary
