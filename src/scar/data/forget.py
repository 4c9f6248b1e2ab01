"""Forget specifications (what to delete) and the train/test splits they induce.

A :class:`ForgetSpec` is a small, serialisable description of a deletion request: whole classes
(CR scenario), a seeded random sample of training images (HR scenario), or an explicit index file.
:func:`make_splits` turns it into forget / retain / test sets. Random forget sets are sampled with a
seeded ``torch.Generator`` and can be saved with :func:`save_indices`, so every method and the
oracle use exactly the same set.
"""

from __future__ import annotations

import json
import operator
import os
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from scar.data.base import ImageSet
from scar.data.datasets import DatasetBundle
from scar.errors import ConfigError, MissingDataError, check_choice

ForgetKind = Literal["class", "random", "indices"]
FORGET_KINDS: tuple[str, ...] = ("class", "random", "indices")


#: The two deletion scenarios: class removal (CR, a ForgetSpec of kind "class") and random /
#: index-file removal (HR, kinds "random" and "indices").
SCENARIOS = ("CR", "HR")


def scenario_of(spec: ForgetSpec) -> str:
    """CR for class removal, HR for random / index-file removal."""
    return "CR" if spec.kind == "class" else "HR"


@dataclass(frozen=True)
class ForgetSpec:
    """What to forget. Build with :meth:`for_classes`, :meth:`random` or :meth:`from_file`."""

    kind: ForgetKind
    classes: tuple[int, ...] = ()
    count: int | None = None
    fraction: float | None = None
    seed: int = 0
    indices_file: str | None = None

    def __post_init__(self) -> None:
        check_choice("ForgetSpec kind", self.kind, FORGET_KINDS)
        object.__setattr__(self, "classes", tuple(as_int(c) for c in self.classes))
        if self.kind == "class":
            validate_classes(self.classes)
        elif self.kind == "random":
            validate_amount(self.count, self.fraction)
        elif not self.indices_file:
            raise ConfigError("ForgetSpec kind 'indices' needs indices_file (a JSON index file).")
        given = {
            "classes": bool(self.classes),
            "count": self.count is not None,
            "fraction": self.fraction is not None,
            "indices_file": self.indices_file is not None,
        }
        applies = {
            "class": {"classes"},
            "random": {"count", "fraction"},
            "indices": {"indices_file"},
        }
        stray = sorted(k for k, v in given.items() if v and k not in applies[self.kind])
        if stray:
            raise ConfigError(
                f"ForgetSpec of kind {self.kind!r} only uses {sorted(applies[self.kind])}; got "
                f"values for {stray}."
            )

    @classmethod
    def for_classes(cls, *classes: int) -> ForgetSpec:
        """Class removal: ``for_classes(3)``, ``for_classes(3, 5)`` or ``for_classes([3, 5])``."""
        flat: list = []
        for c in classes:
            flat.extend(c if isinstance(c, (list, tuple)) else [c])
        return cls(kind="class", classes=tuple(flat))

    @classmethod
    def random(
        cls, count: int | None = None, fraction: float | None = None, seed: int = 0
    ) -> ForgetSpec:
        """Random (homogeneous) removal of ``count`` images or a ``fraction`` of the train set."""
        return cls(kind="random", count=count, fraction=fraction, seed=seed)

    @classmethod
    def from_file(cls, path: str | Path) -> ForgetSpec:
        """Removal of the training images listed in a JSON index file (see :func:`save_indices`)."""
        return cls(kind="indices", indices_file=str(path))

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "classes": list(self.classes),
            "count": self.count,
            "fraction": self.fraction,
            "seed": self.seed,
            "indices_file": self.indices_file,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ForgetSpec:
        allowed = {"kind", "classes", "count", "fraction", "seed", "indices_file"}
        unknown = sorted(set(d) - allowed)
        if unknown or "kind" not in d:
            raise ConfigError(
                f"A forget spec dict needs 'kind' and may hold {sorted(allowed)}; got keys "
                f"{sorted(d)}."
            )
        return cls(
            kind=d["kind"],
            classes=tuple(d.get("classes") or ()),
            count=d.get("count"),
            fraction=d.get("fraction"),
            seed=int(d.get("seed") or 0),
            indices_file=d.get("indices_file"),
        )

    def describe(self) -> str:
        if self.kind == "class":
            word = "class" if len(self.classes) == 1 else "classes"
            return f"class removal ({word} {', '.join(map(str, self.classes))})"
        if self.kind == "random":
            amount = f"{self.count} images" if self.count is not None else f"{self.fraction:.1%}"
            return f"random removal ({amount}, seed {self.seed})"
        return f"removal of the indices in {self.indices_file}"


