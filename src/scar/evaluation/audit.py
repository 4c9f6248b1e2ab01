"""The audit of an unlearning request: every model over every split once, then all metrics.

Metric keys are stable strings (``acc/test_forget``, ``mia/auc``, ``aus``) because they become
column names in results files and reports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from scar.data.base import BatchLoader, InputSpec
from scar.data.forget import Splits
from scar.evaluation.aus import aus
from scar.evaluation.metrics import SPLITS, split_accuracies
from scar.evaluation.mia import MIAResult, mia_cr, mia_hr, separation_note
from scar.evaluation.outputs import Outputs, evaluate_splits

log = logging.getLogger(__name__)

#: Which accuracies play A_t (kept-data accuracy) and A_f (forget accuracy) in AUS, per scenario
#: (protocol.md): CR uses the test split by class; HR uses test and train-forget.
AUS_KEYS: dict[str, dict[str, str]] = {
    "CR": {"a_t": "acc/test_retain", "a_f": "acc/test_forget"},
    "HR": {"a_t": "acc/test", "a_f": "acc/train_forget"},
}
SPLIT_NAMES = SPLITS  # every split of a forget request (evaluation.metrics)


def split_loaders(splits: Splits, spec: InputSpec, device: torch.device | str,
                  batch_size: int = 1024, names: tuple[str, ...] = SPLIT_NAMES
                  ) -> dict[str, BatchLoader]:
    return {n: BatchLoader(getattr(splits, n), spec, batch_size=batch_size, device=device)
            for n in names}


def attack(outputs: Mapping[str, Outputs], scenario: str, *, variant: str = "balanced",
           seed: int = 0, repeats: int = 5) -> MIAResult:
    """The membership-inference attack of the scenario on already computed outputs.

    CR: members = train images of the removed classes, non-members = their test images.
    HR: members = forget images, non-members = test images.
    """
    members = outputs["train_forget"].probs()
    if scenario == "CR":
        return mia_cr(members, outputs["test_forget"].probs(), variant=variant, seed=seed,
                      repeats=repeats)
    return mia_hr(members, outputs["test"].probs(), balanced=variant == "balanced", seed=seed,
                  repeats=repeats)


def model_metrics(model: nn.Module, loaders: Mapping[str, BatchLoader], scenario: str, *,
                  mia: bool = True, mia_variant: str = "balanced", seed: int = 0
                  ) -> tuple[dict[str, Any], dict[str, Outputs]]:
    """Accuracies on every split (+ the MIA) of one model; outputs are kept for plots."""
    outputs = evaluate_splits(model, loaders)
    metrics: dict[str, Any] = split_accuracies({k: v for k, v in outputs.items() if len(v)})
    if mia:
        metrics.update(attack(outputs, scenario, variant=mia_variant, seed=seed).to_metrics())
    return metrics, outputs


def add_aus(metrics: dict[str, Any], a_or: float, scenario: str) -> dict[str, Any]:
    """AUS with A_or measured from the original model of the same run (never hard-coded)."""
    keys = AUS_KEYS[scenario]
    metrics["aus"] = float(aus(scenario, a_or, metrics[keys["a_t"]], metrics[keys["a_f"]]))
    return metrics


def original_reference(original_metrics: Mapping[str, Any], scenario: str) -> float:
    """A_or: the original model's test accuracy (CR: retain-test accuracy)."""
    return float(original_metrics[AUS_KEYS[scenario]["a_t"]])


def audit_models(models: Mapping[str, nn.Module], splits: Splits, spec: InputSpec,
                 scenario: str, *, device: torch.device | str = "cpu", mia: bool = True,
                 mia_variant: str = "balanced", seed: int = 0, original: str = "original"
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Outputs]]]:
    """Metrics of several models on one forget request; ``models[original]`` gives A_or."""
    if original not in models:
        raise KeyError(f"audit needs the original model under key {original!r}")
    loaders = split_loaders(splits, spec, device)
    results: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, Outputs]] = {}
    for name, model in models.items():
        log.info("evaluating %s", name)
        results[name], outputs[name] = model_metrics(model.to(device), loaders, scenario, mia=mia,
                                                     mia_variant=mia_variant, seed=seed)
    a_or = original_reference(results[original], scenario)
    for metrics in results.values():
        add_aus(metrics, a_or, scenario)
    return results, outputs


def mia_note(results: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Whether the attack separates the original from the oracle at all (None without both)."""
    if "original" not in results or "retrain" not in results:
        return None
    if "mia/acc" not in results["original"] or "mia/acc" not in results["retrain"]:
        return None
    return separation_note(_as_result(results["original"]), _as_result(results["retrain"]))


def _as_result(m: Mapping[str, Any]) -> MIAResult:
    return MIAResult(
        accuracy=m["mia/acc"], accuracy_std=m.get("mia/acc_std", 0.0), f1=m["mia/f1"],
        f1_std=m.get("mia/f1_std", 0.0), auc=m["mia/auc"], auc_std=m.get("mia/auc_std", 0.0),
        chance_distance=m["mia/chance_dist"], n_members=int(m.get("mia/n_members", 0)),
        n_nonmembers=int(m.get("mia/n_nonmembers", 0)), variant=m.get("mia/variant", "balanced"),
    )
