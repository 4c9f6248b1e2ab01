"""Where the time of one SCAR run goes, phase by phase, and then its evaluation.

The method's own pieces are wrapped with timers on the instance (the library is not changed):
``prepare`` (self-forget: the teacher pass that picks surrogate-forget images), ``class_stats``
(class statistics), ``build_head`` (shrinkage, pseudo-inverse, factorisation), ``assign_targets``
(nearest wrong class of each forget image, on first sight: per forget batch in CR, one pass over
the forget set first in HR), ``surrogate_source`` (CR: sampler set-up; HR:
the teacher's logits on every surrogate image) and the teacher-target function it returns (CR:
one teacher forward per step), the surrogate batch iterator (loading), ``confirm_stop`` (full
forget-set checks of the stopping rule). The unlearning total is ``method.seconds_``; what no timer
covers is the optimisation steps (forward, loss, backward, Adam, forget batch loading) plus small
set-up (model copies). The audit (``audit_models``, MIA included unless ``--no-mia``) is timed
separately.

    python benchmarks/profile_scar.py --original runs/fmnist/original.safetensors
    python benchmarks/profile_scar.py                       # trains a Fashion-MNIST original first
    python benchmarks/profile_scar.py --scenario HR
    python benchmarks/profile_scar.py --small               # synthetic data (CI smoke)
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import common
import torch

from scar.data.datasets import load_dataset
from scar.data.forget import ForgetSpec, make_splits
from scar.evaluation.audit import audit_models
from scar.experiments.unlearn import build_unlearn_data, load_surrogate_for, run_unlearning
from scar.methods import build_method
from scar.utils import seed_everything

HEADERS = ["phase", "seconds", "share", "calls"]
SMALL_HPARAMS = {"epochs": 1, "batch_size": 64, "surrogate_steps": 1}

#: Wrapped method → phase label (in the order of a run).
PHASES = {
    "prepare": "forget/surrogate preparation (self-forget: a teacher pass)",
    "class_stats": "class statistics",
    "build_head": "precision matrices (shrink, pinv, factors)",
    "assign_targets": "target assignment (nearest wrong class, on first sight)",
    "surrogate_source": "teacher passes: surrogate set-up",
    "calibrate": "step-size calibration (at the first step: probes on held-out surrogates)",
    "confirm_stop": "stopping checks (forget-set passes; a failing one ends early)",
}
TEACHER_STEP = "teacher passes: per-step targets"
SURROGATE_LOAD = "surrogate batch loading"
STEPS = "optimisation steps + rest (by difference)"


class PhaseTimer:
    """Accumulated seconds and call counts per phase (CUDA synchronised at both ends)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def add(self, label: str, seconds: float) -> None:
        self.seconds[label] += seconds
        self.calls[label] += 1

    def wrap(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            common.synchronize(self.device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                common.synchronize(self.device)
                self.add(label, time.perf_counter() - start)

        return timed

    def iterate(self, label: str, it: Iterator) -> Iterator:
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                return
            common.synchronize(self.device)
            self.add(label, time.perf_counter() - start)
            yield item


def instrument(method, timer: PhaseTimer) -> None:
    """Shadow the method's pieces with timed versions (instance attributes)."""
    for name, label in PHASES.items():
        if name == "surrogate_source":
            continue
        setattr(method, name, timer.wrap(label, getattr(method, name)))
    setup = timer.wrap(PHASES["surrogate_source"], method.surrogate_source)

    def surrogate_source(*args: Any, **kwargs: Any):
        batches, target = setup(*args, **kwargs)
        return timer.iterate(SURROGATE_LOAD, batches), timer.wrap(TEACHER_STEP, target)

    method.surrogate_source = surrogate_source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(parser)
    common.add_original_args(parser)
    parser.add_argument("--method", choices=("scar", "scar_self_forget"), default="scar")
    parser.add_argument("--scenario", choices=("CR", "HR"), default="CR")
    parser.add_argument("--forget-class", type=int, default=0)
    parser.add_argument("--fraction", type=float, default=0.1, help="HR forget fraction")
    parser.add_argument("--surrogate", default=None,
                        help="default natural-objects; gaussian-noise with --small")
    parser.add_argument("--surrogate-n", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-mia", action="store_true", help="leave the MIA out of the audit")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="method hyperparameter, e.g. --set stop_check=step (repeatable)")
    args = parser.parse_args(argv)
    common.setup_logging()
    device = common.get_device(args)
    dataset = args.dataset or ("synthetic" if args.small else "fashion-mnist")
    surrogate_name = args.surrogate or ("gaussian-noise" if args.small else "natural-objects")
    surrogate_n = args.surrogate_n or (128 if args.small else None)
    hparams: dict[str, Any] = dict(SMALL_HPARAMS) if args.small else {}
    hparams.update(common.parse_sets([f"{args.method}.{kv}" for kv in args.set])
                   .get(args.method, {}))

    with tempfile.TemporaryDirectory(prefix="profile_scar_") as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        bundle = load_dataset(dataset, data_dir=args.data_dir)
        ck, _ = common.load_or_train_original(args, bundle, device, work_dir)
        spec = (ForgetSpec.for_classes(args.forget_class) if args.scenario == "CR"
                else ForgetSpec.random(fraction=args.fraction, seed=0))
        splits = make_splits(bundle, spec)
        method = build_method(args.method, **hparams)
        surrogate = load_surrogate_for(ck, surrogate_name, surrogate_n, args.seed, args.data_dir)
        # Reads the stored class statistics next to the checkpoint (inside work_dir).
        data = build_unlearn_data(ck, bundle, splits, surrogate=surrogate, device=device,
                                  seed=args.seed)
    timer = PhaseTimer(device)
    instrument(method, timer)
    seed_everything(args.seed)
    with common.phase(f"{args.method} ({args.scenario})"):
        outcome = run_unlearning(ck, method, data)
    start = time.perf_counter()
    with common.phase("audit"):
        audit_models({"original": ck.model, args.method: outcome.model}, splits, ck.input_spec,
                     args.scenario, device=device, mia=not args.no_mia, seed=args.seed)
    eval_s = time.perf_counter() - start

    total = outcome.seconds
    covered = sum(timer.seconds.values())
    order = [*PHASES.values(), TEACHER_STEP, SURROGATE_LOAD]
    phases = [(label, timer.seconds[label], timer.calls[label]) for label in order]
    phases.append((STEPS, total - covered, outcome.info.get("steps_", "-")))
    grand = total + eval_s
    rows = [[label, common.fmt(s, 3), f"{100 * s / grand:.1f}%", calls]
            for label, s, calls in phases]
    rows.append(["unlearning total (method.seconds_)", common.fmt(total, 3),
                 f"{100 * total / grand:.1f}%", 1])
    rows.append([f"evaluation (audit_models{'' if args.no_mia else ', MIA'}, 2 models)",
                 common.fmt(eval_s, 3), f"{100 * eval_s / grand:.1f}%", 1])
    table = common.markdown_table(HEADERS, rows)
    print(table)
    notes = [
        f"{args.method} on {dataset} ({ck.model_spec.name}), {spec.describe()}, surrogate "
        f"{surrogate_name} ({len(surrogate)} images), hyperparameters "
        f"{hparams or 'defaults'}; stop: {outcome.info.get('stop_reason_', '-')}, "
        f"{outcome.info.get('steps_', '-')} steps, {outcome.info.get('full_checks_', '-')} full "
        "forget-set checks.",
        "Share = of unlearning + evaluation. The steps row is the unlearning total minus every "
        "timed phase (it also holds forget batch loading and model copies); the steps column "
        "of that row counts optimisation steps.",
    ]
    print("\n" + "\n".join(notes))
    common.maybe_record(args, f"Profile of one {args.method} run ({args.scenario})", table,
                        "\n".join(f"- {n}" for n in notes), device=device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
