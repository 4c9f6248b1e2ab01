"""The `scar` command: happy paths on synthetic data, and clear errors (exit 2, no traceback)."""

import json
import pickle

import pytest

from scar.cli import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "orig.safetensors"
    assert main(["-q", "train", "--dataset", "synthetic", "--epochs", "2", "--out",
                 str(out)]) == 0
    return out


def test_train_writes_checkpoint_sidecar_and_stats(trained, capsys):
    meta = json.loads(trained.with_suffix(".json").read_text())
    assert meta["role"] == "original" and meta["dataset"] == "synthetic"
    assert meta["model"]["name"] == "fastcnn" and meta["test_acc"] > 0.3
    assert (trained.parent / meta["stats"]).exists()
    assert meta["device_name"] and meta["train_seconds"] > 0


def test_unlearn_then_unlearn_again(trained, tmp_path, capsys):
    out1 = tmp_path / "u1.safetensors"
    rc = main(["-q", "unlearn", "--checkpoint", str(trained), "--forget-class", "1",
               "--surrogate", "gaussian-noise", "--surrogate-n", "256", "--set", "epochs=2",
               "--set", "batch_size=64", "--out", str(out1)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "retain-free: yes" in text and "acc/test_forget" in text
    meta = json.loads(out1.with_suffix(".json").read_text())
    assert meta["parent"] == str(trained) and meta["method"] == "scar"
    assert meta["hparams"]["epochs"] == 2 and meta["access"]["images_loaded"].get("retain", 0) == 0
    out2 = tmp_path / "u2.safetensors"
    rc = main(["-q", "unlearn", "--checkpoint", str(out1), "--forget-class", "2",
               "--surrogate", "gaussian-noise", "--surrogate-n", "256", "--set", "epochs=1",
               "--set", "batch_size=64", "--out", str(out2)])
    assert rc == 0
    meta2 = json.loads(out2.with_suffix(".json").read_text())
    assert meta2["removed_classes"] == [1, 2]
    # The original's training recipe travels down the chain (augmentation, audit references).
    original_recipe = json.loads(trained.with_suffix(".json").read_text())["recipe"]
    assert meta["recipe"] == meta2["recipe"] == original_recipe

    report = tmp_path / "audit.json"
    assert main(["-q", "evaluate", "--checkpoint", str(out1), "--no-mia", "--out",
                 str(report)]) == 0
    audit = json.loads(report.read_text())
    assert audit["scenario"] == "CR" and audit["forget"]["classes"] == [1]
    assert set(audit["results"]) == {"original", "evaluated"}
    assert 0.0 <= audit["results"]["evaluated"]["acc/test_forget"] <= 1.0
    assert "aus" in audit["results"]["evaluated"]


def test_forget_set_sample(tmp_path, capsys):
    out = tmp_path / "idx.json"
    assert main(["forget-set", "sample", "--dataset", "synthetic", "--fraction", "0.1",
                 "--seed", "3", "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["indices"]) == 51  # 10% of 512, rounded


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["train", "--dataset", "fashion-mnits"], "Did you mean 'fashion-mnist'"),
        (["train", "--dataset", "synthetic", "--model", "resnet19"], "Unknown model 'resnet19'"),
        (["train", "--dataset", "synthetic", "--forget-class", "12"], "12"),
        (["train", "--dataset", "synthetic", "--forget-fraction", "1.5"], "fraction"),
        (["forget-set", "sample", "--dataset", "synthetic", "--count", "0", "--out", "x.json"],
         "count"),
        (["unlearn", "--checkpoint", "missing.safetensors", "--forget-class", "1", "--out",
          "o"], "does not exist"),
    ],
)
def test_bad_input_gives_clear_error(argv, needle, capsys):
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err
    assert "Traceback" not in err


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch, capsys):
    import scar.data.datasets as ds

    monkeypatch.setenv("SCAR_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(ds, "SYSTEM_LOCATIONS", {k: [] for k in ds.SYSTEM_LOCATIONS})
    assert main(["-q", "train", "--dataset", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "apt-get install dataset-fashion-mnist" in err


def test_pickled_checkpoint_is_refused(tmp_path, capsys):
    bad = tmp_path / "model.pt"
    bad.write_bytes(pickle.dumps({"x": object()}))
    assert main(["-q", "unlearn", "--checkpoint", str(bad), "--forget-class", "1",
                 "--out", str(tmp_path / "o")]) == 2
    assert "never unpickles" in capsys.readouterr().err


def test_unknown_method_hyperparameter(trained, tmp_path, capsys):
    assert main(["-q", "unlearn", "--checkpoint", str(trained), "--forget-class", "1",
                 "--set", "lamda_1=2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "lamda_1" in err and "lambda_1" in err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("fashion-mnist", "fastcnn", "natural-patches", "scar", "scar_self_forget"):
        assert word in out


def test_list_presets_prints_each_methods_values(capsys):
    assert main(["list", "presets"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("presets:\n  reference ")
    for text in ("scar: ", "surrogate_steps=6", "stop_from_epoch=2", "random_labels: ",
                 "allow_true_label=True", "scar on tinyimagenet: hr_gate=0.4, surrogate_steps=91"):
        assert text in out, text


def test_unlearn_with_a_preset_records_it_and_set_overrides_it(trained, tmp_path, capsys):
    out = tmp_path / "ng.safetensors"
    rc = main(["-q", "unlearn", "--checkpoint", str(trained), "--forget-class", "1",
               "--method", "negative_gradient", "--preset", "reference", "--set", "epochs=2",
               "--set", "batch_size=64", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "negative_gradient (preset reference) on" in text
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["preset"] == "reference"
    hp = meta["hparams"]
    assert (hp["lr"], hp["stop_check"], hp["hr_margin"]) == (5e-4, "epoch", 0.015)  # the preset
    assert (hp["epochs"], hp["batch_size"]) == (2, 64)  # --set wins


@pytest.mark.parametrize("method", ["scar", "scar_self_forget", "negative_gradient",
                                    "random_labels", "finetune", "duck"])
def test_every_reference_method_runs_with_the_preset(method, trained, tmp_path, capsys):
    """`scar unlearn --preset reference` runs each method of the reference repository (small
    batches and one epoch, so that it takes seconds; the rest is the preset's)."""
    out = tmp_path / f"{method}.safetensors"
    rc = main(["-q", "unlearn", "--checkpoint", str(trained), "--forget-class", "1",
               "--method", method, "--preset", "reference", "--surrogate", "gaussian-noise",
               "--surrogate-n", "256", "--set", "epochs=1", "--set", "batch_size=64",
               "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert f"{method} (preset reference) on" in text
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["preset"] == "reference"
    if method == "scar_self_forget":  # the reference's stop reads the real forget set
        assert "not forget-free" in meta["access"]["profile"]


@pytest.mark.parametrize(("method", "preset", "words"), [
    ("scar", "refrence", ["Unknown preset 'refrence'", "Did you mean 'reference'"]),
    ("retrain", "reference", ["no settings for method 'retrain'", "covers", "scar"]),
])
def test_unknown_preset_is_a_clear_error(method, preset, words, trained, tmp_path, capsys):
    rc = main(["-q", "unlearn", "--checkpoint", str(trained), "--forget-class", "1",
               "--method", method, "--preset", preset, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    for word in words:
        assert word in err, (word, err)
    assert not (tmp_path / "o").exists()


def test_dataset_options_travel_with_the_checkpoint(fake_fmnist_dir, tmp_path, capsys):
    """Grey Fashion-MNIST as RGB: `train` records the option, `unlearn` and `evaluate` reuse it
    without being told, and the unlearned checkpoint records it again."""
    data = ["--dataset", "fashion-mnist", "--data-dir", str(fake_fmnist_dir)]
    orig = tmp_path / "rgb.safetensors"
    assert main(["-q", "train", *data, "--dataset-option", "channels=3", "--epochs", "1",
                 "--set", "batch_size=32", "--out", str(orig)]) == 0
    meta = json.loads(orig.with_suffix(".json").read_text())
    assert meta["dataset_options"] == {"channels": 3, "train_subset": 0}
    assert meta["input_spec"]["channels"] == 3 and meta["model"]["channels"] == 3
    out = tmp_path / "u.safetensors"
    rc = main(["-q", "unlearn", "--checkpoint", str(orig), "--data-dir", str(fake_fmnist_dir),
               "--forget-class", "1", "--method", "negative_gradient", "--set", "epochs=1",
               "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(out.with_suffix(".json").read_text())["dataset_options"] == {
        "channels": 3, "train_subset": 0}
    report = tmp_path / "audit.json"
    assert main(["-q", "evaluate", "--checkpoint", str(out), "--data-dir", str(fake_fmnist_dir),
                 "--no-mia", "--out", str(report)]) == 0
    assert set(json.loads(report.read_text())["results"]) == {"original", "evaluated"}
    capsys.readouterr()
    # asking for other options than the recorded ones is refused, naming both
    assert main(["-q", "evaluate", "--checkpoint", str(out), "--data-dir", str(fake_fmnist_dir),
                 "--dataset-option", "channels=1", "--no-mia"]) == 2
    err = capsys.readouterr().err
    assert "3x28px" in err and "1x28px" in err and "'channels': 3" in err


def test_default_checkpoint_name_carries_the_dataset_options():
    from scar.cli import default_name
    from scar.training.workflow import TrainJob

    job = TrainJob(dataset="fashion-mnist", dataset_options={"channels": 3},
                   model="tv:mobilenet_v3_small")
    assert default_name(job).startswith("fashion-mnist-channels3_tv:mobilenet_v3_small_original")


@pytest.mark.parametrize(
    "option, needle",
    [
        ("channels=x", "--dataset-option channels expects a int value; got 'x'"),
        ("channels", "--dataset-option expects key=value; got 'channels'"),
        ("colour=1", "allowed options: ['channels', 'train_subset']"),
        ("channels=2", "fashion-mnist option channels must be one of [1, 3]; got 2"),
    ],
)
def test_bad_dataset_option(option, needle, tmp_path, capsys, fake_fmnist_dir):
    assert main(["-q", "train", "--dataset", "fashion-mnist", "--data-dir", str(fake_fmnist_dir),
                 "--dataset-option", option, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def _digests(paths):
    import hashlib

    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.exists()}


@pytest.mark.parametrize("target", ["weights", "sidecar", "sidecar-via-evaluate",
                                    "sidecar-via-forget-set"])
def test_out_never_overwrites_an_input(target, trained, capsys):
    """Issue 12: `unlearn --out` equal to the checkpoint (or its .json), `evaluate --out
    CKPT.json` and `forget-set sample --out CKPT.json` overwrote the original or its sidecar."""
    files = [trained, trained.with_suffix(".json")]
    before = _digests(files)
    common = ["--forget-class", "1", "--surrogate", "gaussian-noise", "--surrogate-n", "64"]
    argv = {
        "weights": ["unlearn", "--checkpoint", str(trained), *common, "--out", str(trained)],
        "sidecar": ["unlearn", "--checkpoint", str(trained), *common, "--out",
                    str(trained.with_suffix(".json"))],
        "sidecar-via-evaluate": ["evaluate", "--checkpoint", str(trained), "--forget-class",
                                 "1", "--no-mia", "--out", str(trained.with_suffix(".json"))],
        "sidecar-via-forget-set": ["forget-set", "sample", "--dataset", "synthetic",
                                   "--count", "5", "--out", str(trained.with_suffix(".json"))],
    }[target]
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert "would be overwritten" in err or "sidecar of checkpoint" in err
    assert _digests(files) == before


def test_unwritable_out_fails_before_any_work(trained, tmp_path, capsys):
    """The output folder is checked before the work (it once failed after it). A regular file
    standing where the folder should be cannot be written into, whatever the user's rights."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    assert main(["-q", "unlearn", "--checkpoint", str(trained), "--forget-class", "1",
                 "--out", str(blocker / "u.safetensors")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "cannot write into" in err and str(blocker) in err
    assert "data access" not in out  # no run happened


def test_evaluate_refuses_an_oracle_of_another_task(trained, tmp_path, capsys):
    """Issue 12: a mismatched --oracle gave AUS 0.000 or a traceback."""
    other = tmp_path / "other.safetensors"
    assert main(["-q", "train", "--dataset", "synthetic", "--dataset-option", "num_classes=6",
                 "--epochs", "1", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["-q", "evaluate", "--checkpoint", str(trained), "--forget-class", "1",
                 "--no-mia", "--oracle", str(other)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--oracle" in err and "6-class model" in err


def test_two_concurrent_unlearns_to_one_out_leave_one_consistent_checkpoint(trained, tmp_path):
    """Issue 12: two unlearns to one --out once left random-labels weights under a
    negative-gradient sidecar. Now each writer's weights + sidecar pair is written whole."""
    import os
    import subprocess
    import sys

    from safetensors import safe_open

    out = tmp_path / "u.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "scar", "-q", "unlearn", "--checkpoint", str(trained),
         "--forget-class", "1", "--method", method, "--set", "epochs=1",
         "--out", str(out)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True) for method in ("negative_gradient", "random_labels")]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    with safe_open(str(out), framework="pt") as fh:
        embedded = json.loads(fh.metadata()["scar_meta"])
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar == embedded and sidecar["method"] in ("negative_gradient", "random_labels")


def test_train_with_the_reference_preset_uses_the_paper_recipe(tmp_path, capsys):
    out = tmp_path / "ref.safetensors"
    assert main(["-q", "train", "--dataset", "synthetic", "--preset", "reference", "--epochs",
                 "1", "--set", "lr=0.05", "--out", str(out)]) == 0
    assert "(training recipe of preset reference)" in capsys.readouterr().out
    recipe = json.loads(out.with_suffix(".json").read_text())["recipe"]
    # The paper code's recipe (protocol.md); --epochs and --set win over it.
    assert (recipe["epochs"], recipe["lr"]) == (1, 0.05)
    assert (recipe["batch_size"], recipe["weight_decay"], recipe["label_smoothing"],
            recipe["schedule"], recipe["crop_padding"], recipe["hflip"]) == \
        (256, 5e-5, 0.4, "cosine", 4, True)


def test_unlearn_and_evaluate_write_audit_pages(trained, tmp_path, capsys):
    out = tmp_path / "u.safetensors"
    assert main(["-q", "unlearn", "--checkpoint", str(trained), "--forget-class", "1",
                 "--surrogate", "gaussian-noise", "--surrogate-n", "128", "--set", "epochs=1",
                 "--set", "batch_size=64", "--out", str(out), "--report"]) == 0
    page = tmp_path / "u.audit.html"
    assert f"audit page: {page}" in capsys.readouterr().out
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "Verdict:" in text
    assert "no retrained model was given" in text and text.count("data:image/png;base64,") == 2
    chosen = tmp_path / "pages" / "eval.html"
    assert main(["-q", "evaluate", "--checkpoint", str(out), "--no-mia", "--oracle",
                 str(trained), "--report", str(chosen)]) == 0
    text = chosen.read_text()
    assert "retrained model&#x27;s 95% band" in text and ">evaluated<" in text
    # --report never overwrites an input
    assert main(["-q", "evaluate", "--checkpoint", str(out), "--no-mia", "--report",
                 str(trained)]) == 2
    assert "is an input of this command" in capsys.readouterr().err
