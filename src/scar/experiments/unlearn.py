"""The steps of one unlearning request (checkpoint + forget spec + method → unlearned
checkpoint), which :func:`scar.experiments.request.run_request` puts together for ``scar
unlearn``, the experiment runner and ``scar demo``; the :mod:`scar.api` facade reuses them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scar.checkpoint import Checkpoint, save_checkpoint
from scar.data.base import ImageSet
from scar.data.datasets import DatasetBundle, load_dataset
from scar.data.forget import Splits, scenario_of  # noqa: F401 - scenario_of re-exported
from scar.data.surrogates import load_surrogate
from scar.errors import CheckpointError, ConfigError, MissingRequirementError
from scar.methods.base import Method, UnlearnData, access_profile
from scar.statistics import ClassStats
from scar.training.recipes import recorded_augment
from scar.utils import device_name

log = logging.getLogger(__name__)

#: Default surrogate (out-of-distribution) source per dataset. The paper uses a 10k-image ImageNet
#: subset for CIFAR/TinyImageNet (build one with `scar surrogate build`, pass imagefolder:<dir>);
#: natural-patches works offline everywhere.
DEFAULT_SURROGATES: dict[str, str] = {
    "cifar10": "dataset:cifar100",
    # Objects on a dark background: plain photo crops all look like one class ("bag") to a
    # Fashion-MNIST model; cut out on black they spread over most classes (surrogates.py).
    "fashion-mnist": "natural-objects",
    "mnist": "natural-objects",
}
FALLBACK_SURROGATE = "natural-patches"
DEFAULT_SURROGATE_SIZE = 5000


def default_surrogate(dataset: str) -> str:
    return DEFAULT_SURROGATES.get(dataset, FALLBACK_SURROGATE)


def surrogate_size(name: str, n: int | None = None) -> int | None:
    """Images taken from surrogate source ``name``: ``n`` when given, else
    :data:`DEFAULT_SURROGATE_SIZE`, except ``digits`` (None: all of its images)."""
    if n is not None:
        return n
    return None if name == "digits" else DEFAULT_SURROGATE_SIZE


def load_surrogate_for(ck: Checkpoint, name: str | None, n: int | None, seed: int,
                       data_dir: str | Path | None = None) -> ImageSet:
    spec = ck.input_spec
    name = name or default_surrogate(ck.dataset)
    return load_surrogate(name, channels=spec.channels, size=spec.size,
                          n=surrogate_size(name, n),
                          seed=seed, data_dir=data_dir, exclude_dataset=ck.dataset)


def stored_stats(ck: Checkpoint) -> ClassStats | None:
    path = ck.stats_path()
    if path is None or not path.exists():
        return None
    return ClassStats.load(path)


def check_stats(ck: Checkpoint, method: Method) -> None:
    """Before any work: a method configured to read stored class statistics needs a checkpoint
    that has them (``scar train`` records them; a checkpoint trained elsewhere has none)."""
    if "stats" not in method.required_data():
        return
    path = ck.stats_path()
    if path is not None and path.exists():
        return
    why = (f"its statistics file {path} is missing" if path is not None else
           "it records none (only `scar train` records them)")
    raise MissingRequirementError(
        f"method {method.name!r} as configured reads the class statistics stored with checkpoint "
        f"{ck.path}, but {why}. Set its 'stats' hyperparameter: stats=surrogate (data-free: "
        "statistics of the surrogate images by predicted class) or stats=retain (reads the "
        "retain set: not retain-free); --set stats=surrogate on the command line, "
        "{stats: surrogate} in a grid's method mapping."
    )


def removed_so_far(ck: Checkpoint) -> tuple[int, ...]:
    """Classes already removed by earlier requests on this checkpoint (second deletion request)."""
    return tuple(ck.meta.get("removed_classes") or ())


def original_test_accuracy(ck: Checkpoint, bundle: DatasetBundle,
                           device: torch.device | str = "cpu") -> float:
    """The original's test accuracy (HR stopping rule): the recorded one, else measured once
    on the test split (a checkpoint trained elsewhere records none)."""
    recorded = ck.meta.get("test_acc")
    if recorded is not None:
        return float(recorded)
    from scar.data.base import BatchLoader
    from scar.methods.base import EVAL_BATCH, accuracy_on

    acc = accuracy_on(ck.model.to(device), BatchLoader(bundle.test, ck.input_spec,
                                                       batch_size=EVAL_BATCH, device=device))
    ck.model.cpu()
    log.info("checkpoint %s records no test accuracy; measured %.4f on the test split",
             ck.path, acc)
    ck.meta["test_acc"] = acc
    return acc


def build_unlearn_data(ck: Checkpoint, bundle: DatasetBundle, splits: Splits, *,
                       surrogate: ImageSet | None, device: torch.device | str = "cpu",
                       seed: int = 0, progress: bool = False) -> UnlearnData:
    scenario = scenario_of(splits.spec)
    removed = tuple(sorted(set(splits.removed_classes) | set(removed_so_far(ck))))
    if scenario == "HR":
        original_test_accuracy(ck, bundle, device)
    return UnlearnData(
        input_spec=ck.input_spec,
        num_classes=bundle.info.num_classes,
        scenario=scenario,
        removed_classes=removed if scenario == "CR" else (),
        forget=splits.train_forget,
        retain=splits.train_retain,
        surrogate=surrogate,
        stats=stored_stats(ck),
        original_test_acc=ck.meta.get("test_acc"),
        train_augment=recorded_augment(ck.meta.get("recipe")),
        device=device,
        seed=seed,
        head=ck.model_spec.head,
        progress=progress,
    )


@dataclass
class UnlearnOutcome:
    model: nn.Module
    method: Method
    seconds: float
    touched: dict[str, int]
    profile: str
    info: dict[str, Any] = field(default_factory=dict)


def run_unlearning(ck: Checkpoint, method: Method, data: UnlearnData, *,
                   also_read: Mapping[str, int] | None = None) -> UnlearnOutcome:
    """Unlearn (timed: statistics and teacher passes included, evaluation excluded).

    ``also_read``: images read for this request outside the method (e.g. class statistics the
    caller computed from training images), added to the data-access profile by kind."""
    model = method.unlearn(ck.model, data)
    info = dict(method.run_info())
    touched = merge_counts(method.access_, also_read or {})
    return UnlearnOutcome(model=model.cpu(), method=method, seconds=method.seconds_,
                          touched=touched, profile=access_profile(method, touched), info=info)


def merge_counts(*counts: Mapping[str, int]) -> dict[str, int]:
    """Image counts by data kind, summed."""
    out: dict[str, int] = {}
    for c in counts:
        for kind, n in c.items():
            out[kind] = out.get(kind, 0) + int(n)
    return out


def unlearned_path(path: str | Path) -> Path:
    """Where ``save_unlearned`` writes the weights for an ``--out`` of ``path`` (a folder gets
    ``unlearned.safetensors``; another suffix becomes ``.safetensors``)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path
    return path / "unlearned.safetensors" if path.suffix == "" else path.with_suffix(
        ".safetensors")


