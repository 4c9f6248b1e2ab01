"""Train the original model (all training data) or the oracle (retain data only)."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from scar.data.base import BatchLoader, ImageSet, InputSpec
from scar.models.base import channels_last, check_finite, eval_mode
from scar.training.recipes import Recipe

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: nn.Module
    seconds: float
    test_acc: float | None
    history: list[dict[str, float]] = field(default_factory=list)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    builders = {
        "sgd": lambda p: torch.optim.SGD(p, lr=recipe.lr, momentum=recipe.momentum,
                                          nesterov=recipe.nesterov and recipe.momentum > 0,
                                          weight_decay=recipe.weight_decay),
        "adam": lambda p: torch.optim.Adam(p, lr=recipe.lr, weight_decay=recipe.weight_decay),
        "adamw": lambda p: torch.optim.AdamW(p, lr=recipe.lr, weight_decay=recipe.weight_decay),
    }
    return builders[recipe.optimizer](model.parameters())


def make_scheduler(opt: torch.optim.Optimizer, recipe: Recipe, steps_per_epoch: int):
    """Per-step schedulers (stepped after every optimiser step)."""
    total = max(1, recipe.epochs * steps_per_epoch)
    if recipe.schedule == "onecycle" and total < 10:
        # OneCycleLR divides by its warm-up length, which rounds to zero for a handful of steps.
        log.info("one-cycle schedule needs >= 10 steps (got %d): using a constant rate", total)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    builders = {
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total),
        # One-cycle: warm up for 20% of the steps then anneal — converges in few epochs.
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=recipe.lr, total_steps=total, pct_start=0.2),
        "multistep": lambda: torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=[m * steps_per_epoch for m in recipe.milestones], gamma=0.5),
        "constant": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
    }
    return builders[recipe.schedule]()


def autocast_for(device: torch.device, amp: bool):
    """bfloat16 autocast on CUDA when ``amp`` (no grad scaler needed); nothing on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def evaluate_accuracy(model: nn.Module, data: ImageSet, spec: InputSpec, device: torch.device,
                      batch_size: int = 1024, amp: bool = False) -> float:
    """Top-1 accuracy (fraction) of ``model`` on ``data``; NaN for an empty set."""
    if len(data) == 0:
        return float("nan")
    correct = 0
    with eval_mode(model):
        for batch in BatchLoader(data, spec, batch_size=batch_size, device=device):
            with autocast_for(device, amp):
                logits = model(batch.x)
            correct += int((logits.argmax(1) == batch.y).sum())
    return correct / len(data)


def train_model(
    model: nn.Module,
    train: ImageSet,
    spec: InputSpec,
    recipe: Recipe,
    *,
    test: ImageSet | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    amp: bool = True,
    progress: bool = True,
    desc: str = "train",
) -> TrainResult:
    """Supervised training with ``recipe``; returns the trained model (in eval mode).

    Deterministic on CPU for a given seed (shuffling and augmentation use seeded generators).
    """
    device = torch.device(device)
    torch.manual_seed(seed)
    model = model.to(device)
    augment = recipe.augment()
    loader = BatchLoader(train, spec, batch_size=recipe.batch_size, shuffle=True,
                         augment=augment, device=device, seed=seed, drop_last=len(train) >
                         recipe.batch_size)
    opt = make_optimizer(model, recipe)
    sched = make_scheduler(opt, recipe, len(loader))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = tqdm(total=recipe.epochs * len(loader), desc=desc, disable=not progress,
               dynamic_ncols=True, leave=False)
    with channels_last(model):
        for epoch in range(recipe.epochs):
            model.train()
            tot_loss, tot_correct, seen = 0.0, 0, 0
            for batch in loader:
                with autocast_for(device, amp):
                    logits = model(batch.x)
                    loss = loss_fn(logits.float(), batch.y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                n = batch.y.numel()
                tot_loss += float(loss.detach()) * n
                tot_correct += int((logits.argmax(1) == batch.y).sum())
                seen += n
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{tot_loss / seen:.3f}",
                                acc=f"{tot_correct / seen:.3f}")
            row = {"epoch": epoch + 1, "loss": tot_loss / max(seen, 1),
                   "train_acc": tot_correct / max(seen, 1)}
            history.append(row)
            log.info("%s epoch %d/%d loss %.4f acc %.4f", desc, epoch + 1, recipe.epochs,
                     row["loss"], row["train_acc"])
    bar.close()
    seconds = time.perf_counter() - start
    check_finite(model, f"training ({desc})", f"after {len(history)} epochs")
    model.eval()
    test_acc = evaluate_accuracy(model, test, spec, device, amp=amp) if test is not None else None
    if test_acc is not None:
        log.info("%s done in %.1fs, test accuracy %.4f", desc, seconds, test_acc)
    return TrainResult(model=model, seconds=seconds, test_acc=test_acc, history=history)
