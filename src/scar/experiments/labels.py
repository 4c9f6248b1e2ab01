"""How results rows are named in tables and plots: the row label of a method run, the order
of methods (original and retrain first), the natural sort of forget ids and the class names of
a class-removal request. Shared by
:mod:`scar.experiments.report` and :mod:`scar.experiments.plots` (which draw from the same rows)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: The reference rows of every forget request (methods of those names are not unlearning runs).
ORIGINAL = "original"
RETRAIN = "retrain"
#: An empty cell: no value, or none that means anything (the original's unlearning time).
DASH = "—"


def natural_key(text: Any) -> tuple:
    """Sort key with numbers compared as numbers: class2 < class10."""
    parts = re.split(r"(\d+)", str(text))
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def table_key(row: Mapping[str, Any]) -> tuple[str, str, str]:
    return (str(row.get("dataset")), str(row.get("model")), str(row.get("scenario")).upper())


def _hparam_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _varying_keys(settings: Iterable[str]) -> list[str]:
    """Hyper-parameter names whose values differ among the JSON-encoded ``settings``."""
    decoded = [json.loads(s) for s in sorted(settings)]
    names = set().union(*decoded)
    return sorted(k for k in names if len({_hparam_text(h.get(k)) for h in decoded}) > 1)


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else _hparam_text(value)


def method_labels(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Row label per row: the method, plus ``[preset=…, k=v, …]`` naming its preset (if any) and
    the hparams that vary among the rows of that method and preset."""
    settings: dict[tuple, set[str]] = {}
    for row in rows:
        key = (*table_key(row), row.get("method"), row.get("preset"))
        settings.setdefault(key, set()).add(_hparam_text(row.get("hparams") or {}))
    varying = {key: _varying_keys(s) for key, s in settings.items() if len(s) > 1}
    labels = []
    for row in rows:
        name = str(row.get("method"))
        keys = varying.get((*table_key(row), row.get("method"), row.get("preset"))) or []
        own = row.get("hparams") or {}
        shown = [f"{k}={_value_text(own[k]) if k in own else 'unset'}" for k in keys]
        if row.get("preset"):
            shown.insert(0, f"preset={row['preset']}")
        if shown:
            name += " [" + ", ".join(shown) + "]"
        labels.append(name)
    return labels


def method_order(labels: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for label in labels:
        if label not in seen:
            seen.append(label)
    head = [m for m in (ORIGINAL, RETRAIN) if m in seen]
    return head + [m for m in seen if m not in head]


def class_names_of(dataset: str) -> tuple[str, ...] | None:
    """The class names of a well-known dataset without loading it (None: not known statically;
    a dataset that reads its names from its files, an image folder, synthetic data)."""
    from scar.data.datasets import KNOWN_DATASETS

    known = KNOWN_DATASETS.get(str(dataset))
    return known.class_names if known is not None else None


def removed_names(classes: Sequence[int], names: Sequence[str] | None) -> list[str]:
    """Names of the removed ``classes`` (``class K`` where no name is known)."""
    return [str(names[c]) if names is not None and 0 <= c < len(names) else f"class {c}"
            for c in classes]


def forget_label(row: Mapping[str, Any]) -> str:
    """How a row's forget request reads in a plot or table: the removed classes' names (the
    row's ``forget_names``, else the dataset's known names), else its forget id."""
    forget = row.get("forget") or {}
    classes = forget.get("classes") if forget.get("kind") == "class" else None
    if not classes:
        return str(row.get("forget_id"))
    names = row.get("forget_names")
    if names and len(names) == len(classes):
        return " + ".join(map(str, names))
    return " + ".join(removed_names([int(c) for c in classes], class_names_of(row.get("dataset"))))
