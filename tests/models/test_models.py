"""Contract tests over every registered model: features, logits and gradients via FeatureModel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer

from scar.errors import ConfigError, UnknownComponentError
from scar.models import MODELS, FeatureModel, ModelSpec, build_model
from scar.models.zoo import pick_patch_size

#: Plain (non-parametrised) model names; new registrations are covered automatically.
PLAIN_MODELS = [name for name in MODELS.names() if not name.endswith(":")]
#: (channels, size) per model; anything not listed gets CIFAR-shaped input. The deeper ResNets
#: get 16 px to keep the suite fast (the contract does not depend on the image size).
INPUT = {"fastcnn": (1, 28), "mlp": (1, 28), "resnet34": (3, 16), "resnet50": (3, 16)}
#: Documented feature widths (see the table in scar.models.zoo).
WIDTH = {
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "allcnn": 192,
    "vit": 192,
    "fastcnn": 128,
    "mlp": 128,
}
NUM_CLASSES = 10


def first_weight(model: nn.Module) -> torch.Tensor:
    """Weight of the first convolution or Linear layer (the start of the backbone)."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return m.weight
    raise AssertionError("model has no conv or linear layer")


def randomise_head(fm: FeatureModel) -> None:
    # torchvision's ViT zero-initialises its head, which would make head(features) == logits
    # trivially true; random weights make the comparison meaningful.
    with torch.no_grad():
        fm.head.weight.normal_(0, 0.1)
        fm.head.bias.normal_(0, 0.1)


def check_contract(model: nn.Module, x: torch.Tensor, width: int | None = None) -> FeatureModel:
    model.eval()
    fm = FeatureModel(model, example=x)
    randomise_head(fm)
    features, logits = fm(x)
    assert features.shape == (x.shape[0], fm.head.in_features) == (x.shape[0], fm.feature_dim)
    assert logits.shape == (x.shape[0], NUM_CLASSES) and fm.num_classes == NUM_CLASSES
    if width is not None:
        assert fm.feature_dim == width
    torch.testing.assert_close(fm.head(features), logits, atol=1e-5, rtol=1e-4)
    # Same grad mode on both sides: PyTorch's attention takes a different (inference) kernel
    # under no_grad, which changes ViT outputs in the last bits.
    with torch.no_grad():
        plain = model(x)
        torch.testing.assert_close(fm(x)[1], plain, atol=0, rtol=0)
    # A random projection, not features.sum(): the sum of a LayerNorm output (ViT) is constant.
    weight = first_weight(model)
    (features * torch.randn_like(features)).sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    return fm


@pytest.mark.parametrize("name", PLAIN_MODELS)
def test_registered_model_contract(name: str) -> None:
    torch.manual_seed(0)
    channels, size = INPUT.get(name, (3, 32))
    model = build_model(ModelSpec(name, NUM_CLASSES, channels, size))
    check_contract(model, torch.randn(2, channels, size, size), WIDTH.get(name))


def test_every_plain_model_has_documented_width() -> None:
    assert set(PLAIN_MODELS) <= set(WIDTH), "add the new model's feature width to WIDTH"


@pytest.mark.parametrize(
    ("name", "channels", "size", "kwargs", "width"),
    [
        ("resnet18", 1, 72, {}, 512),  # standard 7x7 stem with one input channel
        ("vit", 1, 28, {}, 192),  # patch 4, channel adapter
        ("vit", 3, 96, {"num_layers": 1, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32}, 16),
        ("allcnn", 3, 32, {"width_mult": 0.5, "dropout": 0.2}, 96),
        ("fastcnn", 3, 32, {"width": 8, "feature_dim": 32}, 32),
        ("fastcnn", 1, 8, {}, 128),  # tiny input: the adaptive pool still gives 3x3
        ("mlp", 3, 8, {"hidden": 16}, 16),
    ],
)
def test_model_variants(name: str, channels: int, size: int, kwargs: dict, width: int) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(name, NUM_CLASSES, channels, size, kwargs=kwargs))
    check_contract(model, torch.randn(2, channels, size, size), width)


def test_resnet_small_stem() -> None:
    small = build_model(ModelSpec("resnet18", NUM_CLASSES, 3, 32))
    large = build_model(ModelSpec("resnet18", NUM_CLASSES, 3, 224))
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert large.conv1.kernel_size == (7, 7) and isinstance(large.maxpool, nn.MaxPool2d)


