"""Forget specs, index files and the splits they induce (the oracle's retain set above all)."""

from __future__ import annotations

import json

import pytest
import torch

from scar.data.base import InputSpec, TensorImages
from scar.data.datasets import DatasetBundle, DatasetInfo
from scar.data.forget import (
    ForgetSpec,
    load_indices,
    make_splits,
    retain_indices,
    sample_forget_indices,
    save_indices,
)
from scar.errors import ConfigError, MissingDataError

NUM_CLASSES = 5


def coded_images(n: int) -> torch.Tensor:
    """Images whose first two pixels spell their own position (so subsets reveal indices)."""
    x = torch.zeros((n, 1, 4, 4), dtype=torch.uint8)
    idx = torch.arange(n)
    x[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
    x[:, 0, 0, 1] = (idx // 256).to(torch.uint8)
    return x


def decode_positions(images: torch.Tensor) -> set[int]:
    return set((images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist())


@pytest.fixture
def bundle() -> DatasetBundle:
    n_train, n_test = 600, 100
    g = torch.Generator().manual_seed(0)
    train = TensorImages(coded_images(n_train), torch.randint(NUM_CLASSES, (n_train,), generator=g))
    test = TensorImages(coded_images(n_test), torch.arange(n_test) % NUM_CLASSES)
    info = DatasetInfo(
        "coded",
        NUM_CLASSES,
        InputSpec(1, 4, (0.5,), (0.25,)),
        tuple(f"c{i}" for i in range(NUM_CLASSES)),
        "synthetic",
    )
    return DatasetBundle(info, train, test)


# --------------------------------------------------------------------------------------------
# ForgetSpec
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "classes"}, "kind must be one of"),
        ({"kind": "class"}, "at least one class"),
        ({"kind": "class", "classes": (-1,)}, "non-negative"),
        ({"kind": "class", "classes": (2, 2)}, "distinct"),
        ({"kind": "class", "classes": (1,), "count": 3}, "only uses"),
        ({"kind": "random"}, "exactly one of count or fraction"),
        ({"kind": "random", "count": 3, "fraction": 0.1}, "exactly one"),
        ({"kind": "random", "fraction": 0.0}, r"in \(0, 1\)"),
        ({"kind": "random", "fraction": 1.0}, r"in \(0, 1\)"),
        ({"kind": "random", "count": 0}, ">= 1"),
        ({"kind": "indices"}, "indices_file"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ForgetSpec(**kwargs)


@pytest.mark.parametrize(
    "spec",
    [
        ForgetSpec.for_classes(3),
        ForgetSpec.for_classes([1, 4]),
        ForgetSpec.random(count=50, seed=7),
        ForgetSpec.random(fraction=0.1),
        ForgetSpec.from_file("/tmp/forget.json"),
    ],
)
def test_spec_dict_round_trip(spec):
    d = json.loads(json.dumps(spec.to_dict()))
    assert ForgetSpec.from_dict(d) == spec
    assert spec.describe()


def test_spec_accepts_integer_like_classes():
    spec = ForgetSpec.for_classes(torch.tensor(3), 4)
    assert spec.classes == (3, 4) and all(type(c) is int for c in spec.classes)
    with pytest.raises(ConfigError, match=r"non-negative integers; got \[1\.5\]"):
        ForgetSpec.for_classes(1.5)


def test_spec_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="colour"):
        ForgetSpec.from_dict({"kind": "class", "classes": [1], "colour": "red"})


def test_describe():
    assert ForgetSpec.for_classes(3).describe() == "class removal (class 3)"
    assert "10.0%" in ForgetSpec.random(fraction=0.1, seed=2).describe()
    assert "50 images" in ForgetSpec.random(count=50).describe()


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def test_sample_forget_indices():
    a = sample_forget_indices(1000, fraction=0.1, seed=0)
    assert a.dtype == torch.long and len(a) == 100
    assert torch.equal(a, a.unique())  # sorted and distinct
    assert int(a.min()) >= 0 and int(a.max()) < 1000
    assert torch.equal(a, sample_forget_indices(1000, count=100, seed=0))
    assert not torch.equal(a, sample_forget_indices(1000, fraction=0.1, seed=1))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"count": 10}, r"\[1, 9\]"),
        ({"count": 0}, ">= 1"),
        ({"fraction": 0.01}, "gives 0 images"),
        ({"fraction": 1.5}, r"\(0, 1\)"),
    ],
)
def test_sample_forget_indices_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        sample_forget_indices(10, **kwargs)


def test_retain_indices():
    assert retain_indices(5, torch.tensor([1, 3])).tolist() == [0, 2, 4]
    with pytest.raises(ConfigError, match=r"\[0, 4\]"):
        retain_indices(5, torch.tensor([5]))


# --------------------------------------------------------------------------------------------
# Splits: the oracle's retain set excludes exactly the forget indices
# --------------------------------------------------------------------------------------------


def assert_partition(bundle: DatasetBundle, splits) -> None:
    n = len(bundle.train)
    forget = set(splits.forget_indices.tolist())
    assert decode_positions(splits.train_forget.load(torch.arange(len(splits.train_forget)))) == (
        forget
    )
    retained = decode_positions(splits.train_retain.load(torch.arange(len(splits.train_retain))))
    assert retained == set(range(n)) - forget
    assert len(splits.train_retain) + len(splits.train_forget) == n
    assert splits.train_retain.labels.tolist() == bundle.train.labels[sorted(retained)].tolist()