def save_unlearned(path: str | Path, outcome: UnlearnOutcome, ck: Checkpoint, splits: Splits,
                   data: UnlearnData, metrics: dict[str, Any] | None = None, *,
                   dataset_options: Mapping[str, Any] | None = None,
                   preset: str | None = None) -> Path:
    """Write the unlearned checkpoint; its sidecar records the parent, method, hyperparameters
    (and the preset they started from), data-access profile, time and the parent's training
    recipe, so it can itself be unlearned (and audited) again. ``dataset_options``: the options
    the dataset was loaded with (default: the parent's recorded ones)."""
    path = unlearned_path(path)
    stats = ck.stats_path()
    meta = {
        "role": "unlearned",
        "dataset": ck.dataset,
        "dataset_options": (dict(dataset_options) if dataset_options is not None
                            else ck.dataset_options),
        "parent": str(ck.path) if ck.path else None,
        "method": outcome.method.name,
        "hparams": outcome.method.hparams(),
        "preset": preset,
        "forget": splits.spec.to_dict(),
        "scenario": data.scenario,
        "removed_classes": list(data.removed_classes),
        "access": {"required": sorted(outcome.method.required_data()),
                   "images_loaded": outcome.touched, "profile": outcome.profile},
        "unlearn_seconds": outcome.seconds,
        "unlearn_info": outcome.info,
        "device": str(data.device),
        "device_name": device_name(data.device),
        "seed": data.seed,
        # The reference accuracy for a later HR request on this checkpoint.
        "test_acc": (metrics or {}).get("acc/test", ck.meta.get("test_acc")),
        "metrics": metrics or {},
        "stats": os.path.relpath(stats, path.parent) if stats and stats.exists() else None,
        # How the weights were first trained: a later request on this checkpoint reads its
        # training augmentation, and its membership audit trains reference models that way.
        "recipe": ck.meta.get("recipe"),
    }
    return save_checkpoint(path, outcome.model, ck.model_spec, ck.input_spec, meta)


