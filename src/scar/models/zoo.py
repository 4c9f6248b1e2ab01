"""The model zoo: builders registered in :data:`scar.models.base.MODELS`.

Every builder has the signature ``builder(num_classes, channels, size, **kwargs) -> nn.Module``
and never downloads weights. Each model ends in an ``nn.Linear`` classifier head whose *input* is
the feature vector SCAR works on (found by :func:`scar.models.adapter.find_head`):

=========== ============== ============================== =====================================
name        head           feature width                  features non-negative?
=========== ============== ============================== =====================================
fastcnn     ``fc``         ``feature_dim`` (128)          yes (after ReLU)
mlp         ``fc``         ``hidden`` (128)               yes (after ReLU)
allcnn      ``classifier`` ``192 * width_mult`` (192)     yes (after ReLU)
resnet18/34 ``fc``         512                            yes (after ReLU + average pool)
resnet50    ``fc``         2048                           yes (after ReLU + average pool)
vit         ``heads.head`` ``hidden_dim`` (192 / 768)     **no**: the CLS token after LayerNorm
tv:<name>   found          model dependent                model dependent
timm:<name> get_classifier model dependent                model dependent
=========== ============== ============================== =====================================

SCAR's Tukey transform f**δ needs non-negative features; for ViTs the method must use its
sign-preserving variant (see the method spec, section 1).
"""

from __future__ import annotations

import difflib
import logging
import math

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import VisionTransformer

from scar.errors import ConfigError, UnknownComponentError, check_range, optional_import
from scar.models.base import MODELS

log = logging.getLogger(__name__)

#: Inputs up to this size get the "small image" variants (CIFAR-style ResNet stem, small ViT).
SMALL_INPUT_MAX = 64


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer; got {value!r}.")


def _check_common(name: str, num_classes: int, channels: int, size: int) -> None:
    for label, value in (("num_classes", num_classes), ("channels", channels), ("size", size)):
        _check_positive_int(f"Model {name!r}: {label}", value)


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------------------------
# ResNets
# --------------------------------------------------------------------------------------------

_RESNETS = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}


def _resnet(name: str, num_classes: int, channels: int, size: int, **kwargs) -> nn.Module:
    _check_common(name, num_classes, channels, size)
    model = _RESNETS[name](weights=None, num_classes=num_classes, **kwargs)
    if size <= SMALL_INPUT_MAX:
        # CIFAR-style stem: a 7x7/2 conv plus max-pool would shrink a 32 px image to 8 px
        # before the first block and cost several points of accuracy.
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif channels != 3:
        model.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    else:
        return model
    # The replaced stem gets the initialisation torchvision gives every ResNet conv.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@MODELS.register("resnet18", help="torchvision ResNet-18 (3x3 stem for inputs <= 64 px); 512-d")
def resnet18(num_classes: int, channels: int, size: int, **kwargs) -> nn.Module:
    return _resnet("resnet18", num_classes, channels, size, **kwargs)


@MODELS.register("resnet34", help="torchvision ResNet-34 (3x3 stem for inputs <= 64 px); 512-d")
def resnet34(num_classes: int, channels: int, size: int, **kwargs) -> nn.Module:
    return _resnet("resnet34", num_classes, channels, size, **kwargs)


@MODELS.register("resnet50", help="torchvision ResNet-50 (3x3 stem for inputs <= 64 px); 2048-d")
def resnet50(num_classes: int, channels: int, size: int, **kwargs) -> nn.Module:
    return _resnet("resnet50", num_classes, channels, size, **kwargs)


# --------------------------------------------------------------------------------------------
# All-CNN
# --------------------------------------------------------------------------------------------


