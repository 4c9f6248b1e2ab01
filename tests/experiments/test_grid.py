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
