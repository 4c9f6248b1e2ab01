"""The runner end to end on tiny synthetic data: cached checkpoints, rows, reruns, failures."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from scar.errors import ScarError
from scar.experiments.executors import LocalExecutor
from scar.experiments.grid import load_grid
from scar.experiments.runner import CHECKPOINT_DIR, run_grid
from scar.experiments.store import ROW_KEYS, ResultsStore
from scar.methods.base import METHODS, Method

#: The shared tiny grid (tests/experiments/tiny_grid.yaml).
TINY = {**yaml.safe_load((Path(__file__).parent / "tiny_grid.yaml").read_text()), "device": "cpu"}


class CountingExecutor(LocalExecutor):
    """Runs tasks in turn, counts them per task function, and can simulate a Ctrl-C."""

    def __init__(self, interrupt_after: int | None = None):
        self.calls: Counter[str] = Counter()
        self.interrupt_after = interrupt_after

    def map(self, fn, tasks):
        for task in tasks:
            if fn.__name__ == "run_method" and self.calls["run_method"] == self.interrupt_after:
                raise KeyboardInterrupt
            self.calls[fn.__name__] += 1
            yield fn(task)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """The 2 methods x 2 classes grid, run once (trains 1 original + 2 oracles)."""
    run_dir = tmp_path_factory.mktemp("run") / "tiny"
    executor = CountingExecutor()
    summary = run_grid(load_grid(TINY), run_dir, executor=executor, progress=False)
    return run_dir, summary, executor.calls


def with_checkpoints(base_dir, tmp_path):
    """A fresh run folder that reuses the base run's cached checkpoints (no training)."""
    run_dir = tmp_path / "run"
    shutil.copytree(base_dir / CHECKPOINT_DIR, run_dir / CHECKPOINT_DIR)
    return run_dir


def test_grid_runs_end_to_end(base_run):
    run_dir, summary, calls = base_run
    assert (summary.total, summary.skipped, summary.ok, summary.failed) == (8, 0, 8, 0)
    assert calls == {"train_checkpoint": 3, "evaluate_reference": 2, "run_method": 4}
    rows = ResultsStore(run_dir).rows()
    assert len(rows) == 8 and len({r["run_id"] for r in rows}) == 8
    assert all(set(ROW_KEYS) <= set(r) and r["status"] == "ok" for r in rows)
    by = {(r["method"], r["forget_id"]): r for r in rows}
    assert set(by) == {(m, f) for m in ("original", "retrain", "scar", "negative_gradient")
                       for f in ("class0", "class1")}
    original, oracle, scar = by["original", "class1"], by["retrain", "class1"], by["scar", "class1"]
    assert original["metrics"]["time/unlearn_s"] == 0 and original["access"] is None
    assert oracle["metrics"]["time/unlearn_s"] > 0 and oracle["metrics"]["acc/test_forget"] == 0
    assert "retain-free: no" in oracle["access"]["profile"]
    assert "retain-free: yes" in scar["access"]["profile"]
    assert scar["access"]["images_loaded"].get("retain", 0) == 0
    assert scar["hparams"]["epochs"] == 1 and scar["forget"]["classes"] == [1]
    for row in (original, oracle, scar):
        assert {"acc/test_forget", "acc/test_retain", "aus"} <= set(row["metrics"])
        assert row["device_name"] and row["versions"]["torch"] and row["finished_at"]
    # one original shared by every request, one oracle per request
    names = sorted(p.name for p in (run_dir / CHECKPOINT_DIR).glob("*.safetensors")
                   if not p.name.endswith(".stats.safetensors"))
    assert len(names) == 3 and sum("original" in n for n in names) == 1