def test_large_vit_resizes_input() -> None:
    kwargs = {"num_layers": 1, "hidden_dim": 16, "num_heads": 2, "mlp_dim": 32}
    model = build_model(ModelSpec("vit", NUM_CLASSES, 3, 96, kwargs=kwargs)).eval()
    assert model.image_size == 224 and model.patch_size == 16
    assert model(torch.randn(2, 3, 96, 96)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize(("size", "patch"), [(28, 4), (32, 4), (64, 8), (16, 2)])
def test_pick_patch_size(size: int, patch: int) -> None:
    assert pick_patch_size(size) == patch


def test_vit_bad_patch_size_is_explained() -> None:
    with pytest.raises(ConfigError, match="patch_size"):
        build_model(ModelSpec("vit", NUM_CLASSES, 3, 31))
    with pytest.raises(ConfigError, match="patch_size must divide"):
        build_model(ModelSpec("vit", NUM_CLASSES, 3, 32, kwargs={"patch_size": 5}))


def test_tiny_torchvision_vit() -> None:
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=16,
        patch_size=8,
        num_layers=1,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
        num_classes=NUM_CLASSES,
    )
    fm = check_contract(model, torch.randn(2, 3, 16, 16), 16)
    assert fm.head_name == "heads.head"


def test_torchvision_model_by_name() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("tv:mobilenet_v3_small", NUM_CLASSES, 3, 32))
    fm = check_contract(model, torch.randn(2, 3, 32, 32))
    assert fm.head_name == "classifier.3"


def test_timm_model_by_name() -> None:
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model(ModelSpec("timm:resnet10t", NUM_CLASSES, 3, 32))
    assert check_contract(model, torch.randn(2, 3, 32, 32), 512).head_name == "fc"
    # A ViT takes img_size=size (CNNs do not: the builder falls back) and in_chans=channels.
    vit = build_model(
        ModelSpec(
            "timm:vit_tiny_patch16_224", NUM_CLASSES, 1, 32, kwargs={"depth": 1, "patch_size": 8}
        )
    )
    assert check_contract(vit, torch.randn(2, 1, 32, 32), 192).head_name == "head"


def test_bad_model_names_are_explained() -> None:
    with pytest.raises(UnknownComponentError, match="Did you mean 'resnet18'"):
        build_model(ModelSpec("resnet19", NUM_CLASSES, 3, 32))
    with pytest.raises(UnknownComponentError, match="mobilenet_v3_small") as info:
        build_model(ModelSpec("tv:mobilenet_v3_smal", NUM_CLASSES, 3, 32))
    assert "torchvision classification model" in str(info.value)
    with pytest.raises(ConfigError, match="3 input channels; got channels=1"):
        build_model(ModelSpec("tv:resnet18", NUM_CLASSES, 1, 28))
    with pytest.raises(ConfigError, match="num_classes must be a positive integer"):
        build_model(ModelSpec("fastcnn", 0, 1, 28))


def test_bad_timm_name_is_explained() -> None:
    pytest.importorskip("timm")
    with pytest.raises(ConfigError, match="Unknown timm model 'resnet10q'.*resnet10t"):
        build_model(ModelSpec("timm:resnet10q", NUM_CLASSES, 3, 32))


def test_resnet18_sgd_step_changes_weights() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec("resnet18", NUM_CLASSES, 3, 32)).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, NUM_CLASSES, (4,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _, logits = FeatureModel(model)(x)
    F.cross_entropy(logits, y).backward()
    opt.step()
    after = model.state_dict()
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    assert torch.isfinite(model(x)).all()


def test_fastcnn_trains_with_a_batch_of_one() -> None:
    # SCAR keeps BatchNorm in train mode; a one-sample forget batch must not crash the model.
    model = build_model(ModelSpec("fastcnn", NUM_CLASSES, 1, 28)).train()
    features, logits = FeatureModel(model)(torch.randn(1, 1, 28, 28))
    assert features.shape == (1, 128) and (features >= 0).all() and logits.shape == (1, 10)


def test_an_input_size_a_model_cannot_take_names_one_it_can():
    """Issue 12: tv:alexnet at 32 px failed inside training with a torch shape error."""
    from scar.models.base import check_input_fits

    spec = ModelSpec("tv:alexnet", 10, 3, 32)
    with pytest.raises(ConfigError, match=r"cannot take 3x32x32 inputs.*takes 64x64"):
        check_input_fits(build_model(spec), spec)
    ok = ModelSpec("fastcnn", 10, 1, 28)
    check_input_fits(build_model(ok), ok)  # no error


def test_torchvision_models_with_auxiliary_heads_train_on_the_main_output():
    """tv:googlenet returned GoogLeNetOutputs in train mode, which training cannot use."""
    model = build_model(ModelSpec("tv:googlenet", 10, 3, 32)).train()
    out = model(torch.zeros(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)
