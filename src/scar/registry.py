"""One generic registry, used for methods, models, datasets and surrogate sources."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from scar.errors import UnknownComponentError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name → component mapping with "did you mean" errors.

    Names may have a parametrised form ``prefix:argument`` (e.g. ``imagefolder:/data/x`` or
    ``timm:vit_tiny_patch16_224``): registering ``"imagefolder:"`` (trailing colon) makes the
    component receive the argument as its first positional parameter.
    """

    def __init__(self, kind: str, describe: Callable[[T], list[str]] | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._help: dict[str, str] = {}
        self._describe = describe

    def register(self, name: str, help: str = "") -> Callable[[T], T]:
        def decorator(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            doc = help or (getattr(obj, "__doc__", None) or "").strip().split("\n")[0]
            self._help[name] = doc
            return obj

        return decorator

    def resolve(self, name: str) -> tuple[T, str | None]:
        """Return (component, argument) for ``name`` or ``prefix:argument``."""
        if not isinstance(name, str) or not name:
            raise UnknownComponentError(self.kind, str(name), self.names())
        if name in self._items:
            return self._items[name], None
        if ":" in name:
            prefix, arg = name.split(":", 1)
            key = prefix + ":"
            if key in self._items and arg:
                return self._items[key], arg
        raise UnknownComponentError(self.kind, name, self.names())

    def get(self, name: str) -> T:
        obj, arg = self.resolve(name)
        if arg is not None:
            raise UnknownComponentError(self.kind, name, self.names())
        return obj

    def names(self) -> list[str]:
        return sorted(self._items)

    def help(self, name: str) -> str:
        return self._help.get(name, "")

    def details(self, name: str) -> list[str]:
        """Further lines about ``name`` for ``scar list`` (none unless the registry was given a
        ``describe`` function)."""
        return self._describe(self._items[name]) if self._describe else []

    def __contains__(self, name: object) -> bool:
        try:
            self.resolve(name)  # type: ignore[arg-type]
        except UnknownComponentError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
