"""Smoke test of the benchmark scripts: every ``--small`` run exits 0 and prints its table.

Benchmarks measure speed; this only checks that the scripts still run against the library (tiny
sizes, CPU, one thread, nothing recorded). Two scripts run at a time to stay well under a minute.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
FLAGS = ["--small", "--no-record", "--threads", "1"]

#: script → (command, the header line of its table)
CASES: dict[str, tuple[list[str], str]] = {
    "bench_vs_retrain": (
        [sys.executable, "benchmarks/bench_vs_retrain.py"],
        "| scenario | method | unlearn s | x retrain | forget acc | retain acc | test acc | AUS |",
    ),
    "probe_scar": ([sys.executable, "benchmarks/probe_scar.py"],
                   "| model | forget | retain/test | drop |"),
    "gpu_check": (["bash", "benchmarks/gpu_check.sh"], "| item | seconds | peak MB | details |"),
    "profile_scar": ([sys.executable, "benchmarks/profile_scar.py"],
                     "| phase | seconds | share | calls |"),
    "bench_step": ([sys.executable, "benchmarks/bench_step.py"],
                   "| batch | classes | width | ms/step | peak MB | head MB |"),
    "bench_mahalanobis": (
        [sys.executable, "benchmarks/bench_mahalanobis.py"],
        "| batch | classes | dim | batched ms | per-sample ms | speed-up |",
    ),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench_out")
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    results_file = BENCH / "RESULTS.md"
    before = results_file.read_text() if results_file.exists() else None

    def run(name: str) -> subprocess.CompletedProcess:
        return subprocess.run(CASES[name][0] + FLAGS, cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(CASES, pool.map(run, CASES), strict=True))
    after = results_file.read_text() if results_file.exists() else None
    assert before == after, "a --small --no-record run wrote to benchmarks/RESULTS.md"
    done["_out"] = out  # type: ignore[assignment]
    return done


@pytest.mark.parametrize("name", list(CASES))
def test_small_run_prints_its_table(runs, name):
    proc = runs[name]
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    header = CASES[name][1]
    assert header in proc.stdout, f"{name}: no table header {header!r} in:\n{proc.stdout}"
    assert "(not recorded" in proc.stdout


def test_gpu_check_writes_under_out(runs):
    out = runs["_out"]
    assert (out / "gpu_check.md").read_text().startswith("# GPU check")
    assert (out / "gpu_check.json").stat().st_size > 0


def test_record_appends_a_dated_section(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_common", BENCH / "common.py")
    common = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = common  # dataclasses look their module up there
    try:
        spec.loader.exec_module(common)
    finally:
        sys.modules.pop(spec.name, None)
    path = tmp_path / "RESULTS.md"
    table = common.markdown_table(["a", "b"], [[1, 2]])
    common.record("first", "python x.py", table, "a note", path=path)
    common.record("second", "python y.py --z", table, path=path)
    text = path.read_text()
    assert text.startswith("# Benchmark results")
    assert text.index("## first") < text.index("## second")
    for needle in ("- date: ", "UTC", "- command: `python y.py --z`", "- device: cpu",
                   "- versions: scar ", "| a | b |", "| 1 | 2 |", "a note"):
        assert needle in text
    assert not list(tmp_path.glob(".RESULTS.md.*"))  # no temporary file left behind


def test_logit_mask_runs_on_a_checkpoint(tmp_path):
    """benchmarks/logit_mask.py (the yardstick quoted for self-forget in the README)."""
    ck = tmp_path / "m.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "scar", "-q", "train", "--dataset", "synthetic",
                    "--epochs", "1", "--out", str(ck)], cwd=ROOT, env=env, check=True,
                   timeout=300)
    proc = subprocess.run([sys.executable, "benchmarks/logit_mask.py", "--original", str(ck),
                           "--classes", "0,3"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("class ")]
    assert [ln.split(":")[0].strip() for ln in lines] == ["class 0", "class 3"]
    assert all("forget-test 0.00%" in ln for ln in lines)


def test_panel_table_summarises_probe_rows(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("panel_table", BENCH / "panel_table.py")
    panel = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(panel)
    row = {"original": "a.safetensors", "model": "fastcnn", "method": "scar", "hparams": {},
           "seed": 0, "steps": 4, "a_or": 0.90, "retain_test": 0.89, "forget_test": 0.01,
           "aus": 0.98, "forget": "class 1 seed 0",
           "class_change": [-2.0, -90.0, 1.0]}
    row["seconds"] = 1.0
    other = {**row, "seed": 1, "steps": 8, "seconds": 2.0, "retain_test": 0.87,
             "forget_test": 0.0, "aus": 0.97, "forget": "class 1 seed 1",
             "class_change": [0.5, -95.0, -6.0]}
    hr = {**row, "forget": "hr 0.1 seed 0"}  # random-removal rows are not in the CR table
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (row, other, hr)) + "\n")
    rows = panel.read_rows([path])
    assert len(rows) == 2
    line = panel.summary_line(rows, "")
    # drops 1 and 3 points; forget 1% and 0%; the removed class's -90/-95 is not a kept class
    assert line[2:] == ["1", "0, 1", "+2.00 / +3.00", "0.50 / 1.00", "0.975 / 0.970",
                        "-4.0 / -6.0", "6.0", "1.5"]
    assert panel.table(rows).count("\n") == 2  # header, rule, one group
