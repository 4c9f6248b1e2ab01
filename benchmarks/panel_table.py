"""The architecture panel's summary table from rows written by ``probe_scar.py --log``.

One line per (checkpoint, method, hyperparameters) group of class-removal rows: the classes and
seeds it covers, the retain-test drop (mean / worst, points), forget-test (mean / worst, %),
AUS (mean / min), the worst change of a single kept class (points; the mean over runs of each
run's worst, and the worst of all), the mean number of steps and the mean of the method's own
seconds (``method.seconds_``: a time only where the rows ran alone). This is the table of the
README's *Every architecture: the panel*.

    python benchmarks/panel_table.py benchmarks/fmnist_arch_panel/forget_distill/*.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common import markdown_table

HEADERS = ["architecture", "method", "classes", "seeds", "retain-test drop (mean / worst)",
           "forget-test % (mean / worst)", "AUS (mean / min)",
           "worst kept class (mean / worst)", "steps (mean)", "seconds (mean)"]


def read_rows(paths: list[Path]) -> list[dict]:
    """Every class-removal row of the files, in file order."""
    rows = []
    for path in paths:
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("forget", "").startswith("class "):
                    rows.append(row)
    return rows


def group_key(row: dict) -> tuple[str, str, str]:
    return (row["original"], row["method"], json.dumps(row.get("hparams") or {}, sort_keys=True))


def worst_kept(row: dict) -> float:
    """The most negative accuracy change (points) of a class other than the removed one."""
    removed = int(row["forget"].split()[1])
    return min(v for k, v in enumerate(row["class_change"]) if k != removed)


def ids(values: set[int]) -> str:
    values = sorted(values)
    return "all 10" if values == list(range(10)) else ", ".join(map(str, values))


def summary_line(rows: list[dict], label: str) -> list[str]:
    drop = [100 * (r["a_or"] - r["retain_test"]) for r in rows]
    forget = [100 * r["forget_test"] for r in rows]
    aus = [r["aus"] for r in rows]
    kept = [worst_kept(r) for r in rows]
    steps = [r["steps"] for r in rows if r.get("steps") is not None]
    seconds = [r["seconds"] for r in rows if r.get("seconds") is not None]
    method = rows[0]["method"] + (f" ({label})" if label else "")
    return [rows[0]["model"], method,
            ids({int(r["forget"].split()[1]) for r in rows}),
            ids({int(r.get("seed", 0)) for r in rows}),
            f"{statistics.mean(drop):+.2f} / {max(drop):+.2f}",
            f"{statistics.mean(forget):.2f} / {max(forget):.2f}",
            f"{statistics.mean(aus):.3f} / {min(aus):.3f}",
            f"{statistics.mean(kept):.1f} / {min(kept):.1f}",
            f"{statistics.mean(steps):.1f}" if steps else "—",
            f"{statistics.mean(seconds):.1f}" if seconds else "—"]


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault(group_key(row), []).append(row)
    lines = []
    for (_, _, hparams), members in groups.items():
        label = ", ".join(f"{k}={v}" for k, v in json.loads(hparams).items())
        lines.append(summary_line(members, label))
    return markdown_table(HEADERS, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", type=Path, help="JSON-lines files of probe_scar.py")
    args = parser.parse_args(argv)
    print(table(read_rows(args.rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
