"""Does the membership audit see forgetting? Original vs oracle (and methods between them).

The audit setting (issue 14): ``fastcnn`` trained with the ``audit`` recipe (20 epochs, no
augmentation) on ``train_subset`` Fashion-MNIST images, the oracle retrained without the forget
set, reference models on halves of the pool (``scar.experiments.references``), then the RMIA and
LiRA offline attacks (``scar.evaluation.lr_attack``) on the forget set: AUC and TPR at 1% / 0.1%
FPR with 95% bootstrap CIs (1000 resamples, seed 0). Checkpoints are cached in
``--work-dir/checkpoints`` (named as a grid's; a rerun reuses them). One JSON row per (request,
model, attack) goes to ``--rows``.

    OMP_NUM_THREADS=1 python benchmarks/audit_separation.py --threads 1 \\
        --rows benchmarks/fmnist_audit/rows.jsonl

``--small``: a tiny run (600 images, 2 epochs, 2 reference models) for the smoke test.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import common

from scar.checkpoint import checkpoint_exists, load_checkpoint
from scar.data.datasets import load_dataset
from scar.data.forget import ForgetSpec, make_splits, scenario_of
from scar.evaluation.audit import MembershipAudit, audit_note, model_metrics, split_loaders
from scar.evaluation.lr_attack import FPR_LEVELS, AuditResult, audit_separates, tpr_key
from scar.experiments.grid import TRAIN_SEED, RunSpec, freeze
from scar.experiments.references import prepare_audit
from scar.experiments.request import UnlearnRequest, run_request
from scar.experiments.runner import CHECKPOINT_DIR, checkpoint_path
from scar.training.workflow import TrainJob, run_train_job
from scar.utils import atomic_write_text, device_name

log = logging.getLogger("benchmarks.audit")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--train-subset", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=None, help="override the audit recipe's 20")
    p.add_argument("--references", type=int, default=4)
    p.add_argument("--classes", default="0", help="CR requests (comma-separated class ids)")
    p.add_argument("--hr-count", type=int, default=500, help="HR request size (0: none)")
    p.add_argument("--attacks", default="rmia,lira")
    p.add_argument("--methods", default="scar,negative_gradient",
                   help="unlearning methods audited between original and oracle ('' for none)")
    p.add_argument("--work-dir", default="benchmarks/out/audit", help="cached checkpoints")
    p.add_argument("--rows", default=None, help="write the JSON rows here")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.small:
        args.train_subset, args.epochs, args.references = 600, 2, 2
        args.hr_count = min(args.hr_count, 60)
    return args


def trained(job: TrainJob, work: Path, bundle, device, progress: bool):
    """The cached checkpoint of ``job`` (a grid's cache path and name), trained if missing."""
    forget = job.forget or ForgetSpec.for_classes([0])  # the original's path ignores it
    spec = RunSpec(dataset=job.dataset, model=job.model, scenario=scenario_of(forget),
                   forget=forget, seed=TRAIN_SEED, method=job.role,
                   train_items=freeze(job.recipe_overrides or {}),
                   dataset_options_items=freeze(job.dataset_options or {}))
    path = checkpoint_path(work, spec, job.role)
    if not checkpoint_exists(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        run_train_job(job, path, bundle=bundle, device=device, progress=progress)
    return load_checkpoint(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    common.setup_logging(args.verbose)
    device = common.get_device(args)
    start = time.perf_counter()
    options = {"train_subset": args.train_subset}
    bundle = load_dataset("fashion-mnist", **options)
    recipe = {"recipe": "audit", **({"epochs": args.epochs} if args.epochs else {})}
    work = Path(args.work_dir)
    progress = not args.quiet
    job = TrainJob(dataset="fashion-mnist", dataset_options=options, model="fastcnn",
                   recipe_overrides=recipe, seed=TRAIN_SEED)
    original = trained(job, work, bundle, device, progress)
    requests = [ForgetSpec.for_classes([int(c)]) for c in args.classes.split(",") if c.strip()]
    if args.hr_count:
        requests.append(ForgetSpec.random(count=args.hr_count, seed=0))
    attacks = [a for a in args.attacks.split(",") if a]
    methods = [m for m in args.methods.split(",") if m]
    rows, table = [], []
    for spec in requests:
        scenario = scenario_of(spec)
        oracle = trained(replace(job, forget=spec), work, bundle, device, progress)
        splits = make_splits(bundle, spec)
        first = prepare_audit(original, bundle, splits, attacks[0], work / CHECKPOINT_DIR,
                              count=args.references, device=device, progress=progress)
        audits = {a: MembershipAudit(a, first.references) for a in attacks}
        loaders = split_loaders(splits, original.input_spec, device)
        models = {"original": original.model, "retrain": oracle.model}
        for method in methods:
            result = run_request(original, bundle, UnlearnRequest(forget=spec, method=method,
                                                                  mia=False), device=device,
                                 progress=progress)
            models[method] = result.model
        for attack, audit in audits.items():
            results = {name: model_metrics(m.to(device), loaders, scenario, mia=False,
                                           audit=audit)[0] for name, m in models.items()}
            note = audit_note(results)
            a = AuditResult.from_metrics(results["original"])
            b = AuditResult.from_metrics(results["retrain"])
            for name, metrics in results.items():
                row = {"request": spec.describe(), "scenario": scenario, "model": name,
                       "attack": attack, "metrics": metrics}
                if name == "original":
                    row["separates"] = audit_separates(a, b)
                    row["note"] = note
                rows.append(row)
                table.append([spec.describe(), attack, name] + [
                    f"{metrics[f'audit/{k}']:.3f} [{metrics[f'audit/{k}_lo']:.3f}, "
                    f"{metrics[f'audit/{k}_hi']:.3f}]"
                    for k in ["auc"] + [tpr_key(x) for x in FPR_LEVELS]]
                    + [f"{100 * metrics['acc/train_forget']:.2f}"])
            log.info("%s", note)
    headers = ["request", "attack", "model", "AUC [95% CI]"] + [
        f"TPR@{100 * x:g}%FPR [95% CI]" for x in FPR_LEVELS] + ["train-forget acc %"]
    text = common.markdown_table(headers, table)
    print(text)
    for row in rows:
        if "note" in row:
            print(f"- {row['request']}, {row['attack']}: {row['note']}")
    seconds = time.perf_counter() - start
    print(f"\n{len(rows)} rows in {seconds:.0f}s on {device_name(device)}")
    if args.rows:
        atomic_write_text(args.rows, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    common.maybe_record(args, "Membership audit: original vs oracle", text,
                        f"{seconds:.0f}s; rows: {args.rows}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
