"""Pipelined sweeps (issue 13, part 3): the runner's overlapping phases, on a fake in-process
executor (always) and on a local 2-CPU Ray cluster (skipped, with the reason, without ray).

Every sweep here runs torch on one thread, as a Ray task holding one CPU does, so a model trained
or unlearned here and one trained or unlearned in a Ray worker are the same to the last bit and
the rows can be compared for equality."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml

from scar.errors import ConfigError, OptionalDependencyError
from scar.experiments.executors import PipelinedExecutor, TaskLost
from scar.experiments.grid import load_grid
from scar.experiments.runner import CHECKPOINT_DIR, run_grid
from scar.experiments.store import ResultsStore

TINY = {**yaml.safe_load((Path(__file__).parent / "tiny_grid.yaml").read_text()), "device": "cpu"}

HAS_RAY = importlib.util.find_spec("ray") is not None
#: Only a missing ray package skips the Ray tests (CI installs it: scripts/install.sh).
needs_ray = pytest.mark.skipif(
    not HAS_RAY, reason="ray is not installed: pip install 'scar-unlearn[ray]' (scripts/install.sh "
                        "does) to run the Ray executor tests")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The tiny grid (1 original + 2 oracles trained, 8 rows) with the local executor."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("local") / "tiny"
        summary = run_grid(load_grid(TINY), run_dir, progress=False)
    finally:
        torch.set_num_threads(before)
    assert (summary.ok, summary.failed) == (8, 0)
    return run_dir, ResultsStore(run_dir).rows()


def comparable(row: dict) -> dict:
    """A row less what differs between two runs of the same sweep: when it finished and how
    long things took (the retrain row's time is its oracle's training time)."""
    metrics = {k: v for k, v in row["metrics"].items() if not k.startswith("time/")}
    return {**{k: v for k, v in row.items() if k != "finished_at"}, "metrics": metrics}


def assert_same_rows(rows: list[dict], expected: list[dict]) -> None:
    ids = Counter(r["run_id"] for r in rows)
    assert set(ids.values()) == {1} and set(ids) == {r["run_id"] for r in expected}
    by_id = {r["run_id"]: comparable(r) for r in rows}
    for row in expected:
        assert by_id[row["run_id"]] == comparable(row), row["method"]


def with_checkpoints(run_dir: Path, tmp_path: Path, keep=lambda name: True) -> Path:
    out = tmp_path / "run"
    (out / CHECKPOINT_DIR).mkdir(parents=True)
    for p in (run_dir / CHECKPOINT_DIR).iterdir():
        if keep(p.name):
            shutil.copy(p, out / CHECKPOINT_DIR / p.name)
    return out


class FakePipelined:
    """A :class:`PipelinedExecutor` in this process: runs the oldest submitted task when asked
    for one, records what happened in which order, and can lose chosen tasks (as a Ray task
    whose worker died on every try)."""

    def __init__(self, lose=lambda fn, task: False):
        self.queue: list[tuple[int, object, object]] = []
        self.events: list[tuple[str, str]] = []
        self.lose = lose
        self.tickets = 0

    def submit(self, fn, task):
        self.tickets += 1
        self.queue.append((self.tickets, fn, task))
        self.events.append(("submit", fn.__name__))
        return self.tickets

    def next_done(self):
        ticket, fn, task = self.queue.pop(0)
        self.events.append(("done", fn.__name__))
        if self.lose(fn, task):
            return ticket, TaskLost("the Ray task did not finish: its worker died on each of 3 "
                                    "tries (WorkerCrashedError: simulated)")
        return ticket, fn(task)

    def pending(self):
        return len(self.queue)

    def cancel_pending(self):
        self.queue.clear()


def test_pipelined_sweep_overlaps_the_phases_and_gives_the_local_rows(local_run, tmp_path):
    executor = FakePipelined()
    assert isinstance(executor, PipelinedExecutor)
    summary = run_grid(load_grid(TINY), tmp_path / "run", executor=executor, progress=False)
    assert (summary.total, summary.ok, summary.failed) == (8, 8, 0)
    assert_same_rows(ResultsStore(tmp_path / "run").rows(), local_run[1])
    ev = executor.events
    assert Counter(name for kind, name in ev if kind == "done") == {
        "train_checkpoint": 3, "evaluate_reference": 2, "run_method": 4}
    # method runs start once the original exists, while the oracles are still to be trained,
    # and finish before their request's A_or is known (the driver adds the AUS)
    first_method = ev.index(("submit", "run_method"))
    assert ("done", "train_checkpoint") in ev[first_method + 1:]
    assert ev.index(("done", "run_method")) < ev.index(("done", "evaluate_reference"))


def test_lost_tasks_become_failed_rows_and_a_rerun_finishes_them(local_run, tmp_path):
    run_dir = with_checkpoints(local_run[0], tmp_path, keep=lambda n: "oracle-class1" not in n)

    def lose(fn, task):  # the oracle of class 1, and the scar run on class 0
        if fn.__name__ == "train_checkpoint":
            return task.role == "oracle"
        return fn.__name__ == "run_method" and (task.spec.method, task.spec.forget_id) == (
            "scar", "class0")

    executor = FakePipelined(lose)
    summary = run_grid(load_grid(TINY), run_dir, executor=executor, progress=False)
    assert (summary.total, summary.ok, summary.failed) == (8, 3, 5)
    rows = ResultsStore(run_dir).rows()
    assert len(rows) == 8 and len({r["run_id"] for r in rows}) == 8
    failed = {(r["method"], r["forget_id"]): r["error"] for r in rows if r["status"] == "failed"}
    assert failed.pop(("scar", "class0")).startswith("TaskLost: the Ray task did not finish")
    assert set(failed) == {(m, "class1") for m in ("original", "retrain", "scar",
                                                   "negative_gradient")}
    assert all(e.startswith("oracle checkpoint: TaskLost:") for e in failed.values())
    # the class-1 method runs never started: they wait for their oracle (they measure their
    # distance to its outputs), which was lost
    assert Counter(n for k, n in executor.events if k == "done")["run_method"] == 2
    again = run_grid(load_grid(TINY), run_dir, executor=FakePipelined(), progress=False)
    assert (again.skipped, again.ok, again.failed) == (3, 5, 0)
    latest = ResultsStore(run_dir).latest()
    assert len(latest) == 8 and all(r["status"] == "ok" for r in latest.values())
    assert_same_rows([r for r in ResultsStore(run_dir).rows() if r["status"] == "ok"],
                     local_run[1])


def test_ray_flags_need_the_ray_executor(tmp_path, capsys, monkeypatch):
    import scar.cli_run  # noqa: F401  (registers `scar run`)
    from scar.cli import main

    grid = tmp_path / "tiny.yaml"
    grid.write_text(yaml.safe_dump(TINY))
    assert main(["-q", "run", str(grid), "--out", str(tmp_path / "r"), "--address", "auto"]) == 2
    assert "--address only apply with --executor ray" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # as if ray were not installed
    assert main(["-q", "run", str(grid), "--out", str(tmp_path / "r"), "--executor", "ray"]) == 2
    assert "pip install 'scar-unlearn[ray]'" in capsys.readouterr().err
    from scar.experiments.executors import RayExecutor

    with pytest.raises(OptionalDependencyError, match=r"scar-unlearn\[ray\]"):
        RayExecutor()


# ---------------------------------------------------------------- on a local Ray cluster
@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    # address="local": a new cluster even where `ray start` runs one (or left its address file)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.ray
@needs_ray
def test_ray_sweep_from_the_cli_gives_the_local_rows(ray_cluster, local_run, tmp_path, capsys):
    import scar.cli_run  # noqa: F401
    from scar.cli import main

    grid = tmp_path / "tiny.yaml"
    grid.write_text(yaml.safe_dump(TINY, sort_keys=False))
    out = tmp_path / "ray"
    assert main(["-q", "run", str(grid), "--out", str(out), "--executor", "ray",
                 "--cpus-per-task", "1"]) == 0
    assert "8 runs: 0 already finished, 8 ok, 0 failed" in capsys.readouterr().out
    assert_same_rows(ResultsStore(out).rows(), local_run[1])
    assert ray_cluster.is_initialized()  # the CLI used this cluster and left it running
    with pytest.raises(ConfigError, match="cluster has 2"):
        from scar.experiments.executors import RayExecutor

        RayExecutor(num_cpus=3).start()


def _kill_first_worker_running(fn_name: str, killed: list[int], stop: threading.Event) -> None:
    """SIGKILL the first Ray worker process seen executing ``fn_name`` (its process title)."""
    title = f"ray::{fn_name}".encode()
    while not stop.is_set():
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except OSError:
                continue
            if cmd.split(b"\0")[0].strip() == title:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
                return
        time.sleep(0.02)


def _sweep_with_a_killed_worker(run_dir: Path, retries: int):
    from scar.experiments.executors import RayExecutor

    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_worker_running,
                              args=("run_method", killed, stop), daemon=True)
    killer.start()
    try:
        summary = run_grid(load_grid(TINY), run_dir, executor=RayExecutor(retries=retries),
                           progress=False)
    finally:
        stop.set()
        killer.join(5)
    assert len(killed) == 1, "no Ray worker was seen running a method"
    return summary


@pytest.mark.ray
@needs_ray
def test_a_killed_ray_worker_is_retried_and_nothing_is_lost(ray_cluster, local_run, tmp_path):
    run_dir = with_checkpoints(local_run[0], tmp_path)
    summary = _sweep_with_a_killed_worker(run_dir, retries=2)
    assert (summary.total, summary.ok, summary.failed) == (8, 8, 0)
    assert_same_rows(ResultsStore(run_dir).rows(), local_run[1])


@pytest.mark.ray
@needs_ray
def test_a_ray_worker_killed_beyond_the_retries_is_a_failed_row(ray_cluster, local_run,
                                                                tmp_path):
    run_dir = with_checkpoints(local_run[0], tmp_path)
    summary = _sweep_with_a_killed_worker(run_dir, retries=0)
    assert (summary.total, summary.ok, summary.failed) == (8, 7, 1)
    rows = ResultsStore(run_dir).rows()
    assert len({r["run_id"] for r in rows}) == len(rows) == 8
    (failed,) = [r for r in rows if r["status"] == "failed"]
    assert failed["method"] in ("scar", "negative_gradient")
    assert failed["error"].startswith("TaskLost: the Ray task did not finish: its worker died")
    from scar.experiments.executors import RayExecutor

    again = run_grid(load_grid(TINY), run_dir, executor=RayExecutor(), progress=False)
    assert (again.skipped, again.ok, again.failed) == (7, 1, 0)
    assert_same_rows([r for r in ResultsStore(run_dir).rows() if r["status"] == "ok"],
                     local_run[1])
