"""The plain-data facade: your own ``nn.Module`` and your own data, no toolkit types needed.

:func:`unlearn`, :func:`evaluate` and :func:`class_statistics` take a model and data as a
``Dataset``, a ``DataLoader``, an ``(images, labels)`` pair of tensors or a bare image tensor, and
convert them into the toolkit's own types (:class:`~scar.data.base.TensorImages`, one
:class:`~scar.data.base.InputSpec`, :class:`~scar.methods.base.UnlearnData`, an in-memory
:class:`~scar.checkpoint.Checkpoint`) before calling the functions the CLI and the grid runner
call (:func:`~scar.experiments.unlearn.run_unlearning`,
:func:`~scar.evaluation.audit.model_metrics`, :func:`~scar.methods.statistics.class_statistics`).
There is no second unlearning pipeline here, only conversions.

**Images are what the model takes.** Float images are taken to be exactly the model's input (as
a ``DataLoader`` with ``Normalize`` yields them). The toolkit stores images as uint8 pixels and
normalises each batch with an :class:`InputSpec`, so the floats are mapped back to pixels:
with ``mean`` / ``std`` given, ``pixel = x * std + mean`` (the ``Normalize`` you applied); without
them, images already in [0, 1] are taken as pixels (mean 0, std 1), and other images get the
per-channel affine map that sends their smallest value to pixel 0 and their largest to 255
(:func:`infer_input_spec`). Either way the model then sees its inputs again up to 8-bit rounding,
and toolkit surrogate sources (``surrogate="natural-patches"``) are normalised the same way.
uint8 images are pixels; ``mean`` / ``std`` then say how the model expects them normalised.

**The data-access profile counts statistics.** Class statistics computed with
:func:`class_statistics` record the images they read; passed to :func:`unlearn` they count in its
profile (labelled images of a removed class as ``forget``, of a kept class as ``retain``; images
grouped by the model's predictions as ``surrogate``), so statistics from training data make the
profile say ``retain-free: no``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from scar.data.base import ImageSet, InputSpec, TensorImages
from scar.errors import ConfigError, MissingRequirementError, check_choice

log = logging.getLogger(__name__)

#: What the facade accepts as data: a Dataset of ``(image, label)`` items, a DataLoader of
#: ``(images, labels)`` batches, an ``(images, labels)`` pair, or images alone (surrogates).
DataLike = Union[Dataset, DataLoader, Tensor, "tuple[Tensor, Tensor]", ImageSet]
#: Batch size used to read a Dataset.
READ_BATCH = 256
#: How far (in pixels of 0..255) un-normalised images may fall outside [0, 255] before the given
#: mean / std are declared wrong (rounding in the user's own pipeline stays well inside it).
PIXEL_SLACK = 2.0
STATS_GROUPING = ("labels", "predictions")


# ---------------------------------------------------------------- reading the user's data
@dataclass(frozen=True)
class RawImages:
    """Images as the user gave them (float model inputs or uint8 pixels) with int64 labels."""

    images: Tensor
    labels: Tensor | None

    @property
    def is_pixels(self) -> bool:
        return self.images.dtype == torch.uint8


@functools.singledispatch
def _batches(data: Any, what: str) -> Iterator[tuple[Tensor, Tensor | None]]:
    raise ConfigError(
        f"{what}: expected a torch Dataset, a DataLoader, an (images, labels) pair of tensors or "
        f"an image tensor; got {type(data).__name__}."
    )


@_batches.register
def _(data: DataLoader, what: str) -> Iterator[tuple[Tensor, Tensor | None]]:
    for batch in data:
        yield _split_batch(batch, what)


@_batches.register
def _(data: Dataset, what: str) -> Iterator[tuple[Tensor, Tensor | None]]:
    yield from _batches(DataLoader(data, batch_size=READ_BATCH, shuffle=False), what)


@_batches.register
def _(data: Tensor, what: str) -> Iterator[tuple[Tensor, Tensor | None]]:
    yield data, None


@_batches.register
def _(data: tuple, what: str) -> Iterator[tuple[Tensor, Tensor | None]]:
    yield _split_batch(data, what)


@_batches.register
def _(data: ImageSet, what: str) -> Iterator[tuple[Tensor, Tensor | None]]:
    yield data.load(torch.arange(len(data))), data.labels


def _split_batch(batch: Any, what: str) -> tuple[Tensor, Tensor | None]:
    """``(images, labels, ...)`` or ``images`` → (images, labels or None)."""
    if isinstance(batch, Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        labels = batch[1] if len(batch) > 1 else None
        return batch[0], None if labels is None else torch.as_tensor(labels)
    raise ConfigError(
        f"{what}: each item must be an image tensor or an (image, label) pair of tensors; got "
        f"{type(batch).__name__}. Convert PIL images with torchvision.transforms.ToTensor()."
    )


def read_images(data: DataLike, what: str, *, labels_needed: bool = True) -> RawImages:
    """Every image (and label) of ``data`` in memory, as the user gave them."""
    images, labels = [], []
    for x, y in _batches(data, what):
        images.append(x.detach().cpu())
        labels.append(y)
    if not images or sum(len(x) for x in images) == 0:
        raise ConfigError(f"{what} holds no images.")
    x = torch.cat(images)
    if x.dim() != 4 or not (x.is_floating_point() or x.dtype == torch.uint8):
        raise ConfigError(
            f"{what}: images must be float (the model's input) or uint8 tensors of shape "
            f"[N, C, H, W]; got {x.dtype} {tuple(x.shape)}."
        )
    if any(y is None for y in labels):
        if labels_needed:
            raise ConfigError(f"{what}: labels are needed; give (images, labels) items.")
        return RawImages(x, None)
    return RawImages(x, torch.cat([y.reshape(-1).cpu() for y in labels]).to(torch.long))


# ---------------------------------------------------------------- normalisation
def _per_channel(name: str, value: float | Sequence[float], channels: int) -> tuple[float, ...]:
    values = (value,) * channels if isinstance(value, (int, float)) else tuple(value)
    if len(values) != channels:
        raise ConfigError(f"{name} needs 1 or {channels} values (one per channel); got {value!r}.")
    return tuple(float(v) for v in values)


def infer_input_spec(raws: Iterable[RawImages], mean: float | Sequence[float] | None = None,
                     std: float | Sequence[float] | None = None) -> InputSpec:
    """The :class:`InputSpec` that maps uint8 pixels back to the given images (module docstring):
    ``mean`` / ``std`` when given, else pixels in [0, 1], else each channel's value range."""
    raws = list(raws)
    shapes = {tuple(r.images.shape[1:]) for r in raws}
    if len(shapes) != 1:
        raise ConfigError(f"all images must have one shape [C, H, W]; got {sorted(shapes)}.")
    channels, size = raws[0].images.shape[1], raws[0].images.shape[2]
    if (mean is None) != (std is None):
        raise ConfigError("give both mean and std (the normalisation of your images), or neither.")
    if mean is not None:
        return InputSpec(channels, size, _per_channel("mean", mean, channels),
                         _per_channel("std", std, channels))
    floats = [r.images for r in raws if not r.is_pixels]
    if not floats:
        return InputSpec(channels, size, (0.0,) * channels, (1.0,) * channels)
    lo = torch.stack([x.amin(dim=(0, 2, 3)) for x in floats]).amin(0).double()
    hi = torch.stack([x.amax(dim=(0, 2, 3)) for x in floats]).amax(0).double()
    if bool((lo >= 0).all() and (hi <= 1).all()):
        return InputSpec(channels, size, (0.0,) * channels, (1.0,) * channels)
    span = (hi - lo).clamp_min(1e-12)
    spec = InputSpec(channels, size, tuple((-lo / span).tolist()), tuple((1 / span).tolist()))
    log.info("images are not in [0, 1] and no mean/std was given: inferred mean %s, std %s from "
             "their value range (pass mean= and std= to set them)", spec.mean, spec.std)
    return spec


