"""Small helpers shared by the baseline methods (fine-tune, negative gradient, random labels, DUCK).

The forget-driven baselines share one loop shape (spec ``scar-method.md`` §5 and §8): iterate over
forget batches for up to ``epochs`` epochs, take one or more optimiser steps per forget batch, and
stop as soon as the forget accuracy is below :func:`scar.methods.base.stop_target`.

When the forget set is evaluated is the ``stop_check`` option (:data:`STOP_CHECKS`):

* ``"auto"`` (default): each forget batch's own *pre-update* predictions (already computed by the
  step) are a free estimate of the forget accuracy, and the forget set is evaluated when that
  estimate is below the target — plus once at the end of every epoch, so a misleading estimate
  (train-mode BatchNorm on a one-class batch) costs at most one epoch;
* ``"epoch"``: once at the end of every epoch only. The reference's NegativeGradient and
  RandomLabels check this way (spec §10), so they can run up to an epoch past the target;
* ``"step"``: after every forget batch.

A check that fails ends as soon as the target is out of reach
(:func:`scar.methods.base.check_below`); a stop is always decided on the whole forget set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from scar.data.base import Batch
from scar.errors import ConfigError
from scar.methods.base import (
    EVAL_BATCH,
    HR_MARGIN,
    ForgetCheck,
    Method,
    UnlearnData,
    check_below,
    stop_target,
)

log = logging.getLogger(__name__)

#: Learning-rate factor at each MultiStepLR milestone (reference baselines: γ = 0.5).
LR_DECAY = 0.5
#: When the forget set is evaluated for the stopping rule (module docstring).
STOP_CHECKS = ("auto", "epoch", "step")


# ----------------------------------------------------------------------------- shared params
@dataclass(kw_only=True)
class SGDForgetMethod(Method):
    """Hyperparameters shared by the forget-set baselines (negative gradient, random labels):
    SGD with momentum (reference) or Adam, a per-epoch MultiStepLR, the stopping rule."""

    lr: float = 0.01
    optimizer: str = "sgd"  # reference: SGD with momentum
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    epochs: int = 30  # an upper bound: the stopping rule usually ends the run much earlier
    batch_size: int = 256
    milestones: tuple[int, ...] = (25, 40)
    hr_margin: float = HR_MARGIN  # HR stops below A_test − hr_margin (reference 0.015)
    stop_check: str = "auto"  # when the forget set is evaluated (STOP_CHECKS; reference "epoch")

    def validate(self) -> None:
        from scar.errors import check_choice, check_range

        check_range("lr", self.lr, 0, low_inclusive=False)
        check_choice("optimizer", self.optimizer, ("sgd", "adam"))
        check_range("momentum", self.momentum, 0, 1, high_inclusive=False)
        check_range("weight_decay", self.weight_decay, 0)
        check_count("epochs", self.epochs)
        check_count("batch_size", self.batch_size)
        check_milestones(self.milestones)
        check_range("hr_margin", self.hr_margin, 0, 1)
        check_choice("stop_check", self.stop_check, STOP_CHECKS)


# ----------------------------------------------------------------------------- validation
def check_count(name: str, value: object, low: int = 1) -> None:
    """Raise ConfigError unless ``value`` is an integer >= ``low`` (epochs, batch sizes, ...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}; got {value!r}.")


def check_milestones(value: object) -> None:
    """Milestones of the per-epoch MultiStepLR: strictly increasing positive integers."""
    ok = isinstance(value, (tuple, list)) and all(
        isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in value
    )
    if not ok or list(value) != sorted(set(value)):
        raise ConfigError(
            f"milestones must be strictly increasing positive epoch numbers, e.g. (25, 40); "
            f"got {value!r}."
        )


# ----------------------------------------------------------------------------- setup helpers
def epoch_scheduler(opt: torch.optim.Optimizer, milestones: Sequence[int]):
    """MultiStepLR stepped once per epoch, ×0.5 at each milestone (reference baselines)."""
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=LR_DECAY)


