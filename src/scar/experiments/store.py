"""The append-only results file of a run folder: ``results.jsonl``, one JSON object per line.

Each finished run (ok or failed) appends one row; reports are built from the rows only. A run can
appear more than once (a failed run retried later); :meth:`ResultsStore.latest` keeps the last row
of each id.

Row schema (reports rely on these keys)::

    run_id, status ("ok" | "failed"), error (str | None), dataset, model, scenario,
    forget (ForgetSpec.to_dict()), forget_id ("class3", "seed0"), seed,
    method (a method name, or "original" / "retrain"), hparams {...},
    preset (the name the hyperparameters started from, or None; absent in older rows),
    metrics {"acc/...", "mia/...", "aus", "time/unlearn_s"},
    access {"required": [...], "images_loaded": {...}, "profile": str} | None,
    device, device_name, versions {...}, finished_at (ISO 8601, UTC),
    forget_names (the removed classes' names, CR; None or absent otherwise)

Appending is atomic: the existing bytes plus the new line are written to a temporary file in the
same folder, fsynced and renamed over the file, so a crash (or Ctrl-C, or kill -9) leaves either
the old or the new file, never half a row. That costs O(size of the file) per append; a results
file holds one short line per run (a few hundred bytes), so even 10,000 runs rewrite a few MB per
append, negligible next to a run that trains or unlearns a model. A truncated last line (a file
written by other means, or a copy cut short) is skipped with a warning when reading and dropped
by the next append.

Several processes may write one store (e.g. ``scar run`` split with ``--only``, or the same sweep
started twice): each append holds an exclusive lock (``flock`` on ``.results.jsonl.lock``, released
by the kernel if the process dies) around its read-rename, so no process rewrites the file over
another's row; and a row whose run already has an "ok" row is not appended again, so a run
that two processes both finished appears once (the first "ok" row wins).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scar.errors import ScarError
from scar.utils import atomic_write_bytes, file_lock

log = logging.getLogger(__name__)

RESULTS_FILE = "results.jsonl"
STATUSES = ("ok", "failed")
ROW_KEYS = (
    "run_id", "status", "error", "dataset", "model", "scenario", "forget", "forget_id", "seed",
    "method", "hparams", "metrics", "access", "device", "device_name", "versions", "finished_at",
)  # fmt: skip


class ResultsStore:
    """Rows of ``path``: a ``.jsonl`` file, or a run folder holding ``results.jsonl`` (created
    on the first append)."""

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path if path.suffix == ".jsonl" else path / RESULTS_FILE

    def rows(self) -> list[dict[str, Any]]:
        """All complete rows, in file order."""
        return self.read()[0]

    def read(self) -> tuple[list[dict[str, Any]], int]:
        """(all complete rows in file order, number of unreadable last lines skipped): the one
        reader of results files (``scar run`` resumes, appends and ``scar report`` use it)."""
        if not self.path.exists():
            return [], 0
        return parse_rows_counted(self.path.read_bytes(), str(self.path))

    def latest(self) -> dict[str, dict[str, Any]]:
        """The last row of each run id."""
        return {row["run_id"]: row for row in self.rows()}

    def finished_ids(self) -> set[str]:
        """Ids with a row of status "ok" (failed runs are retried by a rerun)."""
        return {row["run_id"] for row in self.rows() if row.get("status") == "ok"}

    def append(self, row: dict[str, Any]) -> bool:
        """Append ``row``; False (nothing written) when its run already has an "ok" row."""
        check_row(row)
        line = json.dumps(row, sort_keys=True, default=_json_default).encode("utf-8") + b"\n"
        with file_lock(self.path):
            existing = self.path.read_bytes() if self.path.exists() else b""
            if any(r.get("status") == "ok" and r["run_id"] == row["run_id"]
                   for r in parse_rows(existing, str(self.path))):
                log.info("%s: run %s already has an ok row (another process); not appended",
                         self.path, row["run_id"])
                return False
            self._write(existing, line)
        return True

    def _write(self, existing: bytes, line: bytes) -> None:
        if existing and not existing.endswith(b"\n"):
            cut = existing.rfind(b"\n") + 1
            if _is_row(existing[cut:]):  # a whole row that only lacks its newline
                existing += b"\n"
            else:
                log.warning("%s: dropping a truncated last line (%d bytes)", self.path,
                            len(existing) - cut)
                existing = existing[:cut]
        atomic_write_bytes(self.path, existing + line)

    def extend(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.append(row)


# ---------------------------------------------------------------- views of rows
def latest_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    """One row per ``run_id``: a later row replaces an earlier one (a rerun after a failure)."""
    by_id: dict[Any, dict] = {}
    anonymous: list[dict] = []
    for row in rows:
        run_id = row.get("run_id")
        if run_id is None:
            anonymous.append(dict(row))
            continue
        if run_id in by_id:
            log.info("run %s appears again; the later row replaces the earlier one", run_id)
            del by_id[run_id]  # re-insert so file order reflects the latest row
        by_id[run_id] = dict(row)
    return list(by_id.values()) + anonymous


def ok_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    return [dict(r) for r in latest_rows(rows) if r.get("status", "ok") == "ok"]


def failed_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict]:
    return [dict(r) for r in latest_rows(rows) if r.get("status", "ok") != "ok"]


def parse_rows(data: bytes, source: str = "<results>") -> list[dict[str, Any]]:
    """Rows of a results file; a truncated or unreadable *last* line is skipped with a warning,
    an unreadable line elsewhere is an error (the file was edited by hand). The one reader of
    results files: ``scar run`` (resume), the store's appends and ``scar report``."""
    return parse_rows_counted(data, source)[0]


def parse_rows_counted(data: bytes, source: str = "<results>"
                       ) -> tuple[list[dict[str, Any]], int]:
    """:func:`parse_rows`, and how many (last) lines it skipped."""
    lines = data.split(b"\n")
    complete = data.endswith(b"\n")
    rows = []
    skipped = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        last = number == len(lines) or (number == len(lines) - 1 and complete)
        try:
            row = _load_row(raw)
        except ValueError as exc:
            if last:
                log.warning("%s: skipping a truncated or unreadable last line %d (%s)", source,
                            number, exc)
                skipped += 1
                continue
            raise ScarError(
                f"{source}, line {number} is not a results row ({exc}); the file was changed by "
                "something other than `scar run`: fix or delete that line."
            ) from exc
        if not complete and number == len(lines):
            log.warning("%s: last line %d has no newline (a cut-short write?)", source, number)
        rows.append(row)
    return rows, skipped


def _load_row(raw: bytes) -> dict[str, Any]:
    row = json.loads(raw)
    if not isinstance(row, dict) or "run_id" not in row:
        raise ValueError("not a row object with a run_id")
    return row


def _is_row(raw: bytes) -> bool:
    try:
        _load_row(raw)
    except ValueError:
        return False
    return True


def check_row(row: dict[str, Any]) -> None:
    """Internal invariant: the runner writes complete rows only."""
    missing = [k for k in ROW_KEYS if k not in row]
    assert not missing, f"results row lacks {missing}"
    assert row["status"] in STATUSES, row["status"]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