def to_pixels(raw: RawImages, spec: InputSpec, what: str) -> Tensor:
    """uint8 pixels whose normalisation with ``spec`` gives back ``raw``'s float images."""
    if raw.is_pixels:
        return raw.images
    mean = torch.tensor(spec.mean, dtype=torch.float64)[None, :, None, None]
    std = torch.tensor(spec.std, dtype=torch.float64)[None, :, None, None]
    pixels = (raw.images.double() * std + mean) * 255.0
    lo, hi = float(pixels.min()), float(pixels.max())
    if lo < -PIXEL_SLACK or hi > 255.0 + PIXEL_SLACK:
        raise ConfigError(
            f"{what}: with mean={list(spec.mean)} and std={list(spec.std)} the images map to "
            f"pixel values {lo:.1f}..{hi:.1f}, outside 0..255; give the mean and std your images "
            "were normalised with (or neither, to infer them)."
        )
    return pixels.round_().clamp_(0, 255).to(torch.uint8)


def as_image_set(raw: RawImages, spec: InputSpec, what: str) -> TensorImages:
    labels = raw.labels if raw.labels is not None else torch.zeros(len(raw.images),
                                                                   dtype=torch.long)
    return TensorImages(to_pixels(raw, spec, what), labels)


# ---------------------------------------------------------------- model helpers
def model_device(model: nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` resolved, else where the model's parameters are."""
    from scar.utils import resolve_device

    if device is not None:
        return resolve_device(device)
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def feature_model(model: nn.Module, head: str | None, example: TensorImages, spec: InputSpec):
    """The model's head found and checked with one forward pass on CPU copies of its inputs."""
    from scar.data.base import normalize
    from scar.models.adapter import FeatureModel

    x = normalize(example.load(torch.arange(min(2, len(example)))), spec)
    param = next(model.parameters(), None)
    return FeatureModel(model, head=head, example=x.to(param.device if param is not None
                                                       else "cpu"))


# ---------------------------------------------------------------- class statistics
@dataclass(frozen=True)
class ClassStatistics:
    """Class statistics and the images they were computed from (for the data-access profile).

    ``by="labels"``: ``stats.counts[c]`` labelled images of class ``c`` were read;
    ``by="predictions"``: images (surrogates) grouped by the model's predicted class.
    """

    stats: Any  # scar.methods.mahalanobis.ClassStats
    by: str

    @property
    def images_read(self) -> int:
        return int(self.stats.counts.sum())

    def access(self, removed_classes: Sequence[int]) -> dict[str, int]:
        """The images these statistics read, by the data kinds of the profile."""
        if self.by == "predictions":
            return {"surrogate": self.images_read}
        counts = self.stats.counts.to(torch.long)
        forget = int(counts[list(removed_classes)].sum()) if removed_classes else 0
        return {"forget": forget, "retain": self.images_read - forget}


def class_statistics(model: nn.Module, data: DataLike, *, by: str = "labels",
                     mean: float | Sequence[float] | None = None,
                     std: float | Sequence[float] | None = None, head: str | None = None,
                     delta: float | None = None, device: str | torch.device | None = None
                     ) -> ClassStatistics:
    """Per-class statistics of ``model``'s features over ``data`` (SCAR's ``stats=stored``).

    ``by="labels"`` groups labelled images by their labels (training images: they count as
    forget / retain images in :func:`unlearn`'s profile); ``by="predictions"`` groups unlabelled
    images (surrogates) by the model's predictions.
    """
    from scar import statistics

    check_choice("by", by, STATS_GROUPING)
    raw = read_images(data, "data", labels_needed=by == "labels")
    spec = infer_input_spec([raw], mean, std)
    images = as_image_set(raw, spec, "data")
    fm = feature_model(model, head, images, spec)
    kw = {} if delta is None else {"delta": delta}
    stats = statistics.class_statistics(fm, images, spec, num_classes=fm.num_classes, by=by,
                                        device=model_device(model, device), **kw)
    return ClassStatistics(stats, by)


# ---------------------------------------------------------------- unlearning
@dataclass(frozen=True)
class UnlearnResult:
    """What :func:`unlearn` did: the method and its settings, its per-step history, the data it
    read (``images_loaded``, ``profile``: the data-access profile line) and its time."""

    method: str
    hparams: dict[str, Any]
    scenario: str
    removed_classes: tuple[int, ...]
    seconds: float
    history: list[dict[str, float]]
    images_loaded: dict[str, int]
    profile: str
    input_spec: InputSpec
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def retain_free(self) -> bool:
        return self.images_loaded.get("retain", 0) == 0


def unlearn(model: nn.Module, *, forget: DataLike, surrogate: DataLike | str | None = None,
            method: str = "scar", forget_classes: Sequence[int] | None = None,
            retain: DataLike | None = None,
            stats: ClassStatistics | str | Any | None = None,
            test_accuracy: float | None = None, mean: float | Sequence[float] | None = None,
            std: float | Sequence[float] | None = None, head: str | None = None,
            preset: str | None = None, surrogate_n: int | None = None, seed: int = 0,
            device: str | torch.device | None = None, progress: bool = False,
            **hparams: Any) -> tuple[nn.Module, UnlearnResult]:
    """Unlearn ``forget`` from ``model``; returns ``(new model, result)``. ``model`` is not
    changed.

    ``forget_classes`` given: class removal (CR) of those classes; else random removal (HR) of
    the ``forget`` images, which needs the original model's ``test_accuracy`` (its stopping
    rule). ``surrogate``: out-of-distribution images (data, or a toolkit source name such as
    ``"natural-patches"``, ``surrogate_n`` images of it). ``retain``: only for methods that read
    it. ``stats``: class statistics (:func:`class_statistics`, or a ``ClassStats``) for SCAR's
    default ``stats="stored"``; a string is SCAR's hyperparameter of that name
    (``stats="surrogate"``: data-free, no statistics needed). Other keywords are the method's
    hyperparameters (``scar list methods``), over the ``preset``'s values.
    """
    from scar.checkpoint import Checkpoint
    from scar.experiments.unlearn import run_unlearning, surrogate_size
    from scar.methods import UnlearnData, build_method
    from scar.methods.presets import with_preset
    from scar.models.base import ModelSpec

    if isinstance(stats, str):  # SCAR's hyperparameter of the same name (stats="surrogate")
        hparams, stats = {**hparams, "stats": stats}, None
    built = build_method(method, **with_preset(method, hparams, preset, None))
    scenario = "CR" if forget_classes else "HR"
    raws = {"forget": read_images(forget, "forget")}
    if retain is not None:
        raws["retain"] = read_images(retain, "retain")
    if surrogate is not None and not isinstance(surrogate, str):
        raws["surrogate"] = read_images(surrogate, "surrogate", labels_needed=False)
    spec = infer_input_spec(raws.values(), mean, std)
    sets = {kind: as_image_set(raw, spec, kind) for kind, raw in raws.items()}
    if isinstance(surrogate, str):
        sets["surrogate"] = _named_surrogate(surrogate, spec,
                                             surrogate_size(surrogate, surrogate_n), seed)
    fm = feature_model(model, head, sets["forget"], spec)
    class_stats = stats.stats if isinstance(stats, ClassStatistics) else stats
    check_unlearn_inputs(built, scenario, test_accuracy, class_stats, sets)
    removed = tuple(sorted(int(c) for c in forget_classes or ()))
    ck = Checkpoint(model=model, model_spec=ModelSpec(type(model).__name__, fm.num_classes,
                                                      spec.channels, spec.size, head=head),
                    input_spec=spec, meta={"test_acc": test_accuracy})
    data = UnlearnData(input_spec=spec, num_classes=fm.num_classes, scenario=scenario,
                       removed_classes=removed, forget=sets["forget"], retain=sets.get("retain"),
                       surrogate=sets.get("surrogate"), stats=class_stats,
                       original_test_acc=test_accuracy, device=model_device(model, device),
                       seed=seed, head=head, progress=progress)
    outcome = run_unlearning(ck, built, data, also_read=stats_access(stats, removed))
    result = UnlearnResult(
        method=built.name, hparams=built.hparams(), scenario=scenario, removed_classes=removed,
        seconds=outcome.seconds, history=list(getattr(built, "history_", [])),
        images_loaded=outcome.touched, profile=outcome.profile, input_spec=spec,
        info=outcome.info)
    return outcome.model.to(model_device(model, None)), result


def _named_surrogate(name: str, spec: InputSpec, n: int | None, seed: int) -> ImageSet:
    from scar.data.surrogates import load_surrogate

    return load_surrogate(name, channels=spec.channels, size=spec.size, n=n, seed=seed)


def stats_access(stats: ClassStatistics | Any | None, removed: Sequence[int]) -> dict[str, int]:
    """Images read by caller-computed statistics: a bare ``ClassStats`` (no record of its
    images) is counted as labelled images by its per-class counts, the conservative reading."""
    if stats is None:
        return {}
    wrapped = stats if isinstance(stats, ClassStatistics) else ClassStatistics(stats, "labels")
    return wrapped.access(removed)


def check_unlearn_inputs(method: Any, scenario: str, test_accuracy: float | None,
                         stats: Any, sets: Mapping[str, ImageSet]) -> None:
    """Before any work: what the configured method needs and the call lacks, with the keyword
    that gives it."""
    if scenario == "HR" and test_accuracy is None:
        raise MissingRequirementError(
            "random removal (no forget_classes) stops when the forget accuracy falls below the "
            "original model's test accuracy: pass test_accuracy= (a fraction in [0, 1]), or "
            "forget_classes= for class removal."
        )
    needed = method.required_data()
    how = {
        "surrogate": "surrogate= (images, a Dataset / DataLoader, or a source name such as "
                     "'natural-patches')",
        "retain": "retain= (the training images to keep)",
        "stats": "stats=scar.class_statistics(model, train_data) (counted in the data-access "
                 "profile), or the hyperparameter stats='surrogate' (data-free)",
    }
    have = {**sets, "stats": stats}
    missing = [k for k in sorted(needed) if have.get(k) is None and k in how]
    if missing:
        raise MissingRequirementError(
            f"method {method.name!r} (as configured) needs {', '.join(missing)}: pass "
            + "; ".join(how[k] for k in missing) + "."
        )


# ---------------------------------------------------------------- evaluation
def evaluate(model: nn.Module, *, forget: DataLike, retain: DataLike | None = None,
             test: DataLike | None = None, forget_classes: Sequence[int] | None = None,
             original: nn.Module | None = None, mia: bool = False,
             mean: float | Sequence[float] | None = None,
             std: float | Sequence[float] | None = None, seed: int = 0,
             device: str | torch.device | None = None) -> dict[str, float]:
    """The audit of ``model`` on a forget request, with the toolkit's metric keys.

    ``acc/train_forget`` (``forget``), ``acc/train_retain`` (``retain``), ``acc/test`` and, in
    class removal, ``acc/test_forget`` / ``acc/test_retain`` (``test``); the membership attack
    (``mia=True``, needs ``test``) and AUS (needs ``test`` and the ``original`` model, whose
    accuracy is A_or).
    """
    from scar.data.base import BatchLoader
    from scar.data.forget import class_indices
    from scar.evaluation.audit import add_aus, model_metrics, original_reference

    scenario = "CR" if forget_classes else "HR"
    raws = {"train_forget": read_images(forget, "forget")}
    for name, data in (("train_retain", retain), ("test", test)):
        if data is not None:
            raws[name] = read_images(data, name.replace("train_", ""))
    if mia and test is None:
        raise MissingRequirementError("the membership attack (mia=True) needs test= images "
                                      "(its non-members).")
    spec = infer_input_spec(raws.values(), mean, std)
    sets = {name: as_image_set(raw, spec, name) for name, raw in raws.items()}
    if "test" in sets and scenario == "CR":
        classes = tuple(int(c) for c in forget_classes)
        idx = class_indices(sets["test"].labels, classes)
        keep = torch.ones(len(sets["test"]), dtype=torch.bool)
        keep[idx] = False
        sets["test_forget"] = sets["test"].subset(idx)
        sets["test_retain"] = sets["test"].subset(keep.nonzero().flatten())
    dev = model_device(model, device)
    loaders = {name: BatchLoader(s, spec, batch_size=1024, device=dev) for name, s in sets.items()}

    def metrics_of(m: nn.Module, attack: bool) -> dict[str, Any]:
        # Plain floats only (no dest/shares list): the facade's documented keys.
        return model_metrics(m.to(dev), loaders, scenario, mia=attack, seed=seed,
                             destination=False)[0]

    metrics = metrics_of(model, mia)
    if original is not None and "test" in sets:
        a_or = original_reference(metrics_of(original, False), scenario)
        add_aus(metrics, a_or, scenario)
    return metrics
