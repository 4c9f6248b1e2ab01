"""The metrics beside the accuracies in a tiny grid: JS to the oracle, forget destination and
(grid key ``relearn``) relearn time in the rows, the oracle's outputs kept once, report columns."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from scar.data.forget import make_splits
from scar.errors import ConfigError
from scar.experiments.grid import expand, load_grid
from scar.experiments.report import build_report
from scar.experiments.runner import (
    CHECKPOINT_DIR,
    Settings,
    cached_dataset,
    clear_caches,
    oracle_outputs,
    oracle_outputs_path,
    run_grid,
)
from scar.experiments.store import ResultsStore

TINY = {**yaml.safe_load((Path(__file__).parent / "tiny_grid.yaml").read_text()),
        "device": "cpu", "classes": [1],
        "methods": {"negative_gradient": {"lr": 1.0e-4, "epochs": 1, "batch_size": 64}}}
RELEARN = {"max_steps": 4, "eval_images": 32, "batch_size": 32}


@pytest.fixture(scope="module")
def relearn_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("metrics") / "tiny"
    summary = run_grid(load_grid({**TINY, "relearn": RELEARN}), run_dir, progress=False)
    return run_dir, summary


def test_rows_record_js_destination_and_relearn(relearn_run):
    run_dir, summary = relearn_run
    assert (summary.ok, summary.failed) == (3, 0)
    rows = {r["method"]: r["metrics"] for r in ResultsStore(run_dir).rows()}
    assert set(rows) == {"original", "retrain", "negative_gradient"}
    for name in ("original", "negative_gradient"):
        js = {k: rows[name][k] for k in ("js/train_forget", "js/test_forget", "js/test")}
        assert all(0.0 <= v <= 0.6932 for v in js.values()), js
    assert not any(k.startswith("js/") for k in rows["retrain"])  # the oracle itself
    for m in rows.values():
        assert len(m["dest/shares"]) == 4 and sum(m["dest/shares"]) == pytest.approx(1.0)
        assert m["dest/top_share"] == max(m["dest/shares"])
        assert m["dest/shares"][m["dest/top_class"]] == m["dest/top_share"]
        assert 0 <= m["relearn/steps"] <= RELEARN["max_steps"]
        assert m["relearn/censored"] in (0, 1)
        assert m["relearn/target"] == pytest.approx(0.5 * rows["original"]["acc/train_forget"])
    assert rows["original"]["relearn/steps"] == 0  # it is at its own target already
    assert rows["retrain"]["dest/shares"][1] == 0.0  # the oracle never predicts the removed class


def test_the_oracle_outputs_are_kept_once_and_equal_a_fresh_pass(relearn_run):
    run_dir, _ = relearn_run
    oracle = next(p for p in (run_dir / CHECKPOINT_DIR).glob("*oracle*.safetensors")
                  if not p.name.endswith(".stats.safetensors"))
    kept_path = oracle_outputs_path(oracle)
    assert kept_path.is_file()
    spec = next(s for s in expand(load_grid(TINY)) if s.method == "negative_gradient")
    settings = Settings(run_dir=str(run_dir), device="cpu")
    splits = make_splits(cached_dataset(spec, settings), spec.forget)
    kept = oracle_outputs(str(oracle), splits, spec, settings, "cpu")
    kept_path.unlink()
    fresh = oracle_outputs(str(oracle), splits, spec, settings, "cpu")
    clear_caches()
    assert kept_path.is_file()  # computed again and kept
    assert set(kept) == set(fresh) == {"train_forget", "test_forget", "test"}
    for split in kept:
        assert torch.allclose(kept[split].logits, fresh[split].logits)
        assert torch.equal(kept[split].labels, fresh[split].labels)
    assert oracle_outputs(None, splits, spec, settings, "cpu") is None


def test_report_shows_the_new_columns_only_when_present(relearn_run, tmp_path):
    run_dir, _ = relearn_run
    groups, written = build_report(run_dir, tmp_path / "report")
    text = written["markdown"].read_text()
    for header in ("JS to oracle, train-forget", "forget top-class share", "relearn steps"):
        assert header in text
    assert "in nats" in text and "Relearn steps:" in text
    assert "dest/top_class_mean" not in written["csv"].read_text()  # a label is not averaged


def test_relearn_is_off_by_default_and_keeps_run_ids():
    plain = expand(load_grid(TINY))
    assert all(s.relearn is None and "relearn" not in s.to_dict() for s in plain)
    on = expand(load_grid({**TINY, "relearn": True}))
    assert on[0].relearn.max_steps == 200
    assert {s.run_id for s in plain}.isdisjoint({s.run_id for s in on})
    assert expand(load_grid({**TINY, "relearn": False})) == plain
    with pytest.raises(ConfigError, match="relearn"):
        load_grid({**TINY, "relearn": {"max_step": 3}})
