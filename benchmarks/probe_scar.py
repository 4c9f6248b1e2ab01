"""One unlearning method with given hyperparameters on trained checkpoints: test-split metrics.

The quick research loop behind SCAR's defaults (the architecture panel of issue 10): for each
``--original`` checkpoint (any architecture; its data is loaded as its sidecar records) and each
class of ``--classes`` (class removal) or each seed of ``--seeds`` (``--hr FRACTION``, random
removal), run the method through ``scar.experiments.unlearn.run_unlearning`` and measure on the
*test* split only (cheaper than the full audit of ``scar evaluate``):

- CR: retain-test and forget-test accuracy, the drop of retain-test from the original, AUS,
  and each class's accuracy change (which kept classes paid for the removal);
- HR: test accuracy and its drop, accuracy on the train forget set (before / after), AUS;

plus the method's own time (``method.seconds_``), steps and, for SCAR, the learning rate the step
size calibration chose (``lr_``). Each run is one row printed as it finishes and appended to
``--log`` (JSON lines, default none); the table is recorded in ``RESULTS.md`` (full runs).

    python benchmarks/probe_scar.py --original r18.safetensors --original fastcnn.safetensors \\
        --classes 0,3,7 --set step_kl=0.1 --threads 1
    python benchmarks/probe_scar.py --original r18.safetensors --hr 0.1 --seeds 0,1
    python benchmarks/probe_scar.py --small                  # synthetic data (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import common
import torch

from scar.checkpoint import load_checkpoint
from scar.data.base import BatchLoader
from scar.data.datasets import load_dataset
from scar.data.forget import ForgetSpec, make_splits
from scar.evaluation.aus import aus
from scar.evaluation.outputs import compute_outputs
from scar.experiments.unlearn import (
    build_unlearn_data,
    load_dataset_for,
    load_surrogate_for,
    run_unlearning,
)
from scar.methods import METHODS, build_method
from scar.methods.presets import with_preset
from scar.utils import seed_everything

HEADERS = ["model", "forget", "retain/test", "drop", "forget-test / train-forget", "AUS",
           "seconds", "steps", "lr"]


@torch.no_grad()
def predictions(model, images, input_spec, device) -> tuple[torch.Tensor, torch.Tensor]:
    out = compute_outputs(model, BatchLoader(images, input_spec, batch_size=512, device=device))
    return out.logits.argmax(1), out.labels


def accuracy(pred: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    if mask is not None:
        pred, labels = pred[mask], labels[mask]
    return float((pred == labels).float().mean()) if len(labels) else float("nan")


def cr_metrics(pred0, pred, y, cls: int, num_classes: int) -> dict:
    forget = y == cls
    a_or, a_t = accuracy(pred0, y, ~forget), accuracy(pred, y, ~forget)
    a_f = accuracy(pred, y, forget)
    per_class = [round(100 * (accuracy(pred, y, y == k) - accuracy(pred0, y, y == k)), 1)
                 for k in range(num_classes)]
    return {"a_or": a_or, "retain_test": a_t, "forget_test": a_f,
            "aus": aus("CR", a_or, a_t, a_f), "class_change": per_class}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    parser.add_argument("--original", action="append", default=[], metavar="PATH",
                        help="trained checkpoint (repeatable; --small trains a tiny one)")
    parser.add_argument("--method", default="scar")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="hyperparameter of the method (repeatable)")
    parser.add_argument("--preset", default=None,
                        help="a named preset (scar list presets), e.g. reference; --set wins")
    parser.add_argument("--classes", default="0,3,7", help="CR: classes, one run each")
    parser.add_argument("--hr", type=float, default=None, metavar="FRACTION",
                        help="random removal of this fraction instead of class removal")
    parser.add_argument("--seeds", default="0",
                        help="seeds of the unlearning call (HR: also one forget set each)")
    parser.add_argument("--surrogate", default=None, help="surrogate source (dataset default)")
    parser.add_argument("--surrogate-n", type=int, default=None)
    parser.add_argument("--log", type=Path, default=None, help="append every row (JSON lines)")
    args = parser.parse_args(argv)
    common.setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = common.get_device(args)
    METHODS.get(args.method)  # unknown name → the registered ones
    hparams = dict(item.split("=", 1) for item in args.set if "=" in item)
    if len(hparams) != len(args.set):
        raise SystemExit("--set expects KEY=VALUE")
    if args.small:
        hparams = {"epochs": 1, "surrogate_steps": 1, **hparams}
    seeds = common.parse_int_list(args.seeds, "--seeds")
    # (forget set, seed of the unlearning call): HR seeds pick the forget set too.
    classes = common.parse_int_list(args.classes, "--classes")
    specs = ([(ForgetSpec.random(fraction=args.hr, seed=s), s) for s in seeds] if args.hr else
             [(ForgetSpec.for_classes(c), s) for c in classes for s in seeds])
    rows, table = [], []
    with tempfile.TemporaryDirectory(prefix="probe_scar_") as tmp:
        paths = list(args.original)
        if not paths:
            if not args.small:
                parser.error("--original PATH is required (or --small)")
            bundle = load_dataset("synthetic")
            ns = argparse.Namespace(small=True, original=None)
            ck, _ = common.load_or_train_original(ns, bundle, device, Path(tmp))
            paths = [ck.path]
            if not args.hr:
                specs = [(ForgetSpec.for_classes(0), s) for s in seeds]
        for path in paths:
            ck = load_checkpoint(path)
            bundle = load_dataset_for(ck)
            surrogate_name = args.surrogate or ("gaussian-noise" if args.small else None)
            surrogate = None
            pred0, y = predictions(ck.model, bundle.test, ck.input_spec, device)
            for spec, seed in specs:
                splits = make_splits(bundle, spec)
                method = build_method(args.method, **with_preset(
                    args.method, hparams, args.preset, ck.dataset))
                if surrogate is None and "surrogate" in method.uses():
                    surrogate = load_surrogate_for(ck, surrogate_name, args.surrogate_n or
                                                   (128 if args.small else None), seeds[0])
                data = build_unlearn_data(ck, bundle, splits, device=device, seed=seed,
                                          surrogate=surrogate, progress=False)
                seed_everything(seed)
                outcome = run_unlearning(ck, method, data)
                pred, _ = predictions(outcome.model, bundle.test, ck.input_spec, device)
                row = {"original": str(path), "model": ck.model_spec.name,
                       "method": args.method, "hparams": hparams, "preset": args.preset,
                       "seed": seed,
                       "seconds": outcome.seconds, "steps": outcome.info.get("steps_"),
                       "lr": outcome.info.get("lr_"), "stop": outcome.info.get("stop_reason_")}
                if args.hr:
                    fp0, fy = predictions(ck.model, splits.train_forget, ck.input_spec, device)
                    fp, _ = predictions(outcome.model, splits.train_forget, ck.input_spec,
                                        device)
                    a_or, a_t, a_f = accuracy(pred0, y), accuracy(pred, y), accuracy(fp, fy)
                    row |= {"forget": f"HR {args.hr:g} seed {seed}", "a_or": a_or,
                            "test": a_t, "train_forget": a_f,
                            "train_forget_before": accuracy(fp0, fy),
                            "aus": aus("HR", a_or, a_t, a_f)}
                    shown = (a_t, a_f)
                else:
                    cls = spec.classes[0]
                    row |= {"forget": f"class {cls} seed {seed}",
                            **cr_metrics(pred0, pred, y, cls, ck.model_spec.num_classes)}
                    shown = (row["retain_test"], row["forget_test"])
                rows.append(row)
                table.append([row["model"], row["forget"], common.fmt(100 * shown[0], 2),
                              f"{100 * (row['a_or'] - shown[0]):+.2f}",
                              common.fmt(100 * shown[1], 2), common.fmt(row["aus"]),
                              common.fmt(row["seconds"], 1), str(row["steps"]),
                              f"{row['lr']:.3g}" if row["lr"] else "-"])
                print(" | ".join(table[-1]), flush=True)
                if args.log:
                    with args.log.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
                del outcome, data

    markdown = common.markdown_table(HEADERS, table)
    print(markdown)
    notes = (f"- {args.method} with {hparams or 'the library defaults'}; metrics on the test "
             "split: CR retain-test = accuracy on the kept classes' test images, drop = the "
             "original's minus it, forget-test = the removed class's test images, AUS = (1 − "
             "drop) / (1 + forget-test); HR test accuracy and the train forget set's accuracy, "
             "AUS = (1 − drop) / (1 + |train-forget − test|). seconds = method.seconds_; lr = "
             "the learning rate SCAR's step-size calibration chose.")
    common.maybe_record(args, f"Probe: {args.method} on {len(paths)} checkpoint(s)", markdown,
                        notes, device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
