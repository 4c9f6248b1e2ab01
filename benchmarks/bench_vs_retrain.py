"""Every unlearning method against retraining the oracle, in one process, on Fashion-MNIST.

For each scenario — class removal (CR) of each ``--forget-class`` (one at a time, one oracle
each) and random removal (HR) of 10% of the training images (seed 0) — this

1. retrains the oracle from scratch on the retain set with the original model's recipe (timed);
2. runs every method through ``scar.experiments.unlearn.run_unlearning`` (timed by the method
   itself: ``method.seconds_``, statistics and teacher passes included, evaluation excluded);
   SCAR self-forget runs in CR only;
3. evaluates original, oracle and every unlearned model once with
   ``scar.evaluation.audit.audit_models`` (``mia=False`` for speed: accuracies and AUS only);

and prints one table: unlearning wall time, its ratio to the oracle's retraining time measured in
the same process, forget / retain / test accuracy and AUS.

    python benchmarks/bench_vs_retrain.py                          # trains the original first
    python benchmarks/bench_vs_retrain.py --original runs/fmnist/original.safetensors
    python benchmarks/bench_vs_retrain.py --methods scar,duck --scenarios CR
    python benchmarks/bench_vs_retrain.py --original r18.safetensors --forget-class 0,3,7 \
        --methods scar --scenarios CR   # any architecture; data loaded as its sidecar records
    python benchmarks/bench_vs_retrain.py --small                  # synthetic data (CI smoke)

Columns: forget acc = accuracy on the train forget set; retain acc = on the train retain set;
test acc = the A_t of AUS (CR: test images of the kept classes; HR: the whole test set).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
import torch

from scar.checkpoint import load_checkpoint
from scar.data.datasets import load_dataset
from scar.data.forget import ForgetSpec, make_splits
from scar.evaluation.audit import AUS_KEYS, audit_models
from scar.experiments.unlearn import (
    build_unlearn_data,
    load_dataset_for,
    load_surrogate_for,
    run_unlearning,
)
from scar.methods import METHODS, build_method
from scar.models.base import build_model
from scar.training.trainer import train_model
from scar.utils import seed_everything

METHOD_NAMES = ("scar", "scar_self_forget", "finetune", "negative_gradient", "random_labels",
                "duck")
HEADERS = ["scenario", "method", "unlearn s", "x retrain", "forget acc", "retain acc",
           "test acc", "AUS", "steps"]

#: --small hyperparameters: one short pass each, so the smoke test stays fast.
SMALL_HPARAMS: dict[str, dict[str, Any]] = {
    "scar": {"epochs": 1, "batch_size": 64, "surrogate_steps": 1},
    "scar_self_forget": {"epochs": 1, "batch_size": 64, "surrogate_steps": 1,
                         "min_forget_images": 1},
    "finetune": {"epochs": 1, "batch_size": 64},
    "negative_gradient": {"epochs": 1, "batch_size": 64},
    "random_labels": {"epochs": 1, "batch_size": 64},
    "duck": {"epochs": 1, "batch_size": 64},
}


def forget_spec(scenario: str, args: argparse.Namespace) -> ForgetSpec:
    """``scenario`` is "HR" or "CR <class>"."""
    if scenario.startswith("CR"):
        return ForgetSpec.for_classes(int(scenario.split()[1]))
    return ForgetSpec.random(fraction=args.fraction, seed=0)


@torch.no_grad()
def most_predicted(ck, images, device: torch.device) -> int:
    """The class the original model predicts most often on ``images``."""
    from scar.data.base import BatchLoader

    model = ck.model.to(device).eval()
    preds = torch.cat([model(b.x).argmax(1).cpu()
                       for b in BatchLoader(images, ck.input_spec, batch_size=256, device=device)])
    return int(torch.bincount(preds, minlength=ck.model_spec.num_classes).argmax())


def retrain_oracle(ck, splits, recipe, device: torch.device, seed: int):
    """Train the original's architecture from scratch on the retain set; (model, seconds)."""
    seed_everything(seed)
    model = build_model(ck.model_spec)
    common.synchronize(device)
    start = time.perf_counter()
    result = train_model(model, splits.train_retain, ck.input_spec, recipe, device=device,
                         seed=seed, progress=False, desc="oracle")
    common.synchronize(device)
    return result.model, time.perf_counter() - start


