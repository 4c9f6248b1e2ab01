"""Typed errors. Every message says what was wrong, where, what is allowed and what was given.

The CLI turns any :class:`ScarError` into a one-paragraph message and a non-zero exit code;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable


class ScarError(Exception):
    """Base class for errors caused by user input or the environment (not by bugs)."""


class ConfigError(ScarError, ValueError):
    """A parameter, option or configuration value is invalid."""


class UnknownComponentError(ConfigError, KeyError):
    """A name was looked up in a registry that does not hold it."""

    def __init__(self, kind: str, name: str, known: Iterable[str]):
        known = sorted(known)
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        msg = f"Unknown {kind} {name!r}.{hint} Known {kind}s: {', '.join(known) or '(none)'}."
        super().__init__(msg)
        self.kind, self.name, self.known = kind, name, known

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class MissingDataError(ScarError, FileNotFoundError):
    """A dataset or file could not be found; the message says where we looked and how to get it."""


class CheckpointError(ScarError):
    """A checkpoint is unsafe (pickle), corrupt, or does not match the requested model."""


class HeadNotFoundError(ConfigError):
    """The classifier head of a model could not be identified unambiguously."""


class MissingRequirementError(ConfigError):
    """A method was called without data it requires (e.g. a forget set)."""


class DivergedError(ScarError):
    """A run produced non-finite (NaN / inf) weights; nothing of it may be saved as a result."""


class OptionalDependencyError(ScarError, ImportError):
    """An optional extra (timm, ray, scikit-image) is needed but not installed."""


def check_choice(name: str, value: object, allowed: Iterable[object]) -> None:
    """Raise ConfigError unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {allowed}; got {value!r}.")


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raise ConfigError unless ``value`` is a finite number with ``low <= value <= high``
    (bounds optional / exclusive). NaN and ±inf are refused whatever the bounds: a NaN passes
    every comparison, and no setting of this toolkit means anything at infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a number; got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value!r}.")
    bad_low = low is not None and (value < low if low_inclusive else value <= low)
    bad_high = high is not None and (value > high if high_inclusive else value >= high)
    if bad_low or bad_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        lb = "[" if low_inclusive and low is not None else "("
        hb = "]" if high_inclusive and high is not None else ")"
        raise ConfigError(f"{name} must be in {lb}{lo}, {hi}{hb}; got {value!r}.")


def optional_import(module: str, extra: str):
    """Import an optional dependency or raise a message naming the pip extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OptionalDependencyError(
            f"This feature needs the optional package {module!r}, which is not installed. "
            f"Install it with: pip install 'scar-unlearn[{extra}]' (or pip install {module})."
        ) from exc
