"""Shared helpers of the benchmark scripts: flags, timing, peak memory, tables, RESULTS.md.

The scripts are run as ``python benchmarks/<name>.py`` (so this folder is on ``sys.path`` and
``import common`` works); they are scripts, not library code, and print their tables.

Conventions every script follows (see README.md):

* ``--small``: tiny sizes for the CI smoke test; a small run never records unless ``--record``;
* ``--no-record``: do not append to RESULTS.md even for a full run;
* ``--results PATH``: where sections are appended (default ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import json
import logging
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from scar.utils import (
    atomic_write_text,
    device_name,
    resolve_device,
    tune_cpu_allocator,
    versions,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "RESULTS.md"
RESULTS_HEADER = (
    "# Benchmark results\n\n"
    "Sections are appended by `benchmarks/common.record` (newest last); each names the date, "
    "the command, the device and the versions it was measured with. Compare numbers only "
    "within a section or between sections measured on the same device.\n"
)

log = logging.getLogger("benchmarks")


# ---------------------------------------------------------------- flags
def add_original_args(parser: argparse.ArgumentParser) -> None:
    """--dataset / --data-dir / --original / --work-dir, shared by the whole-run benchmarks."""
    parser.add_argument("--dataset", default=None,
                        help="dataset (default fashion-mnist; synthetic with --small)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--original", type=Path, default=None,
                        help="original checkpoint to reuse (default: train one here)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where a freshly trained original is saved (default: a temp dir)")


def add_common_args(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """``--small``, ``--record`` / ``--no-record``, ``--results`` and (optionally) ``--device``."""
    parser.add_argument("--small", action="store_true",
                        help="tiny sizes for the CI smoke test (never recorded unless --record)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--record", action="store_true",
                       help="append the table to the results file even for a --small run")
    group.add_argument("--no-record", action="store_true",
                       help="do not append the table to the results file")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="results file to append to (default benchmarks/RESULTS.md)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice). On a shared machine "
                             "use 1: spare-core OpenMP waits can make small ops 100x slower")
    if device:
        parser.add_argument("--device", default="auto",
                            help="auto (CUDA if available), cpu, cuda or cuda:N (default auto)")


def should_record(args: argparse.Namespace) -> bool:
    """Full runs record unless ``--no-record``; ``--small`` runs only with ``--record``."""
    if getattr(args, "no_record", False):
        return False
    return bool(getattr(args, "record", False)) or not getattr(args, "small", False)


def command_line() -> str:
    """The command that started this process, relative to the repository root when possible."""
    argv = list(sys.argv)
    with contextlib.suppress(ValueError):
        argv[0] = str(Path(argv[0]).resolve().relative_to(REPO_ROOT))
    return shlex.join(["python", *argv])


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def get_device(args: argparse.Namespace) -> torch.device:
    """The device of ``--device``; ``--small`` runs stay on the CPU unless a device is named.

    Also applies ``--threads`` and, like the ``scar`` command, tunes glibc's allocator
    (``scar.utils.tune_cpu_allocator``; ``SCAR_NO_MALLOPT=1`` to keep its defaults)."""
    tune_cpu_allocator()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if getattr(args, "small", False) and args.device == "auto":
        return torch.device("cpu")
    return resolve_device(args.device)


# ---------------------------------------------------------------- recording
def record(section: str, command: str, table_markdown: str, notes: str = "", *,
           device: torch.device | str | None = None, path: str | Path = RESULTS) -> Path:
    """Append a dated section (date UTC, command, device, versions, table, notes) to ``path``.

    The file is read, extended and written to a temporary file that then replaces it
    (:func:`scar.utils.atomic_write_text`: temp file in the same folder + ``os.replace``), so a
    crash never leaves a half-written results file.
    """
    path = Path(path)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    old = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    vers = ", ".join(f"{k} {v}" for k, v in versions().items())
    parts = [
        f"## {section}",
        "",
        f"- date: {stamp}",
        f"- command: `{command}`",
        f"- device: {device_name(dev)}",
        f"- versions: {vers}",
        "",
        table_markdown.rstrip(),
    ]
    if notes.strip():
        parts += ["", notes.strip()]
    text = old.rstrip("\n") + "\n\n" + "\n".join(parts) + "\n"
    atomic_write_text(path, text)
    return path


def maybe_record(args: argparse.Namespace, section: str, table: str, notes: str = "",
                 device: torch.device | None = None) -> None:
    if should_record(args):
        where = record(section, command_line(), table, notes, device=device, path=args.results)
        print(f"\nrecorded in {where}")
    else:
        print("\n(not recorded: --small or --no-record)")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed as given (format them before)."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 3) -> str:
    """A number for a table; ``-`` for None / NaN."""
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}"


# ---------------------------------------------------------------- timing
def synchronize(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], *, repeats: int, warmup: int = 1,
              device: torch.device | str | None = None, min_seconds: float = 0.0
              ) -> tuple[float, list[float]]:
    """Median seconds per call of ``fn`` (after ``warmup`` calls) and all measured times.

    Keeps calling until ``repeats`` calls are measured and, if ``min_seconds`` is given, at least
    that much time was spent measuring (short calls get more samples).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    while len(times) < repeats or sum(times) < min_seconds:
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if len(times) >= 1000:
            break
    return statistics.median(times), times


