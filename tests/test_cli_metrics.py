"""`scar evaluate` / `scar unlearn` record the metrics beside the accuracies (JS to --oracle,
forget destination, --relearn)."""

import json

import pytest

from scar.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-metrics") / "orig.safetensors"
    assert main(["-q", "train", "--dataset", "synthetic", "--epochs", "1", "--out",
                 str(out)]) == 0
    return out


def test_evaluate_with_oracle_and_relearn(trained, tmp_path, capsys):
    report = tmp_path / "audit.json"
    assert main(["-q", "evaluate", "--checkpoint", str(trained), "--forget-class", "1",
                 "--no-mia", "--oracle", str(trained), "--relearn", "--relearn-set",
                 "max_steps=3", "--relearn-set", "eval_images=64", "--out", str(report)]) == 0
    assert "relearn/steps" in capsys.readouterr().out
    results = json.loads(report.read_text())["results"]
    assert set(results) == {"original", "retrain", "evaluated"}
    # the "oracle" here is the same model: distance 0
    assert results["evaluated"]["js/test_forget"] == pytest.approx(0.0, abs=1e-9)
    assert not any(k.startswith("js/") for k in results["retrain"])
    for m in results.values():
        assert m["relearn/steps"] == 0 and m["relearn/censored"] == 0
        assert sum(m["dest/shares"]) == pytest.approx(1.0)


def test_unlearn_with_relearn(trained, tmp_path, capsys):
    out = tmp_path / "u.safetensors"
    assert main(["-q", "unlearn", "--checkpoint", str(trained), "--forget-class", "1",
                 "--method", "negative_gradient", "--set", "epochs=1", "--relearn",
                 "--relearn-set", "max_steps=2", "--out", str(out)]) == 0
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["metrics"]["relearn/steps"] <= 2 and "dest/top_share" in meta["metrics"]
    assert "relearn/steps" in capsys.readouterr().out


def test_relearn_set_needs_relearn(trained, capsys):
    assert main(["-q", "evaluate", "--checkpoint", str(trained), "--forget-class", "1",
                 "--no-mia", "--relearn-set", "max_steps=3"]) == 2
    assert "--relearn-set needs --relearn" in capsys.readouterr().err
