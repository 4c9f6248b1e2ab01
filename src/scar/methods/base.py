"""The method contract shared by every unlearning method.

A method is a keyword-only dataclass of hyperparameters, validated at construction, registered in
:data:`METHODS` under a snake_case name and called as ``method.unlearn(model, data)``, which returns
a NEW model (the input is never mutated). After a call, ``method.history_`` holds one dict per
optimisation step and ``method.access_`` the data the call actually touched.

Each method declares its *data-access profile*: ``requires`` (what must be present) and
``may_use`` (what it can read, depending on options). :func:`access_profile` turns this into the
line every report prints — the honest answer to "is it retain-free?".
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, TypedDict

import torch
from torch import nn

from scar.data.base import Augment, BatchLoader, ImageSet, InputSpec, SubsetImages
from scar.data.forget import SCENARIOS
from scar.errors import ConfigError, MissingRequirementError, check_choice
from scar.models.base import channels_last, check_finite, eval_mode
from scar.registry import Registry

log = logging.getLogger(__name__)

#: Names of the data a method can touch (keys of the access profile).
DATA_KINDS = ("forget", "retain", "surrogate", "stats")
#: Batch size of inference-only passes over a split (stopping checks, target assignment).
EVAL_BATCH = 1024


class TrackedImages(ImageSet):
    """An ImageSet that records how many images were loaded from it (for the access audit)."""

    def __init__(self, inner: ImageSet, kind: str):
        self.inner = inner
        self.kind = kind
        self.labels = inner.labels
        self.channels = inner.channels
        self.size = inner.size
        self.loaded = 0

    def load(self, idx: torch.Tensor) -> torch.Tensor:
        self.loaded += int(idx.numel())
        return self.inner.load(idx)

    def subset(self, idx, labels: torch.Tensor | None = None) -> ImageSet:
        """A view whose loads are still counted here."""
        return SubsetImages(self, torch.as_tensor(idx, dtype=torch.long), labels)


@dataclass
class UnlearnData:
    """What an unlearning call may see. Unavailable parts are ``None``.

    ``original_test_acc`` is the original model's test accuracy (HR stopping rule); it comes
    from the original checkpoint's sidecar, not from test images.
    ``stats`` are class statistics recorded at training time (``stored`` source).
    ``train_augment`` is the original's training augmentation (from its recorded recipe; None
    when unknown): the reference code reads retain and CR surrogate images through it.
    """

    input_spec: InputSpec
    num_classes: int
    scenario: str
    removed_classes: tuple[int, ...] = ()
    forget: ImageSet | None = None
    retain: ImageSet | None = None
    surrogate: ImageSet | None = None
    stats: Any = None  # scar.methods.mahalanobis.ClassStats
    original_test_acc: float | None = None
    train_augment: Augment | None = None
    device: torch.device | str = "cpu"
    seed: int = 0
    head: str | None = None
    progress: bool = False
    _tracked: dict[str, TrackedImages] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_choice("scenario", self.scenario, SCENARIOS)
        self.device = torch.device(self.device)
        bad = [c for c in self.removed_classes if not 0 <= c < self.num_classes]
        if bad:
            raise ConfigError(
                f"removed classes {bad} are outside 0..{self.num_classes - 1}."
            )
        if self.scenario == "CR" and not self.removed_classes:
            raise ConfigError("class removal (CR) needs at least one removed class.")
        for kind in ("forget", "retain", "surrogate"):
            data = getattr(self, kind)
            if data is not None and not isinstance(data, TrackedImages):
                tracked = TrackedImages(data, kind)
                setattr(self, kind, tracked)
                self._tracked[kind] = tracked

    def touched(self) -> dict[str, int]:
        """Number of images loaded from each source so far (0 = never touched)."""
        return {k: t.loaded for k, t in self._tracked.items()}

    def kept_classes(self) -> list[int]:
        return [c for c in range(self.num_classes) if c not in set(self.removed_classes)]

    def loader(self, kind: str | ImageSet, batch_size: int, *, shuffle: bool = True,
               seed_offset: int = 0, **kw) -> BatchLoader:
        """Batches of ``kind`` ("forget", "retain", "surrogate") or of any ImageSet."""
        data = getattr(self, kind) if isinstance(kind, str) else kind
        if data is None:
            raise MissingRequirementError(f"no {kind} data was provided.")
        return BatchLoader(data, self.input_spec, batch_size=batch_size, shuffle=shuffle,
                           device=self.device, seed=self.seed + seed_offset, **kw)


class RunInfo(TypedDict, total=False):
    """What one ``unlearn`` call reports beyond the model (a results row's ``info``, an unlearned
    checkpoint's ``unlearn_info``). Keys end in ``_`` like fitted attributes; a method reports
    the ones it has."""

    stop_reason_: str  # why the loop stopped ("max epochs", "forget accuracy ... < ...")
    steps_: int  # optimisation steps taken
    full_checks_: int  # full passes over the forget set by the stopping rule
    cover_images_: int  # images synthesised into kept classes (SCAR's cover_per_class)
    lr_: float | None  # the learning rate used (calibrated when the hyperparameter is None)


@dataclass(kw_only=True)
class Method:
    """Base class: subclasses are kw-only dataclasses of hyperparameters."""

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    may_use: ClassVar[frozenset[str]] = frozenset()
    scenarios: ClassVar[tuple[str, ...]] = SCENARIOS

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for a bad hyperparameter (override; call check_* helpers)."""

    # -- public API ---------------------------------------------------------------------
    def hparams(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def required_data(self) -> frozenset[str]:
        """What this configured method needs (override when it depends on hyperparameters)."""
        return self.requires

    def uses(self) -> frozenset[str]:
        """The data this configured method may read."""
        return self.required_data() | self.may_use

    def run_info(self) -> RunInfo:
        """Facts of the last :meth:`unlearn` call (override; none by default)."""
        return {}

    def access_note(self) -> str | None:
        """A detail of the data access the kinds alone do not tell (printed in the profile)."""
        return None

    def unlearn(self, model: nn.Module, data: UnlearnData) -> nn.Module:
        if data.scenario not in self.scenarios:
            raise ConfigError(
                f"method {self.name!r} supports scenarios {list(self.scenarios)}; "
                f"got {data.scenario!r}."
            )
        self.check_requirements(data)
        new = copy.deepcopy(model).to(data.device)
        original = copy.deepcopy(model).to(data.device).eval()
        for p in original.parameters():
            p.requires_grad_(False)
        self.history_: list[dict[str, float]] = []
        start = time.perf_counter()
        with channels_last(new, original):
            new = self._unlearn(new, original, data) or new
        if data.device.type == "cuda":
            torch.cuda.synchronize(data.device)
        self.seconds_ = time.perf_counter() - start
        self.access_ = data.touched()
        check_finite(new, self.name, f"after {len(self.history_)} recorded steps")
        new.eval()
        return new

    def check_requirements(self, data: UnlearnData) -> None:
        needed = self.required_data()
        missing = [k for k in sorted(needed) if getattr(data, k) is None]
        empty = [k for k in sorted(needed - {"stats"})
                 if getattr(data, k) is not None and len(getattr(data, k)) == 0]
        if missing or empty:
            parts = [f"missing: {', '.join(missing)}"] if missing else []
            parts += [f"empty: {', '.join(empty)}"] if empty else []
            raise MissingRequirementError(
                f"method {self.name!r} (as configured) requires "
                f"{', '.join(sorted(needed))} data; {'; '.join(parts)}."
            )

    def _unlearn(self, model: nn.Module, original: nn.Module, data: UnlearnData):
        raise NotImplementedError

    def record(self, **values: float) -> None:
        self.history_.append({k: float(v) for k, v in values.items()})


METHODS: Registry[type[Method]] = Registry("method")


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: register a method under its ``name``."""
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    METHODS.register(cls.name, doc)(cls)
    return cls


def build_method(name: str, **hparams: Any) -> Method:
    """Instantiate a registered method; unknown hyperparameters → ConfigError listing allowed."""
    cls = METHODS.get(name)
    allowed = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ConfigError(
            f"method {name!r} has no hyperparameter {', '.join(map(repr, unknown))}. "
            f"Allowed: {', '.join(sorted(allowed)) or '(none)'}."
        )
    clean = {k: coerce_hparam(k, v, allowed[k].type, allowed[k].default)
             for k, v in hparams.items()}
    return cls(**clean)


def coerce_hparam(key: str, value: Any, ftype: Any, default: Any) -> Any:
    """Coerce a CLI/YAML string to the hyperparameter's type (from its default, else from its
    annotation, e.g. ``float | None``); "none"/"null" gives None where None is allowed."""
    from scar.training.recipes import coerce

    if not isinstance(value, str):
        return value
    text = str(ftype)
    if value.strip().lower() in ("none", "null") and "None" in text:
        return None
    if default is not None and not callable(default):
        return coerce(key, value, default)
    for name, like in (("bool", False), ("int", 0), ("float", 0.0)):
        if name in text:
            return coerce(key, value, like)
    return value


def access_profile(method: Method, touched: dict[str, int] | None = None) -> str:
    """One line: what the method requires / may read / actually read, and whether it is retain-free.
    """
    uses = method.uses()
    words = [f"requires: {', '.join(sorted(method.required_data())) or '-'}",
             f"reads: {', '.join(sorted(uses)) or '-'}"]
    if note := method.access_note():
        words.append(note)
    if touched is not None:
        seen = [f"{k}={v}" for k, v in sorted(touched.items()) if v]
        words.append(f"images loaded: {', '.join(seen) or 'none'}")
        retain_free = touched.get("retain", 0) == 0
    else:
        retain_free = "retain" not in uses
    words.append("retain-free: " + ("yes" if retain_free else "no"))
    return "; ".join(words)


# ---------------------------------------------------------------- shared loop helpers
def cycle(loader: BatchLoader) -> Iterator:
    """Endless iteration over a loader (each pass reshuffles with the next seed)."""
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ConfigError("cannot cycle over an empty data source.")


@torch.inference_mode()
def predict(model: nn.Module, loader: BatchLoader) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, labels) of ``model`` over a loader, in eval mode; restores each module's
    mode."""
    preds, labels = [], []
    with eval_mode(model):
        for b in loader:
            preds.append(model(b.x).argmax(1))
            labels.append(b.y)
    if not preds:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    return torch.cat(preds), torch.cat(labels)


def accuracy_on(model: nn.Module, loader: BatchLoader) -> float:
    p, y = predict(model, loader)
    return float((p == y).float().mean()) if len(y) else float("nan")


@dataclass(frozen=True)
class ForgetCheck:
    """Outcome of one stopping-rule check over the forget set (see :func:`check_below`)."""

    reached: bool  # accuracy strictly below the target
    correct: int  # correct predictions counted
    seen: int  # images evaluated (the loader's first ``seen``): all, unless the check ended early
    total: int
    hits: torch.Tensor | None = None  # bool [seen]: which of them were classified correctly

    @property
    def exact(self) -> bool:
        return self.seen == self.total

    @property
    def accuracy(self) -> float:
        """The forget accuracy when ``exact``; otherwise a lower bound (the check ended early)."""
        return self.correct / self.total if self.total else float("nan")


@torch.inference_mode()
def check_below(model: nn.Module, loader: BatchLoader, target: float, *,
                z: float | None = None, min_seen: int = 256) -> ForgetCheck:
    """Is ``model``'s accuracy over ``loader`` strictly below ``target``? (eval mode; every
    module's mode restored)

    A *stop* is only ever decided on every image, exactly. A *no* ends the pass early:

    * always, as soon as the correct predictions counted so far rule the target out
      (accuracy < target ⇔ correct < target · total) — exact;
    * with ``z`` (for a loader in random order), also once the accuracy of the first
      ``min_seen`` or more images is more than ``z`` standard errors (finite-population
      corrected) above the target. That is a statistical decision: with z = 3 it wrongly says
      "not yet" about once in 700 checks, which only delays the stop to a later check.
    """
    total = len(loader.data)
    correct = seen = 0
    hits = []
    with eval_mode(model):
        for b in loader:
            hits.append(model(b.x).argmax(1) == b.y)
            correct += int(hits[-1].sum())
            seen += len(hits[-1])
            if correct >= target * total or (
                    z is not None and min_seen <= seen < total
                    and _clearly_above(correct, seen, total, target, z)):
                break
    mask = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool)
    return ForgetCheck(reached=len(mask) == total and correct < target * total,
                       correct=correct, seen=len(mask), total=total, hits=mask)


