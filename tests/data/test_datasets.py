"""Dataset loaders: idx parsing, data-root resolution, image folders, TinyImageNet, synthetic."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scar.data import datasets as ds
from scar.data.datasets import DATASETS, load_dataset, parse_idx, read_idx
from scar.errors import ConfigError, MissingDataError, UnknownComponentError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# helpers / fixtures
# --------------------------------------------------------------------------------------------


def write_png(path: Path, size: tuple[int, int] = (10, 12), mode: str = "RGB", seed: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    """Point every data location at empty folders."""
    for name in list(ds.SYSTEM_LOCATIONS):
        monkeypatch.setitem(ds.SYSTEM_LOCATIONS, name, (str(tmp_path / "system" / name),))
    monkeypatch.delenv(ds.DATA_DIR_ENV, raising=False)


# --------------------------------------------------------------------------------------------
# idx files
# --------------------------------------------------------------------------------------------


def test_parse_idx_round_trip(tmp_path, idx_files):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_files.encode(arr)))
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_parse_idx_rejects_bad_header_and_size(idx_files):
    with pytest.raises(ConfigError, match="not an idx file"):
        parse_idx(b"\x01\x00\x08\x01abcd", "f")
    good = idx_files.encode(np.zeros((2, 2), np.uint8))
    with pytest.raises(ConfigError, match="announces shape"):
        parse_idx(good[:-1], "f")


@pytest.mark.parametrize("layout", ["", "MNIST/raw"])
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_from_idx_files_in_data_dir(tmp_path, no_system_data, idx_files, layout, gz):
    idx_files.write_dir(tmp_path / layout if layout else tmp_path, gz=gz)
    b = load_dataset("mnist", data_dir=tmp_path)
    assert b.train.images.shape == (6, 1, 28, 28) and b.test.images.shape == (4, 1, 28, 28)
    assert b.train.images.dtype == torch.uint8
    assert b.train.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert int(b.train.images[3].max()) == 3
    assert b.info.recipe == "mnist" and b.info.class_names[7] == "7"


def test_env_var_is_searched(tmp_path, no_system_data, monkeypatch, idx_files):
    idx_files.write_dir(tmp_path / "env" / "FashionMNIST" / "raw")
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(tmp_path / "env"))
    b = load_dataset("fashion-mnist")
    assert len(b.train) == 6 and b.info.num_classes == 10
    assert b.info.class_names[0] == "T-shirt/top"


def test_fashion_mnist_real_files():
    if not FMNIST_DIR.is_dir():
        pytest.skip(f"{FMNIST_DIR} not present (apt-get install dataset-fashion-mnist)")
    b = load_dataset("fashion-mnist", data_dir=FMNIST_DIR)
    assert b.train.images.shape == (60000, 1, 28, 28)
    assert b.test.images.shape == (10000, 1, 28, 28)
    assert b.train.labels.unique().tolist() == list(range(10))
    assert b.test.labels.unique().tolist() == list(range(10))
    assert b.info.input_spec.size == 28 and b.info.input_spec.channels == 1
    mean = b.train.images.float().mean().item() / 255
    assert abs(mean - b.info.input_spec.mean[0]) < 1e-3


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_grey_dataset_as_rgb(tmp_path, no_system_data, idx_files, name):
    idx_files.write_dir(tmp_path)
    grey = load_dataset(name, data_dir=tmp_path)
    rgb = load_dataset(name, data_dir=tmp_path, channels=3)
    assert grey.options == {"channels": 1, "train_subset": 0}
    assert rgb.options == {"channels": 3, "train_subset": 0}
    assert rgb.train.images.shape == (6, 3, 28, 28) and rgb.test.images.shape == (4, 3, 28, 28)
    for split_rgb, split_grey in ((rgb.train, grey.train), (rgb.test, grey.test)):
        assert torch.equal(split_rgb.images, split_grey.images.expand(-1, 3, -1, -1))
        assert torch.equal(split_rgb.labels, split_grey.labels)
    g, c = grey.info.input_spec, rgb.info.input_spec
    assert (c.channels, c.size) == (3, 28)
    assert c.mean == g.mean * 3 and c.std == g.std * 3
    assert rgb.info.class_names == grey.info.class_names and rgb.info.recipe == name


@pytest.mark.parametrize("bad", [2, 0, True, 3.0, "3"])
def test_channels_option_names_the_bad_value_before_reading_files(no_system_data, bad):
    with pytest.raises(ConfigError) as err:
        load_dataset("fashion-mnist", channels=bad)  # no files anywhere: validated first
    assert "fashion-mnist option channels" in str(err.value) and "[1, 3]" in str(err.value)
    assert repr(bad) in str(err.value)


def test_rgb_datasets_take_no_channels_option():
    with pytest.raises(ConfigError, match=r"\['channels'\].*allowed options: \['train_subset'\]"):
        load_dataset("cifar10", channels=1)


def test_bundles_keep_their_options_with_defaults():
    b = load_dataset("synthetic", num_classes=3, n_train=30, n_test=9)
    assert b.options == {"num_classes": 3, "n_train": 30, "n_test": 9, "size": 16,
                         "channels": 1, "seed": 0}
    assert ds.full_options("synthetic", {"seed": 2}) == {**ds.option_defaults("synthetic"),
                                                          "seed": 2}
    assert ds.option_defaults("fashion-mnist") == {"channels": 1, "train_subset": 0}
    assert ds.option_defaults("cifar10") == {"train_subset": 0}


def test_missing_data_lists_every_location(tmp_path, no_system_data, monkeypatch):
    monkeypatch.setenv(ds.DATA_DIR_ENV, str(tmp_path / "envdir"))
    with pytest.raises(MissingDataError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path / "explicit")
    msg = str(err.value)
    for place in ("explicit", "envdir", str(tmp_path / "system" / "fashion-mnist")):
        assert place in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--download" in msg and "--data-dir" in msg


def test_missing_data_says_when_env_unset(no_system_data):
    with pytest.raises(MissingDataError, match=r"SCAR_DATA_DIR: \(not set\)"):
        load_dataset("cifar10")


def test_unreadable_cifar_folder_is_missing_data(tmp_path, no_system_data):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(MissingDataError, match="could not be read by torchvision"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_unknown_dataset_suggests_name():
    with pytest.raises(UnknownComponentError, match="fashion-mnist"):
        load_dataset("fashion-mnst")


def test_unknown_option_is_config_error():
    with pytest.raises(ConfigError, match="allowed options"):
        load_dataset("synthetic", colour=True)


def test_registry_holds_the_documented_datasets():
    for name in ("fashion-mnist", "mnist", "cifar10", "cifar100", "tinyimagenet", "synthetic"):
        assert name in DATASETS
    assert "imagefolder:/some/path" in DATASETS


# --------------------------------------------------------------------------------------------
# imagefolder
# --------------------------------------------------------------------------------------------


def make_tree(root: Path, classes=("cat", "dog"), per_class: int = 5) -> None:
    for ci, c in enumerate(classes):
        for i in range(per_class):
            mode = "L" if i % 2 else "RGB"
            write_png(root / c / f"{i}.png", (10 + i, 12), mode, seed=10 * ci + i)


def test_imagefolder_single_tree_split(tmp_path):
    make_tree(tmp_path / "imgs")
    b = load_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    assert b.info.class_names == ("cat", "dog") and b.info.num_classes == 2
    assert b.train.images.shape == (8, 3, 32, 32) and b.test.images.shape == (2, 3, 32, 32)
    assert sorted(b.test.labels.tolist()) == [0, 1]  # stratified: one test image per class
    assert b.info.recipe == "imagefolder"
    mean = (b.train.images.double() / 255).mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(b.info.input_spec.mean, dtype=torch.double), atol=1e-5)


def test_imagefolder_options_and_determinism(tmp_path):
    make_tree(tmp_path, per_class=10)
    name = f"imagefolder:{tmp_path}"
    a = load_dataset(name, size=16, channels=1, seed=3, test_fraction=0.3)
    b = load_dataset(name, size=16, channels=1, seed=3, test_fraction=0.3)
    c = load_dataset(name, size=16, channels=1, seed=4, test_fraction=0.3)
    assert a.train.images.shape == (14, 1, 16, 16) and len(a.test) == 6
    assert torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.test.images, c.test.images)


def test_imagefolder_train_val_layout(tmp_path):
    make_tree(tmp_path / "train", per_class=3)
    make_tree(tmp_path / "val", classes=("dog",), per_class=2)
    b = load_dataset(f"imagefolder:{tmp_path}", size=8)
    assert len(b.train) == 6 and len(b.test) == 2
    assert b.test.labels.tolist() == [1, 1]  # "dog" keeps its train label


def test_imagefolder_errors(tmp_path):
    with pytest.raises(MissingDataError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="No class folders"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    make_tree(tmp_path / "t", per_class=2)
    (tmp_path / "t" / "bird").mkdir()
    with pytest.raises(ConfigError, match=r"bird holds no images"):
        load_dataset(f"imagefolder:{tmp_path / 't'}")
    make_tree(tmp_path / "s" / "train", per_class=2)
    make_tree(tmp_path / "s" / "test", classes=("eel",), per_class=1)
    with pytest.raises(ConfigError, match="does not exist in the training set"):
        load_dataset(f"imagefolder:{tmp_path / 's'}")
    with pytest.raises(ConfigError, match="channels"):
        load_dataset(f"imagefolder:{tmp_path / 't'}", channels=2)


# --------------------------------------------------------------------------------------------
# TinyImageNet
# --------------------------------------------------------------------------------------------


def write_jpeg(path: Path, value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (64, 64, 3) if mode == "RGB" else (64, 64)
    Image.fromarray(np.full(shape, value, np.uint8), mode=mode).save(path, quality=95)


def make_tiny(root: Path, annotations: str | None = None) -> None:
    wnids = ["n03", "n01", "n02"]  # unsorted on purpose: labels follow sorted wnids
    (root / "wnids.txt").parent.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01\tgoldfish, Carassius\nn02\tsalamander\nn03\tfrog\n")
    for w in wnids:
        for i in range(2):
            write_jpeg(
                root / "train" / w / "images" / f"{w}_{i}.JPEG", 40 * i + 20, "L" if i else "RGB"
            )
    for i in range(3):
        write_jpeg(root / "val" / "images" / f"val_{i}.JPEG", 100)
    ann = annotations or "".join(
        f"val_{i}.JPEG\t{w}\t0\t0\t63\t63\n" for i, w in enumerate(["n02", "n03", "n01"])
    )
    (root / "val" / "val_annotations.txt").write_text(ann)


def test_tinyimagenet_layout(tmp_path, no_system_data):
    make_tiny(tmp_path / "tiny-imagenet-200")
    b = load_dataset("tinyimagenet", data_dir=tmp_path)
    assert b.info.class_names == ("goldfish", "salamander", "frog")
    assert b.train.images.shape == (6, 3, 64, 64) and b.train.images.dtype == torch.uint8
    assert b.train.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert b.test.labels.tolist() == [1, 2, 0]
    assert b.info.input_spec.size == 64 and b.info.recipe == "tinyimagenet"


def test_tinyimagenet_bad_annotation(tmp_path, no_system_data):
    make_tiny(tmp_path / "tiny-imagenet-200", annotations="val_0.JPEG\tn99\t0\t0\t1\t1\n")
    with pytest.raises(ConfigError, match="line 1"):
        load_dataset("tinyimagenet", data_dir=tmp_path)


def test_tinyimagenet_missing(tmp_path, no_system_data):
    with pytest.raises(MissingDataError, match="tiny-imagenet-200.zip"):
        load_dataset("tinyimagenet", data_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_shaped():
    a = load_dataset("synthetic")
    b = load_dataset("synthetic")
    c = load_dataset("synthetic", seed=1)
    assert a.train.images.shape == (512, 1, 16, 16) and a.test.images.shape == (128, 1, 16, 16)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert torch.bincount(a.train.labels).tolist() == [52] * 2 + [51] * 8
    rgb = load_dataset("synthetic", channels=3, size=8, num_classes=3, n_train=30, n_test=9)
    assert rgb.train.images.shape == (30, 3, 8, 8) and rgb.info.num_classes == 3


def test_synthetic_is_learnable():
    """A nearest-class-mean classifier already separates the classes, so a CNN can too."""
    b = load_dataset("synthetic")
    x_train, x_test = b.train.images.flatten(1).float(), b.test.images.flatten(1).float()
    means = torch.stack([x_train[b.train.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(x_test, means).argmin(1)
    assert (pred == b.test.labels).float().mean() > 0.9


def test_synthetic_option_validation():
    with pytest.raises(ConfigError, match="num_classes"):
        load_dataset("synthetic", num_classes=1)


def test_concat_images_load_across_parts_and_refuse_mixed_shapes():
    from scar.data.base import ConcatImages, TensorImages

    a = TensorImages(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 1, 2]))
    b = TensorImages(torch.full((2, 1, 4, 4), 7, dtype=torch.uint8), torch.tensor([5, 6]))
    both = ConcatImages([a, b])
    assert len(both) == 5 and both.labels.tolist() == [0, 1, 2, 5, 6]
    got = both.load(torch.tensor([4, 0, 3, 2]))
    assert got[:, 0, 0, 0].tolist() == [7, 0, 7, 0]
    assert both.subset([3], torch.tensor([9])).labels.tolist() == [9]
    odd = TensorImages(torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.tensor([0]))
    with pytest.raises(ConfigError, match="one shape"):
        ConcatImages([a, odd])
