"""``scar run GRID.yaml [--out RUN_DIR] [--dry-run] [--only key=value,...] [--device ...]
[--executor local|ray [--address auto] [--cpus-per-task N] [--gpus-per-task N] [--retries N]]``.

Its parser (``add_run_parser``) and handler (``cmd_run``) are registered by :mod:`scar.cli`,
which imports this module (never the other way round: no import cycle). Exit code 0 when every
run succeeded, 1 when some failed (their rows say why), 2 for an invalid grid (nothing ran).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from scar.errors import ConfigError

DEFAULT_RUNS_DIR = Path("runs")


def add_run_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run an experiment grid (YAML) into a run folder")
    p.add_argument("grid", metavar="GRID", help="grid file (YAML; see scar.experiments.grid)")
    p.add_argument("--out", default=None,
                   help="run folder (default runs/<grid name, else the file name>)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the expanded runs (and which are finished) without running them")
    p.add_argument("--only", action="append", metavar="KEY=VALUE[,KEY=VALUE...]",
                   help="run a subset, e.g. --only method=scar,seed=0 or --only class=3|5")
    p.add_argument("--device", default=None, help="override the grid's device (auto|cpu|cuda:N)")
    ray = p.add_argument_group(
        "distributed sweeps", "run each task (training, reference rows, method runs) as a Ray "
        "task, the three phases overlapping; needs the ray extra (pip install "
        "'scar-unlearn[ray]') and a run folder + data on a file system every node sees")
    ray.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: in turn in this process (default); ray: on a Ray cluster")
    ray.add_argument("--address", default=None,
                     help="Ray cluster to join: auto (the one `ray start` runs here) or "
                          "HOST:PORT; default: start a local one")
    ray.add_argument("--cpus-per-task", type=float, default=None, metavar="N",
                     help="CPUs each Ray task holds (default 1)")
    ray.add_argument("--gpus-per-task", type=float, default=None, metavar="N",
                     help="GPUs each Ray task holds (default 1 when the cluster has GPUs, else 0)")
    ray.add_argument("--retries", type=int, default=None, metavar="N",
                     help="times a task whose Ray worker died is retried before its runs are "
                          "recorded as failed (default 2)")


def parse_only(values: Sequence[str] | None) -> dict[str, str]:
    """``["method=scar,seed=0", "class=3"]`` → ``{"method": "scar", "seed": "0", "class": "3"}``."""
    out: dict[str, str] = {}
    for value in values or []:
        for pair in filter(None, (p.strip() for p in value.split(","))):
            key, sep, wanted = pair.partition("=")
            if not sep or not key.strip() or not wanted.strip():
                raise ConfigError(f"--only expects key=value pairs separated by ','; got {pair!r}.")
            out[key.strip()] = wanted.strip()
    return out


RAY_FLAGS = ("address", "cpus_per_task", "gpus_per_task", "retries")


def make_executor(args: argparse.Namespace):
    """The executor the flags ask for (None: the runner's local default)."""
    given = [f"--{f.replace('_', '-')}" for f in RAY_FLAGS if getattr(args, f, None) is not None]
    if args.executor == "local":
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --executor ray.")
        return None
    from scar.experiments.executors import DEFAULT_RETRIES, RayExecutor

    return RayExecutor(address=args.address,
                       num_cpus=1.0 if args.cpus_per_task is None else args.cpus_per_task,
                       num_gpus=args.gpus_per_task,
                       retries=DEFAULT_RETRIES if args.retries is None else args.retries)


def default_run_dir(grid_path: str | Path, name: str | None) -> Path:
    return DEFAULT_RUNS_DIR / (name or Path(grid_path).stem)


def format_runs(specs, finished: set[str]) -> str:
    """One line per run: id, dataset, model, scenario, forget, seed, method, changed hparams."""
    from scar.experiments.grid import hparams_changed

    rows = [(s.run_id, s.dataset, s.model or "(default)", s.scenario, s.forget_id, str(s.seed),
             s.method, ", ".join(f"{k}={v}" for k, v in hparams_changed(s).items()) or "-",
             " (finished)" if s.run_id in finished else "") for s in specs]
    names = ("run id", "dataset", "model", "scen", "forget", "seed", "method",
             "hyperparameters (non-default)")
    # Column widths from the content (a long model name must not run into the next column).
    widths = [max([len(n), *(len(r[i]) for r in rows)]) + 1 for i, n in enumerate(names[:-1])]
    head = "".join(n.ljust(w) for n, w in zip(names, widths)) + names[-1]
    lines = [head, "-" * len(head)]
    lines += ["".join(v.ljust(w) for v, w in zip(r, widths)) + r[-2] + r[-1] for r in rows]
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from scar.experiments.grid import check_only, expand, load_grid
    from scar.experiments.runner import run_grid, select
    from scar.experiments.store import ResultsStore

    grid = load_grid(args.grid).with_device(args.device)
    only = parse_only(args.only)
    check_only(only)
    run_dir = Path(args.out) if args.out else default_run_dir(args.grid, grid.name)
    if args.dry_run:
        specs = select(expand(grid), only)
        finished = ResultsStore(run_dir).finished_ids()
        print(format_runs(specs, finished))
        done = sum(s.run_id in finished for s in specs)
        print(f"{len(specs)} runs ({done} already finished in {run_dir}); nothing was run.")
        return 0
    executor = make_executor(args)
    try:
        if executor is not None:
            executor.start()  # an unreachable cluster: an error before the run folder exists
        summary = run_grid(grid, run_dir, executor=executor, only=only, progress=not args.quiet)
    finally:
        if executor is not None:
            executor.close()
    print(f"{summary.total} runs: {summary.skipped} already finished, {summary.ok} ok, "
          f"{summary.failed} failed")
    print(f"results: {ResultsStore(run_dir).path}")
    if summary.failed:
        print(f"some runs failed; their rows hold the error. Rerun `scar run {args.grid}"
              f"{' --out ' + str(args.out) if args.out else ''}` to retry only those.")
    return 1 if summary.failed else 0

