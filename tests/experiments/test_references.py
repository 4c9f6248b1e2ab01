"""Reference models of the membership audit: the pool and its halves, caching and resuming, the
``train_subset`` dataset option and the ``audit`` recipe, the audit end to end (tiny, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scar.checkpoint import load_checkpoint
from scar.cli import main
from scar.data.datasets import load_dataset, train_subset_indices
from scar.data.forget import ForgetSpec, make_splits
from scar.errors import CheckpointError, ConfigError, MissingDataError
from scar.evaluation.audit import membership_audit, model_metrics, split_loaders
from scar.experiments import references
from scar.experiments.references import (
    prepare_audit,
    reference_half,
    reference_pool,
    train_references,
)
from scar.training.workflow import TrainJob, run_train_job

TINY = {"width": 4, "feature_dim": 8}
SUBSET = 20


@pytest.fixture(scope="module")
def audit_original(fake_fmnist_dir, tmp_path_factory):
    """A tiny fastcnn trained with the audit recipe on 20 images of the fake Fashion-MNIST."""
    folder = tmp_path_factory.mktemp("audit_ckpt")
    bundle = load_dataset("fashion-mnist", data_dir=fake_fmnist_dir, train_subset=SUBSET)
    job = TrainJob(dataset="fashion-mnist", dataset_options={"train_subset": SUBSET},
                   model="fastcnn", model_kwargs=TINY,
                   recipe_overrides={"recipe": "audit", "epochs": 1, "batch_size": 8})
    path = run_train_job(job, folder / "original.safetensors", bundle=bundle, device="cpu",
                         progress=False, record_stats=False)
    return load_checkpoint(path), bundle, folder


def test_train_subset_is_a_prefix_of_every_larger_one(fake_fmnist_dir):
    small = load_dataset("fashion-mnist", data_dir=fake_fmnist_dir, train_subset=10)
    large = load_dataset("fashion-mnist", data_dir=fake_fmnist_dir, train_subset=30)
    assert len(small.train) == 10 and len(large.train) == 30 and len(small.test) == 20
    assert torch.equal(large.train.images[:10], small.train.images)
    # Image i of the fake set is filled with value i: the subset is the seeded permutation.
    assert small.train.images[:, 0, 0, 0].tolist() == train_subset_indices(60, 10).tolist()
    assert small.options["train_subset"] == 10
    with pytest.raises(ConfigError, match="train_subset must be smaller"):
        load_dataset("fashion-mnist", data_dir=fake_fmnist_dir, train_subset=60)
    with pytest.raises(ConfigError, match="integer >= 0"):
        load_dataset("fashion-mnist", data_dir=fake_fmnist_dir, train_subset=-1)


def test_audit_recipe_is_recorded(audit_original):
    ck, _, _ = audit_original
    assert ck.meta["recipe"]["crop_padding"] == 0 and ck.meta["recipe"]["hflip"] is False
    assert ck.meta["recipe"]["label_smoothing"] == 0.0 and ck.meta["recipe"]["epochs"] == 1
    assert ck.meta["dataset_options"]["train_subset"] == SUBSET


def test_halves_come_in_complementary_pairs():
    a, b, c = (reference_half(41, i, seed=0) for i in (0, 1, 2))
    assert len(a) == 20 and len(b) == 21
    assert sorted(torch.cat([a, b]).tolist()) == list(range(41))
    assert not torch.equal(a, c)  # another pair, another split
    assert torch.equal(a, reference_half(41, 0, seed=0))  # seeded
    assert not torch.equal(a, reference_half(41, 0, seed=1))


def test_pool_starts_with_the_models_training_set(audit_original, fake_fmnist_dir):
    ck, bundle, _ = audit_original
    pool = reference_pool(ck, bundle, data_dir=fake_fmnist_dir)
    assert len(pool.images) == 2 * SUBSET and pool.target_size == SUBSET
    assert torch.equal(pool.images.images[:SUBSET], bundle.train.images)
    assert pool.options["train_subset"] == 2 * SUBSET
    # Another copy of the data (here the system's Fashion-MNIST, or none): refused.
    with pytest.raises((ConfigError, MissingDataError)):
        reference_pool(ck, bundle, data_dir=fake_fmnist_dir / "elsewhere")


def test_reference_models_are_cached_and_resumed(audit_original, fake_fmnist_dir, tmp_path,
                                                 monkeypatch):
    ck, bundle, _ = audit_original
    calls = []
    real_train = references.train_model

    def counting(*args, **kwargs):
        calls.append(kwargs["desc"])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(references, "train_model", counting)
    first = train_references(ck, bundle, tmp_path, count=2, device="cpu", data_dir=fake_fmnist_dir,
                        progress=False)
    assert calls == ["reference 0", "reference 1"]
    assert all(p.suffix == ".safetensors" and p.exists() for p in first.paths)
    assert first.paths[0].name.startswith("fashion-mnist_fastcnn_reference0_")
    # Every image of the model's training set is in exactly one model of the pair.
    assert first.members[0].shape == (SUBSET,)
    assert np.array_equal(first.members[0] | first.members[1], first.members[0] ^ first.members[1])
    # Rerun: everything reused; one deleted: only it is retrained, with the same weights.
    again = train_references(ck, bundle, tmp_path, count=2, device="cpu", data_dir=fake_fmnist_dir,
                        progress=False)
    assert len(calls) == 2
    first.paths[1].unlink()
    train_references(ck, bundle, tmp_path, count=4, device="cpu", data_dir=fake_fmnist_dir,
                        progress=False)
    assert calls[2:] == ["reference 1", "reference 2", "reference 3"]
    for a, b in zip(first.models[0].state_dict().values(),
                    again.models[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)
    reloaded = load_checkpoint(first.paths[1])
    assert reloaded.meta["role"] == "reference" and reloaded.meta["reference"]["index"] == 1


def test_a_cached_file_of_another_key_is_refused(audit_original, fake_fmnist_dir, tmp_path):
    ck, bundle, _ = audit_original
    refs = train_references(ck, bundle, tmp_path, count=2, device="cpu", data_dir=fake_fmnist_dir,
                        progress=False)
    other = load_checkpoint(refs.paths[0])
    from scar.checkpoint import save_checkpoint

    save_checkpoint(refs.paths[0], other.model, other.model_spec, other.input_spec,
                    {**other.meta, "reference": {**other.meta["reference"], "seed": 99}})
    with pytest.raises(CheckpointError, match="delete it to retrain"):
        train_references(ck, bundle, tmp_path, count=2, device="cpu", data_dir=fake_fmnist_dir,
                        progress=False)


@pytest.mark.parametrize("count", [3, 0, True])
def test_reference_count_must_be_even(audit_original, tmp_path, count):
    ck, bundle, _ = audit_original
    with pytest.raises(ConfigError, match="even integer"):
        train_references(ck, bundle, tmp_path, count=count, progress=False)


def test_audit_end_to_end(audit_original, fake_fmnist_dir, tmp_path):
    ck, bundle, _ = audit_original
    splits = make_splits(bundle, ForgetSpec.random(count=6, seed=0))
    audit = prepare_audit(ck, bundle, splits, "rmia", tmp_path, count=2, device="cpu",
                          data_dir=fake_fmnist_dir, progress=False)
    assert audit.references.count == 2
    # Each forget image is OUT for exactly one model of the pair.
    assert (audit.references.train_forget_out.sum(axis=0) == 1).all()
    loaders = split_loaders(splits, ck.input_spec, "cpu")
    metrics, outputs = model_metrics(ck.model, loaders, "HR", mia=False, audit=audit)
    assert metrics["audit/attack"] == "rmia" and metrics["audit/n_members"] == 6
    assert metrics["audit/auc_lo"] <= metrics["audit/auc"] <= metrics["audit/auc_hi"]
    assert 0.0 <= metrics["audit/tpr@0.1%"] <= 1.0
    lira = membership_audit(outputs, "HR", audit.__class__("lira", audit.references))
    assert lira.attack == "lira" and lira.n_references == 2
    with pytest.raises(ConfigError, match="Unknown membership audit"):
        prepare_audit(ck, bundle, splits, "likelihood", tmp_path, count=2, progress=False)


def test_cli_evaluate_with_audit(audit_original, fake_fmnist_dir, tmp_path, capsys):
    ck, _, folder = audit_original
    out = tmp_path / "eval.json"
    code = main(["-q", "evaluate", "--checkpoint", str(ck.path), "--forget-count", "6",
                 "--no-mia", "--audit", "lira", "--references", "2", "--references-dir",
                 str(tmp_path / "refs"), "--data-dir", str(fake_fmnist_dir), "--device", "cpu",
                 "--out", str(out)])
    assert code == 0
    import json

    report = json.loads(out.read_text())
    assert report["results"]["evaluated"]["audit/attack"] == "lira"
    assert "audit/tpr@1%" in report["results"]["original"]
    assert report["audit_note"] is None  # no --oracle: nothing to separate
    assert len(list((tmp_path / "refs").glob("*_reference*.safetensors"))) == 2
    assert "audit/auc" in capsys.readouterr().out


def test_cli_unlearn_with_audit(audit_original, fake_fmnist_dir, tmp_path, capsys):
    """`scar unlearn --audit`: the original and the unlearned model carry the audit, computed
    with the same reference models as `scar evaluate --audit`, and the page shows it."""
    ck, _, _ = audit_original
    refs, out = tmp_path / "refs", tmp_path / "unlearned.safetensors"
    common = ["--forget-count", "6", "--audit", "lira", "--references", "2",
              "--references-dir", str(refs), "--data-dir", str(fake_fmnist_dir),
              "--device", "cpu"]
    code = main(["-q", "unlearn", "--checkpoint", str(ck.path), "--method",
                 "negative_gradient", "--set", "epochs=1", *common, "--out", str(out),
                 "--report", str(tmp_path / "page.html")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "audit/auc" in printed
    assert len(list(refs.glob("*_reference*.safetensors"))) == 2
    meta = load_checkpoint(out).meta
    unlearned_auc = meta["metrics"]["audit/auc"]
    # The same request through `scar evaluate` reuses the cached references: same AUC.
    report = tmp_path / "eval.json"
    assert main(["-q", "evaluate", "--checkpoint", str(out), "--original", str(ck.path),
                 "--no-mia", *common, "--out", str(report)]) == 0
    import json

    evaluated = json.loads(report.read_text())["results"]
    assert evaluated["evaluated"]["audit/auc"] == pytest.approx(unlearned_auc)
    assert len(list(refs.glob("*_reference*.safetensors"))) == 2
    page = (tmp_path / "page.html").read_text()
    assert "Likelihood-ratio audit" in page and f"{unlearned_auc:.3f} [" in page


def test_grid_with_audit(fake_fmnist_dir, tmp_path):
    """A grid with 'audit': the original, retrain and method rows carry the audit; reference
    models are cached with the other checkpoints and reused; run ids of grids without the key
    are unchanged."""
    from scar.experiments.grid import expand, load_grid
    from scar.experiments.report import audit_separation_note, summarize
    from scar.experiments.runner import CHECKPOINT_DIR, run_grid
    from scar.experiments.store import ResultsStore

    raw = {"dataset": "fashion-mnist", "data_dir": str(fake_fmnist_dir), "device": "cpu",
           "dataset_options": {"train_subset": 40}, "model": "fastcnn", "model_kwargs": TINY,
           "train": {"recipe": "audit", "epochs": 1, "batch_size": 8}, "scenario": "HR",
           "forget_count": 6, "mia": False, "audit": "lira", "audit_references": 2,
           "methods": {"negative_gradient": {"epochs": 1}}}
    summary = run_grid(load_grid(raw), tmp_path, progress=False)
    rows = ResultsStore(tmp_path).rows()
    assert (summary.total, summary.ok) == (3, 3), [r["error"] for r in rows]
    assert all(r["metrics"]["audit/attack"] == "lira" for r in rows)
    refs = sorted((tmp_path / CHECKPOINT_DIR).glob("*_reference*.safetensors"))
    assert len(refs) == 2
    assert audit_separation_note(summarize(rows)).startswith("Membership audit: The lira")
    without = {k: v for k, v in raw.items() if not k.startswith("audit")}
    with_ids = {s.run_id for s in expand(load_grid(raw))}
    assert not with_ids & {s.run_id for s in expand(load_grid(without))}
    assert "audit" not in expand(load_grid(without))[0].to_dict()
    with pytest.raises(ConfigError, match="grid key 'audit' must be one of"):
        load_grid({**raw, "audit": "svm"})
    with pytest.raises(ConfigError, match="must be even"):
        load_grid({**raw, "audit_references": 3})
