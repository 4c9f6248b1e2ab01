"""Features and logits for any classifier, without per-architecture code.

SCAR needs, for every input, the *features* f (the input of the final linear layer) and the
*logits* π(f), from one forward pass and with gradients flowing back into the backbone. Instead of
asking every architecture to expose a ``features()`` method we

1. find the classifier head once (:func:`find_head`): an explicit module name, else timm's
   ``get_classifier()``, else the ``nn.Linear`` whose output *is* the model output (checked with a
   forward pass on an example input), and
2. capture the head's input with a forward hook during the normal forward pass
   (:func:`features_and_logits`, :class:`FeatureModel`).

This works for torchvision ResNets and ViTs, timm models and custom networks alike, as long as the
model's output is the output of one ``nn.Linear`` applied to a ``[B, d]`` feature matrix.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from scar.errors import ConfigError, HeadNotFoundError
from scar.models.base import eval_mode

log = logging.getLogger(__name__)

#: How many candidate Linear modules an error message lists (the last ones: heads come last).
_MAX_LISTED = 12
_HINT = ("Pass the head's module name explicitly: head='<name>' (CLI: `scar train --head "
         "<name>`; the checkpoint records it for every later command).")


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """All ``nn.Linear`` modules (subclasses included) in registration order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def describe_linears(linears: list[tuple[str, nn.Linear]]) -> str:
    """A readable one-line list ``'fc' (in 512, out 10), ...`` (the last few when long)."""
    if not linears:
        return "(none)"
    shown = linears[-_MAX_LISTED:]
    text = ", ".join(f"{name!r} (in {m.in_features}, out {m.out_features})" for name, m in shown)
    hidden = len(linears) - len(shown)
    return (f"... {hidden} earlier ones, " if hidden else "") + text


def _module_name(model: nn.Module, module: nn.Module) -> str | None:
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _check_output(output: object, where: str) -> Tensor:
    if not isinstance(output, Tensor):
        raise ConfigError(
            f"{where}: the model must return a logits tensor [B, num_classes]; it returned "
            f"{type(output).__name__}. Wrap it in a module whose forward returns only the logits "
            "(for torchvision googlenet / inception_v3 build it with aux_logits=False)."
        )
    return output


@contextmanager
def _probe_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients for a one-off inspection pass, so BatchNorm running statistics
    are not updated by it; each module's train/eval flag is restored afterwards."""
    with eval_mode(model), torch.no_grad():
        yield


def _same_tensor(a: Tensor, b: Tensor) -> bool:
    return a is b or (a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b))


# --------------------------------------------------------------------------------------------
# Finding the head
# --------------------------------------------------------------------------------------------


def _explicit_head(model: nn.Module, head: str) -> str:
    modules = dict(model.named_modules())
    linears = describe_linears(linear_modules(model))
    if head not in modules:
        raise HeadNotFoundError(
            f"head={head!r} is not a module of {type(model).__name__}. "
            f"Its nn.Linear modules are: {linears}."
        )
    if not isinstance(modules[head], nn.Linear):
        raise HeadNotFoundError(
            f"head={head!r} is a {type(modules[head]).__name__}, but the classifier head must be "
            f"an nn.Linear (its input is the feature vector). Its nn.Linear modules are: {linears}."
        )
    return head


def _timm_head(model: nn.Module) -> str | None:
    get_classifier = getattr(model, "get_classifier", None)
    if not callable(get_classifier):
        return None
    try:
        classifier = get_classifier()
    except Exception:  # noqa: BLE001 - a foreign method; fall back to the generic search
        log.debug("get_classifier() of %s failed; searching Linear modules", type(model).__name__)
        return None
    if not isinstance(classifier, nn.Linear):
        return None
    return _module_name(model, classifier)


def _heads_producing_output(
    model: nn.Module, linears: list[tuple[str, nn.Linear]], example: Tensor
) -> list[str]:
    """Names of the Linear modules whose output equals the model output on ``example``."""
    outputs: dict[str, list[Tensor]] = {name: [] for name, _ in linears}
    handles = [
        m.register_forward_hook(lambda _m, _i, out, name=name: outputs[name].append(out))
        for name, m in linears
    ]
    try:
        with _probe_mode(model):
            result = _check_output(model(example), "find_head")
    finally:
        for h in handles:
            h.remove()
    identical = [n for n, outs in outputs.items() if any(o is result for o in outs)]
    if len(identical) == 1:
        return identical
    return [
        n
        for n, outs in outputs.items()
        if any(isinstance(o, Tensor) and _same_tensor(o, result) for o in outs)
    ]


def find_head(model: nn.Module, head: str | None = None, example: Tensor | None = None) -> str:
    """Return the qualified module name of ``model``'s classifier head (an ``nn.Linear``).

    Order: the explicit ``head`` name (must exist and be an ``nn.Linear``); else
    ``model.get_classifier()`` when it returns an ``nn.Linear`` (timm); else, with an ``example``
    input, the Linear whose output is the model output in one forward pass (eval mode, no grad,
    train/eval flags restored); without an example, the last registered Linear (unverified).

    Raises :class:`HeadNotFoundError` when there is no Linear, when none or several produce the
    output, or when the explicit name is wrong; the message lists the candidates.
    """
    if head is not None:
        return _explicit_head(model, head)
    found = _timm_head(model)
    if found is not None:
        return found
    linears = linear_modules(model)
    if not linears:
        raise HeadNotFoundError(
            f"{type(model).__name__} has no nn.Linear module, so it has no classifier head to "
            "take features from (e.g. a 1x1-convolution classifier). Replace the final layer by "
            "an nn.Linear applied to the pooled [B, d] features."
        )
    if example is None:
        name = linears[-1][0]
        log.debug(
            "head of %s: last Linear %r (no example input, unverified)", type(model).__name__, name
        )
        return name
    matches = _heads_producing_output(model, linears, example)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise HeadNotFoundError(
            f"None of the nn.Linear modules of {type(model).__name__} produces the model output "
            f"(the output is computed after the last Linear, e.g. averaged or rescaled). "
            f"Candidates: {describe_linears(linears)}. {_HINT}"
        )
    tied = describe_linears([(n, m) for n, m in linears if n in matches])
    raise HeadNotFoundError(
        f"The classifier head of {type(model).__name__} is ambiguous: several nn.Linear modules "
        f"produce exactly the model output: {tied}. {_HINT}"
    )