def test_rerun_does_nothing_twice(base_run, tmp_path):
    base_dir, _, _ = base_run
    run_dir = tmp_path / "copy"
    shutil.copytree(base_dir, run_dir)
    before = (run_dir / "results.jsonl").read_bytes()
    executor = CountingExecutor()
    summary = run_grid(load_grid(TINY), run_dir, executor=executor, progress=False)
    assert (summary.total, summary.skipped, summary.ok, summary.failed) == (8, 8, 0, 0)
    assert sum(executor.calls.values()) == 0
    assert (run_dir / "results.jsonl").read_bytes() == before


def test_interrupted_sweep_resumes_without_losing_or_redoing_runs(base_run, tmp_path):
    run_dir = with_checkpoints(base_run[0], tmp_path)
    grid = load_grid(TINY)
    with pytest.raises(KeyboardInterrupt):
        run_grid(grid, run_dir, executor=CountingExecutor(interrupt_after=1), progress=False)
    first = ResultsStore(run_dir).rows()
    assert len(first) == 4 + 1  # the 4 reference rows, then one method run before the Ctrl-C
    executor = CountingExecutor()
    summary = run_grid(grid, run_dir, executor=executor, progress=False)
    assert (summary.skipped, summary.ok, summary.failed) == (5, 3, 0)
    assert executor.calls == {"run_method": 3}  # no training, no reference re-evaluation
    rows = ResultsStore(run_dir).rows()
    assert rows[:5] == first and len(rows) == 8 and len({r["run_id"] for r in rows}) == 8


def test_only_selects_runs_and_brings_their_reference_rows(base_run, tmp_path):
    run_dir = with_checkpoints(base_run[0], tmp_path)
    executor = CountingExecutor()
    summary = run_grid(load_grid(TINY), run_dir, executor=executor, progress=False,
                       only={"method": "negative_gradient", "class": "1"})
    assert (summary.total, summary.ok) == (3, 3)
    rows = ResultsStore(run_dir).rows()
    assert sorted(r["method"] for r in rows) == ["negative_gradient", "original", "retrain"]
    assert {r["forget_id"] for r in rows} == {"class1"}


def test_hr_grid_with_mia_reuses_the_original(base_run, tmp_path):
    run_dir = with_checkpoints(base_run[0], tmp_path)
    raw = {**TINY, "scenario": "HR", "classes": None, "forget_fraction": 0.1, "seeds": [1],
           "mia": True, "methods": {"finetune": {"epochs": 1, "batch_size": 64}}}
    executor = CountingExecutor()
    summary = run_grid(load_grid(raw), run_dir, executor=executor, progress=False)
    assert (summary.total, summary.ok) == (3, 3)
    assert executor.calls["train_checkpoint"] == 1  # the oracle; the original is cached
    rows = {r["method"]: r for r in ResultsStore(run_dir).rows()}
    assert rows["finetune"]["forget_id"] == "seed1" and rows["finetune"]["seed"] == 1
    for row in rows.values():
        assert {"acc/test", "acc/train_forget", "mia/auc", "aus"} <= set(row["metrics"])
    assert "retain-free: no" in rows["finetune"]["access"]["profile"]


@dataclass(kw_only=True)
class AlwaysFails(Method):
    """Test-only method whose unlearning raises."""

    name: ClassVar[str] = "test_always_fails"
    requires: ClassVar[frozenset[str]] = frozenset({"forget"})

    def _unlearn(self, model, original, data):
        raise RuntimeError("boom")


@pytest.fixture
def failing_method():
    METHODS.register(AlwaysFails.name)(AlwaysFails)
    yield AlwaysFails.name
    METHODS._items.pop(AlwaysFails.name, None)
    METHODS._help.pop(AlwaysFails.name, None)


