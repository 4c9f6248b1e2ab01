"""How the runner's tasks are executed: in turn here, or spread over GPUs.

An executor has one method, ``map(fn, tasks)``, yielding ``fn(task)`` for every task, in any
order (the runner matches results by their run id). The runner only ever passes top-level
functions of :mod:`scar.experiments.runner` and frozen dataclasses of plain values (paths,
names, numbers), so both pickle and can be shipped to another process or machine; each task
loads what it needs (dataset, checkpoint, surrogate) itself and returns a plain dict. Task
functions catch their own exceptions and return them as a failed result, so one bad run never
stops a ``map``. Results are consumed lazily: the runner stores each one as it arrives, so an
interrupted sweep keeps everything finished before the interruption.

A distributed executor (see :class:`RayExecutor`) wraps ``fn`` as a remote function asking for
one GPU, submits every task, and yields results as they complete. It needs the run folder and the
data on a file system every worker sees (checkpoints are passed by path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, TypeVar

from scar.errors import optional_import

T = TypeVar("T")
R = TypeVar("R")


class Executor(Protocol):
    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        """Yield ``fn(task)`` for each task (order not guaranteed)."""
        ...


class LocalExecutor:
    """Run the tasks one after the other in this process (the default)."""

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:
        for task in tasks:
            yield fn(task)


class RayExecutor:
    """Run each task as a Ray task holding ``num_gpus`` GPUs (needs the ``ray`` extra).

    ``address`` is passed to ``ray.init`` (None: a local cluster, "auto": an existing one).
    """

    def __init__(self, num_gpus: float = 1.0, num_cpus: float = 1.0,
                 address: str | None = None):
        self.ray = optional_import("ray", "ray")
        self.num_gpus, self.num_cpus, self.address = num_gpus, num_cpus, address

    def map(self, fn: Callable[[T], R], tasks: Iterable[T]) -> Iterator[R]:  # pragma: no cover
        ray = self.ray
        if not ray.is_initialized():
            ray.init(address=self.address)
        remote = ray.remote(num_gpus=self.num_gpus, num_cpus=self.num_cpus)(fn)
        pending = [remote.remote(task) for task in tasks]
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