def test_class_removal_splits(bundle):
    splits = make_splits(bundle, ForgetSpec.for_classes(2, 4))
    assert_partition(bundle, splits)
    expected = set(torch.nonzero(torch.isin(bundle.train.labels, torch.tensor([2, 4]))).flatten())
    assert set(splits.forget_indices.tolist()) == {int(i) for i in expected}
    assert set(splits.train_forget.labels.tolist()) == {2, 4}
    assert not set(splits.train_retain.labels.tolist()) & {2, 4}
    assert set(splits.test_forget.labels.tolist()) == {2, 4}
    assert set(splits.test_retain.labels.tolist()) == {0, 1, 3}
    assert len(splits.test_forget) + len(splits.test_retain) == len(bundle.test)
    assert splits.removed_classes == (2, 4)


def test_random_removal_splits(bundle):
    spec = ForgetSpec.random(fraction=0.1, seed=3)
    splits = make_splits(bundle, spec)
    assert_partition(bundle, splits)
    assert len(splits.forget_indices) == 60
    assert torch.equal(splits.forget_indices, sample_forget_indices(600, fraction=0.1, seed=3))
    assert splits.removed_classes == ()
    assert len(splits.test_forget) == 0 and splits.test_forget.images.shape[1:] == (1, 4, 4)
    assert splits.test_retain is bundle.test


def test_index_file_splits(bundle, tmp_path):
    path = save_indices(tmp_path / "f.json", torch.tensor([5, 0, 599]), {"num_train": 600})
    splits = make_splits(bundle, ForgetSpec.from_file(path))
    assert splits.forget_indices.tolist() == [0, 5, 599]
    assert_partition(bundle, splits)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (ForgetSpec.for_classes(5), r"\[0, 4\]"),
        (ForgetSpec.for_classes(0, 1, 2, 3, 4), "Cannot remove all 5 classes"),
        (ForgetSpec.random(count=600), r"\[1, 599\]"),
    ],
)
def test_split_validation(bundle, spec, match):
    with pytest.raises(ConfigError, match=match):
        make_splits(bundle, spec)


def test_class_without_train_images(bundle):
    bundle.train.labels[bundle.train.labels == 1] = 0
    with pytest.raises(ConfigError, match="no training images"):
        make_splits(bundle, ForgetSpec.for_classes(1))


# --------------------------------------------------------------------------------------------
# Index files
# --------------------------------------------------------------------------------------------


def test_index_file_round_trip(tmp_path):
    idx = sample_forget_indices(1000, count=30, seed=4)
    meta = {"num_train": 1000, "seed": 4, "dataset": "fashion-mnist"}
    path = save_indices(tmp_path / "sub" / "forget.json", idx, meta)
    data = json.loads(path.read_text())
    assert data["indices"] == idx.tolist() and data["dataset"] == "fashion-mnist"
    assert torch.equal(load_indices(path), idx)
    assert torch.equal(load_indices(path, num_train=1000), idx)
    assert [p.name for p in path.parent.iterdir()] == ["forget.json"]  # no temp file left


def write(tmp_path, content: str):
    path = tmp_path / "idx.json"
    path.write_text(content)
    return path


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "not valid JSON"),
        ('{"idx": [1]}', "'indices' list"),
        ('"text"', "'indices' list"),
        ('{"indices": []}', "empty"),
        ('{"indices": [1, 2.5, "3", true]}', r"integers; got \[2\.5, '3', True\]"),
        ('{"indices": [4, 1, 4, 2, 1]}', r"duplicated: \[1, 4\]"),
        ('{"indices": [1, 10, 12], "num_train": 10}', r"out of range: \[10, 12\]"),
        ('{"indices": [-1, 2]}', r">= 0; got \[-1\]"),
    ],
)
def test_index_file_validation(tmp_path, content, match):
    path = write(tmp_path, content)
    with pytest.raises(ConfigError, match=match) as err:
        load_indices(path)
    assert str(path) in str(err.value)


def test_index_file_num_train_checks(tmp_path):
    path = write(tmp_path, '{"indices": [1, 2], "num_train": 10}')
    with pytest.raises(ConfigError, match="made for a training set of 10"):
        load_indices(path, num_train=20)
    path = write(tmp_path, "[0, 7]")
    with pytest.raises(ConfigError, match=r"out of range: \[7\]"):
        load_indices(path, num_train=5)
    assert load_indices(path).tolist() == [0, 7]


def test_index_file_missing(tmp_path):
    with pytest.raises(MissingDataError, match="nope.json"):
        load_indices(tmp_path / "nope.json")


def test_save_indices_validates(tmp_path):
    with pytest.raises(ConfigError, match="out of range"):
        save_indices(tmp_path / "f.json", torch.tensor([3, 10]), {"num_train": 10})
    assert not (tmp_path / "f.json").exists()


def test_index_file_messages_say_what_is_wrong(tmp_path):
    """Issue 12: a folder was reported as "does not exist", and a string num_train as
    "512 vs 512"."""
    from scar.data.forget import load_indices

    with pytest.raises(ConfigError, match="is a folder"):
        load_indices(tmp_path)
    bad = tmp_path / "idx.json"
    bad.write_text(json.dumps({"indices": [1, 2], "num_train": "512"}))
    with pytest.raises(ConfigError, match=r"'num_train' must be an integer.*'512' \(str\)"):
        load_indices(bad, num_train=512)
