"""Run a model over a split once and keep its logits and labels; every metric comes from these.

Inference is the expensive part of evaluation, so it happens exactly once per (model, split);
accuracies, per-class accuracies and the membership-inference features (softmax vectors) are all
derived from the stored :class:`Outputs` afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from scar.data.base import Batch
from scar.errors import ConfigError
from scar.models.base import eval_mode

log = logging.getLogger(__name__)


@dataclass
class Outputs:
    """One model's outputs on one split: ``logits`` float32 [N, C], ``labels`` int64 [N], on CPU."""

    logits: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.logits.dim() != 2:
            raise ConfigError(
                f"Outputs.logits must have shape [N, C]; got shape {tuple(self.logits.shape)}."
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.logits.shape[0]:
            raise ConfigError(
                f"Outputs.labels must have shape [{self.logits.shape[0]}] (one per logit row); "
                f"got shape {tuple(self.labels.shape)}."
            )
        self.logits = self.logits.detach().to("cpu", torch.float32)
        self.labels = self.labels.detach().to("cpu", torch.int64)

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def probs(self) -> torch.Tensor:
        """Softmax probabilities, float32 [N, C]."""
        return torch.softmax(self.logits, dim=1)

    def preds(self) -> torch.Tensor:
        """Predicted class per sample (argmax of the logits), int64 [N]."""
        return self.logits.argmax(dim=1)

    @classmethod
    def empty(cls, num_classes: int) -> Outputs:
        """Outputs with zero rows (an empty split) and ``num_classes`` logit columns."""
        return cls(torch.zeros(0, num_classes), torch.zeros(0, dtype=torch.int64))


def compute_outputs(model: nn.Module, loader: Iterable[Batch]) -> Outputs:
    """Run ``model`` over every batch of ``loader`` (eval mode, no autograd) and collect outputs.

    Each module's previous train/eval mode is restored afterwards, so this can be called in the
    middle of training. Batches must have ``.x`` (inputs on the model's device) and ``.y``.
    An empty loader gives :class:`Outputs` with zero rows and zero columns; use
    :func:`evaluate_splits` to get the right column count for empty splits.
    """
    logits: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    with eval_mode(model), torch.inference_mode():
        for batch in loader:
            logits.append(model(batch.x).detach().to("cpu", torch.float32))
            labels.append(batch.y.detach().to("cpu", torch.int64))
    if not logits:
        return Outputs.empty(0)
    return Outputs(torch.cat(logits), torch.cat(labels))


def _model_num_classes(model: nn.Module) -> int:
    """Best guess of a model's class count without a forward pass (for all-empty evaluations)."""
    n = getattr(model, "num_classes", None)
    if isinstance(n, int) and n > 0:
        return n
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else 0


def evaluate_splits(model: nn.Module, loaders: Mapping[str, Iterable[Batch]]) -> dict[str, Outputs]:
    """Run ``model`` over each split once; return ``{split name: Outputs}`` in the loaders' order.

    An empty split gives :class:`Outputs` with 0 rows whose column count is taken from the other
    splits (or, if every split is empty, from ``model.num_classes`` / its last ``nn.Linear``).
    """
    results = {name: compute_outputs(model, loader) for name, loader in loaders.items()}
    widths = {o.num_classes for o in results.values() if len(o) > 0}
    if len(widths) > 1:
        raise ConfigError(
            f"The model gave a different number of logits on different splits: {sorted(widths)}; "
            "all splits must be evaluated by the same classifier."
        )
    num_classes = widths.pop() if widths else _model_num_classes(model)
    for name, out in results.items():
        if len(out) == 0:
            log.debug("split %r is empty; storing 0 x %d outputs", name, num_classes)
            results[name] = Outputs.empty(num_classes)
    return results