def test_failing_method_is_recorded_and_the_sweep_goes_on(base_run, tmp_path, failing_method,
                                                          caplog):
    run_dir = with_checkpoints(base_run[0], tmp_path)
    raw = {**TINY, "methods": {failing_method: {}, "negative_gradient": {"epochs": 1}}}
    summary = run_grid(load_grid(raw), run_dir, executor=CountingExecutor(), progress=False)
    assert (summary.total, summary.ok, summary.failed) == (8, 6, 2)
    rows = ResultsStore(run_dir).rows()
    failed = [r for r in rows if r["status"] == "failed"]
    assert {r["method"] for r in failed} == {failing_method}
    assert all(r["error"] == "RuntimeError: boom" and r["metrics"] == {} for r in failed)
    assert "boom" in caplog.text
    # a rerun retries the failed runs only
    executor = CountingExecutor()
    again = run_grid(load_grid(raw), run_dir, executor=executor, progress=False)
    assert (again.skipped, again.failed) == (6, 2) and executor.calls == {"run_method": 2}


def test_truncated_last_line_is_tolerated(tmp_path, caplog):
    store = ResultsStore(tmp_path)
    row = {k: None for k in ROW_KEYS} | {"run_id": "a" * 12, "status": "ok"}
    store.append(row)
    with store.path.open("ab") as fh:  # a write cut short
        fh.write(json.dumps(row | {"run_id": "b" * 12})[:40].encode())
    with caplog.at_level(logging.WARNING):
        assert [r["run_id"] for r in store.rows()] == ["a" * 12]
    assert "truncated" in caplog.text
    assert store.finished_ids() == {"a" * 12}
    store.append(row | {"run_id": "c" * 12, "status": "failed"})
    assert [r["run_id"] for r in store.rows()] == ["a" * 12, "c" * 12]
    assert store.path.read_bytes().endswith(b"\n") and store.finished_ids() == {"a" * 12}
    # garbage before the last line is not a crash artefact: refuse to guess
    store.path.write_bytes(b"not json\n" + store.path.read_bytes())
    with pytest.raises(ScarError, match="line 1"):
        store.rows()


def test_cli_dry_run_and_exit_codes(base_run, tmp_path, capsys):
    import scar.cli_run  # noqa: F401  (registers `scar run`)
    from scar.cli import main

    grid_file = tmp_path / "tiny.yaml"
    grid_file.write_text(yaml.safe_dump(TINY, sort_keys=False))
    assert main(["-q", "run", str(grid_file), "--dry-run", "--only", "method=scar",
                 "--out", str(base_run[0])]) == 0
    out = capsys.readouterr().out
    assert "scar" in out and "surrogate_steps=1" in out and "negative_gradient" not in out
    assert "6 runs (6 already finished" in out
    copy = tmp_path / "copy"
    shutil.copytree(base_run[0], copy)
    assert main(["-q", "run", str(grid_file), "--out", str(copy)]) == 0
    assert "8 already finished, 0 ok, 0 failed" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**TINY, "clases": [1]}))
    assert main(["-q", "run", str(bad), "--out", str(tmp_path / "never")]) == 2
    assert "Did you mean 'classes'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_oracles_subset_trains_and_evaluates_only_those(base_run, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / CHECKPOINT_DIR).mkdir(parents=True)
    for p in (base_run[0] / CHECKPOINT_DIR).iterdir():  # the original only: no oracle exists
        if "oracle" not in p.name:
            shutil.copy(p, run_dir / CHECKPOINT_DIR / p.name)
    executor = CountingExecutor()
    summary = run_grid(load_grid({**TINY, "oracles": "none"}), run_dir, executor=executor,
                       progress=False)
    assert (summary.total, summary.ok, summary.failed) == (6, 6, 0)
    assert executor.calls == {"evaluate_reference": 2, "run_method": 4}  # nothing trained
    assert not list((run_dir / CHECKPOINT_DIR).glob("*oracle*"))
    rows = ResultsStore(run_dir).rows()
    assert "retrain" not in {r["method"] for r in rows}
    base_rows = {r["run_id"]: r for r in ResultsStore(base_run[0]).rows()}
    original = next(r for r in rows if r["method"] == "original" and r["forget_id"] == "class1")
    # same row, same id; only the distance to the oracle (js/*) needs an oracle
    with_oracle = base_rows[original["run_id"]]["metrics"]
    assert original["metrics"] == {k: v for k, v in with_oracle.items() if not k.startswith("js/")}
    assert all("aus" in r["metrics"] for r in rows)
    # asking for one oracle later trains that one only and adds its retrain row
    executor = CountingExecutor()
    summary = run_grid(load_grid({**TINY, "oracles": [1]}), run_dir, executor=executor,
                       progress=False)
    assert (summary.total, summary.skipped, summary.ok) == (7, 6, 1)
    assert executor.calls == {"train_checkpoint": 1, "evaluate_reference": 1}
    retrain = [r for r in ResultsStore(run_dir).rows() if r["method"] == "retrain"]
    assert [r["forget_id"] for r in retrain] == ["class1"]
    assert retrain[0]["metrics"]["acc/test_forget"] == 0


