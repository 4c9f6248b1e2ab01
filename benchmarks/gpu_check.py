"""GPU check: ResNet-18 on CIFAR-shaped synthetic data — SCAR step, SCAR run, retraining epoch.

On CIFAR-100-shaped synthetic images (3x32x32, 100 classes, 50k train / 10k test; the library's
``synthetic`` dataset, so no download) with the zoo's ResNet-18 (512-d features), this measures

1. one epoch of training the original (paper recipe, bfloat16 autocast on CUDA), time + peak;
2. class statistics of the original over the train set (the ``stored`` statistics), time;
3. one SCAR optimisation step at batch 1024 (``bench_step.ScarStep``: forget forward, Mahalanobis
   loss over 99 kept classes, teacher forward + CR mask + KL on a surrogate batch, backward,
   Adam), median time + peak;
4. a full SCAR unlearning run of class 0 (``method.unlearn``, at most ``--scar-epochs`` epochs,
   batch 1024, surrogate gaussian-noise), time + peak, steps and stop reason;
5. one epoch of retraining from scratch on the retain set, time + peak.

Peak memory is ``torch.cuda.max_memory_allocated`` above the level before each item (CPU: peak
RSS, see ``common.PeakMemory``). Results go to ``$OUT/gpu_check.{md,json}`` (default
``benchmarks/out``) and, unless --small / --no-record, to RESULTS.md. Runs in well under
5 minutes on one H100; ``--small`` runs tiny sizes on the CPU for the CI smoke test.

    bash benchmarks/gpu_check.sh          # python benchmarks/gpu_check.py --out ${OUT:-...}
    bash benchmarks/gpu_check.sh --small
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import common
import torch
from bench_step import ScarStep

from scar.data.base import BatchLoader
from scar.data.datasets import load_dataset
from scar.data.forget import ForgetSpec, make_splits
from scar.data.surrogates import load_surrogate
from scar.methods import build_method
from scar.methods.base import UnlearnData
from scar.methods.mahalanobis import MahalanobisHead
from scar.methods.statistics import class_statistics
from scar.models.base import ModelSpec, build_model
from scar.training.recipes import RECIPES
from scar.training.trainer import evaluate_accuracy, train_model
from scar.utils import device_name, seed_everything, versions

HEADERS = ["item", "seconds", "peak MB", "details"]
FULL = {"classes": 100, "n_train": 50_000, "n_test": 10_000, "size": 32, "batch": 1024,
        "scar_epochs": 3, "surrogate_steps": 5, "step_repeats": 5, "surrogate_n": 5000}
SMALL = {"classes": 10, "n_train": 64, "n_test": 20, "size": 16, "batch": 16,
         "scar_epochs": 1, "surrogate_steps": 1, "step_repeats": 1, "surrogate_n": 16}


def timed(device: torch.device, fn):
    """(result, seconds, peak MB) of ``fn()``."""
    with common.PeakMemory(device) as mem:
        common.synchronize(device)
        start = time.perf_counter()
        out = fn()
        common.synchronize(device)
        seconds = time.perf_counter() - start
    return out, seconds, mem.peak_mb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or
                                                         common.BENCH_DIR / "out"))
    for key, value in FULL.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"default {value} ({SMALL[key]} with --small)")
    args = parser.parse_args(argv)
    common.setup_logging()
    device = common.get_device(args)
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else
           (SMALL if args.small else FULL)[k] for k in FULL}
    if device.type != "cuda" and not args.small:
        print("warning: no CUDA device; the full check on a CPU takes a long time",
              file=sys.stderr)
    seed_everything(0)
    c, b = cfg["classes"], cfg["batch"]
    bundle = load_dataset("synthetic", num_classes=c, n_train=cfg["n_train"],
                          n_test=cfg["n_test"], size=cfg["size"], channels=3)
    spec = bundle.info.input_spec
    model_spec = ModelSpec("resnet18", c, 3, cfg["size"])
    recipe = RECIPES.get("cifar100").with_overrides({"epochs": 1})
    if args.small:
        recipe = recipe.with_overrides({"batch_size": b})
    splits = make_splits(bundle, ForgetSpec.for_classes(0))
    rows, info = [], {}

    # 1. one epoch of training the original
    seed_everything(0)
    result, s, mb = timed(device, lambda: train_model(
        build_model(model_spec), bundle.train, spec, recipe, device=device, progress=False,
        desc="original"))
    original = result.model
    test_acc = evaluate_accuracy(original, bundle.test, spec, device)
    rows.append(["original training, 1 epoch", s, mb,
                 f"{len(bundle.train)} images, batch {recipe.batch_size}, test acc {test_acc:.3f}"])

    # 2. stored class statistics
    stats, s, mb = timed(device, lambda: class_statistics(
        original, bundle.train, spec, num_classes=c, device=device, batch_size=b))
    rows.append(["class statistics (stored)", s, mb, f"{len(bundle.train)} images, 512-d"])

    # 3. one SCAR step at batch b
    kept = [k for k in range(c) if k != 0]
    head = MahalanobisHead(stats.subset(kept)).to(device=device, dtype=torch.float32)
    student = build_model(model_spec)
    student.load_state_dict(original.state_dict())
    student.to(device)
    x_f = next(iter(BatchLoader(bundle.train, spec, batch_size=b, shuffle=True, device=device))).x
    surrogate = load_surrogate("gaussian-noise", channels=3, size=cfg["size"],
                               n=max(cfg["surrogate_n"], b), seed=0)
    x_s = next(iter(BatchLoader(surrogate, spec, batch_size=b, device=device))).x
    targets = torch.tensor(kept, device=device)[torch.randint(len(kept), (b,), device=device)]
    step = ScarStep(student, head, [0], x_f[:2])
    step(x_f, targets, x_s)
    step(x_f, targets, x_s)
    with common.PeakMemory(device) as mem:
        step(x_f, targets, x_s)
    step_s, _ = common.time_call(lambda: step(x_f, targets, x_s), repeats=cfg["step_repeats"],
                                 warmup=0, device=device)
    rows.append([f"SCAR step, batch {b}", step_s, mem.peak_mb,
                 f"{len(kept)} kept classes x 512-d; median of {cfg['step_repeats']}"])
    step = student = head = None  # free them before the full run

    # 4. a full SCAR unlearning run (class 0)
    method = build_method("scar", epochs=cfg["scar_epochs"], batch_size=b,
                          surrogate_batch_size=b, surrogate_steps=cfg["surrogate_steps"])
    data = UnlearnData(input_spec=spec, num_classes=c, scenario="CR", removed_classes=(0,),
                       forget=splits.train_forget, surrogate=surrogate, stats=stats,
                       device=device, seed=0)
    unlearned, s, mb = timed(device, lambda: method.unlearn(original, data))
    forget_acc = evaluate_accuracy(unlearned, splits.train_forget, spec, device)
    retain_acc = evaluate_accuracy(unlearned, splits.test_retain, spec, device)
    rows.append([f"SCAR unlearning run (<= {cfg['scar_epochs']} epochs)", method.seconds_, mb,
                 f"{method.steps_} steps, {method.full_checks_} full checks, stop: "
                 f"{method.stop_reason_}; forget acc {forget_acc:.3f}, "
                 f"retain-test acc {retain_acc:.3f}"])
    info["scar_wall_s"] = s

    # 5. one epoch of retraining on the retain set
    seed_everything(0)
    result, s, mb = timed(device, lambda: train_model(
        build_model(model_spec), splits.train_retain, spec, recipe, device=device,
        progress=False, desc="retrain"))
    rows.append(["retraining, 1 epoch (retain set)", s, mb,
                 f"{len(splits.train_retain)} images, batch {recipe.batch_size}"])

    table = common.markdown_table(HEADERS, [
        [r[0], common.fmt(r[1], 3), common.fmt(r[2], 1), r[3]] for r in rows])
    print(table)
    ratio = rows[3][1] / rows[4][1]
    notes = [
        f"ResNet-18 (zoo, 3x3 stem), synthetic {c} classes of 3x{cfg['size']}x{cfg['size']}, "
        f"{cfg['n_train']} train images; paper recipe with epochs=1 (bf16 autocast on CUDA); "
        f"SCAR defaults except epochs={cfg['scar_epochs']}, batch {b}, surrogate_steps="
        f"{cfg['surrogate_steps']}; surrogate gaussian-noise "
        f"({len(surrogate)} images).",
        f"SCAR run / one retraining epoch = {ratio:.2f}. Peak MB: memory above the level before "
        f"each item ({mem.method}).",
    ]
    print("\n" + "\n".join(notes))
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"config": cfg, "device": device_name(device), "versions": versions(),
               "rows": [dict(zip(HEADERS, r, strict=True)) for r in rows], **info}
    (args.out / "gpu_check.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(
        f"# GPU check\n\n- command: `{common.command_line()}`\n- device: {device_name(device)}\n"
        f"- versions: {', '.join(f'{k} {v}' for k, v in versions().items())}\n\n{table}\n\n"
        + "\n".join(f"- {n}" for n in notes) + "\n")
    print(f"\nwrote {args.out / 'gpu_check.md'} and gpu_check.json")
    common.maybe_record(args, "GPU check: ResNet-18 SCAR step, SCAR run, retraining epoch",
                        table, "\n".join(f"- {n}" for n in notes), device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