# --------------------------------------------------------------------------------------------
# Features and logits from one forward pass
# --------------------------------------------------------------------------------------------


def features_and_logits(
    model: nn.Module, x: Tensor, head: str | nn.Module
) -> tuple[Tensor, Tensor]:
    """Run ``model(x)`` once; return (input of the head, model output).

    The features keep their autograd graph. The hook lives only for this call (removed in a
    ``finally``) and ignores calls from other threads, so nothing leaks into the model, deep
    copies or pickles of it.
    """
    module = model.get_submodule(head) if isinstance(head, str) else head
    label = repr(head) if isinstance(head, str) else type(head).__name__
    captured: list[Tensor] = []
    thread = threading.get_ident()

    def hook(_module: nn.Module, args: tuple, kwargs: dict, _out: object) -> None:
        if threading.get_ident() == thread:
            captured.append(args[0] if args else kwargs["input"])

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        logits = model(x)
    finally:
        handle.remove()
    logits = _check_output(logits, "features_and_logits")
    if len(captured) != 1:
        raise HeadNotFoundError(
            f"The head {label} was called {len(captured)} times in one forward pass; "
            "features need exactly one call. Pass the right head with head='<name>'."
        )
    features = captured[0]
    if features.dim() != 2:
        raise HeadNotFoundError(
            f"The head {label} receives a tensor of shape {tuple(features.shape)}, but features "
            "must be a [batch, d] matrix (a head applied to tokens or feature maps is not a "
            "classifier head over pooled features). Pass the right head with head='<name>'."
        )
    return features, logits


class FeatureModel(nn.Module):
    """Wraps a classifier so that ``forward(x)`` returns ``(features, logits)`` from one pass.

    Attributes: ``model`` (the wrapped classifier, not copied), ``head_name``, ``head`` (the
    ``nn.Linear``), ``feature_dim`` (= ``head.in_features``), ``num_classes``
    (= ``head.out_features``).

    Train/eval mode, ``.to()`` and parameters are the wrapped model's. The state-dict keys of a
    FeatureModel carry a ``model.`` prefix: save and load ``fm.model.state_dict()`` so that
    checkpoints stay loadable into the bare architecture.

    With an ``example`` input the wrapper is verified once at construction (eval mode, no grad):
    features are ``[B, feature_dim]``, logits ``[B, num_classes]`` and ``head(features)`` equals
    the logits, i.e. nothing is applied after the head.
    """

    def __init__(self, model: nn.Module, head: str | None = None, example: Tensor | None = None):
        super().__init__()
        self.model = model
        # The wrapper's own flag follows the model's (nn.Module starts in train mode), so that
        # ``fm.training`` tells the truth about the model it wraps.
        self.training = model.training
        self.head_name = find_head(model, head=head, example=example)
        self.feature_dim = self.head.in_features
        self.num_classes = self.head.out_features
        if example is not None:
            self.verify(example)

    @property
    def head(self) -> nn.Linear:
        # A property, not an attribute: assigning the module would register it twice and
        # duplicate its parameters in the state dict.
        return self.model.get_submodule(self.head_name)  # type: ignore[return-value]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return features_and_logits(self.model, x, self.head_name)

    def logits(self, x: Tensor) -> Tensor:
        """Plain forward pass of the wrapped model (no hook)."""
        return self.model(x)

    def verify(self, example: Tensor, atol: float = 1e-5) -> None:
        """Check on ``example`` that the logits are exactly ``head(features)``."""
        with _probe_mode(self.model):
            features, logits = self(example)
            batch = example.shape[0]
            if features.shape != (batch, self.feature_dim):
                raise HeadNotFoundError(
                    f"Head {self.head_name!r}: features have shape {tuple(features.shape)}, "
                    f"expected [{batch}, {self.feature_dim}]."
                )
            if logits.shape != (batch, self.num_classes):
                raise HeadNotFoundError(
                    f"Head {self.head_name!r} has {self.num_classes} outputs but the model "
                    f"returns shape {tuple(logits.shape)}, expected [{batch}, {self.num_classes}]. "
                    f"{_HINT}"
                )
            recomputed = self.head(features)
        if not torch.allclose(recomputed, logits, atol=atol, rtol=1e-4):
            gap = (recomputed - logits).abs().max().item()
            raise HeadNotFoundError(
                f"The model output is not {self.head_name!r}(features) (max difference {gap:.3g}):"
                " something is applied after the head (scaling, averaging, another layer). "
                f"Candidates: {describe_linears(linear_modules(self.model))}. {_HINT}"
            )

    def extra_repr(self) -> str:
        return (
            f"head={self.head_name!r}, feature_dim={self.feature_dim}, "
            f"num_classes={self.num_classes}"
        )