def test_hr_request_without_an_oracle(base_run, tmp_path):
    run_dir = with_checkpoints(base_run[0], tmp_path)
    raw = {**TINY, "scenario": "HR", "classes": None, "forget_fraction": 0.1, "seeds": [2],
           "oracles": "none", "methods": {"negative_gradient": {"epochs": 1}}}
    executor = CountingExecutor()
    summary = run_grid(load_grid(raw), run_dir, executor=executor, progress=False)
    assert (summary.total, summary.ok) == (2, 2)
    assert executor.calls == {"evaluate_reference": 1, "run_method": 1}
    rows = {r["method"]: r for r in ResultsStore(run_dir).rows()}
    assert set(rows) == {"original", "negative_gradient"}
    assert {"acc/test", "acc/train_forget", "aus"} <= set(rows["negative_gradient"]["metrics"])


def test_per_model_dataset_options_on_grey_images(fake_fmnist_dir, tmp_path):
    """An architecture panel on (fake) Fashion-MNIST: a grey fastcnn and an RGB-only torchvision
    model that gets the images as 3 channels; both train, unlearn and evaluate, and each cached
    checkpoint records the options its data was loaded with."""
    raw = {
        "dataset": "fashion-mnist", "data_dir": str(fake_fmnist_dir), "device": "cpu",
        "model": ["fastcnn", {"name": "tv:mobilenet_v3_small", "dataset_options": {"channels": 3},
                              "train": {"lr": 0.01}}],
        "train": {"epochs": 1, "batch_size": 32}, "scenario": "CR", "classes": [1],
        "oracles": "none", "mia": False, "methods": {"negative_gradient": {"epochs": 1}},
    }
    summary = run_grid(load_grid(raw), tmp_path, executor=CountingExecutor(), progress=False)
    rows = ResultsStore(tmp_path).rows()
    assert (summary.total, summary.ok) == (4, 4), [r["error"] for r in rows]
    assert {r["model"] for r in rows} == {"fastcnn", "tv:mobilenet_v3_small"}
    tv = [r for r in rows if r["model"] == "tv:mobilenet_v3_small"]
    assert all(r["train"] == {"epochs": 1, "batch_size": 32, "lr": 0.01} for r in tv)
    sidecars = {}
    for side in (tmp_path / CHECKPOINT_DIR).glob("*.json"):
        meta = json.loads(side.read_text())
        sidecars[meta["model"]["name"]] = (meta["dataset_options"], meta["input_spec"]["channels"])
    assert sidecars == {"fastcnn": ({"channels": 1, "train_subset": 0}, 1),
                        "tv:mobilenet_v3_small": ({"channels": 3, "train_subset": 0}, 3)}


def test_dry_run_columns_fit_long_model_names():
    from scar.cli_run import format_runs
    from scar.experiments.grid import expand

    grid = load_grid({**TINY, "model": ["fastcnn", "tv:mobilenet_v3_small"],
                      "dataset_options": {"channels": 3}})
    lines = format_runs(expand(grid), set()).splitlines()
    long = next(line for line in lines if "tv:mobilenet_v3_small" in line)
    assert "tv:mobilenet_v3_small " in long  # separated from the scenario column
    assert len({line.index(" CR ") for line in lines[2:]}) == 1  # columns aligned


