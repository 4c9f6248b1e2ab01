import shutil

import pytest

from scar.cli import main
from scar.errors import ConfigError, ScarError
from scar.evaluation.audit import SPLIT_NAMES
from scar.experiments.demo import (
    DEMO_GRID,
    audit_checkpoints,
    audit_page_paths,
    audit_spec,
    demo_grid,
    write_demo_audit_page,
)
from scar.experiments.grid import expand, load_grid
from scar.experiments.html_report import accuracy_text
from scar.experiments.runner import request_of
from scar.methods import METHODS
from scar.methods.presets import PRESETS
from scar.models.pretrained import sha256


def test_demo_grid_is_valid_and_covers_every_method():
    runs = expand(load_grid(demo_grid(forget_class=3, device="cpu")))
    methods = {r.method for r in runs}
    # SCAR, self-forget and the reference code's baselines (the methods of the reference
    # preset), with the oracle as the "retrain" reference row; the field's other methods are
    # registered but not in the demo (scar run with them)
    assert methods == set(PRESETS.get("reference").methods) | {"original", "retrain"}
    assert methods <= set(METHODS.names()) | {"original"}
    assert {r.forget_id for r in runs} == {"class3"}
    assert DEMO_GRID["classes"] == [0]  # demo_grid copies, never mutates the default


def test_demo_grid_overrides_keep_the_class_and_device():
    grid = demo_grid(forget_class=2, device="cpu",
                     overrides={"dataset": "synthetic", "classes": [1], "device": "cuda"})
    assert grid["dataset"] == "synthetic" and grid["classes"] == [2] and grid["device"] == "cpu"
    assert DEMO_GRID["dataset"] == "fashion-mnist"


def test_the_audit_page_needs_a_scar_run_and_the_cached_models(tmp_path):
    with pytest.raises(ConfigError, match="no 'scar' run"):
        audit_spec(load_grid(demo_grid(overrides={"methods": {"duck": {}}})))
    grid = load_grid(demo_grid(device="cpu"))
    with pytest.raises(ScarError, match="lacks the cached original .* and oracle"):
        write_demo_audit_page(tmp_path / "never-run", grid)


def test_demo_writes_the_audit_page_of_its_scar_request(tiny_demo, demo_audit):
    run_dir, grid, written = tiny_demo
    page, result = demo_audit
    assert page == written["audit"] == audit_page_paths(run_dir)[0]
    assert page.parent == written["html"].parent  # beside report.html
    # the grid's SCAR request, on the grid's cached original and oracle
    assert result.request == request_of(audit_spec(grid))
    assert result.method.name == "scar"
    checkpoints = audit_checkpoints(run_dir, grid)
    assert result.checkpoint.path == checkpoints["original"]
    assert result.saved == audit_page_paths(run_dir)[1] and result.saved.exists()
    text = page.read_text()
    assert "<td>method</td><td>scar</td>" in text
    for path in (checkpoints["original"], checkpoints["oracle"], result.saved):
        assert sha256(path) in text
    # the tables hold the RequestResult's numbers (the browser test reads them cell by cell)
    results = result.results()
    assert set(results) == {"original", "retrain", "unlearned"}
    sizes = {s: len(getattr(result.splits, s)) for s in SPLIT_NAMES}
    for metrics in results.values():
        for split in SPLIT_NAMES:
            assert accuracy_text(metrics[f"acc/{split}"], sizes[split]) in text
        assert f"{metrics['aus']:.3f}" in text
        assert f"{metrics['mia/auc']:.3f} ± {metrics['mia/auc_std']:.3f}" in text


def test_scar_demo_again_reuses_the_models_and_rewrites_the_page(tiny_demo, demo_overrides,
                                                                 tmp_path, monkeypatch, capsys):
    """A second ``scar demo`` (the CLI, the demo grid shrunk to the tiny one): no training, no
    finished run again, the audit page and its checkpoint written anew."""
    import scar.experiments.demo as demo

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_demo[0], run_dir)
    cached = {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()}
    page, unlearned = audit_page_paths(run_dir)
    before = page.stat().st_ino, unlearned.stat().st_ino
    monkeypatch.setattr(demo, "DEMO_GRID", {**DEMO_GRID, **demo_overrides})
    assert main(["-q", "demo", "--out", str(run_dir), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "0 runs done, 4 reused, 0 failed" in out
    assert f"audit page of the scar request: {page}" in out
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "checkpoints").iterdir()} == cached
    # replaced whole (a new file renamed over the old one), not rewritten in place
    assert (page.stat().st_ino, unlearned.stat().st_ino) != before
    assert page.read_text().rstrip().endswith("</html>")
    assert not list(page.parent.glob(".*.tmp"))  # no temp files left
