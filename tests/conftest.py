"""Shared fixtures: tiny synthetic data and a tiny trained model (fast, offline)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from scar.data.datasets import load_dataset
from scar.data.forget import ForgetSpec, make_splits
from scar.data.surrogates import load_surrogate
from scar.models.base import ModelSpec, build_model
from scar.training.recipes import Recipe
from scar.training.trainer import train_model

torch.set_num_threads(2)

TINY_RECIPE = Recipe(epochs=4, batch_size=64, lr=0.05, weight_decay=0.0, schedule="constant",
                     model="fastcnn")


@pytest.fixture(scope="session")
def synth():
    """4 classes of 1x16x16 images with class-dependent patterns."""
    return load_dataset("synthetic", num_classes=4, n_train=384, n_test=128, size=16, channels=1)


@pytest.fixture(scope="session")
def tiny_spec(synth):
    info = synth.info
    return ModelSpec("fastcnn", info.num_classes, info.input_spec.channels, info.input_spec.size,
                     kwargs={"width": 8, "feature_dim": 32})


@pytest.fixture(scope="session")
def tiny_model(synth, tiny_spec):
    """A fastcnn trained on the synthetic data (reaches high accuracy in a few seconds)."""
    torch.manual_seed(0)
    model = build_model(tiny_spec)
    result = train_model(model, synth.train, synth.info.input_spec, TINY_RECIPE,
                         test=synth.test, seed=0, progress=False)
    assert result.test_acc > 0.8, f"tiny model did not learn: {result.test_acc}"
    return result.model


@pytest.fixture(scope="session")
def cr_splits(synth):
    return make_splits(synth, ForgetSpec.for_classes(1))


@pytest.fixture(scope="session")
def hr_splits(synth):
    return make_splits(synth, ForgetSpec.random(fraction=0.1, seed=0))


@pytest.fixture(scope="session")
def tiny_surrogate(synth):
    spec = synth.info.input_spec
    return load_surrogate("gaussian-noise", channels=spec.channels, size=spec.size, n=256, seed=0)


class IdxFiles:
    """Miniature MNIST-style datasets in the original idx format (as Fashion-MNIST ships)."""

    @staticmethod
    def encode(array: np.ndarray) -> bytes:
        header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        return header + array.astype(np.uint8).tobytes()

    @staticmethod
    def write_dir(directory: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> Path:
        """Image i is filled with value i, label i % 10."""
        directory.mkdir(parents=True, exist_ok=True)
        for prefix, n in (("train", n_train), ("t10k", n_test)):
            images = np.stack([np.full((28, 28), i, np.uint8) for i in range(n)])
            labels = (np.arange(n) % 10).astype(np.uint8)
            for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
                name = f"{prefix}-{kind}" + (".gz" if gz else "")
                data = IdxFiles.encode(arr)
                (directory / name).write_bytes(gzip.compress(data) if gz else data)
        return directory


@pytest.fixture(scope="session")
def idx_files() -> type[IdxFiles]:
    return IdxFiles


@pytest.fixture(scope="session")
def fake_fmnist_dir(tmp_path_factory) -> Path:
    """A 60 + 20 image Fashion-MNIST in its original file format (pass it as data_dir)."""
    return IdxFiles.write_dir(tmp_path_factory.mktemp("fashion-mnist"), n_train=60, n_test=20)
