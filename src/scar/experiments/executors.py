"""How the runner's tasks are executed: in turn here, or on a Ray cluster.

The runner only ever ships top-level functions of :mod:`scar.experiments.runner` and frozen
dataclasses of plain values (paths, names, numbers), so both pickle and can go to another process
or machine; each task loads what it needs (dataset, checkpoint, surrogate) itself and returns a
plain dict. Task functions catch their own exceptions and return them as a failed result, so one
bad run never stops a sweep. Results are consumed as they arrive: the driver stores each one at
once, so an interrupted sweep keeps everything finished before the interruption.

Two shapes of executor:

- :class:`Executor` (``map(fn, tasks)``, e.g. :class:`LocalExecutor`, the default): the runner
  maps over each phase in turn (train checkpoints, then the reference rows, then the methods).
- :class:`PipelinedExecutor` (``submit`` / ``next_done``, e.g. :class:`RayExecutor`): the runner
  submits a task as soon as what it needs exists (a method run as soon as its original is
  trained), so the three phases overlap. A task the executor itself could not run (its worker
  died more often than the retries allow) comes back as a :class:`TaskLost` instead of a result,
  and the runner records the task's runs as failed rows.

A distributed executor needs the run folder and the data on a file system every worker sees
(checkpoints are passed by path).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

from scar.errors import ConfigError, ScarError, optional_import

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


class TaskLost(ScarError):
    """A task the executor could not run to the end (its worker was killed, ran out of memory
    or lost its node on every try); the runner turns it into failed rows."""


class Executor(Protocol):
    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        """Yield ``fn(task)`` for each task (order not guaranteed)."""
        ...


@runtime_checkable
class PipelinedExecutor(Protocol):
    """An executor the runner feeds task by task, as their inputs come to exist."""

    def submit(self, fn: Callable[[T], Any], task: T) -> int:
        """Start ``fn(task)``; returns a ticket that :meth:`next_done` hands back."""
        ...

    def next_done(self) -> tuple[int, Any]:
        """Wait for any submitted task: ``(ticket, result)``, or ``(ticket, TaskLost)``."""
        ...

    def pending(self) -> int:
        """How many submitted tasks have not been handed back by :meth:`next_done`."""
        ...

    def cancel_pending(self) -> None:
        """Stop every submitted task not handed back yet (the sweep is being abandoned)."""
        ...


class LocalExecutor:
    """Run the tasks one after the other in this process (the default)."""

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        for task in tasks:
            yield fn(task)


#: Tries after the first when a Ray worker dies under a task (killed, out of memory, node lost).
#: A task that raises is never retried: the task functions turn their own errors into rows, and a
#: run that fails once (a bad hyperparameter, a missing file) fails again.
DEFAULT_RETRIES = 2


class RayExecutor:
    """Each task a Ray task holding ``num_cpus`` CPUs and ``num_gpus`` GPUs (the ``ray`` extra).

    ``address`` is passed to ``ray.init`` (None: the cluster this process already initialised,
    else the one ``RAY_ADDRESS`` names, else a new local one; ``"auto"`` or ``"HOST:PORT"``: an
    existing cluster, see the README's "Distributed sweeps with Ray"). ``num_gpus=None``: one
    GPU per task when the cluster has GPUs, else none. A task whose worker dies is retried
    ``retries`` times by Ray, then handed back as :class:`TaskLost`.
    """

    def __init__(self, *, address: str | None = None, num_cpus: float = 1.0,
                 num_gpus: float | None = None, retries: int = DEFAULT_RETRIES):
        self.ray = optional_import("ray", "ray")
        if num_cpus <= 0:
            raise ConfigError(f"RayExecutor: num_cpus (--cpus-per-task) must be > 0; "
                              f"got {num_cpus}.")
        if num_gpus is not None and num_gpus < 0:
            raise ConfigError(f"RayExecutor: num_gpus (--gpus-per-task) must be >= 0; "
                              f"got {num_gpus}.")
        if retries < 0:
            raise ConfigError(f"RayExecutor: retries must be >= 0; got {retries}.")
        self.address, self.num_cpus, self.num_gpus = address, num_cpus, num_gpus
        self.retries = retries
        self._started_here = False
        self._remote: dict[Callable, Any] = {}
        self._refs: dict[Any, int] = {}  # ObjectRef -> ticket
        self._tickets = 0

    # ------------------------------------------------------------ cluster
    def start(self) -> None:
        """Connect to (or start) the cluster and settle the GPUs per task; idempotent."""
        ray = self.ray
        if not ray.is_initialized():
            try:
                # None: a new local cluster, even where `ray start` left one running (or only its
                # address file): joining one is asked for with an address (or RAY_ADDRESS).
                ray.init(address=self.address or os.environ.get("RAY_ADDRESS") or "local")
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ScarError(
                    f"could not start or reach the Ray cluster (address={self.address!r}): "
                    f"{str(exc).rstrip('.')}. Start one with `ray start --head` (and "
                    "`ray start --address HEAD_IP:6379` on every other node), or leave out "
                    "--address for a local one."
                ) from exc
            self._started_here = True
        if self._remote:
            return
        resources = ray.cluster_resources()
        if self.num_gpus is None:
            self.num_gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
        for name, wanted in (("CPU", self.num_cpus), ("GPU", self.num_gpus)):
            if wanted > resources.get(name, 0):
                flag = "--cpus-per-task" if name == "CPU" else "--gpus-per-task"
                raise ConfigError(f"each task asks for {wanted:g} {name}s ({flag}) but the Ray "
                                  f"cluster has {resources.get(name, 0):g}: no task could start.")
        log.info("Ray cluster: %g CPUs, %g GPUs; each task holds %g CPU(s), %g GPU(s)",
                 resources.get("CPU", 0), resources.get("GPU", 0), self.num_cpus, self.num_gpus)

    def close(self) -> None:
        """Shut down the cluster connection if :meth:`start` opened it."""
        if self._started_here and self.ray.is_initialized():
            self.ray.shutdown()
        self._started_here = False

    # ------------------------------------------------------------ tasks
    def _remote_fn(self, fn: Callable) -> Any:
        if fn not in self._remote:
            # Named after fn: the worker's process title is then ray::<fn> (ray::run_method).
            self._remote[fn] = self.ray.remote(
                num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_retries=self.retries,
                retry_exceptions=False)(_in_worker).options(name=getattr(fn, "__name__", "task"))
        return self._remote[fn]

    def submit(self, fn: Callable[[T], Any], task: T) -> int:
        self.start()
        ref = self._remote_fn(fn).remote(fn, task, max(1, int(self.num_cpus)))
        self._tickets += 1
        self._refs[ref] = self._tickets
        return self._tickets

    def pending(self) -> int:
        return len(self._refs)

    def next_done(self) -> tuple[int, Any]:
        ray = self.ray
        if not self._refs:
            raise RuntimeError("next_done() with no task pending")
        (ref,), _ = ray.wait(list(self._refs), num_returns=1)
        ticket = self._refs.pop(ref)
        try:
            return ticket, ray.get(ref)
        except ray.exceptions.RayError as exc:
            if isinstance(exc, ray.exceptions.RayTaskError):  # raised outside the task body
                why = "it raised in its worker"
            else:
                why = f"its worker died on each of {self.retries + 1} tries"
            lost = TaskLost(f"the Ray task did not finish: {why} "
                            f"({type(exc).__name__}: {_first_line(exc)})")
            log.error("%s", lost)
            return ticket, lost

    def cancel_pending(self) -> None:
        for ref in list(self._refs):
            try:
                self.ray.cancel(ref, force=True)
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                log.debug("cancelling %s: %s", ref, exc)
        self._refs.clear()

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        """:class:`Executor` too: every task submitted at once; a lost task raises."""
        tickets = {self.submit(fn, task) for task in tasks}
        try:
            while tickets:
                ticket, out = self.next_done()
                tickets.discard(ticket)
                if isinstance(out, TaskLost):
                    raise out
                yield out
        finally:
            if tickets:
                self.cancel_pending()


def _in_worker(fn: Callable[[T], R], task: T, threads: int) -> R:
    """A task on a Ray worker: torch gets as many threads as the task holds CPUs (Ray sets
    OMP_NUM_THREADS per task, but a reused worker's torch keeps the count it was imported with)."""
    import torch

    torch.set_num_threads(threads)
    return fn(task)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
