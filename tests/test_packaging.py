"""Package metadata and entry points (issue 13, part 4)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import scar
from scar.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_version_flag_and_python_dash_m(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"scar {scar.__version__}"
    out = subprocess.run([sys.executable, "-m", "scar", "--version"], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == f"scar {scar.__version__}"


def test_pyproject_metadata():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["license"] == {"text": "MIT"} and "MIT" in (ROOT / "LICENSE").read_text()
    assert "License :: OSI Approved :: MIT License" in project["classifiers"]
    assert "Typing :: Typed" in project["classifiers"] and project["urls"]
    assert project["version"] == scar.__version__
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["scar"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target, runs", [("demo", ".venv/bin/scar demo"),
                                          ("test", ".venv/bin/python -m pytest -q")])
def test_make_targets_install_what_is_missing_then_run(target, runs):
    plan = subprocess.run(["make", "-n", "-B", target], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.splitlines()
    assert plan.index("bash scripts/install.sh") < plan.index(runs)
