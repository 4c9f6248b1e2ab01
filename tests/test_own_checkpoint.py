"""Bring your own checkpoint: a plain state dict (torch.save / bare safetensors) with --model and
--dataset on the command line, and the grid key `checkpoint:` instead of a trained original."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from scar.cli import main
from scar.data.datasets import load_dataset
from scar.experiments.grid import load_grid
from scar.experiments.runner import run_grid
from scar.experiments.store import ResultsStore
from scar.models.base import ModelSpec, build_model
from scar.training.recipes import Recipe
from scar.training.trainer import train_model

SYNTH = ["--dataset", "synthetic", "--dataset-option", "num_classes=4", "--dataset-option",
         "n_train=256", "--dataset-option", "n_test=128"]
OPTIONS = {"num_classes": 4, "n_train": 256, "n_test": 128}
FAST = ["--surrogate", "gaussian-noise", "--surrogate-n", "128", "--set", "epochs=1",
        "--set", "batch_size=64"]


@pytest.fixture(scope="module")
def plain_fastcnn(tmp_path_factory):
    """A fastcnn trained outside the toolkit's workflow, saved as a plain torch state dict and as
    a bare safetensors file (no sidecar, no embedded metadata)."""
    data = load_dataset("synthetic", **OPTIONS)
    info = data.info
    torch.manual_seed(0)
    model = build_model(ModelSpec("fastcnn", 4, info.input_spec.channels, info.input_spec.size))
    recipe = Recipe(epochs=3, batch_size=64, lr=0.05, weight_decay=0.0, schedule="constant",
                    model="fastcnn")
    model = train_model(model, data.train, info.input_spec, recipe, seed=0,
                        progress=False).model.eval()
    folder = tmp_path_factory.mktemp("own")
    torch.save(model.state_dict(), folder / "my.pt")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(folder / "my.safetensors"))
    return folder


def test_unlearn_a_torchvision_state_dict_saved_by_plain_torch(tmp_path, capsys):
    """The issue's acceptance: `scar unlearn --checkpoint my.pt --model tv:resnet18 ...`."""
    torch.manual_seed(0)
    pt = tmp_path / "my.pt"
    torch.save(torchvision.models.resnet18(num_classes=4).state_dict(), pt)
    out = tmp_path / "unlearned.safetensors"
    rc = main(["-q", "unlearn", "--checkpoint", str(pt), "--model", "tv:resnet18", *SYNTH,
               "--dataset-option", "channels=3", "--forget-class", "1", "--method",
               "negative_gradient", "--set", "epochs=1", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "retain-free: yes" in text and "unlearned checkpoint" in text
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["parent"] == str(pt) and meta["model"]["name"] == "tv:resnet18"
    assert meta["dataset"] == "synthetic" and meta["dataset_options"]["channels"] == 3
    # The unlearned checkpoint carries its metadata; its plain parent is the original.
    assert main(["-q", "evaluate", "--checkpoint", str(out), "--no-mia", "--out",
                 str(tmp_path / "audit.json")]) == 0
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert set(audit["results"]) == {"original", "evaluated"}


@pytest.mark.parametrize("name", ["my.pt", "my.safetensors"])
def test_unlearn_a_plain_fastcnn_and_forget(plain_fastcnn, name, tmp_path, capsys):
    out = tmp_path / "u.safetensors"
    rc = main(["-q", "unlearn", "--checkpoint", str(plain_fastcnn / name), "--model", "fastcnn",
               *SYNTH, "--forget-class", "2", *FAST[:4], "--set", "stats=surrogate",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    meta = json.loads(out.with_suffix(".json").read_text())
    metrics = meta["metrics"]
    assert metrics["acc/test_forget"] < 0.2 and metrics["acc/test_retain"] > 0.5, text


def test_random_removal_measures_the_original_test_accuracy(plain_fastcnn, tmp_path, capsys):
    out = tmp_path / "hr.safetensors"
    rc = main(["-q", "unlearn", "--checkpoint", str(plain_fastcnn / "my.pt"), "--model",
               "fastcnn", *SYNTH, "--forget-fraction", "0.1", "--method", "negative_gradient",
               "--set", "epochs=1", "--out", str(out)])
    assert rc == 0, capsys.readouterr()
    assert json.loads(out.with_suffix(".json").read_text())["scenario"] == "HR"


@pytest.mark.parametrize("argv, needles", [
    (["--dataset", "synthetic"], ["plain state dict", "--model NAME"]),
    (["--model", "fastcnn"], ["--dataset NAME"]),
    ([], ["--model NAME", "--dataset NAME"]),
    (["--model", "fastcnn", *SYNTH], ["stats=surrogate", "stats=retain", "records none"]),
    (["--model", "resnet18", *SYNTH], ["does not match architecture 'resnet18'"]),
    (["--model", "fastcnn", *SYNTH, "--head", "nope"], ["nope"]),
])
def test_missing_metadata_is_a_clear_error(plain_fastcnn, argv, needles, tmp_path, capsys):
    rc = main(["-q", "unlearn", "--checkpoint", str(plain_fastcnn / "my.pt"), *argv,
               "--forget-class", "1", *FAST[:4], "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_model_flag_must_agree_with_a_scar_checkpoint(tmp_path, capsys):
    ck = tmp_path / "orig.safetensors"
    assert main(["-q", "train", *SYNTH, "--epochs", "1", "--out", str(ck)]) == 0
    rc = main(["-q", "unlearn", "--checkpoint", str(ck), "--model", "mlp", "--forget-class", "1",
               *FAST, "--out", str(tmp_path / "u")])
    err = capsys.readouterr().err
    assert rc == 2 and "records model 'fastcnn'" in err


def test_grid_uses_an_existing_original(plain_fastcnn, tmp_path):
    grid = load_grid({
        "dataset": "synthetic", "dataset_options": OPTIONS, "scenario": "CR", "classes": [1],
        "model": "fastcnn", "checkpoint": str(plain_fastcnn / "my.pt"), "oracles": "none",
        "mia": False, "surrogate": "gaussian-noise", "surrogate_n": 128,
        "methods": {"scar": {"stats": "surrogate"}, "negative_gradient": {}},
    })
    summary = run_grid(grid, tmp_path / "run", progress=False)
    assert summary.failed == 0 and summary.ok == 3
    rows = {r["method"]: r for r in ResultsStore(tmp_path / "run").rows()}
    assert set(rows) == {"original", "scar", "negative_gradient"}
    assert rows["scar"]["metrics"]["acc/test_forget"] < 0.2
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing was trained


@pytest.mark.parametrize("extra, needle", [
    ({"checkpoint": "missing.pt"}, "does not exist"),
    ({"model": None}, "needs the model's name"),
    ({"model": ["fastcnn", "mlp"]}, "one model"),
    ({"dataset": ["synthetic", "mnist"]}, "one dataset"),
])
def test_grid_checkpoint_key_errors(plain_fastcnn, extra, needle):
    from scar.errors import ConfigError

    raw = {"dataset": "synthetic", "scenario": "CR", "classes": [1], "model": "fastcnn",
           "checkpoint": str(plain_fastcnn / "my.pt"), "methods": {"negative_gradient": {}},
           **extra}
    with pytest.raises(ConfigError, match=needle):
        load_grid(raw)
