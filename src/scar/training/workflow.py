"""Train-and-save workflows shared by the CLI and the experiment runner."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scar.checkpoint import save_checkpoint
from scar.data.datasets import DatasetBundle, full_options, load_dataset
from scar.data.forget import ForgetSpec, make_splits
from scar.errors import ConfigError
from scar.models.adapter import FeatureModel
from scar.models.base import ModelSpec, build_model, check_input_fits
from scar.training.recipes import Recipe, recipe_from
from scar.training.trainer import train_model
from scar.utils import device_name, resolve_device, seed_everything

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    """Everything that defines an original (``forget=None``) or oracle training run."""

    dataset: str = "fashion-mnist"
    dataset_options: dict[str, Any] | None = None  # loader options, e.g. {"channels": 3}
    model: str | None = None  # None → the recipe's default architecture
    forget: ForgetSpec | None = None
    recipe_overrides: dict[str, Any] | None = None
    seed: int = 0
    head: str | None = None
    model_kwargs: dict[str, Any] | None = None
    #: Start from pretrained weights (timm:/tv: models): a weights file, or True for the
    #: library's local cache (scar.models.pretrained); a grid gives it as model_kwargs
    #: {pretrained: ...}. None: random initialisation.
    pretrained: str | bool | None = None

    @property
    def role(self) -> str:
        return "original" if self.forget is None else "oracle"


def resolve_recipe(bundle: DatasetBundle, overrides: dict[str, Any] | None) -> Recipe:
    """The dataset's recipe, or the registered recipe named by the override ``recipe`` (e.g.
    ``audit``), with the other overrides set over it."""
    return recipe_from(bundle.info.recipe, overrides)


def run_train_job(
    job: TrainJob,
    out: str | Path,
    *,
    bundle: DatasetBundle | None = None,
    device: str | torch.device = "auto",
    data_dir: str | Path | None = None,
    download: bool = False,
    amp: bool = True,
    progress: bool = True,
    record_stats: bool = True,
) -> Path:
    """Train and save a checkpoint (+ sidecar, + stored class statistics). Returns its path.

    A given ``bundle`` must have been loaded with the job's dataset options; the sidecar records
    the bundle's options, so every later reload of the checkpoint's data gets the same images.
    ``download`` also allows downloading the pretrained weights a job asks for.
    """
    if bundle is None:
        bundle = load_dataset(job.dataset, data_dir=data_dir, download=download,
                              **(job.dataset_options or {}))
    elif job.dataset_options and bundle.options != full_options(job.dataset,
                                                                job.dataset_options):
        raise ConfigError(
            f"the dataset given to the {job.role} training was loaded with options "
            f"{bundle.options}, but the job asks for {job.dataset_options}."
        )
    recipe = resolve_recipe(bundle, job.recipe_overrides)
    dev = resolve_device(device)
    info = bundle.info
    kwargs = dict(job.model_kwargs or {})
    # Starting weights are not part of the architecture: the checkpoint's spec must rebuild the
    # model on load without them (its metadata records where they came from instead).
    from_kwargs = kwargs.pop("pretrained", None)
    pretrained = from_kwargs if job.pretrained is None else job.pretrained
    spec = ModelSpec(name=job.model or recipe.model, num_classes=info.num_classes,
                     channels=info.input_spec.channels, size=info.input_spec.size, head=job.head,
                     kwargs=kwargs)
    seed_everything(job.seed)
    origin = None
    if pretrained is None or pretrained is False:
        model = build_model(spec)
    else:
        from scar.models.pretrained import build_pretrained

        model, origin = build_pretrained(spec, pretrained, download=download)
    # Before any training: the input size and the head (found, and checked to produce the
    # logits) must work, or the hour of training is lost to a late error.
    # (fork_rng: the checks leave the random state of the training as it was.)
    with torch.random.fork_rng(devices=[]):
        check_input_fits(model, spec)
        FeatureModel(model, head=spec.head,
                     example=torch.zeros(2, spec.channels, spec.size, spec.size))
    if job.forget is None:
        train, test = bundle.train, bundle.test
    else:
        splits = make_splits(bundle, job.forget)
        train, test = splits.train_retain, splits.test_retain
    result = train_model(model, train, info.input_spec, recipe, test=test, device=dev,
                         seed=job.seed, amp=amp, progress=progress,
                         desc=f"{job.role} {spec.name}")
    meta: dict[str, Any] = {
        "role": job.role,
        "dataset": job.dataset,
        "dataset_options": dict(bundle.options),
        "forget": job.forget.to_dict() if job.forget else None,
        "recipe": recipe.to_dict(),
        "seed": job.seed,
        "pretrained": origin,  # None: trained from a random initialisation
        "test_acc": result.test_acc,
        "test_acc_split": "test" if job.forget is None else "test_retain",
        "train_seconds": result.seconds,
        "device": str(dev),
        "device_name": device_name(dev),
        "history": result.history,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if record_stats:
        from scar.statistics import record_class_statistics

        stats_file = out.with_suffix(".stats.safetensors")
        record_class_statistics(result.model, spec, train, info.input_spec, stats_file,
                                device=dev)
        meta["stats"] = stats_file.name
    return save_checkpoint(out, result.model.cpu(), spec, info.input_spec, meta)