def as_int(value: object) -> object:
    """Integer-like values (numpy / torch ints) as plain ints; anything else unchanged."""
    if isinstance(value, bool):
        return value
    try:
        return operator.index(value)
    except TypeError:
        return value


def validate_classes(classes: tuple, num_classes: int | None = None) -> None:
    """Class ids must be distinct non-negative ints (below ``num_classes`` when known)."""
    if not classes:
        raise ConfigError("Class removal needs at least one class id; got none.")
    bad = [c for c in classes if isinstance(c, bool) or not isinstance(c, int) or c < 0]
    if bad:
        raise ConfigError(f"Class ids must be non-negative integers; got {bad}.")
    if len(set(classes)) != len(classes):
        raise ConfigError(f"Class ids must be distinct; got {list(classes)}.")
    if num_classes is not None:
        out = [c for c in classes if c >= num_classes]
        if out:
            raise ConfigError(
                f"Class ids must be in [0, {num_classes - 1}] for this {num_classes}-class "
                f"dataset; got {out}."
            )
        if len(classes) >= num_classes:
            raise ConfigError(
                f"Cannot remove all {num_classes} classes (nothing would be retained); got "
                f"{list(classes)}."
            )


def validate_amount(
    count: int | None, fraction: float | None, num_train: int | None = None
) -> None:
    """Exactly one of ``count`` (in [1, N-1]) or ``fraction`` (in (0, 1)) must be given."""
    if (count is None) == (fraction is None):
        raise ConfigError(
            f"Random removal needs exactly one of count or fraction; got count={count!r}, "
            f"fraction={fraction!r}."
        )
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"Forget count must be an integer >= 1; got {count!r}.")
        if num_train is not None and count > num_train - 1:
            raise ConfigError(
                f"Forget count must be in [1, {num_train - 1}] for a training set of {num_train} "
                f"images; got {count}."
            )
    elif (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not (0 < fraction < 1)
    ):
        raise ConfigError(f"Forget fraction must be in (0, 1); got {fraction!r}.")


def forget_count(num_train: int, count: int | None, fraction: float | None) -> int:
    """Number of images to forget; a fraction is rounded and must give between 1 and N-1."""
    validate_amount(count, fraction, num_train)
    if count is not None:
        return count
    k = round(fraction * num_train)
    if not 1 <= k <= num_train - 1:
        raise ConfigError(
            f"Forget fraction {fraction} of {num_train} training images gives {k} images; it must "
            f"give between 1 and {num_train - 1}."
        )
    return k


def sample_forget_indices(
    num_train: int, count: int | None = None, fraction: float | None = None, seed: int = 0
) -> torch.Tensor:
    """Sorted, distinct int64 positions in [0, num_train), seeded by ``seed``."""
    k = forget_count(num_train, count, fraction)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(num_train, generator=g)[:k].sort().values


def retain_indices(num_train: int, forget_indices: torch.Tensor) -> torch.Tensor:
    """All positions in [0, num_train) that are not in ``forget_indices`` (sorted)."""
    forget_indices = torch.as_tensor(forget_indices, dtype=torch.long)
    if forget_indices.numel() and (forget_indices.min() < 0 or forget_indices.max() >= num_train):
        raise ConfigError(
            f"Forget indices must be in [0, {num_train - 1}]; got values from "
            f"{int(forget_indices.min())} to {int(forget_indices.max())}."
        )
    keep = torch.ones(num_train, dtype=torch.bool)
    keep[forget_indices] = False
    return torch.nonzero(keep).flatten()


# --------------------------------------------------------------------------------------------
# Index files
# --------------------------------------------------------------------------------------------


def save_indices(path: str | Path, indices: torch.Tensor, meta: dict | None = None) -> Path:
    """Write ``{"indices": [...], **meta}`` as JSON atomically (temp file + os.replace).

    ``meta`` usually holds ``num_train``, ``seed`` and ``dataset``; ``num_train`` is checked.
    """
    path = Path(path)
    values = sorted(int(i) for i in torch.as_tensor(indices).flatten().tolist())
    meta = dict(meta or {})
    if "indices" in meta:
        raise ConfigError("save_indices meta must not contain the key 'indices'.")
    validate_index_values(values, meta.get("num_train"), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"indices": values, **meta}, f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _first(values: list, n: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:n])
    return f"[{shown}{', …' if len(values) > n else ''}] ({len(values)} in all)"