def make_optimizer(kind: str, params, lr: float, momentum: float = 0.9,
                   weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """``sgd`` (with momentum) or ``adam``; the two optimisers the reference baselines use."""
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be one of ['sgd', 'adam']; got {kind!r}.")


# ----------------------------------------------------------------------------- stopping rule
@dataclass
class StopCheck:
    """Decides when a forget-set evaluation is worth its cost, and runs it.

    ``worth_checking`` decides from the ``mode`` (:data:`STOP_CHECKS`), the end of an epoch and
    one batch's pre-update accuracy; ``run`` evaluates the stopping rule on the forget set
    (accuracy strictly below the target, as in the reference) and counts the checks.
    """

    target: float
    margin: float = 0.0
    full_checks: int = 0
    mode: str = "auto"

    def worth_checking(self, batch_acc: float, end_of_epoch: bool = False) -> bool:
        if self.mode == "epoch":
            return end_of_epoch
        if self.mode == "step":
            return True
        return end_of_epoch or batch_acc < self.target + self.margin

    def run(self, model: nn.Module, loader) -> ForgetCheck:
        self.full_checks += 1
        return check_below(model, loader, self.target)


@dataclass
class StepOut:
    """One optimiser step's work: the loss to minimise, the forget batch's logits computed in the
    same forward pass (before the update), and the loss terms to record."""

    loss: Tensor
    logits: Tensor
    terms: dict[str, float] = field(default_factory=dict)


@dataclass
class LoopResult:
    steps: int = 0
    forget_acc: float | None = None  # last full evaluation (None if none ran)
    reached: bool = False
    full_checks: int = 0


StepFn = Callable[[Batch, int], StepOut]


def run_until_forgotten(
    method: Method,
    model: nn.Module,
    data: UnlearnData,
    step: StepFn,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    milestones: Sequence[int] = (),
    steps_per_batch: int = 1,
    stop_check: str = "auto",
    shuffle: bool = True,
) -> LoopResult:
    """Optimise ``step`` over forget batches (shuffled unless ``shuffle`` is False) until the
    stopping rule holds, checked as ``stop_check`` says (:data:`STOP_CHECKS`).

    ``step(batch, k)`` is called ``steps_per_batch`` times per forget batch (k = 0, 1, ...; DUCK
    pairs one forget batch with several retain batches); the first call's logits are the batch's
    pre-update predictions used by :class:`StopCheck`. Every step appends one row to
    ``method.history_``; the last row of a forget batch also holds ``forget_acc_batch`` and, when a
    full evaluation ran, ``forget_acc``.
    """
    check = StopCheck(stop_target(data, getattr(method, "hr_margin", HR_MARGIN)), mode=stop_check)
    forget = data.loader("forget", batch_size, shuffle=shuffle)
    full = data.loader("forget", EVAL_BATCH, shuffle=False)
    sched = epoch_scheduler(optimizer, milestones)
    result = LoopResult()
    bar = tqdm(total=epochs * len(forget), desc=method.name, disable=not data.progress,
               dynamic_ncols=True, leave=False)
    try:
        for epoch in range(1, epochs + 1):
            for i, batch in enumerate(forget):
                batch_acc = _forget_batch(method, model, batch, step, optimizer, epoch,
                                          steps_per_batch, result)
                if batch_acc is None:  # non-finite loss: keep the last finite model
                    return result
                bar.update(1)
                if check.worth_checking(batch_acc, end_of_epoch=i == len(forget) - 1):
                    fc = check.run(model, full)
                    # An early-ended check only bounds the accuracy from below.
                    method.history_[-1]["forget_acc" if fc.exact else "forget_acc_min"] = \
                        fc.accuracy
                    if fc.exact:
                        result.forget_acc = fc.accuracy
                    bar.set_postfix(forget_acc=("" if fc.exact else ">=") + f"{fc.accuracy:.3f}")
                    if fc.reached:
                        result.reached = True
                        return result
            sched.step()
        return result
    finally:
        bar.close()
        result.full_checks = check.full_checks
        _log_result(method.name, result, check.target)


def _forget_batch(method: Method, model: nn.Module, batch: Batch, step: StepFn,
                  optimizer: torch.optim.Optimizer, epoch: int, steps_per_batch: int,
                  result: LoopResult) -> float | None:
    """The optimiser steps of one forget batch; returns its pre-update accuracy (None: NaN/inf)."""
    batch_acc = float("nan")
    model.train()
    for k in range(steps_per_batch):
        out = step(batch, k)
        if not torch.isfinite(out.loss):
            # Gradient ascent can diverge; stepping on a NaN would corrupt every weight.
            log.warning("%s: non-finite loss at step %d; stopping with the last finite model.",
                        method.name, result.steps + 1)
            return None
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        result.steps += 1
        if k == 0:
            batch_acc = float((out.logits.detach().argmax(1) == batch.y).float().mean())
        row = {"epoch": epoch, "step": result.steps, "loss": float(out.loss.detach()),
               **out.terms, "lr": optimizer.param_groups[0]["lr"]}
        if k == steps_per_batch - 1:
            row["forget_acc_batch"] = batch_acc
        method.record(**row)
    return batch_acc


def _log_result(name: str, result: LoopResult, target: float) -> None:
    acc = "n/a" if result.forget_acc is None else f"{result.forget_acc:.4f}"
    if result.reached:
        log.info("%s: forget accuracy %s < target %.4f after %d steps (%d full checks).",
                 name, acc, target, result.steps, result.full_checks)
    else:
        log.info("%s: stopped after %d steps without reaching the target %.4f (forget acc %s).",
                 name, result.steps, target, acc)
