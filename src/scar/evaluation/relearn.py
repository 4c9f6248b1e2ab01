"""Relearn time: how many steps of fine-tuning on the forget set bring its accuracy back.

A model that has truly forgotten should relearn the forget set about as slowly as the oracle,
which never saw it; one whose forgetting is only skin-deep (the knowledge is still in the
weights, the output is suppressed) recovers in a few steps. Golatkar et al. (2020, "Eternal
Sunshine of the Spotless Net", CVPR) introduced the relearn time: fine-tune the scrubbed model
on data containing the forgotten samples and count the epochs until their loss falls below a
threshold. Chundawat et al. (2023, "Zero-Shot Machine Unlearning", IEEE TIFS) count
mini-batches until the forget accuracy is back within a margin of the original model's, and
report it relative to the retrained model's (the Anamnesis Index).

Our setting: plain fine-tuning (SGD by default, or Adam) of a deep copy of the model on the
forget images alone, shuffled (seeded), cross-entropy on their labels, the model in train mode;
after every step the forget accuracy is measured (eval mode) on a fixed seeded sample of the
forget images, and the count stops at the first step where it reaches the target: by default
``fraction`` (0.5) × the *original* model's accuracy on the forget images. A model already at the
target takes 0 steps. A model that has not reached it after ``max_steps`` steps is *censored*:
it reports ``max_steps`` and ``censored`` = 1 (its relearn time is at least that). Compare a
method's steps with the retrain row's (the oracle's): the Anamnesis Index is their ratio.

Caveat, class removal: the forget set holds one class, so fine-tuning on it alone can also
succeed by pushing every prediction towards that class; the oracle relearns in few steps too.
The number is meaningful relative to the oracle's, not on its own.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scar.data.base import Batch, BatchLoader, ImageSet, InputSpec
from scar.errors import ConfigError, check_range
from scar.evaluation.metrics import accuracy
from scar.evaluation.outputs import compute_outputs
from scar.registry import Registry

log = logging.getLogger(__name__)

#: name → builder(parameters, lr) of the fine-tuning optimizer.
RELEARN_OPTIMIZERS: Registry[Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]] = (
    Registry("relearn optimizer"))
RELEARN_OPTIMIZERS.register("sgd", "plain SGD (no momentum, no weight decay)")(
    lambda params, lr: torch.optim.SGD(params, lr=lr))
RELEARN_OPTIMIZERS.register("adam", "Adam with torch's defaults but the learning rate")(
    lambda params, lr: torch.optim.Adam(params, lr=lr))


@dataclass(frozen=True)
class RelearnSettings:
    """How the relearn time is measured (grid key ``relearn``; ``--relearn`` on the CLI)."""

    fraction: float = 0.5  # target = fraction × the original's forget accuracy ...
    target: float | None = None  # ... unless an absolute target accuracy is given
    optimizer: str = "sgd"
    lr: float = 0.01
    batch_size: int = 64
    max_steps: int = 200
    eval_images: int = 1000  # forget images the accuracy is measured on after each step
    seed: int = 0

    def __post_init__(self) -> None:
        check_range("relearn fraction", self.fraction, 0, low_inclusive=False)
        if self.target is not None:
            check_range("relearn target", self.target, 0, 1)
        check_range("relearn lr", self.lr, 0, low_inclusive=False)
        check_range("relearn batch_size", self.batch_size, 1)
        check_range("relearn max_steps", self.max_steps, 1)
        check_range("relearn eval_images", self.eval_images, 1)
        RELEARN_OPTIMIZERS.get(self.optimizer)

    @classmethod
    def parse(cls, value: Any) -> RelearnSettings | None:
        """None / False → off; True → the defaults; a mapping → those settings over them."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, dict):
            raise ConfigError(f"relearn must be true, false or a mapping of settings "
                              f"({', '.join(cls.__dataclass_fields__)}); got {value!r}.")
        unknown = sorted(set(value) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown relearn setting(s) {unknown}; allowed: "
                              f"{', '.join(cls.__dataclass_fields__)}.")
        return cls(**{k: _coerce(k, v) for k, v in value.items()})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def target_for(self, original_forget_acc: float | None) -> float:
        """The accuracy to reach: the absolute ``target``, else ``fraction`` × the original's."""
        if self.target is not None:
            return float(self.target)
        if original_forget_acc is None or not math.isfinite(original_forget_acc):
            raise ConfigError("the relearn target needs the original model's forget accuracy "
                              "(or an absolute 'target').")
        return float(self.fraction * original_forget_acc)


def _coerce(key: str, value: Any) -> Any:
    """A setting given as a string (``--relearn-set max_steps=50``) as the field's type."""
    if not isinstance(value, str):
        return value
    default = getattr(RelearnSettings, key)
    try:
        return value if isinstance(default, str) else type(default or 0.0)(value)
    except ValueError as exc:
        raise ConfigError(f"relearn setting {key}={value!r} is not a number.") from exc


@dataclass(frozen=True)
class RelearnResult:
    steps: int  # max_steps when censored
    censored: bool  # the target was not reached within max_steps
    target: float
    accuracy: float  # forget accuracy (on the measured sample) at the last step

    def to_metrics(self) -> dict[str, Any]:
        return {"relearn/steps": self.steps, "relearn/censored": int(self.censored),
                "relearn/target": self.target, "relearn/acc": self.accuracy}


def _endless(loader: BatchLoader) -> Iterator[Batch]:
    while True:
        yield from loader


def relearn_steps(model: nn.Module, train: BatchLoader, check: Iterable[Batch], target: float,
                  *, lr: float = 0.01, max_steps: int = 200, optimizer: str = "sgd"
                  ) -> RelearnResult:
    """Steps of fine-tuning a deep copy of ``model`` on ``train`` (batches of forget images,
    cycled) until its accuracy on ``check`` reaches ``target``; ``max_steps`` with ``censored``
    when it never does. ``model`` itself (parameters, buffers, train/eval modes) is untouched."""
    check_range("max_steps", max_steps, 1)
    student = copy.deepcopy(model)
    opt = RELEARN_OPTIMIZERS.get(optimizer)(
        [p for p in student.parameters() if p.requires_grad], lr)
    acc = accuracy(compute_outputs(student, check))
    steps = 0
    batches = _endless(train)
    while acc < target and steps < max_steps:
        batch = next(batches)
        student.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(student(batch.x), batch.y).backward()
        opt.step()
        steps += 1
        acc = accuracy(compute_outputs(student, check))
    censored = acc < target
    log.info("relearn: %s%d steps to forget accuracy %.3f (target %.3f)",
             ">= " if censored else "", steps, acc, target)
    return RelearnResult(steps, censored, float(target), float(acc))


def relearn_metrics(model: nn.Module, forget: ImageSet, spec: InputSpec,
                    settings: RelearnSettings, original_forget_acc: float | None,
                    device: torch.device | str = "cpu") -> dict[str, Any]:
    """The ``relearn/*`` metrics of one model on the forget images (empty without any)."""
    if len(forget) == 0:
        return {}
    g = torch.Generator().manual_seed(settings.seed)
    sample = torch.randperm(len(forget), generator=g)[:settings.eval_images].sort().values
    train = BatchLoader(forget, spec, batch_size=settings.batch_size, shuffle=True,
                        device=device, seed=settings.seed)
    check = BatchLoader(forget.subset(sample), spec, batch_size=1024, device=device)
    return relearn_steps(model, train, check, settings.target_for(original_forget_acc),
                         lr=settings.lr, max_steps=settings.max_steps,
                         optimizer=settings.optimizer).to_metrics()