def dataset_for(ck: Checkpoint, dataset: str | None = None,
                options: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Name and loader options of the data of ``ck``: the dataset and options its sidecar
    records, ``dataset`` replacing the name (recorded options only apply to the recorded
    dataset) and ``options`` set key by key on top."""
    name = dataset or ck.dataset
    if not name:
        raise ConfigError(
            f"checkpoint {ck.path} records no dataset; name it (--dataset NAME)."
        )
    recorded = ck.dataset_options if name == ck.dataset else None
    return name, {**(recorded or {}), **(options or {})}


def load_dataset_for(ck: Checkpoint, dataset: str | None = None,
                     options: Mapping[str, Any] | None = None, *,
                     data_dir: str | Path | None = None, download: bool = False) -> DatasetBundle:
    """Load the data of ``ck`` (see :func:`dataset_for`), checked against the checkpoint: the
    one way every command that reloads a checkpoint's data gets it."""
    name, opts = dataset_for(ck, dataset, options)
    bundle = load_dataset(name, data_dir=data_dir, download=download, **opts)
    check_dataset_matches(ck, bundle)
    return bundle


def check_dataset_matches(ck: Checkpoint, bundle: DatasetBundle) -> None:
    """The checkpoint must fit the data (classes, channels, size) and, when its sidecar records
    the options of this very dataset, the data must have been loaded with the same options."""
    info = bundle.info
    recorded = ck.dataset_options
    where = (f"its sidecar records dataset {ck.dataset!r} with options {recorded}"
             if recorded is not None else f"its sidecar records dataset {ck.dataset!r}")
    if ck.model_spec.num_classes != info.num_classes or ck.input_spec.size != \
            info.input_spec.size or ck.input_spec.channels != info.input_spec.channels:
        raise ConfigError(
            f"checkpoint expects {ck.model_spec.num_classes} classes of "
            f"{ck.input_spec.channels}x{ck.input_spec.size}px images but dataset {info.name!r} "
            f"(options {bundle.options}) has {info.num_classes} classes of "
            f"{info.input_spec.channels}x{info.input_spec.size}px; {where} (set an option with "
            "--dataset-option KEY=VALUE, or dataset_options in a grid)."
        )
    if recorded is not None and info.name == ck.dataset and bundle.options:
        # A checkpoint written before an option existed records none for it: its default.
        recorded = {**_defaults_of(ck.dataset), **recorded}
    if recorded is not None and info.name == ck.dataset and bundle.options \
            and bundle.options != recorded:
        differ = sorted(k for k in {*recorded, *bundle.options}
                        if recorded.get(k) != bundle.options.get(k))
        raise ConfigError(
            f"checkpoint {ck.path} was trained on {ck.dataset!r} with options {recorded}, but the "
            f"data was loaded with {bundle.options} (differing: {differ}); reload it with the "
            "recorded options."
        )


def _defaults_of(dataset: str) -> dict[str, Any]:
    from scar.data.datasets import option_defaults

    try:
        return option_defaults(dataset)
    except ConfigError:  # a dataset no longer registered: compare what was recorded
        return {}


# ---------------------------------------------------------------- checkpoints trained elsewhere
def plain_checkpoint(path: str | Path, bundle: DatasetBundle, model: str, *,
                     head: str | None = None,
                     model_kwargs: Mapping[str, Any] | None = None) -> Checkpoint:
    """A state dict without SCAR metadata (``torch.save(model.state_dict(), path)``, loaded with
    ``weights_only=True``, or a bare safetensors file) as architecture ``model`` for the data of
    ``bundle``: the class count, input size and normalisation come from the dataset, the head is
    found (or named) and checked with one forward pass."""
    from scar.checkpoint import load_checkpoint
    from scar.models.adapter import FeatureModel
    from scar.models.base import ModelSpec

    info = bundle.info
    spec = ModelSpec(model, info.num_classes, info.input_spec.channels, info.input_spec.size,
                     head=head, kwargs=dict(model_kwargs or {}))
    ck = load_checkpoint(path, model_spec=spec, input_spec=info.input_spec,
                         expect_num_classes=info.num_classes)
    example = torch.zeros(2, spec.channels, spec.size, spec.size)
    FeatureModel(ck.model, head=head, example=example)  # HeadNotFoundError names the candidates
    ck.meta.update(role="original", dataset=info.name, dataset_options=dict(bundle.options),
                   source="plain state dict")
    log.info("loaded %s as %s for %s (%d classes, %dx%d px, normalisation mean %s std %s: the "
             "dataset's)", path, model, info.name, info.num_classes, spec.size, spec.size,
             info.input_spec.mean, info.input_spec.std)
    return ck


def given_checkpoint(path: str | Path, bundle: DatasetBundle, model: str, *,
                     head: str | None = None,
                     model_kwargs: Mapping[str, Any] | None = None) -> Checkpoint:
    """An original the user gives for ``bundle``'s data as architecture ``model``: a SCAR
    checkpoint (which must record that model) or a plain state dict of it."""
    from scar.checkpoint import check_file, has_metadata, load_checkpoint

    if not has_metadata(check_file(path)):
        return plain_checkpoint(path, bundle, model, head=head, model_kwargs=model_kwargs)
    ck = load_checkpoint(path)
    check_model_name(ck, model)
    check_dataset_matches(ck, bundle)
    return ck


def check_model_name(ck: Checkpoint, model: str | None) -> None:
    if model is not None and model != ck.model_spec.name:
        raise ConfigError(
            f"model {model!r} was named for checkpoint {ck.path}, which records model "
            f"{ck.model_spec.name!r}; name that one (or none: a model name is only needed for "
            "plain state dicts)."
        )


def open_checkpoint(path: str | Path, *, model: str | None = None, head: str | None = None,
                    dataset: str | None = None,
                    options: Callable[[str], Mapping[str, Any] | None] | None = None,
                    data_dir: str | Path | None = None, download: bool = False
                    ) -> tuple[Checkpoint, DatasetBundle]:
    """A checkpoint and its data: a SCAR checkpoint with its recorded dataset (``dataset``
    overrides it), or a plain state dict, which needs ``model`` and ``dataset`` (the error names
    the missing flag). ``options(dataset name)`` gives loader options set over the recorded
    ones (the CLI coerces its strings per dataset)."""
    from scar.checkpoint import check_file, has_metadata, load_checkpoint, read_state

    path = check_file(path)
    options = options or (lambda name: None)
    if has_metadata(path):
        ck = load_checkpoint(path)
        check_model_name(ck, model)
        return ck, load_dataset_for(ck, dataset, options(dataset or ck.dataset),
                                    data_dir=data_dir, download=download)
    read_state(path)  # an unsafe or corrupt file is refused before anything else
    missing = [flag for flag, value in (("--model NAME (the architecture, e.g. tv:resnet18; "
                                         "`scar list models`)", model),
                                        ("--dataset NAME (the data it was trained on; `scar "
                                         "list datasets`)", dataset)) if value is None]
    if missing:
        raise CheckpointError(
            f"{path} is a plain state dict without SCAR metadata (no sidecar "
            f"{path.with_suffix('.json').name}, none embedded), so its architecture and data "
            f"are unknown: give {' and '.join(missing)}; --head NAME if the classifier head "
            "cannot be found automatically."
        )
    bundle = load_dataset(dataset, data_dir=data_dir, download=download,
                          **dict(options(dataset) or {}))
    return plain_checkpoint(path, bundle, model, head=head), bundle