def _append_rows(path: str, ids: list[str]) -> None:
    store = ResultsStore(path)
    for run_id in ids:
        store.append({k: None for k in ROW_KEYS} | {"run_id": run_id, "status": "ok"})


def test_concurrent_writers_lose_no_row_and_duplicate_none(tmp_path):
    """Three processes append to one store at once: two with disjoint runs, one repeating
    some runs of the first (a sweep started twice). Every run appears exactly once."""
    import multiprocessing as mp

    first = [f"a{i:011d}" for i in range(40)]
    second = [f"b{i:011d}" for i in range(40)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append_rows, args=(str(tmp_path), ids))
             for ids in (first, second, first[::-1])]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    ids = [r["run_id"] for r in ResultsStore(tmp_path).rows()]
    assert len(ids) == len(set(ids)) == 80 and set(ids) == set(first) | set(second)


def test_a_failed_row_after_an_ok_one_is_not_appended(tmp_path):
    store = ResultsStore(tmp_path)
    row = {k: None for k in ROW_KEYS} | {"run_id": "a" * 12, "status": "failed"}
    assert store.append(row)  # a failed run ...
    assert store.append(row | {"status": "ok"})  # ... retried and finished
    assert not store.append(row | {"status": "ok"})  # another process finished it too
    assert not store.append(row)  # or failed at it
    assert [r["status"] for r in store.rows()] == ["failed", "ok"]


def test_concurrent_sweeps_on_one_folder_record_every_run_once(base_run, tmp_path):
    """Issue 12: two or three `scar run` processes on one --out (split with --only, or the
    same sweep started twice) rewrote results.jsonl over each other. Now: three processes at
    once (two disjoint halves and the whole grid) leave every run exactly once, ok."""
    import os
    import subprocess
    import sys

    run_dir = with_checkpoints(base_run[0], tmp_path)  # cached models: no training
    grid = tmp_path / "tiny.yaml"
    grid.write_text(yaml.safe_dump(TINY, sort_keys=False))
    base = [sys.executable, "-m", "scar", "-q", "run", str(grid), "--out", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(base + extra, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
             for extra in (["--only", "method=scar"], ["--only", "method=negative_gradient"],
                           [])]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    rows = ResultsStore(run_dir).rows()
    ids = Counter(r["run_id"] for r in rows)
    assert len(ids) == base_run[1].total and set(ids.values()) == {1}
    assert all(r["status"] == "ok" for r in rows)


def test_three_identical_sweeps_one_killed_lose_and_duplicate_nothing(base_run, tmp_path):
    """The same sweep started three times on one --out, one of them killed -9 mid-run: every
    run is recorded exactly once and ok (a rerun would finish anything the killed one held)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = with_checkpoints(base_run[0], tmp_path)
    grid = tmp_path / "tiny.yaml"
    grid.write_text(yaml.safe_dump(TINY, sort_keys=False))
    argv = [sys.executable, "-m", "scar", "-q", "run", str(grid), "--out", str(run_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(3)]
    time.sleep(6)  # imports done, work under way
    procs[0].send_signal(signal.SIGKILL)
    codes = [p.wait(timeout=300) for p in procs]
    assert codes[1:] == [0, 0] and codes[0] == -signal.SIGKILL
    rows = ResultsStore(run_dir).rows()  # readable: no half row
    ids = Counter(r["run_id"] for r in rows)
    assert len(ids) == base_run[1].total and set(ids.values()) == {1}
    assert all(r["status"] == "ok" for r in rows)


def test_rows_record_the_preset_of_their_run():
    from scar.experiments.grid import expand
    from scar.experiments.runner import make_row

    specs = expand(load_grid({**TINY, "preset": "reference"}))
    rows = {s.method: make_row(s, metrics={}) for s in specs}
    assert rows["scar"]["preset"] == "reference" and rows["scar"]["hparams"]["surrogate_steps"] == 1
    assert rows["original"]["preset"] is None
