"""Grids: validation before anything runs, expansion, stable run ids, ``only`` filters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from scar.errors import ConfigError, UnknownComponentError
from scar.experiments.grid import (
    check_only,
    expand,
    hparams_changed,
    load_grid,
    matches,
)

#: The shared tiny grid (tests/experiments/tiny_grid.yaml).
BASE = yaml.safe_load((Path(__file__).parent / "tiny_grid.yaml").read_text())


def grid_with(**changes):
    raw = {**BASE, **changes}
    return load_grid({k: v for k, v in raw.items() if v is not ...})


def test_yaml_and_dict_give_the_same_runs(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump(BASE, sort_keys=False))
    assert [s.run_id for s in expand(load_grid(path))] == [s.run_id for s in expand(grid_with())]


def test_cr_expansion_has_reference_rows_per_request():
    specs = expand(grid_with())
    assert len(specs) == 2 * (2 + 2)  # 2 classes x (original, retrain, scar, negative_gradient)
    assert [s.method for s in specs[:4]] == ["original", "retrain", "scar", "negative_gradient"]
    assert {s.forget_id for s in specs} == {"class0", "class1"}
    assert all(s.model == "fastcnn" for s in specs)  # the synthetic recipe's default
    ng = next(s for s in specs if s.method == "negative_gradient")
    assert ng.surrogate is None and ng.hparams["lr"] == 1e-4  # it reads no surrogate
    sc = next(s for s in specs if s.method == "scar")
    assert (sc.surrogate, sc.surrogate_n) == ("gaussian-noise", 128)
    assert hparams_changed(sc) == {"epochs": 1, "surrogate_steps": 1}  # batch 64 is the default
    assert {s.run_id for s in specs} == {s.run_id for s in expand(grid_with())}
    assert len({s.run_id for s in specs}) == len(specs)


def test_cr_all_classes_and_seeds():
    specs = expand(grid_with(classes="all", seeds=[0, 1], methods={"negative_gradient": {}}))
    assert sorted({s.forget_id for s in specs}) == ["class0", "class1", "class2", "class3"]
    ng = [s for s in specs if s.method == "negative_gradient"]
    assert len(ng) == 4 * 2 and {s.seed for s in ng} == {0, 1}
    # the reference rows do not depend on the unlearning seed
    assert len([s for s in specs if s.method == "original"]) == 4


def test_hr_one_forget_set_per_seed():
    specs = expand(grid_with(scenario="HR", classes=..., forget_fraction=0.1, seeds=[0, 3],
                             methods={"negative_gradient": {}, "retrain": {}}))
    assert [s.method for s in specs].count("retrain") == 2  # listing it adds nothing
    assert {(s.forget.kind, s.forget.fraction, s.forget.seed) for s in specs} == {
        ("random", 0.1, 0), ("random", 0.1, 3)}
    assert {s.forget_id for s in specs} == {"seed0", "seed3"}


def test_run_ids_change_with_hyperparameters_but_not_with_device_or_yaml_strings():
    ids = {s.method: s.run_id for s in expand(grid_with()) if s.forget_id == "class0"}
    ng = BASE["methods"]["negative_gradient"]
    lr_changed = grid_with(methods={**BASE["methods"], "negative_gradient": {**ng, "lr": 2e-4}})
    new = {s.method: s.run_id for s in expand(lr_changed) if s.forget_id == "class0"}
    assert new["negative_gradient"] != ids["negative_gradient"]
    assert {k: v for k, v in new.items() if k != "negative_gradient"} == {
        k: v for k, v in ids.items() if k != "negative_gradient"}
    # YAML 1.1 reads 1e-4 as a string; the method coerces it, so the run is the same
    as_string = grid_with(methods={**BASE["methods"], "negative_gradient": {**ng, "lr": "1e-4"}})
    assert {s.run_id for s in expand(as_string)} == {s.run_id for s in expand(grid_with())}
    elsewhere = grid_with(device="cpu", data_dir="/somewhere")
    assert {s.run_id for s in expand(elsewhere)} == {s.run_id for s in expand(grid_with())}


def test_run_ids_are_stable_across_processes():
    code = (
        "import json, sys\n"
        "from scar.experiments.grid import expand, load_grid\n"
        "print(json.dumps([s.run_id for s in expand(load_grid(json.loads(sys.argv[1])))]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, json.dumps(BASE)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == [s.run_id for s in expand(grid_with())]


@pytest.mark.parametrize(
    ("changes", "error", "words"),
    [
        ({"method": {}}, ConfigError, ["'method'", "Did you mean 'methods'", "Allowed keys",
                                        "seeds"]),
        ({"methods": {"scar_selfforget": {}}}, UnknownComponentError,
         ["scar_selfforget", "scar_self_forget"]),
        ({"methods": {"scar": {"lr": -1}}}, ConfigError, ["methods.scar", "lr", "-1"]),
        ({"methods": {"scar": {"learning_rate": 1}}}, ConfigError,
         ["learning_rate", "Allowed", "lambda_2"]),
        ({"methods": {"retrain": {"epochs": 3}}}, ConfigError, ["methods.retrain", "train"]),
        ({"scenario": "XR"}, ConfigError, ["scenario", "CR", "HR", "XR"]),
        ({"classes": [1, 7]}, ConfigError, ["classes", "[0, 3]", "[7]"]),
        ({"classes": ...}, ConfigError, ["classes", "required"]),
        ({"classes": [[0, 1, 2, 3]]}, ConfigError, ["all 4 classes"]),
        ({"scenario": "HR", "classes": ...}, ConfigError, ["forget_fraction", "forget_count"]),
        ({"forget_fraction": 0.1}, ConfigError, ["forget_fraction", "HR"]),
        ({"scenario": "HR", "classes": ..., "forget_fraction": 1.5}, ConfigError,
         ["forget_fraction", "(0, 1)", "1.5"]),
        ({"scenario": "HR", "classes": ..., "forget_fraction": 0.1,
          "methods": {"scar_self_forget": {}}}, ConfigError, ["scar_self_forget", "['CR']"]),
        ({"dataset": "fashion-mnst"}, UnknownComponentError, ["fashion-mnist"]),
        ({"model": "resnet81"}, UnknownComponentError, ["resnet18"]),
        ({"dataset_options": {"classes": 3}}, ConfigError, ["classes", "num_classes"]),
        ({"train": {"epoch": 2}}, ConfigError, ["epoch", "epochs"]),
        ({"surrogate": "noise"}, UnknownComponentError, ["gaussian-noise"]),
        ({"seeds": [0, 0]}, ConfigError, ["seeds", "repeat"]),
        ({"device": "gpu"}, ConfigError, ["device", "cuda:N", "gpu"]),
        ({"dataset": ["synthetic", "synthetic"]}, ConfigError, ["same run twice"]),
        ({"preset": "refrence"}, UnknownComponentError, ["preset", "'reference'"]),
        ({"methods": {"scar": {"preset": "fast"}}}, ConfigError,
         ["methods.scar", "'fast'", "reference"]),
        ({"methods": {"scar": {"preset": 3}}}, ConfigError, ["methods.scar.preset", "3"]),
        ({"methods": {"retrain": {"preset": "reference"}}}, ConfigError,
         ["methods.retrain", "['preset']"]),
    ],
)
def test_malformed_grids_fail_with_a_clear_message(changes, error, words):
    with pytest.raises(error) as info:
        expand(grid_with(**changes))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_all_classes_needs_a_known_class_count():
    grid = grid_with(dataset="imagefolder:/no/such/folder", dataset_options={}, classes="all")
    with pytest.raises(ConfigError, match="list the class ids"):
        expand(grid)


def test_grid_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_grid(bad)


def test_only_filters():
    specs = expand(grid_with())
    chosen = [s for s in specs if matches(s, {"method": "scar|original", "class": "1"})]
    assert [(s.method, s.forget_id) for s in chosen] == [("original", "class1"),
                                                          ("scar", "class1")]
    assert all(matches(s, {"seed": "0"}) for s in specs)
    with pytest.raises(ConfigError, match="Did you mean 'method'"):
        check_only({"metod": "scar"})


# ---------------------------------------------------------------- per-model entries
def test_model_entries_override_grid_settings_for_their_model_only():
    plain = expand(grid_with(model="fastcnn"))
    specs = expand(grid_with(model=[
        {"name": "fastcnn"},  # no own keys: exactly the plain grid's runs
        {"name": "tv:mobilenet_v3_small", "dataset_options": {"channels": 3},
         "train": {"lr": 0.01}, "model_kwargs": {"dropout": 0.1}},
    ]))
    fast = [s for s in specs if s.model == "fastcnn"]
    tv = [s for s in specs if s.model == "tv:mobilenet_v3_small"]
    assert [s.run_id for s in fast] == [s.run_id for s in plain] and len(tv) == len(fast)
    assert fast[0].dataset_options == BASE["dataset_options"] and fast[0].train == {"epochs": 1}
    # merged key by key over the grid-level mappings
    assert tv[0].dataset_options == {**BASE["dataset_options"], "channels": 3}
    assert tv[0].train == {"epochs": 1, "lr": 0.01} and tv[0].model_kwargs == {"dropout": 0.1}
    assert not {s.run_id for s in tv} & {s.run_id for s in fast}


def test_model_entry_settings_change_the_run_ids():
    def ids(**entry):
        return {s.run_id for s in expand(grid_with(model=[{"name": "fastcnn", **entry}]))}

    base = ids()
    assert ids(train={"epochs": 2}) != base
    assert ids(dataset_options={"seed": 1}) != base
    assert ids(model_kwargs={"width": 8}) != base
    assert ids(train={"epochs": 1}) == base  # the same resolved settings, the same runs


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ([{"name": "fastcnn", "trian": {}}], ["model[0]", "'trian'", "Did you mean 'train'",
                                               "name, dataset_options, model_kwargs, train"]),
        ([{"train": {"epochs": 2}}], ["model[0]", "needs 'name'"]),
        ([{"name": 3}], ["model[0]", "needs 'name'", "3"]),
        ([["fastcnn"]], ["'model'", "mappings"]),
        ([{"name": "fastcnn", "train": [1]}], ["model[0].train", "mapping"]),
        ([{"name": "fastcnn", "train": {"epoch": 2}}], ["'fastcnn'", "epoch", "epochs"]),
        ([{"name": "fastcnn", "model_kwargs": {"depth": 2}}], ["model_kwargs", "fastcnn",
                                                               "depth"]),
        ([{"name": "fastcnn", "dataset_options": {"colour": 1}}], ["dataset_options",
                                                                   "'fastcnn'", "colour"]),
        (["fastcnn", {"name": "fastcnn", "train": {"epochs": 2}}], ["'fastcnn' twice",
                                                                     "entries 0 and 1"]),
        ([None, "fastcnn"], ["'fastcnn' twice"]),  # null is the recipe's default: fastcnn
    ],
)
def test_malformed_model_entries(model, words):
    with pytest.raises(ConfigError) as info:
        expand(grid_with(model=model))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_grey_channels_are_checked_before_anything_runs():
    with pytest.raises(ConfigError, match=r"fashion-mnist option channels must be one of "
                                          r"\[1, 3\]; got 2"):
        load_grid({**BASE, "dataset": "fashion-mnist", "dataset_options": {},
                   "model": [{"name": "tv:resnet18", "dataset_options": {"channels": 2}}]})


def test_model_entry_dataset_options_decide_the_class_count():
    grid = grid_with(classes="all", model=["fastcnn", {"name": "resnet18",
                                                       "dataset_options": {"num_classes": 3}}])
    ids = {m: {s.forget_id for s in expand(grid) if s.model == m} for m in ("fastcnn", "resnet18")}
    assert ids == {"fastcnn": {"class0", "class1", "class2", "class3"},
                   "resnet18": {"class0", "class1", "class2"}}


# ---------------------------------------------------------------- oracles
def test_oracles_select_the_requests_with_a_retrain_row():
    every = expand(grid_with())
    none = expand(grid_with(oracles="none"))
    some = expand(grid_with(oracles=[1]))
    assert [s.method for s in none].count("retrain") == 0
    assert {s.forget_id for s in some if s.method == "retrain"} == {"class1"}
    # the other runs keep their ids: stored rows are reused when the choice changes
    assert {s.run_id for s in none} < {s.run_id for s in every}
    assert {s.run_id for s in some} == {s.run_id for s in every} - {
        s.run_id for s in every if s.method == "retrain" and s.forget_id == "class0"}
    assert [s.run_id for s in expand(grid_with(oracles="all"))] == [s.run_id for s in every]
    groups = expand(grid_with(classes=[0, [1, 2]], oracles=[[2, 1]]))
    assert {s.forget_id for s in groups if s.method == "retrain"} == {"class1-2"}
    hr = expand(grid_with(scenario="HR", classes=..., forget_fraction=0.1, seeds=[0, 3],
                          oracles=[3]))
    assert {s.forget_id for s in hr if s.method == "retrain"} == {"seed3"}


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"oracles": [7]}, ["'oracles'", "7", "not a request of 'classes'", "[0, 1]"]),
        ({"oracles": [[0, 1]]}, ["'oracles'", "[0, 1]", "not a request"]),
        ({"classes": "all", "oracles": [4]}, ["'oracles'", "4", "[0, 1, 2, 3]"]),
        ({"oracles": "some"}, ["'oracles'", "['all', 'none']", "'some'"]),
        ({"oracles": []}, ["'oracles'", "non-empty"]),
        ({"oracles": ["0"]}, ["'oracles'", "class entries"]),
        ({"scenario": "HR", "classes": ..., "forget_fraction": 0.1, "seeds": [0, 1],
          "oracles": [5]}, ["'oracles'", "[5]", "'seeds'", "[0, 1]"]),
        ({"oracles": "none", "methods": {"retrain": {}}}, ["'retrain'", "'oracles'", "none"]),
    ],
)
def test_malformed_oracles(changes, words):
    with pytest.raises(ConfigError) as info:
        expand(grid_with(**changes))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_a_key_listed_twice_is_refused_not_dropped(tmp_path):
    """PyYAML keeps the last of two equal keys: a method listed twice once ran only once."""
    grid = tmp_path / "g.yaml"
    grid.write_text("dataset: synthetic\nscenario: CR\nclasses: [0]\nmethods:\n"
                    "  scar: {}\n  negative_gradient: {}\n  scar: {lambda_2: 5}\n")
    with pytest.raises(ConfigError, match=r"line 7: key 'scar' appears twice"):
        load_grid(grid)


def test_a_grid_that_is_not_utf8_is_a_clear_error(tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_bytes("dataset: synthétique\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_grid(grid)


def test_grid_preset_resolves_to_the_preset_values_and_is_recorded():
    from scar.methods.presets import PRESETS

    methods = {"scar": {"epochs": 1}, "negative_gradient": {"preset": None},
               "random_labels": {}, "retrain": {}}
    specs = expand(grid_with(preset="reference", methods=methods))
    by_method = {s.method: s for s in specs if s.forget_id == "class0"}
    scar = by_method["scar"]
    reference = PRESETS.get("reference").values("scar")
    assert scar.preset == "reference"
    assert {k: scar.hparams[k] for k in reference if k != "epochs"} == \
        {k: v for k, v in reference.items() if k != "epochs"}
    assert scar.hparams["epochs"] == 1  # the method's own value wins over the preset's 30
    assert hparams_changed(scar) == {"preset": "reference", "epochs": 1}
    assert by_method["random_labels"].hparams["allow_true_label"] is True
    ng = by_method["negative_gradient"]  # its own 'preset: null' keeps the defaults
    assert ng.preset is None and ng.hparams["stop_check"] == "auto"
    assert by_method["retrain"].preset is None and by_method["original"].preset is None
    assert scar.to_dict()["preset"] == "reference" and "preset" not in ng.to_dict()


def test_a_preset_changes_the_run_id_and_no_preset_keeps_the_old_ids():
    plain = {s.run_id for s in expand(grid_with())}
    explicit_none = {s.run_id for s in expand(grid_with(preset=None))}
    assert explicit_none == plain
    with_preset = {s.method: s.run_id for s in expand(grid_with(preset="reference"))
                   if s.forget_id == "class0"}
    base = {s.method: s.run_id for s in expand(grid_with()) if s.forget_id == "class0"}
    assert with_preset["scar"] != base["scar"] and with_preset["original"] == base["original"]


def test_paper_grids_use_the_reference_preset_with_dataset_values():
    configs = Path(__file__).parents[2] / "configs"
    for name in ("cifar10", "cifar100", "tinyimagenet"):
        for scenario in ("cr", "hr"):
            grid = load_grid(configs / f"{name}_{scenario}.yaml")
            assert grid.preset == "reference"
            assert all(h == {} for _, h in grid.methods), "copied hyperparameter blocks are back"
    tiny = [s for s in expand(load_grid(configs / "tinyimagenet_hr.yaml")) if s.seed == 0]
    scar = next(s for s in tiny if s.method == "scar")
    assert (scar.hparams["surrogate_steps"], scar.hparams["hr_gate"]) == (91, 0.4)
    assert next(s for s in tiny if s.method == "duck").hparams["label_smoothing"] == 0.2
    cifar = next(s for s in expand(load_grid(configs / "cifar10_hr.yaml")) if s.method == "scar")
    assert (cifar.hparams["surrogate_steps"], cifar.hparams["hr_gate"]) == (6, 0.8)