def validate_index_values(values: list, num_train: int | None, source: str) -> None:
    """Indices must be a non-empty list of distinct ints in [0, num_train)."""
    if not values:
        raise ConfigError(f"{source}: the forget index list is empty.")
    not_int = [v for v in values if isinstance(v, bool) or not isinstance(v, int)]
    if not_int:
        raise ConfigError(f"{source}: indices must be integers; got {_first(not_int)}.")
    dups = sorted(v for v, k in Counter(values).items() if k > 1)
    if dups:
        raise ConfigError(f"{source}: indices must be distinct; duplicated: {_first(dups)}.")
    if num_train is not None:
        out = sorted(v for v in values if not 0 <= v < num_train)
        if out:
            raise ConfigError(
                f"{source}: indices must be in [0, {num_train - 1}] (training set of {num_train} "
                f"images); out of range: {_first(out)}."
            )
    else:
        negative = sorted(v for v in values if v < 0)
        if negative:
            raise ConfigError(f"{source}: indices must be >= 0; got {_first(negative)}.")


def load_indices(path: str | Path, num_train: int | None = None) -> torch.Tensor:
    """Read and validate a forget index file; returns sorted int64 indices.

    The file is ``{"indices": [...], "num_train": N, ...}`` (a bare JSON list is accepted too).
    When both ``num_train`` and the file's ``num_train`` are known they must agree.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Forget index file {path} is a folder; give the JSON file written "
                          "by `scar forget-set sample`.")
    if not path.is_file():
        raise MissingDataError(f"Forget index file {path} does not exist.")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Forget index file {path} is not valid JSON: {exc}") from exc
    if isinstance(data, list):
        data = {"indices": data}
    if not isinstance(data, dict) or not isinstance(data.get("indices"), list):
        raise ConfigError(
            f"Forget index file {path} must hold a JSON object with an 'indices' list (or a bare "
            f"list); got {type(data).__name__}"
            f"{' with keys ' + str(sorted(data)) if isinstance(data, dict) else ''}."
        )
    file_n = data.get("num_train")
    if file_n is not None and (isinstance(file_n, bool) or not isinstance(file_n, int)):
        raise ConfigError(f"Forget index file {path}: 'num_train' must be an integer (the "
                          f"training set's size); got {file_n!r} ({type(file_n).__name__}).")
    if num_train is not None and file_n is not None and file_n != num_train:
        raise ConfigError(
            f"Forget index file {path} was made for a training set of {file_n} images, but this "
            f"training set has {num_train}."
        )
    n = num_train if num_train is not None else file_n
    validate_index_values(data["indices"], n, f"Forget index file {path}")
    return torch.tensor(sorted(data["indices"]), dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


@dataclass
class Splits:
    """The sets a deletion request induces.

    ``forget_indices`` are positions in the full train set; ``train_retain`` is exactly the train
    set without them (what the oracle trains on). For random / index removal ``test_forget`` is
    empty and ``test_retain`` is the whole test set.
    """

    train_forget: ImageSet
    train_retain: ImageSet
    test: ImageSet
    test_forget: ImageSet
    test_retain: ImageSet
    forget_indices: torch.Tensor
    removed_classes: tuple[int, ...]
    spec: ForgetSpec


def class_indices(labels: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    """Sorted positions whose label is one of ``classes``."""
    mask = torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))
    return torch.nonzero(mask).flatten()


def forget_indices_for(bundle: DatasetBundle, spec: ForgetSpec) -> torch.Tensor:
    """The train positions ``spec`` removes, validated against the dataset."""
    n = len(bundle.train)
    if spec.kind == "class":
        validate_classes(spec.classes, bundle.info.num_classes)
        idx = class_indices(bundle.train.labels, spec.classes)
        if idx.numel() == 0:
            raise ConfigError(
                f"Classes {list(spec.classes)} have no training images in {bundle.info.name}; "
                "the forget set would be empty."
            )
    elif spec.kind == "random":
        idx = sample_forget_indices(n, spec.count, spec.fraction, spec.seed)
    else:
        idx = load_indices(spec.indices_file, num_train=n)
    if idx.numel() >= n:
        raise ConfigError(
            f"{spec.describe()} would remove all {n} training images; nothing would be retained."
        )
    return idx


def make_splits(bundle: DatasetBundle, spec: ForgetSpec) -> Splits:
    """Forget / retain / test sets for ``spec`` on ``bundle``."""
    forget = forget_indices_for(bundle, spec)
    retain = retain_indices(len(bundle.train), forget)
    test = bundle.test
    if spec.kind == "class":
        test_forget_idx = class_indices(test.labels, spec.classes)
        test_retain_idx = retain_indices(len(test), test_forget_idx)
        test_forget, test_retain = test.subset(test_forget_idx), test.subset(test_retain_idx)
    else:
        test_forget, test_retain = test.subset(torch.empty(0, dtype=torch.long)), test
    return Splits(
        train_forget=bundle.train.subset(forget),
        train_retain=bundle.train.subset(retain),
        test=test,
        test_forget=test_forget,
        test_retain=test_retain,
        forget_indices=forget,
        removed_classes=tuple(spec.classes) if spec.kind == "class" else (),
        spec=spec,
    )
