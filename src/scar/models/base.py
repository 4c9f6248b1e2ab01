"""Model registry and the serialisable model specification."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from torch import nn

from scar.registry import Registry

#: name → builder(num_classes, channels, size, **kwargs) -> nn.Module.
#: Parametrised names ("tv:", "timm:") receive the argument as first positional parameter.
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model's architecture (stored in checkpoint sidecars)."""

    name: str
    num_classes: int
    channels: int
    size: int
    head: str | None = None  # explicit classifier-head module name, else found automatically
    kwargs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        return cls(
            name=d["name"], num_classes=int(d["num_classes"]), channels=int(d["channels"]),
            size=int(d["size"]), head=d.get("head"), kwargs=dict(d.get("kwargs") or {}),
        )


def build_model(spec: ModelSpec) -> nn.Module:
    """Build an untrained model from its spec (no pretrained weights are ever downloaded)."""
    builder, arg = MODELS.resolve(spec.name)
    args = (arg,) if arg is not None else ()
    return builder(*args, num_classes=spec.num_classes, channels=spec.channels, size=spec.size,
                   **spec.kwargs)