def _clearly_above(correct: int, seen: int, total: int, target: float, z: float) -> bool:
    p = correct / seen
    var = max(p * (1 - p), 1.0 / seen) / seen * (1 - seen / total)
    return p - z * math.sqrt(var) > target


@contextmanager
def seeded(data: UnlearnData) -> Iterator[torch.Generator]:
    """Seed torch with ``data.seed`` for the block and restore the caller's RNG state afterwards.

    Yields a CPU generator for the method's own sampling (random labels, ...); the global seed
    covers what the model draws itself (dropout). Forking keeps an unlearning call from
    changing the random stream of whatever runs after it (every method runs its loop in it).
    """
    devices = []
    if data.device.type == "cuda":
        index = data.device.index
        devices = [torch.cuda.current_device() if index is None else index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(data.seed)
        yield torch.Generator().manual_seed(data.seed)


def set_bn_train(model: nn.Module, train_bn: bool) -> None:
    """Model in train mode, with BatchNorm layers in train (reference) or eval mode."""
    model.train()
    if not train_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def fused_if_supported(params: list[nn.Parameter]) -> dict[str, bool]:
    """``{"fused": True}`` for torch's Adam/AdamW when every parameter allows the fused kernel
    (floating point, on CPU or CUDA), else ``{}``. On a CPU ResNet-18 the fused step takes 18 ms
    instead of 81 ms (the for-loop implementation), about a tenth of a SCAR step."""
    ok = params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda")
                        for p in params)
    return {"fused": True} if ok else {}


# HR stopping margin. The reference stops below A_test − 0.015; we stop below A_test (margin 0):
# the oracle's forget accuracy is about its test accuracy (Fashion-MNIST 10% removal, seed 0:
# 91.47% train-forget vs 91.22% test), so the reference margin asks for 1.5 points *more*
# forgetting than retraining shows, and on a model that barely overfits that costs test accuracy
# (SCAR, seed 1: test 91.20% → 87.18% with margin 0.015, → 89.32% with margin 0). Pass
# hr_margin=0.015 for the reference rule (the paper grids in configs/ do).
HR_MARGIN = 0.0


def stop_target(data: UnlearnData, hr_margin: float = HR_MARGIN) -> float:
    """Forget-accuracy target of the stopping rule (spec §5): CR < 0.01; HR < A_test − hr_margin
    (reference margin 0.015, default :data:`HR_MARGIN`)."""
    if data.scenario == "CR":
        return 0.01
    if data.original_test_acc is None:
        raise MissingRequirementError(
            "random removal (HR) stops when forget accuracy falls below the original model's test "
            "accuracy minus hr_margin: pass original_test_acc (it is in the original checkpoint's "
            "sidecar)."
        )
    return data.original_test_acc - hr_margin