# ---------------------------------------------------------------- peak memory
def _malloc_trim() -> None:
    """Give freed heap pages back to the OS (glibc), so the RSS baseline is not inflated by
    memory the allocator kept and would hand out again without the RSS growing."""
    name = ctypes.util.find_library("c")
    if not name:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


@dataclass
class PeakMemory:
    """Peak memory (bytes) used above the level at ``__enter__`` by the code in the block.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensors only, the caching allocator's reserve not
    counted). CPU: the process's peak resident set size; the kernel's peak mark (VmHWM) is reset
    at entry through ``/proc/self/clear_refs`` after a ``gc.collect`` and ``malloc_trim``, so
    earlier set-up peaks do not hide the block's. Where that reset is not possible the fallback is
    ``ru_maxrss``, which never decreases: it is then only right in a fresh process whose set-up
    used less memory than the block (``method`` says which was used).
    """

    device: torch.device | str = "cpu"
    peak_bytes: int = 0
    method: str = ""

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self._dev = torch.device(self.device)
        if self._dev.type == "cuda":
            torch.cuda.synchronize(self._dev)
            torch.cuda.reset_peak_memory_stats(self._dev)
            self._base = torch.cuda.memory_allocated(self._dev)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        _malloc_trim()
        if _reset_hwm():
            self.method = "VmHWM (reset at start)"
            self._base = (_status_kb("VmRSS") or 0) * 1024
        else:
            self.method = "ru_maxrss (monotone)"
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self._dev.type == "cuda":
            torch.cuda.synchronize(self._dev)
            peak = torch.cuda.max_memory_allocated(self._dev)
        elif self.method.startswith("VmHWM"):
            peak = (_status_kb("VmHWM") or 0) * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak_bytes = max(0, peak - self._base)

    @property
    def peak_mb(self) -> float:
        return self.peak_bytes / 2**20


# ---------------------------------------------------------------- child processes
CHILD_MARK = "BENCH-RESULT "


def emit_child_result(obj: dict[str, Any]) -> None:
    """What a child process prints as its last line for :func:`run_child` to parse."""
    print(CHILD_MARK + json.dumps(obj), flush=True)


def run_child(argv: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python <argv>`` in a fresh process and return the dict it emitted."""
    cmd = [sys.executable, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"child {shlex.join(cmd)} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK):])
    raise RuntimeError(f"child {shlex.join(cmd)} printed no result line:\n{proc.stdout[-2000:]}")


# ---------------------------------------------------------------- whole-run set-up
@contextlib.contextmanager
def phase(label: str) -> Iterator[None]:
    """Print how long a set-up phase took (to stderr, so tables stay clean on stdout)."""
    start = time.perf_counter()
    print(f"[{label} ...]", file=sys.stderr, flush=True)
    yield
    print(f"[{label}: {time.perf_counter() - start:.1f}s]", file=sys.stderr, flush=True)


def load_or_train_original(args: argparse.Namespace, bundle, device: torch.device,
                           work_dir: Path):
    """The original checkpoint: ``--original PATH`` if given, else trained here with the
    dataset's recipe (``epochs=1`` for ``--small``) and saved under ``work_dir`` with its stored
    class statistics. Returns (checkpoint, recipe used to train it)."""
    from scar.checkpoint import load_checkpoint
    from scar.experiments.unlearn import check_dataset_matches
    from scar.training.recipes import RECIPES, Recipe
    from scar.training.workflow import TrainJob, run_train_job

    overrides: dict[str, Any] = {"epochs": 1} if args.small else {}
    if args.original:
        ck = load_checkpoint(args.original)
        check_dataset_matches(ck, bundle)
        stored = ck.meta.get("recipe")
        if stored:
            stored = dict(stored)
            stored["milestones"] = tuple(stored.get("milestones", ()))
            recipe = Recipe(**stored)
        else:
            recipe = RECIPES.get(bundle.info.recipe)
            log.warning("%s has no recipe in its sidecar; using the %r recipe", args.original,
                        bundle.info.recipe)
        return ck, recipe
    recipe = RECIPES.get(bundle.info.recipe).with_overrides(overrides)
    job = TrainJob(dataset=bundle.info.name, recipe_overrides=overrides, seed=0)
    with phase(f"training the original {recipe.model} ({recipe.epochs} epochs)"):
        path = run_train_job(job, work_dir / "original.safetensors", bundle=bundle, device=device,
                             progress=False)
    return load_checkpoint(path), recipe


def parse_int_list(text: str, flag: str) -> list[int]:
    """``"0,3,7"`` → [0, 3, 7]; anything else exits naming ``flag``."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{flag} takes integers separated by commas; got {text!r}") from None


def parse_sets(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """``--set method.key=value`` items → {method: {key: value}} (values coerced later)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        target, sep, value = item.partition("=")
        method, dot, key = target.partition(".")
        if not sep or not dot or not method or not key:
            raise SystemExit(f"--set expects METHOD.KEY=VALUE; got {item!r}")
        out.setdefault(method, {})[key] = value
    return out
