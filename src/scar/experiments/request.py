"""One deletion request, end to end: the single pipeline behind ``scar unlearn``, the grid
runner (:func:`~scar.experiments.runner.run_method`, hence also ``scar demo``).

    checkpoint + data (the caller's) → splits → method (preset + hyperparameters) → class
    statistics check → surrogate → :class:`~scar.methods.base.UnlearnData` → unlearn (timed)
    → audit (every split, the MIA, AUS) → save (optional)

Each caller only adds its own input and output around :func:`run_request`: the CLI opens the
checkpoint from its flags and prints a summary; the runner loads cached checkpoints and datasets,
shares one surrogate set per sweep and turns the result into a results row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scar.checkpoint import Checkpoint
from scar.data.base import ImageSet
from scar.data.datasets import DatasetBundle
from scar.data.forget import ForgetSpec, Splits, make_splits
from scar.evaluation.audit import (
    MembershipAudit,
    add_aus,
    add_oracle_distance,
    forget_accuracy,
    model_metrics,
    original_reference,
    split_loaders,
)
from scar.evaluation.metrics import accuracy
from scar.evaluation.outputs import Outputs, compute_outputs
from scar.evaluation.relearn import RelearnSettings, relearn_metrics
from scar.experiments.grid import configured_method
from scar.experiments.unlearn import (
    UnlearnOutcome,
    build_unlearn_data,
    check_dataset_matches,
    check_stats,
    load_surrogate_for,
    run_unlearning,
    save_unlearned,
)
from scar.methods.base import Method, UnlearnData
from scar.utils import seed_everything


@dataclass(frozen=True)
class UnlearnRequest:
    """What to remove and how: plain values (a grid run and the CLI's flags both map onto it)."""

    forget: ForgetSpec
    method: str
    #: Method hyperparameters; values may be strings (the CLI's ``--set``), the method coerces.
    hparams: Mapping[str, Any] = field(default_factory=dict)
    #: Named starting values (``scar list presets``); ``hparams`` override them.
    preset: str | None = None
    #: Surrogate source and size (None: the dataset's default source and size).
    surrogate: str | None = None
    surrogate_n: int | None = None
    seed: int = 0
    mia: bool = True
    mia_variant: str = "balanced"
    #: Also measure the relearn time of every audited model (None: off; it fine-tunes).
    relearn: RelearnSettings | None = None


@dataclass
class RequestResult:
    """Everything a caller may report about one request."""

    request: UnlearnRequest
    checkpoint: Checkpoint
    splits: Splits
    data: UnlearnData
    outcome: UnlearnOutcome
    #: Metrics of the unlearned model (accuracies, MIA, ``aus`` when A_or is known); without
    #: ``time/unlearn_s`` (see :attr:`seconds`).
    metrics: dict[str, Any]
    #: Metrics of the reference models audited alongside (e.g. ``{"original": {...}}``).
    references: dict[str, dict[str, Any]] = field(default_factory=dict)
    saved: Path | None = None
    #: Outputs (logits, labels) per model (the references', then ``"unlearned"``) per split,
    #: kept when :func:`run_request` is asked to (``keep_outputs``; the audit page's plots).
    outputs: dict[str, dict[str, Outputs]] = field(default_factory=dict)

    @property
    def method(self) -> Method:
        return self.outcome.method

    @property
    def model(self) -> nn.Module:
        return self.outcome.model

    @property
    def seconds(self) -> float:
        return self.outcome.seconds

    @property
    def scenario(self) -> str:
        return self.data.scenario

    @property
    def access(self) -> dict[str, Any]:
        """The data-access record of results rows and sidecars."""
        return {"required": sorted(self.method.required_data()),
                "images_loaded": self.outcome.touched, "profile": self.outcome.profile}

    def results(self, name: str = "unlearned") -> dict[str, dict[str, Any]]:
        """Reference metrics, then the unlearned model's under ``name`` (a table's rows)."""
        return {**self.references, name: self.metrics}


def build_request_method(request: UnlearnRequest, dataset: str | None = None) -> Method:
    """The configured method of ``request``: its preset's values, then its hyperparameters."""
    return configured_method(request.method, request.hparams, request.preset, dataset)


def run_request(ck: Checkpoint, bundle: DatasetBundle, request: UnlearnRequest, *,
                device: torch.device | str = "cpu", progress: bool = False,
                surrogate: Callable[[Checkpoint], ImageSet] | None = None,
                data_dir: str | Path | None = None,
                references: Mapping[str, nn.Module] | None = None,
                a_or: float | None = None,
                out: str | Path | None = None,
                membership: MembershipAudit | None = None,
                keep_outputs: bool = False,
                oracle_outputs: Mapping[str, Outputs] | None = None) -> RequestResult:
    """Unlearn ``request`` from ``ck`` (whose data is ``bundle``) and audit the result.

    ``surrogate(ck)``: the surrogate set, when the method uses one (default: loaded from the
    request's source and size; image folders under ``data_dir``). ``references``: models
    audited alongside on the same splits (``"original"`` gives A_or). ``a_or``: the original's
    accuracy the AUS is measured against, when known without auditing the original; with
    neither, the metrics carry no ``aus``.
    ``out``: where to save the unlearned checkpoint (nothing is saved without it).
    ``membership``: the likelihood-ratio audit (:func:`~scar.experiments.references.
    prepare_audit` on the same request) run on every audited model.
    ``keep_outputs``: keep every audited model's outputs per split in the result.
    ``oracle_outputs``: the oracle's outputs per split, when it is not among ``references``
    (as ``"retrain"``); with either, every other model's metrics get ``js/<split>``.
    ``request.relearn``: also the relearn time of every audited model, its target from the
    original's forget accuracy (``references["original"]``, else ``ck``'s model).
    """
    check_dataset_matches(ck, bundle)
    splits = make_splits(bundle, request.forget)
    method = build_request_method(request, bundle.info.name)
    check_stats(ck, method)
    surrogate_set = None
    if "surrogate" in method.uses():
        surrogate_set = (surrogate(ck) if surrogate is not None else
                         load_surrogate_for(ck, request.surrogate, request.surrogate_n,
                                            request.seed, data_dir))
    data = build_unlearn_data(ck, bundle, splits, surrogate=surrogate_set, device=device,
                              seed=request.seed, progress=progress)
    seed_everything(request.seed)
    outcome = run_unlearning(ck, method, data)

    scenario = data.scenario
    loaders = split_loaders(splits, ck.input_spec, data.device)
    audit = dict(mia=request.mia, mia_variant=request.mia_variant, seed=request.seed,
                 audit=membership)
    ref_metrics: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, Outputs]] = {}
    for name, model in (references or {}).items():
        ref_metrics[name], outputs[name] = model_metrics(model.to(data.device), loaders,
                                                         scenario, **audit)
        model.cpu()
    metrics, outputs["unlearned"] = model_metrics(outcome.model.to(data.device), loaders,
                                                  scenario, **audit)
    outcome.model.cpu()
    if a_or is None and "original" in ref_metrics:
        a_or = original_reference(ref_metrics["original"], scenario)
    if a_or is not None:
        for m in (*ref_metrics.values(), metrics):
            add_aus(m, a_or, scenario)
    results = {**ref_metrics, "unlearned": metrics}
    add_oracle_distance(results, outputs, oracle_outputs)
    if request.relearn is not None:
        models = {**(references or {}), "unlearned": outcome.model}
        target_from = (forget_accuracy(ref_metrics["original"]) if "original" in ref_metrics
                       else accuracy(compute_outputs(ck.model.to(data.device),
                                                     loaders["train_forget"])))
        for name, model in models.items():
            results[name].update(relearn_metrics(model.to(data.device), splits.train_forget,
                                                 ck.input_spec, request.relearn, target_from,
                                                 data.device))
            model.cpu()
        ck.model.cpu()
    saved = None
    if out is not None:
        saved = save_unlearned(out, outcome, ck, splits, data, metrics,
                               dataset_options=bundle.options, preset=request.preset)
    return RequestResult(request=request, checkpoint=ck, splits=splits, data=data,
                         outcome=outcome, metrics=metrics, references=ref_metrics, saved=saved,
                         outputs=outputs if keep_outputs else {})


@torch.no_grad()
def feature_pair(ck: Checkpoint, unlearned: nn.Module, images: ImageSet,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Features (classifier-head inputs) of the same ``images`` under the original model of
    ``ck`` and under ``unlearned``, in order: the before / after of a feature projection."""
    from scar.data.base import BatchLoader
    from scar.models.adapter import FeatureModel

    feats = []
    for model in (ck.model, unlearned):
        fm = FeatureModel(model.to(device).eval(), head=ck.model_spec.head)
        feats.append(torch.cat([fm(b.x)[0].cpu() for b in
                                BatchLoader(images, ck.input_spec, batch_size=1000,
                                            device=device)]))
        model.cpu()
    return feats[0], feats[1]