class AllCNN(nn.Module):
    """All-CNN-C (Springenberg et al., 2015) with BatchNorm, as used in unlearning papers.

    Convolutions 96-96-96/2-192-192-192/2-192(3x3)-192(1x1), each followed by BatchNorm and ReLU,
    then global average pooling. Unlike the original (which classifies with a 1x1 convolution)
    the classifier is an ``nn.Linear`` named ``classifier``, so its input is the feature vector.
    """

    def __init__(
        self, num_classes: int, channels: int, width_mult: float = 1.0, dropout: float = 0.0
    ):
        super().__init__()
        check_range("allcnn width_mult", width_mult, 0.0, None, low_inclusive=False)
        check_range("allcnn dropout", dropout, 0.0, 1.0, high_inclusive=False)
        c1 = max(1, round(96 * width_mult))
        c2 = max(1, round(192 * width_mult))
        self.features = nn.Sequential(
            _conv_bn_relu(channels, c1),
            _conv_bn_relu(c1, c1),
            _conv_bn_relu(c1, c1, stride=2),
            _dropout(dropout),
            _conv_bn_relu(c1, c2),
            _conv_bn_relu(c2, c2),
            _conv_bn_relu(c2, c2, stride=2),
            _dropout(dropout),
            _conv_bn_relu(c2, c2),
            _conv_bn_relu(c2, c2, kernel=1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@MODELS.register("allcnn", help="All-CNN-C with BatchNorm (kwargs width_mult, dropout); 192-d")
def allcnn(
    num_classes: int, channels: int, size: int, *, width_mult: float = 1.0, dropout: float = 0.0
) -> nn.Module:
    _check_common("allcnn", num_classes, channels, size)
    return AllCNN(num_classes, channels, width_mult=width_mult, dropout=dropout)


# --------------------------------------------------------------------------------------------
# Vision Transformers
# --------------------------------------------------------------------------------------------

#: Small ViT for inputs <= 64 px (a ViT-Tiny-like width with half the depth).
SMALL_VIT = {"num_layers": 6, "num_heads": 3, "hidden_dim": 192, "mlp_dim": 384}
#: ViT-B/16 (torchvision ``vit_b_16``), used for inputs > 64 px after resizing to 224 px.
BASE_VIT = {"patch_size": 16, "num_layers": 12, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072}


def pick_patch_size(size: int, target_grid: int = 8) -> int:
    """The patch size that divides ``size`` and gives a grid closest to ``target_grid`` patches
    per side (4 for 28 and 32 px, 8 for 64 px, 2 for 16 px).

    Only grids of 4..16 patches per side are considered; otherwise pass ``patch_size``.
    """
    grids = {size // p: p for p in range(1, size + 1) if size % p == 0 and 4 <= size // p <= 16}
    if not grids:
        raise ConfigError(
            f"vit: no patch size divides the image size {size} into a grid of 4 to 16 patches "
            f"per side; pass patch_size=<a divisor of {size}> in the model kwargs."
        )
    best = min(grids, key=lambda g: (abs(g - target_grid), g))
    return grids[best]


class ResizingViT(VisionTransformer):
    """A torchvision ``VisionTransformer`` that first resizes its input to ``image_size``.

    A subclass rather than a wrapper module so that the parameter names (and so checkpoints)
    stay identical to torchvision's ``vit_b_16`` and the head stays at ``heads.head``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(
                x,
                size=(self.image_size, self.image_size),
                mode="bilinear",
                align_corners=False,
                antialias=False,
            )
        return super().forward(x)


def _adapt_vit_channels(model: VisionTransformer, channels: int) -> None:
    """Replace the patch projection so it takes ``channels`` input channels."""
    old = model.conv_proj
    if old.in_channels == channels:
        return
    new = nn.Conv2d(channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride)
    # Same initialisation torchvision uses for conv_proj (LeCun normal on the fan-in).
    fan_in = new.in_channels * new.kernel_size[0] * new.kernel_size[1]
    nn.init.trunc_normal_(new.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(new.bias)
    model.conv_proj = new


@MODELS.register(
    "vit",
    help="torchvision ViT: small (patch 4/8, 192-d, 6 layers) for <= 64 px, else ViT-B/16 "
    "on inputs resized to 224 px; CLS features can be negative",
)
def vit(num_classes: int, channels: int, size: int, **kwargs) -> nn.Module:
    """Vision Transformer. kwargs override the architecture (``patch_size``, ``num_layers``,
    ``num_heads``, ``hidden_dim``, ``mlp_dim``, ``dropout``, ``attention_dropout``, and for
    inputs > 64 px ``image_size``, default 224).

    Features are the CLS token after the final LayerNorm: they can be negative.
    """
    _check_common("vit", num_classes, channels, size)
    if size <= SMALL_INPUT_MAX:
        params = {**SMALL_VIT, "image_size": size, **kwargs}
        params.setdefault("patch_size", pick_patch_size(size))
        cls: type[VisionTransformer] = VisionTransformer
    else:
        params = {**BASE_VIT, "image_size": 224, **kwargs}
        cls = ResizingViT
    if params["image_size"] % params["patch_size"]:
        raise ConfigError(
            f"vit: patch_size must divide the image size; got patch_size={params['patch_size']} "
            f"for image_size={params['image_size']}."
        )
    try:
        model = cls(num_classes=num_classes, **params)
    except TypeError as exc:
        raise ConfigError(f"vit: invalid model kwargs {sorted(kwargs)}: {exc}") from exc
    _adapt_vit_channels(model, channels)
    return model


# --------------------------------------------------------------------------------------------
# Small, fast models
# --------------------------------------------------------------------------------------------


class FastCNN(nn.Module):
    """A compact CNN for small grey or colour images, quick to train on two CPU cores.

    conv(w)-pool-conv(2w)-pool-conv(4w) (3x3 convolutions with BatchNorm and ReLU), an adaptive
    max-pool to a 3x3 map, then a ``feature_dim``-d ReLU layer (the non-negative features) and a
    Linear head ``fc``.

    Why not more convolutions and global average pooling: with two convolutions per stage at full
    resolution an epoch of Fashion-MNIST costs ~10x more on a CPU; keeping a 3x3 spatial map
    before the feature layer preserves the layout that global pooling throws away, and the model
    still reaches >= 90% Fashion-MNIST test accuracy in a few epochs. The feature layer has no
    BatchNorm so it works in train mode with a batch of one (SCAR keeps BatchNorm in train mode).
    """

    def __init__(self, num_classes: int, channels: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn_relu(channels, w),
            nn.MaxPool2d(2),
            _conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),
            _conv_bn_relu(2 * w, 4 * w),
            nn.AdaptiveMaxPool2d(3),
            nn.Flatten(),
            nn.Linear(4 * w * 9, feature_dim),
            nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@MODELS.register(
    "fastcnn", help="compact 3-conv CNN, the CPU default (kwargs width=16, feature_dim=128); 128-d"
)
def fastcnn(
    num_classes: int, channels: int, size: int, *, width: int = 16, feature_dim: int = 128
) -> nn.Module:
    _check_common("fastcnn", num_classes, channels, size)
    _check_positive_int("fastcnn width", width)
    _check_positive_int("fastcnn feature_dim", feature_dim)
    return FastCNN(num_classes, channels, width=width, feature_dim=feature_dim)


class MLP(nn.Module):
    """Flatten → Linear(hidden) → ReLU → Linear head ``fc``; features are the hidden units."""

    def __init__(self, num_classes: int, in_features: int, hidden: int = 128):
        super().__init__()
        self.flatten = nn.Flatten()
        self.hidden = nn.Linear(in_features, hidden)
        self.act = nn.ReLU()
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.hidden(self.flatten(x))))


@MODELS.register("mlp", help="tiny 2-layer MLP for tests (kwarg hidden=128); 128-d")
def mlp(num_classes: int, channels: int, size: int, *, hidden: int = 128) -> nn.Module:
    _check_common("mlp", num_classes, channels, size)
    _check_positive_int("mlp hidden", hidden)
    return MLP(num_classes, channels * size * size, hidden=hidden)


# --------------------------------------------------------------------------------------------
# Any torchvision or timm model by name
# --------------------------------------------------------------------------------------------


@MODELS.register("tv:", help="any torchvision classification model, e.g. tv:mobilenet_v3_small")
def torchvision_model(name: str, num_classes: int, channels: int, size: int, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, num_classes=...)``; RGB input only."""
    _check_common(f"tv:{name}", num_classes, channels, size)
    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise UnknownComponentError("torchvision classification model", name, known)
    if channels != 3:
        raise ConfigError(
            f"Model 'tv:{name}': torchvision models take 3 input channels; got channels="
            f"{channels}. Use a zoo model (fastcnn, resnet18, vit, ...) or 'timm:<name>' (which "
            "adapts the input channels), or load grey images as RGB (dataset option channels=3: "
            "`--dataset-option channels=3`, or `dataset_options: {channels: 3}` in a grid)."
        )
    if kwargs.pop("weights", None) is not None or kwargs.pop("pretrained", None):
        raise ConfigError(f"Model 'tv:{name}': {PRETRAINED_HINT}")
    if name in TV_AUX_LOGITS:  # training and unlearning use the main output only
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    if name.startswith("vit_"):  # torchvision's ViTs are built for one input size
        kwargs.setdefault("image_size", size)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


#: Why a model spec never asks for pretrained weights: a checkpoint rebuilds its architecture from
#: the spec on every load; starting weights are a training option (scar.models.pretrained).
PRETRAINED_HINT = (
    "pretrained weights are a training option, not a model kwarg: `scar train --model NAME "
    "--pretrained [FILE]` (grid: model_kwargs {pretrained: FILE or true}); they are never "
    "downloaded unless --download is given."
)

#: torchvision models that return auxiliary classifier outputs in train mode by default.
TV_AUX_LOGITS = ("googlenet", "inception_v3")


@MODELS.register("timm:", help="any timm model (needs the 'timm' extra), e.g. timm:resnet10t")
def timm_model(name: str, num_classes: int, channels: int, size: int, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes, in_chans=channels)``, with
    ``img_size=size`` for models that accept it (ViTs and friends)."""
    _check_common(f"timm:{name}", num_classes, channels, size)
    timm = optional_import("timm", "timm")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(
            f"Unknown timm model {name!r}.{hint} List them with "
            "python -c \"import timm; print(timm.list_models('*pattern*'))\"."
        )
    if kwargs.pop("pretrained", False):
        raise ConfigError(f"Model 'timm:{name}': {PRETRAINED_HINT}")
    return create_timm(name, num_classes, channels, size, pretrained=False, **kwargs)


def create_timm(name: str, num_classes: int, channels: int, size: int, *, pretrained: bool,
                **kwargs) -> nn.Module:
    """``timm.create_model`` with ``img_size=size`` where the model takes it (ViTs and friends).
    ``pretrained=True`` is for :mod:`scar.models.pretrained`, which passes the weights it found
    locally as the source (timm then downloads nothing)."""
    timm = optional_import("timm", "timm")
    common = {"pretrained": pretrained, "num_classes": num_classes, "in_chans": channels,
              **kwargs}
    if "img_size" not in kwargs:
        try:
            return timm.create_model(name, img_size=size, **common)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            log.debug("timm model %s does not take img_size; building it without", name)
    return timm.create_model(name, **common)
