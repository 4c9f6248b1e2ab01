"""The audit of an unlearning request: every model over every split once, then all metrics.

Metric keys are stable strings (``acc/test_forget``, ``mia/auc``, ``aus``) because they become
column names in results files and reports.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from scar.data.base import BatchLoader, InputSpec
from scar.data.forget import Splits
from scar.errors import ConfigError
from scar.evaluation.aus import aus
from scar.evaluation.lr_attack import (
    ATTACKS,
    MIN_AUC_GAP,
    AuditResult,
    audit_separates,
    audit_values,
    roc_metrics,
    true_label_logodds,
)
from scar.evaluation.metrics import (
    SPLITS,
    accuracy_key,
    destination_metrics,
    oracle_distance,
    split_accuracies,
)
from scar.evaluation.mia import MIAResult, describe_separation, mia_cr, mia_hr, separation_note
from scar.evaluation.outputs import Outputs, compute_outputs, evaluate_splits
from scar.evaluation.relearn import RelearnSettings, relearn_metrics

log = logging.getLogger(__name__)

#: Which accuracies play A_t (kept-data accuracy) and A_f (forget accuracy) in AUS, per scenario
#: (protocol.md): CR uses the test split by class; HR uses test and train-forget.
AUS_KEYS: dict[str, dict[str, str]] = {
    "CR": {"a_t": "acc/test_retain", "a_f": "acc/test_forget"},
    "HR": {"a_t": "acc/test", "a_f": "acc/train_forget"},
}
SPLIT_NAMES = SPLITS  # every split of a forget request (evaluation.metrics)
#: The name of the oracle (the model retrained without the forget set) among audited models.
ORACLE = "retrain"


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


# ---------------------------------------------------------------- membership audit
#: At most this many population samples z (RMIA) are drawn from the test images that are not
#: non-member candidates.
MAX_POPULATION = 2000


@dataclass(frozen=True)
class ReferenceSignals:
    """Reference models' logit-scaled confidences φ (:func:`~scar.evaluation.lr_attack.
    true_label_logodds`) on the two splits the audit reads, computed once per request."""

    train_forget: np.ndarray  # [K, n_forget]
    train_forget_out: np.ndarray  # bool [K, n_forget]: the reference model did not train on it
    test: np.ndarray  # [K, n_test]; no reference model trains on a test image

    @property
    def count(self) -> int:
        return int(self.train_forget.shape[0])


@dataclass(frozen=True)
class MembershipAudit:
    """What :func:`model_metrics` needs for the audit: the attack's name and the references."""

    attack: str
    references: ReferenceSignals


def reference_signals(models: Sequence[nn.Module], members: Sequence[np.ndarray | torch.Tensor],
                      loaders: Mapping[str, BatchLoader], forget_indices: torch.Tensor
                      ) -> ReferenceSignals:
    """φ of each reference model on the train-forget and test splits. ``members[k]``: bool over
    the target's training set, True where reference model k trained on that image;
    ``forget_indices``: the train-forget images' positions in that training set."""
    if len(models) != len(members) or not models:
        raise ConfigError(f"the audit needs one membership mask per reference model; got "
                          f"{len(models)} models and {len(members)} masks.")
    phi: dict[str, list[np.ndarray]] = {"train_forget": [], "test": []}
    for model in models:
        for split in phi:
            out = compute_outputs(model, loaders[split])
            phi[split].append(true_label_logodds(out.logits, out.labels))
    idx = torch.as_tensor(forget_indices, dtype=torch.long).numpy()
    out_mask = np.stack([~np.asarray(m, dtype=bool)[idx] for m in members])
    return ReferenceSignals(np.stack(phi["train_forget"]), out_mask, np.stack(phi["test"]))


def membership_audit(outputs: Mapping[str, Outputs], scenario: str, audit: MembershipAudit, *,
                     seed: int = 0) -> AuditResult:
    """The likelihood-ratio audit of one model on already computed outputs.

    Members: the train-forget images (the model under audit trained on them, or was asked to
    forget them). Non-members: test images of the removed classes (CR) or of every class (HR),
    as many as members (both groups subsampled to the smaller, seeded). Population samples z
    (RMIA): up to :data:`MAX_POPULATION` of the other test images.
    """
    attack_fn = ATTACKS.get(audit.attack)
    refs = audit.references
    forget, test = outputs["train_forget"], outputs["test"]
    if len(forget) != refs.train_forget.shape[1] or len(test) != refs.test.shape[1]:
        raise ConfigError("the reference signals were computed on other splits than the model "
                          f"under audit ({refs.train_forget.shape[1]} / {refs.test.shape[1]} vs "
                          f"{len(forget)} / {len(test)} images).")
    labels = test.labels.numpy()
    if scenario == "CR":
        candidates = np.flatnonzero(np.isin(labels, np.unique(forget.labels.numpy())))
    else:
        candidates = np.arange(len(test))
    k = min(len(forget), len(candidates))
    if k < 2:
        raise ConfigError(f"the membership audit needs at least 2 members and 2 non-members; "
                          f"got {len(forget)} and {len(candidates)}.")
    rng = np.random.default_rng([seed, 14])
    members = np.sort(rng.permutation(len(forget))[:k])
    nonmembers = np.sort(rng.permutation(candidates)[:k])
    rest = np.setdiff1d(np.arange(len(test)), candidates if scenario == "CR" else nonmembers)
    population = np.sort(rng.permutation(rest)[:MAX_POPULATION])
    phi_forget = true_label_logodds(forget.logits, forget.labels)
    phi_test = true_label_logodds(test.logits, test.labels)
    target_x = np.concatenate([phi_forget[members], phi_test[nonmembers]])
    refs_x = np.concatenate([refs.train_forget[:, members], refs.test[:, nonmembers]], axis=1)
    out_x = np.concatenate([refs.train_forget_out[:, members],
                            np.ones((refs.count, k), dtype=bool)], axis=1)
    scores = attack_fn(target_x, refs_x, out_x, phi_test[population], refs.test[:, population])
    return roc_metrics(scores[:k], scores[k:], attack=audit.attack, n_references=refs.count,
                       n_population=len(population), seed=seed)


def model_metrics(model: nn.Module, loaders: Mapping[str, BatchLoader], scenario: str, *,
                  mia: bool = True, mia_variant: str = "balanced", seed: int = 0,
                  audit: MembershipAudit | None = None, destination: bool = True
                  ) -> tuple[dict[str, Any], dict[str, Outputs]]:
    """Accuracies on every split, where the forget images go (``destination``; ``dest/*``) (+
    the MIA, + the membership audit) of one model; outputs are kept for plots and the distance
    to the oracle."""
    outputs = evaluate_splits(model, loaders)
    metrics: dict[str, Any] = split_accuracies({k: v for k, v in outputs.items() if len(v)})
    if destination and "train_forget" in outputs:
        metrics.update(destination_metrics(outputs["train_forget"]))
    if mia:
        metrics.update(attack(outputs, scenario, variant=mia_variant, seed=seed).to_metrics())
    if audit is not None:
        metrics.update(membership_audit(outputs, scenario, audit, seed=seed).to_metrics())
    return metrics, outputs


def add_aus(metrics: dict[str, Any], a_or: float, scenario: str) -> dict[str, Any]:
    """AUS with A_or measured from the original model of the same run (never hard-coded)."""
    keys = AUS_KEYS[scenario]
    metrics["aus"] = float(aus(scenario, a_or, metrics[keys["a_t"]], metrics[keys["a_f"]]))
    return metrics


def original_reference(original_metrics: Mapping[str, Any], scenario: str) -> float:
    """A_or: the original model's test accuracy (CR: retain-test accuracy)."""
    return float(original_metrics[AUS_KEYS[scenario]["a_t"]])


def add_oracle_distance(results: Mapping[str, dict[str, Any]],
                        outputs: Mapping[str, Mapping[str, Outputs]],
                        oracle: Mapping[str, Outputs] | None = None) -> None:
    """``js/<split>`` (mean JS divergence to the oracle's outputs, nats) into every model's
    metrics but the oracle's own; the oracle's outputs are ``oracle``, else ``outputs["retrain"]``
    (nothing without either)."""
    oracle = oracle if oracle is not None else outputs.get(ORACLE)
    if oracle is None:
        return
    for name, metrics in results.items():
        if name != ORACLE:
            metrics.update(oracle_distance(outputs[name], oracle))


def forget_accuracy(metrics: Mapping[str, Any]) -> float | None:
    """A model's accuracy on the forget images (train-forget), if measured."""
    value = metrics.get(accuracy_key("train_forget"))
    return None if value is None else float(value)


def audit_models(models: Mapping[str, nn.Module], splits: Splits, spec: InputSpec,
                 scenario: str, *, device: torch.device | str = "cpu", mia: bool = True,
                 mia_variant: str = "balanced", seed: int = 0, original: str = "original",
                 audit: MembershipAudit | None = None, relearn: RelearnSettings | None = None
                 ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Outputs]]]:
    """Metrics of several models on one forget request; ``models[original]`` gives A_or (and
    the relearn target), ``models["retrain"]``, when audited, the outputs every other model's
    distance to the oracle is measured against. ``relearn``: also the relearn time of each."""
    if original not in models:
        raise KeyError(f"audit needs the original model under key {original!r}")
    loaders = split_loaders(splits, spec, device)
    results: dict[str, dict[str, Any]] = {}
    outputs: dict[str, dict[str, Outputs]] = {}
    for name, model in models.items():
        log.info("evaluating %s", name)
        results[name], outputs[name] = model_metrics(model.to(device), loaders, scenario, mia=mia,
                                                     mia_variant=mia_variant, seed=seed,
                                                     audit=audit)
    a_or = original_reference(results[original], scenario)
    for metrics in results.values():
        add_aus(metrics, a_or, scenario)
    add_oracle_distance(results, outputs)
    if relearn is not None:
        target_from = forget_accuracy(results[original])
        for name, model in models.items():
            results[name].update(relearn_metrics(model, splits.train_forget, spec, relearn,
                                                 target_from, device))
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


def audit_note(results: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Whether the membership audit separates the original from the oracle (None without the
    audit of both)."""
    if "original" not in results or "retrain" not in results:
        return None
    a, b = (AuditResult.from_metrics(dict(results[k])) for k in ("original", "retrain"))
    if a is None or b is None:
        return None
    return describe_separation(f"{a.attack} membership audit", audit_values(a, b),
                               audit_separates(a, b),
                               f"it needs an AUC gap >= {MIN_AUC_GAP} with disjoint CIs")
