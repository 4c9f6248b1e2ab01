"""Reference models of the membership audit (:mod:`scar.evaluation.lr_attack`): trained once per
dataset × architecture × recipe × seed on random halves of a known pool, cached as checkpoints.

**The pool.** A model trained on a dataset's whole training set gets the training set as pool.
A model trained with the dataset option ``train_subset=n`` (the audit setting: 5,000
Fashion-MNIST images) gets the subset of ``min(2n, N)`` images, which starts with the model's own
n images in the same order (:data:`~scar.data.datasets.TRAIN_SUBSET_SEED`): position i of the
model's training set is position i of the pool, and each reference model trains on n images, as
many as the model under audit.

**The halves.** Reference models come in complementary pairs: pair p draws a seeded permutation
of the pool; model 2p trains on its first half, model 2p+1 on the second. So every pool image is
IN for exactly half of the reference models and OUT for the other half, which the offline
attacks need; test images are OUT for all.

**Caching.** A reference model is a SCAR checkpoint (safetensors + sidecar) in the folder of the
other cached checkpoints (a grid's ``run_dir/checkpoints``; next to the original for ``scar
evaluate``), named like them (:func:`~scar.experiments.runner.checkpoint_path`):
``<dataset>_<model>_reference<i>_<hash>.safetensors``, the hash over dataset, pool options,
model spec, recipe, seed and index (not the number of models: asking for more reuses the first
ones). Existing ones are loaded (checked against their key) instead of trained, so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from scar.checkpoint import (
    Checkpoint,
    checkpoint_exists,
    file_slug,
    load_checkpoint,
    save_checkpoint,
)
from scar.data.base import ImageSet
from scar.data.datasets import (
    DatasetBundle,
    load_dataset,
    option_defaults,
    train_subset_indices,
)
from scar.data.forget import Splits
from scar.errors import CheckpointError, ConfigError
from scar.evaluation.audit import MembershipAudit, reference_signals, split_loaders
from scar.evaluation.lr_attack import ATTACKS, DEFAULT_REFERENCES
from scar.experiments.grid import stable_hash
from scar.models.base import build_model
from scar.training.recipes import RECIPES, Recipe
from scar.training.trainer import train_model
from scar.utils import device_name, resolve_device

log = logging.getLogger(__name__)

#: Training seed of reference model i: REFERENCE_SEED_BASE * (seed + 1) + i (the cached
#: originals use seed 0, so no reference model shares their initialisation or batch order).
REFERENCE_SEED_BASE = 1000
ROLE = "reference"


@dataclass(frozen=True)
class ReferencePool:
    """The pool the reference models draw their halves from, and how to reload it."""

    images: ImageSet
    dataset: str
    options: dict[str, Any]  # the dataset options that load the pool (train_subset=2n)
    target_size: int  # the audited model's training-set size (its positions 0..n-1 in the pool)


@dataclass
class ReferenceModels:
    """Trained (or loaded) reference models and, per model, which of the audited model's
    training images it trained on (bool over the model's training set)."""

    models: list[nn.Module]
    members: list[np.ndarray]
    paths: list[Path]


def reference_pool(ck: Checkpoint, bundle: DatasetBundle, *, data_dir: str | Path | None = None
                   ) -> ReferencePool:
    """The pool of ``ck`` (trained on ``bundle.train``): see the module docstring."""
    options = dict(bundle.options)
    n = int(options.get("train_subset", 0) or 0)
    if n == 0:
        return ReferencePool(bundle.train, ck.dataset or bundle.info.name, options,
                             len(bundle.train))
    full = load_dataset(bundle.info.name, data_dir=data_dir, **{**options, "train_subset": 0})
    size = min(2 * n, len(full.train))
    pool_options = {**options, "train_subset": size if size < len(full.train) else 0}
    images = full.train.subset(train_subset_indices(len(full.train), size))
    head = torch.arange(n)
    if not (torch.equal(images.load(head), bundle.train.load(head))
            and torch.equal(images.labels[:n], bundle.train.labels)):
        raise ConfigError(
            f"the reference pool of {bundle.info.name!r} (train_subset={size}) does not start "
            f"with the model's {n} training images: the dataset was loaded from another place "
            "than the model's data; pass the same data_dir (--data-dir)."
        )
    return ReferencePool(images, bundle.info.name, pool_options, n)


def reference_half(pool_size: int, index: int, seed: int = 0) -> torch.Tensor:
    """Sorted pool positions reference model ``index`` trains on (complementary pairs)."""
    if pool_size < 2:
        raise ConfigError(f"the reference pool needs at least 2 images; got {pool_size}.")
    g = torch.Generator().manual_seed(stable_int(seed, index // 2))
    perm = torch.randperm(pool_size, generator=g)
    half = perm[: pool_size // 2] if index % 2 == 0 else perm[pool_size // 2:]
    return half.sort().values


def stable_int(*parts: int) -> int:
    """A 63-bit seed from integers (the same on every platform and Python)."""
    return int(stable_hash(list(parts), 15), 16)


def recorded_recipe(ck: Checkpoint, bundle: DatasetBundle) -> Recipe:
    """The recipe ``ck`` was trained with (its sidecar), else the dataset's default (warned)."""
    recorded = ck.meta.get("recipe")
    if not recorded:
        log.warning("checkpoint %s records no training recipe; the reference models use the "
                    "%r recipe, which may not match how it was trained", ck.path,
                    bundle.info.recipe)
        return RECIPES.get(bundle.info.recipe)
    known = {f.name for f in fields(Recipe)}
    values = {k: v for k, v in recorded.items() if k in known}
    if "milestones" in values:
        values["milestones"] = tuple(values["milestones"])
    return Recipe(**values)


def reference_key(pool: ReferencePool, ck: Checkpoint, recipe: Recipe, seed: int, index: int
                  ) -> dict[str, Any]:
    return {"dataset": pool.dataset, "dataset_options": pool.options,
            "model": ck.model_spec.to_dict(), "recipe": recipe.to_dict(), "seed": seed,
            "index": index, "pool_size": len(pool.images)}


def reference_path(folder: str | Path, key: dict[str, Any]) -> Path:
    """``<folder>/<dataset>_<model>_reference<i>_<hash>.safetensors`` (the cached checkpoints'
    naming, :func:`~scar.experiments.runner.checkpoint_path`)."""
    name = (f"{file_slug(key['dataset'])}_{file_slug(key['model']['name'])}_{ROLE}{key['index']}_"
            f"{stable_hash(key, 10)}")
    return Path(folder) / f"{name}.safetensors"


def _load_cached(path: Path, key: dict[str, Any]) -> nn.Module | None:
    if not checkpoint_exists(path):
        return None
    ck = load_checkpoint(path)
    if ck.meta.get(ROLE) != key:
        raise CheckpointError(
            f"{path} is not the reference model it is named after (its sidecar records "
            f"{ck.meta.get(ROLE)}); delete it to retrain."
        )
    log.info("reusing reference model %s", path)
    return ck.model


def train_references(ck: Checkpoint, bundle: DatasetBundle, folder: str | Path, *,
                     count: int = DEFAULT_REFERENCES, seed: int = 0,
                     device: torch.device | str = "auto", data_dir: str | Path | None = None,
                     amp: bool = True, progress: bool = True) -> ReferenceModels:
    """The ``count`` reference models of ``ck`` (trained on ``bundle.train``): cached ones are
    loaded, missing ones trained with ``ck``'s architecture and recipe and saved."""
    from tqdm.auto import tqdm

    if isinstance(count, bool) or not isinstance(count, int) or count < 2 or count % 2:
        raise ConfigError(f"the number of reference models must be an even integer >= 2 "
                          f"(complementary pairs); got {count!r}.")
    if "train_subset" in option_defaults(bundle.info.name) and bundle.options.get(
            "train_subset") is None:
        raise ConfigError(f"the dataset bundle of {bundle.info.name!r} carries no loader "
                          "options; load it with scar.data.load_dataset.")
    dev = resolve_device(device)
    pool = reference_pool(ck, bundle, data_dir=data_dir)
    recipe = recorded_recipe(ck, bundle)
    out = ReferenceModels([], [], [])
    bar = tqdm(range(count), desc="reference models", unit="model", disable=not progress,
               dynamic_ncols=True)
    for index in bar:
        key = reference_key(pool, ck, recipe, seed, index)
        path = reference_path(folder, key)
        half = reference_half(len(pool.images), index, seed)
        model = _load_cached(path, key)
        if model is None:
            torch.manual_seed(REFERENCE_SEED_BASE * (seed + 1) + index)
            model = build_model(ck.model_spec)
            result = train_model(model, pool.images.subset(half), ck.input_spec, recipe,
                                 device=dev, seed=REFERENCE_SEED_BASE * (seed + 1) + index,
                                 amp=amp, progress=progress, desc=f"{ROLE} {index}")
            model = result.model.cpu()
            meta = {"role": ROLE, ROLE: key, "dataset": pool.dataset,
                    "dataset_options": pool.options, "recipe": recipe.to_dict(),
                    "seed": key["seed"], "train_seconds": result.seconds, "device": str(dev),
                    "device_name": device_name(dev), "history": result.history}
            save_checkpoint(path, model, ck.model_spec, ck.input_spec, meta)
        mask = np.zeros(len(pool.images), dtype=bool)
        mask[half.numpy()] = True
        out.models.append(model.eval())
        out.members.append(mask[: pool.target_size])
        out.paths.append(path)
    bar.close()
    return out


def prepare_audit(ck: Checkpoint, bundle: DatasetBundle, splits: Splits, attack: str,
                  folder: str | Path, *, count: int = DEFAULT_REFERENCES, seed: int = 0,
                  device: torch.device | str = "auto", data_dir: str | Path | None = None,
                  progress: bool = True) -> MembershipAudit:
    """Everything the audit of any model on ``splits`` needs: the reference models of ``ck``
    (the original: trained on ``bundle.train``) trained or loaded, and their signals."""
    ATTACKS.get(attack)  # an unknown name fails before any training
    dev = resolve_device(device)
    refs = train_references(ck, bundle, folder, count=count, seed=seed, device=dev,
                            data_dir=data_dir, progress=progress)
    loaders = split_loaders(splits, ck.input_spec, dev, names=("train_forget", "test"))
    signals = reference_signals([m.to(dev) for m in refs.models], refs.members, loaders,
                                splits.forget_indices)
    for m in refs.models:
        m.cpu()
    return MembershipAudit(attack, signals)
