"""Fixtures of the experiments tests: the demo on the shared tiny grid (tiny_grid.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from scar.experiments.demo import demo_grid, run_demo, write_demo_audit_page
from scar.experiments.grid import load_grid

TINY_GRID = Path(__file__).parent / "tiny_grid.yaml"
#: The demo shrunk to the tiny grid: its dataset, training, surrogate and methods (the demo's
#: own class, device and membership-inference attack stay).
TINY_DEMO = {k: v for k, v in yaml.safe_load(TINY_GRID.read_text()).items()
             if k not in ("name", "classes", "mia")}


@pytest.fixture(scope="session")
def demo_overrides() -> dict:
    """The grid keys that shrink the demo to the tiny grid (``run_demo(overrides=...)``)."""
    return dict(TINY_DEMO)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory):
    """``run_demo`` on the tiny grid: (run folder, its grid, the files it wrote)."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    summary, _, written = run_demo(run_dir, device="cpu", progress=False, overrides=TINY_DEMO)
    assert summary.failed == 0, summary
    return run_dir, load_grid(demo_grid(device="cpu", overrides=TINY_DEMO)), written


@pytest.fixture(scope="session")
def demo_audit(tiny_demo):
    """The demo's page step again on the tiny demo run: (page, RequestResult)."""
    run_dir, grid, _ = tiny_demo
    return write_demo_audit_page(run_dir, grid)
