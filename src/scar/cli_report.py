"""``scar report RUN_DIR [--out DIR]``: tables, notes and plots from a run's stored rows.

Its parser (``add_report_parser``) and handler (``cmd_report``) are registered by
:mod:`scar.cli`, which imports this module (never the other way round: no import cycle).
"""

from __future__ import annotations

import argparse


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="tables (md/csv/tex) and plots from a run's results.jsonl")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding results.jsonl")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")


def cmd_report(args: argparse.Namespace) -> int:
    from scar.experiments.report import (
        build_report,
        format_markdown_table,
        mia_separation_note,
        oracle_note,
        split_tables,
        table_title,
    )

    groups, written = build_report(args.run_dir, args.out)
    tables = split_tables(groups)
    if not tables:
        print("no successful runs to tabulate")
    for key, table in tables.items():
        print(f"## {table_title(key)}\n")
        print(format_markdown_table(table))
        print(f"\n{mia_separation_note(table)}")
        note = oracle_note(table)
        print(f"{note}\n" if note else "")
    print("written:")
    for name, path in written.items():
        print(f"  {name:<30} {path}")
    return 0