def run_scenario(scenario: str, ck, bundle, recipe, surrogate, methods: list[str],
                 hparams: dict[str, dict[str, Any]], args, device) -> tuple[list[list], list[str]]:
    kind = scenario.split()[0]  # "CR" or "HR"
    splits = make_splits(bundle, forget_spec(scenario, args))
    with common.phase(f"{scenario}: retraining the oracle ({recipe.epochs} epochs)"):
        oracle, retrain_s = retrain_oracle(ck, splits, recipe, device, args.seed)
    models: dict[str, torch.nn.Module] = {"original": ck.model, "retrain": oracle}
    seconds: dict[str, float] = {"retrain": retrain_s}
    steps: dict[str, str] = {}
    errors: list[str] = []
    for name in methods:
        if kind not in METHODS.get(name).scenarios:
            continue  # scar_self_forget: class removal only
        try:
            method = build_method(name, **hparams.get(name, {}))
            data = build_unlearn_data(
                ck, bundle, splits, device=device, seed=args.seed,
                surrogate=surrogate if "surrogate" in method.uses() else None)
            seed_everything(args.seed)
            with common.phase(f"{scenario}: {name}"):
                outcome = run_unlearning(ck, method, data)
        except Exception as exc:  # noqa: BLE001 - one failed method must not lose the others
            errors.append(f"{scenario} {name}: {type(exc).__name__}: {exc}")
            seconds[name] = float("nan")
            continue
        models[name] = outcome.model
        seconds[name] = outcome.seconds
        steps[name] = str(outcome.info.get("steps_", len(method.history_)))
    with common.phase(f"{scenario}: audit of {len(models)} models"):
        metrics, _ = audit_models(models, splits, ck.input_spec, kind, device=device,
                                  mia=False, seed=args.seed)
    a_t = AUS_KEYS[kind]["a_t"]
    rows = []
    for name in ["original", "retrain", *methods]:
        if name not in seconds and name != "original":
            continue
        m = metrics.get(name)
        secs = seconds.get(name)
        ratio = secs / retrain_s if secs is not None else None
        if m is None:
            rows.append([scenario, name, "failed", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append([scenario, name, common.fmt(secs, 2), common.fmt(ratio, 3),
                     common.fmt(m["acc/train_forget"]), common.fmt(m["acc/train_retain"]),
                     common.fmt(m[a_t]), common.fmt(m["aus"]), steps.get(name, "-")])
    return rows, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    common.add_original_args(parser)
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--scenarios", default="CR,HR")
    parser.add_argument("--forget-class", default=None,
                        help="CR class, or classes separated by commas (one oracle each; default "
                             "0; with --small the class the original predicts most often on the "
                             "surrogate images, so self-forget has some)")
    parser.add_argument("--fraction", type=float, default=0.1, help="HR forget fraction")
    parser.add_argument("--surrogate", default=None,
                        help="surrogate source (default natural-objects; gaussian-noise with "
                             "--small)")
    parser.add_argument("--surrogate-n", type=int, default=None,
                        help="surrogate images (default: the library's; 128 with --small)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                        help="method hyperparameter, e.g. --set finetune.epochs=1 (repeatable)")
    args = parser.parse_args(argv)
    common.setup_logging()
    device = common.get_device(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        METHODS.get(m)  # unknown name → UnknownComponentError listing the registered ones
    scenarios = [s.strip().upper() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in ("CR", "HR")]
    if bad:
        parser.error(f"--scenarios takes CR and/or HR; got {bad}")
    dataset = args.dataset or ("synthetic" if args.small else "fashion-mnist")
    surrogate_name = args.surrogate or ("gaussian-noise" if args.small else "natural-objects")
    surrogate_n = args.surrogate_n or (128 if args.small else None)
    hparams: dict[str, dict[str, Any]] = {
        m: dict(SMALL_HPARAMS.get(m, {})) if args.small else {} for m in methods}
    for m, kv in common.parse_sets(args.set).items():
        hparams.setdefault(m, {}).update(kv)

    with tempfile.TemporaryDirectory(prefix="bench_vs_retrain_") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        with common.phase(f"loading {dataset}"):
            if args.original:  # the dataset options its sidecar records (e.g. channels=3)
                bundle = load_dataset_for(load_checkpoint(args.original), args.dataset,
                                          data_dir=args.data_dir)
            else:
                bundle = load_dataset(dataset, data_dir=args.data_dir)
        ck, recipe = common.load_or_train_original(args, bundle, device, work_dir)
        surrogate = load_surrogate_for(ck, surrogate_name, surrogate_n, args.seed, args.data_dir)
        classes = (args.forget_class and common.parse_int_list(args.forget_class,
                                                               "--forget-class")) or (
            [most_predicted(ck, surrogate, device)] if args.small else [0])
        rows, errors = [], []
        runs = [s for sc in scenarios
                for s in ([f"CR {c}" for c in classes] if sc == "CR" else [sc])]
        for scenario in runs:
            r, e = run_scenario(scenario, ck, bundle, recipe, surrogate, methods, hparams, args,
                                device)
            rows += r
            errors += e

    table = common.markdown_table(HEADERS, rows)
    print(table)
    train_s = ck.meta.get("train_seconds")
    notes = [
        f"Dataset {dataset}, model {ck.model_spec.name}, recipe epochs={recipe.epochs} "
        f"batch={recipe.batch_size} lr={recipe.lr}; surrogate {surrogate_name} "
        f"({len(surrogate)} images); "
        + (f"CR removes class {', '.join(map(str, classes))} (one at a time); "
           if "CR" in scenarios else "")
        + (f"HR removes {args.fraction:.0%} of the train images; " if "HR" in scenarios else "")
        + f"seed {args.seed}. Original training took "
        f"{common.fmt(train_s, 1)} s (from its sidecar).",
        "unlearn s = method.seconds_ of run_unlearning (statistics and teacher passes included, "
        "evaluation excluded); retrain s = train_model on the retain set with the same recipe, "
        "same process; x retrain = unlearn s / retrain s. Accuracies from audit_models "
        "(mia=False); steps = optimisation steps taken.",
        "Hyperparameters: " + ("; ".join(f"{m} {hparams[m]}" for m in methods if hparams.get(m))
                               or "library defaults") + ".",
        *[f"FAILED {e}" for e in errors],
    ]
    print("\n" + "\n".join(notes))
    common.maybe_record(args, "Unlearning methods vs retraining the oracle", table,
                        "\n".join(f"- {n}" for n in notes), device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
