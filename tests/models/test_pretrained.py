"""Opt-in pretrained starting weights (timm:/tv: models): from a file or the local cache only,
head re-sized, origin recorded; offline (tiny models with random weights saved to temp files)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from scar.checkpoint import load_checkpoint
from scar.cli import main
from scar.errors import CheckpointError, ConfigError
from scar.experiments.grid import expand, load_grid
from scar.models.base import ModelSpec, build_model
from scar.models.pretrained import build_pretrained

pytest.importorskip("timm")

TIMM = "timm:resnet10t"
TV = "tv:mobilenet_v3_small"


def _saved(name: str, path: Path, num_classes: int = 1000) -> dict[str, torch.Tensor]:
    """A model with random weights, its state dict saved the way other tools do it."""
    torch.manual_seed(7)
    state = build_model(ModelSpec(name, num_classes, 3, 32)).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return state


def _same_except(model: torch.nn.Module, state: dict, skip: tuple[str, ...]) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], state[k]) for k in own if not k.startswith(skip))


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "resnet10t.safetensors"
    return path, _saved(TIMM, path)


@pytest.fixture(autouse=True)
def empty_caches(tmp_path, monkeypatch):
    """Nothing cached, nothing downloadable: the Hugging Face and torch hub caches are empty
    temp folders for every test."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch-hub"))


def test_timm_file_loads_the_backbone_and_resizes_the_head(timm_file):
    path, state = timm_file
    model, info = build_pretrained(ModelSpec(TIMM, 4, 3, 32), path)
    assert model.fc.out_features == 4 and state["fc.weight"].shape[0] == 1000
    assert _same_except(model, state, ("fc.",))
    assert info["file"] == str(path.resolve()) and info["head"] == "fc"
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["head_replaced"] and info["file_classes"] == 1000
    assert "state_dict" not in model.pretrained_cfg  # no second copy of the weights kept


def test_timm_adapts_the_first_conv_to_grey_images(timm_file):
    path, state = timm_file
    model, _ = build_pretrained(ModelSpec(TIMM, 4, 1, 32), path)
    assert model.conv1[0].weight.shape[1] == 1
    assert _same_except(model, state, ("fc.", "conv1.0."))
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 4)


def test_timm_file_with_the_datasets_classes_keeps_its_head(tmp_path):
    path = tmp_path / "fine-tuned.pt"
    state = _saved(TIMM, path, num_classes=4)
    model, info = build_pretrained(ModelSpec(TIMM, 4, 3, 32), path)
    assert _same_except(model, state, ()) and not info["head_replaced"]


def test_torchvision_file_replaces_the_head_found_by_the_adapter(tmp_path):
    path = tmp_path / "mobilenet.pth"
    state = _saved(TV, path)
    model, info = build_pretrained(ModelSpec(TV, 4, 3, 32), path)
    assert info["head"] == "classifier.3" and info["head_replaced"]
    assert model.classifier[3].out_features == 4
    assert _same_except(model, state, ("classifier.3.",))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_weights_of_another_architecture_do_not_load_partly(timm_file, tmp_path):
    tv_file = tmp_path / "mobilenet.pth"
    _saved(TV, tv_file)
    with pytest.raises(CheckpointError, match="do not fit model 'timm:resnet10t'.*missing"):
        build_pretrained(ModelSpec(TIMM, 4, 3, 32), tv_file)
    with pytest.raises(CheckpointError, match="do not fit model 'tv:mobilenet_v3_small'"):
        build_pretrained(ModelSpec(TV, 4, 3, 32), timm_file[0])


@pytest.mark.parametrize(("name", "words"), [
    (TIMM, ["'timm:resnet10t'", "resnet10t.c3_in1k/model.safetensors", "Hugging Face hub cache"]),
    (TV, ["'tv:mobilenet_v3_small'", "mobilenet_v3_small-", "torch hub cache"]),
])
def test_weights_not_in_the_local_cache_are_a_one_line_error(name, words, tmp_path):
    with pytest.raises(ConfigError) as info:
        build_pretrained(ModelSpec(name, 4, 3, 32), True)
    text = str(info.value)
    assert "\n" not in text and "not on this machine" in text
    for word in [*words, "--pretrained FILE", "--download"]:
        assert word in text, (word, text)


def test_a_weights_file_that_is_not_a_plain_state_dict_is_never_unpickled(tmp_path):
    marker = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(CheckpointError, match="never unpickles"):
        build_pretrained(ModelSpec(TIMM, 4, 3, 32), path)
    assert not marker.exists()


@pytest.mark.parametrize(("model", "pretrained", "words"), [
    ("fastcnn", True, ["timm:<name> and tv:<name>", "'fastcnn'"]),
    (TIMM, "/no/such/weights.safetensors", ["does not exist", "--download"]),
])
def test_bad_requests(model, pretrained, words):
    with pytest.raises(ConfigError) as info:
        build_pretrained(ModelSpec(model, 4, 3, 32), pretrained)
    for word in words:
        assert word in str(info.value)


def test_a_model_kwarg_never_loads_weights():
    with pytest.raises(ConfigError, match="--pretrained"):
        build_model(ModelSpec(TIMM, 4, 3, 32, kwargs={"pretrained": True}))
    with pytest.raises(ConfigError, match="--pretrained"):
        build_model(ModelSpec(TV, 4, 3, 32, kwargs={"weights": "DEFAULT"}))


def test_cli_train_fine_tunes_from_a_file_and_records_it(timm_file, tmp_path, capsys):
    path, _ = timm_file
    out = tmp_path / "ft.safetensors"
    rc = main(["-q", "train", "--dataset", "synthetic", "--dataset-option", "num_classes=4",
               "--dataset-option", "n_train=64", "--dataset-option", "n_test=32",
               "--model", TIMM, "--pretrained", str(path), "--epochs", "1",
               "--set", "batch_size=32", "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "fine-tuned from pretrained weights" in text
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["pretrained"]["file"] == str(path.resolve())
    assert meta["pretrained"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["model"]["kwargs"] == {}  # reloading never looks for the weights again
    ck = load_checkpoint(out)
    assert ck.model.fc.out_features == 4


def test_cli_train_without_weights_or_a_timm_model_fails_in_one_line(tmp_path, capsys):
    rc = main(["-q", "train", "--dataset", "synthetic", "--model", TIMM, "--pretrained",
               "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert rc == 2 and "not on this machine" in err and "Traceback" not in err
    rc = main(["-q", "train", "--dataset", "synthetic", "--pretrained",
               "--out", str(tmp_path / "y.safetensors")])
    assert rc == 2 and "timm:<name> and tv:<name>" in capsys.readouterr().err


def test_grid_model_kwargs_pretrained_is_checked_before_running(timm_file):
    raw = yaml.safe_load((Path(__file__).parents[1] / "experiments" / "tiny_grid.yaml")
                         .read_text())
    ok = {**raw, "model": TIMM, "model_kwargs": {"pretrained": str(timm_file[0])}}
    assert expand(load_grid(ok))
    with pytest.raises(ConfigError, match="model_kwargs.*does not exist"):
        expand(load_grid({**ok, "model_kwargs": {"pretrained": "/no/such.pt"}}))
    with pytest.raises(ConfigError, match="timm:<name> and tv:<name>"):
        expand(load_grid({**raw, "model": "fastcnn", "model_kwargs": {"pretrained": True}}))
