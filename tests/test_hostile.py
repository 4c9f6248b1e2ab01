"""Hostile and careless input to the `scar` command (issue 12): every case ends with exit
status 2 and an `error:` line saying what was wrong, never a traceback, and writes nothing.

Each case is a function of the prepared folder returning the argv; the checkpoint files it
names are built once per module on synthetic data.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from scar.cli import main


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Path:
    """A folder with a trained checkpoint and broken variants of it."""
    d = tmp_path_factory.mktemp("hostile")
    ck = d / "orig.safetensors"
    assert main(["-q", "train", "--dataset", "synthetic", "--epochs", "1", "--out", str(ck)]) == 0
    meta = json.loads(ck.with_suffix(".json").read_text())
    state = load_file(str(ck))
    (d / "zero.pt").write_bytes(b"")
    (d / "folder").mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "evil.pt").write_bytes(pickle.dumps({"w": Evil()}))
    (d / "corrupt.safetensors").write_bytes(b"not a safetensors file")
    save_file(state, str(d / "nosidecar.safetensors"))  # no metadata anywhere

    def broken(name: str, edit) -> None:
        save_file(state, str(d / f"{name}.safetensors"))  # metadata only in the sidecar
        m = json.loads(json.dumps(meta))
        m = edit(m) or m
        (d / f"{name}.json").write_text(json.dumps(m))

    broken("str_classes", lambda m: m["model"].update(num_classes="ten"))
    broken("model_str", lambda m: m.update(model="fastcnn"))
    broken("input_null", lambda m: m.update(input_spec=None))
    broken("json_list", lambda m: [1, 2])
    broken("no_name", lambda m: m["model"].pop("name") and None)
    broken("bad_kwarg", lambda m: m["model"].update(kwargs={"bogus": 1}))
    other = d / "six.safetensors"
    assert main(["-q", "train", "--dataset", "synthetic", "--dataset-option", "num_classes=6",
                 "--epochs", "1", "--out", str(other)]) == 0
    (d / "idx_folder").mkdir()
    (d / "idx_notjson.json").write_text("{nope")
    (d / "idx_strn.json").write_text(json.dumps({"indices": [1, 2], "num_train": "512"}))
    (d / "grid_missing_method.yaml").write_text("dataset: synthetic\nscenario: CR\n"
                                                "classes: [0]\nmethods: {nope: {}}\n")
    (d / "grid_twice.yaml").write_text("dataset: synthetic\nscenario: CR\nclasses: [0]\n"
                                       "methods:\n  scar: {}\n  scar: {lambda_2: 5}\n")
    (d / "grid_nan.yaml").write_text("dataset: synthetic\nscenario: CR\nclasses: [0]\n"
                                     "methods: {scar: {lambda_1: .nan}}\n")
    (d / "grid_latin1.yaml").write_bytes("dataset: synthétique\n".encode("latin-1"))
    (d / "grid_list.yaml").write_text("- 1\n- 2\n")
    (d / "grid_badkey.yaml").write_text("dataset: synthetic\nscenario: CR\nclasses: [0]\n"
                                        "methodz: {scar: {}}\n")
    (d / "grid_option_type.yaml").write_text("dataset: synthetic\ndataset_options: "
                                             "{num_classes: ten}\nscenario: CR\nclasses: [0]\n"
                                             "methods: {scar: {}}\n")
    (d / "grid_no_surrogate_folder.yaml").write_text(
        "dataset: synthetic\nscenario: CR\nclasses: [0]\nsurrogate: imagefolder:/nowhere\n"
        "methods: {scar: {}}\n")
    (d / "run_garbled").mkdir()
    (d / "run_garbled" / "results.jsonl").write_text('{"run_id": "a"}\n{garbled\n{"run_id": "b"}\n')
    (d / "run_nokeys").mkdir()
    (d / "run_nokeys" / "results.jsonl").write_text('{"run_id": "a", "status": "ok"}\n')
    (d / "run_empty").mkdir()
    (d / "not_a_folder").write_text("x")
    return d


UNLEARN = ["unlearn", "--forget-class", "1", "--surrogate", "gaussian-noise",
           "--surrogate-n", "64"]


def unlearn(ck: str, *extra: str, out: str = "OUT/u.safetensors") -> list[str]:
    return [*UNLEARN, "--checkpoint", ck, *extra, "--out", out]


CASES = {
    # checkpoints that cannot be used
    "missing checkpoint": lambda d: unlearn("missing.safetensors"),
    "folder as checkpoint": lambda d: unlearn(f"{d}/folder"),
    "zero-byte .pt": lambda d: unlearn(f"{d}/zero.pt"),
    "pickled object": lambda d: unlearn(f"{d}/evil.pt"),
    "corrupt safetensors": lambda d: unlearn(f"{d}/corrupt.safetensors"),
    "no metadata, no sidecar": lambda d: unlearn(f"{d}/nosidecar.safetensors"),
    "sidecar: num_classes 'ten'": lambda d: unlearn(f"{d}/str_classes.safetensors"),
    "sidecar: model a string": lambda d: unlearn(f"{d}/model_str.safetensors"),
    "sidecar: input_spec null": lambda d: unlearn(f"{d}/input_null.safetensors"),
    "sidecar: a JSON list": lambda d: unlearn(f"{d}/json_list.safetensors"),
    "sidecar: model without name": lambda d: unlearn(f"{d}/no_name.safetensors"),
    "sidecar: unknown model setting": lambda d: unlearn(f"{d}/bad_kwarg.safetensors"),
    # hyperparameters
    "--set lambda_1=nan": lambda d: unlearn(f"{d}/orig.safetensors", "--set", "lambda_1=nan"),
    "--set lr=inf": lambda d: unlearn(f"{d}/orig.safetensors", "--set", "lr=inf"),
    "--set lr=-1": lambda d: unlearn(f"{d}/orig.safetensors", "--set", "lr=-1"),
    "--set epochs=0": lambda d: unlearn(f"{d}/orig.safetensors", "--set", "epochs=0"),
    "--set beta2=1": lambda d: unlearn(f"{d}/orig.safetensors", "--set", "beta2=1"),
    "--set typo": lambda d: unlearn(f"{d}/orig.safetensors", "--set", "lamda_1=2"),
    "--set without =": lambda d: unlearn(f"{d}/orig.safetensors", "--set", "lambda_1"),
    "--set lr=1e6 diverges": lambda d: unlearn(f"{d}/orig.safetensors", "--set", "lr=1e6",
                                               "--set", "epochs=1"),
    "unknown method": lambda d: unlearn(f"{d}/orig.safetensors", "--method", "nope"),
    "self-forget with retain stats": lambda d: unlearn(
        f"{d}/orig.safetensors", "--method", "scar_self_forget", "--set", "stats=retain"),
    # forget requests
    "class out of range": lambda d: [*unlearn(f"{d}/orig.safetensors")[:-2], "--forget-class",
                                     "99", "--out", "OUT/u.safetensors"],
    "index file is a folder": lambda d: ["unlearn", "--checkpoint", f"{d}/orig.safetensors",
                                         "--forget-indices", f"{d}/idx_folder", "--out", "OUT/u"],
    "index file not JSON": lambda d: ["unlearn", "--checkpoint", f"{d}/orig.safetensors",
                                      "--forget-indices", f"{d}/idx_notjson.json", "--out",
                                      "OUT/u"],
    "index file num_train a string": lambda d: ["unlearn", "--checkpoint",
                                                f"{d}/orig.safetensors", "--forget-indices",
                                                f"{d}/idx_strn.json", "--out", "OUT/u"],
    # outputs
    "--out is the checkpoint": lambda d: unlearn(f"{d}/orig.safetensors",
                                                 out=f"{d}/orig.safetensors"),
    "--out is its sidecar": lambda d: unlearn(f"{d}/orig.safetensors", out=f"{d}/orig.json"),
    "--out under a file": lambda d: unlearn(f"{d}/orig.safetensors",
                                            out=f"{d}/not_a_folder/u.safetensors"),
    # data
    "--surrogate-n absurd": lambda d: ["unlearn", "--checkpoint", f"{d}/orig.safetensors",
                                       "--forget-class", "1", "--surrogate-n", "1000000000",
                                       "--out", "OUT/u"],
    "unknown surrogate": lambda d: unlearn(f"{d}/orig.safetensors", "--surrogate", "nope"),
    "missing surrogate folder": lambda d: unlearn(f"{d}/orig.safetensors", "--surrogate",
                                                  f"imagefolder:{d}/nowhere"),
    "dataset of another shape": lambda d: unlearn(f"{d}/orig.safetensors", "--dataset-option",
                                                  "num_classes=6"),
    "unknown dataset option": lambda d: unlearn(f"{d}/orig.safetensors", "--dataset-option",
                                                "bogus=1"),
    # train
    "dataset typo": lambda d: ["train", "--dataset", "fashion-mnits"],
    "model typo": lambda d: ["train", "--dataset", "synthetic", "--model", "resnet19"],
    "train lr=nan": lambda d: ["train", "--dataset", "synthetic", "--set", "lr=nan",
                               "--out", "OUT/t.safetensors"],
    "train momentum=2": lambda d: ["train", "--dataset", "synthetic", "--set", "momentum=2",
                                   "--out", "OUT/t.safetensors"],
    "train --head nope": lambda d: ["train", "--dataset", "synthetic", "--head", "nope",
                                    "--epochs", "1", "--out", "OUT/t.safetensors"],
    "model too big for the input": lambda d: ["train", "--dataset", "synthetic",
                                              "--dataset-option", "channels=3", "--model",
                                              "tv:alexnet", "--epochs", "1", "--out",
                                              "OUT/t.safetensors"],
    "train --out under a file": lambda d: ["train", "--dataset", "synthetic", "--epochs", "1",
                                           "--out", f"{d}/not_a_folder/t.safetensors"],
    "forget fraction 1.5": lambda d: ["train", "--dataset", "synthetic", "--forget-fraction",
                                      "1.5", "--out", "OUT/t.safetensors"],
    # evaluate / forget-set
    "evaluate --out a sidecar": lambda d: ["evaluate", "--checkpoint", f"{d}/orig.safetensors",
                                           "--forget-class", "1", "--no-mia", "--out",
                                           f"{d}/orig.json"],
    "evaluate another task's oracle": lambda d: ["evaluate", "--checkpoint",
                                                 f"{d}/orig.safetensors", "--forget-class", "1",
                                                 "--no-mia", "--oracle", f"{d}/six.safetensors"],
    "forget-set count 0": lambda d: ["forget-set", "sample", "--dataset", "synthetic",
                                     "--count", "0", "--out", "OUT/i.json"],
    "forget-set --out a sidecar": lambda d: ["forget-set", "sample", "--dataset", "synthetic",
                                             "--count", "5", "--out", f"{d}/orig.json"],
    # grids and reports
    "grid missing": lambda d: ["run", f"{d}/nope.yaml", "--out", "OUT/run", "--dry-run"],
    "grid unknown method": lambda d: ["run", f"{d}/grid_missing_method.yaml", "--out",
                                      "OUT/run", "--dry-run"],
    "grid method twice": lambda d: ["run", f"{d}/grid_twice.yaml", "--out", "OUT/run",
                                    "--dry-run"],
    "grid lambda_1 .nan": lambda d: ["run", f"{d}/grid_nan.yaml", "--out", "OUT/run",
                                     "--dry-run"],
    "grid not UTF-8": lambda d: ["run", f"{d}/grid_latin1.yaml", "--out", "OUT/run",
                                 "--dry-run"],
    "grid a list": lambda d: ["run", f"{d}/grid_list.yaml", "--out", "OUT/run", "--dry-run"],
    "grid key typo": lambda d: ["run", f"{d}/grid_badkey.yaml", "--out", "OUT/run",
                                "--dry-run"],
    "grid option of the wrong type": lambda d: ["run", f"{d}/grid_option_type.yaml", "--out",
                                                "OUT/run", "--dry-run"],
    "grid surrogate folder missing": lambda d: ["run", f"{d}/grid_no_surrogate_folder.yaml",
                                                "--out", "OUT/run", "--dry-run"],
    "report: no results": lambda d: ["report", f"{d}/run_empty", "--out", "OUT/rep"],
    "report: garbled middle line": lambda d: ["report", f"{d}/run_garbled", "--out", "OUT/rep"],
    "report: row without keys": lambda d: ["report", f"{d}/run_nokeys", "--out", "OUT/rep"],
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_exits_2_with_one_error_line(case, lab, tmp_path, capsys):
    before = {p: p.stat().st_mtime_ns for p in lab.rglob("*")}
    argv = [a.replace("OUT", str(tmp_path / "out")) for a in CASES[case](lab)]
    try:
        rc = main(["-q", *argv])
    except SystemExit as exc:  # argparse's own refusals
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2, f"{case}: exit {rc}\n{err}"
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.*"))
    assert {p: p.stat().st_mtime_ns for p in lab.rglob("*")} == before  # inputs untouched


def test_the_suite_is_large_enough():
    assert len(CASES) >= 40
