"""SCAR's loss pieces (known answers) and its architecture-agnostic smoke tests."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scar.data.base import InputSpec, TensorImages
from scar.data.datasets import DatasetBundle, DatasetInfo
from scar.data.forget import ForgetSpec, make_splits
from scar.errors import ConfigError
from scar.methods import UnlearnData, build_method
from scar.methods.scar_method import (
    balanced_weights,
    hr_gate_weights,
    js_divergence,
    kl_divergence,
    mask_teacher_cr,
)
from scar.models.base import ModelSpec, build_model


def test_cr_teacher_masking():
    t = torch.tensor([[5.0, 1.0, 0.0],   # predicted class 0 (removed) → dropped
                      [1.0, 4.0, -2.0],  # kept; class 0 logit → batch min (-3)
                      [2.0, 0.0, 3.0]])  # kept
    t[0, 1] = -3.0
    masked, keep = mask_teacher_cr(t, torch.tensor([0]))
    assert keep.tolist() == [False, True, True]
    assert masked.tolist() == [[-3.0, 4.0, -2.0], [-3.0, 0.0, 3.0]]


def test_cr_teacher_mask_minimum_over_kept_rows_as_the_reference():
    t = torch.tensor([[5.0, -9.0, 0.0],  # predicted class 0 (removed): holds the batch minimum
                      [1.0, 4.0, -2.0],
                      [2.0, 0.0, 3.0]])
    batch, _ = mask_teacher_cr(t, torch.tensor([0]))
    kept, keep = mask_teacher_cr(t, torch.tensor([0]), minimum="kept")
    assert keep.tolist() == [False, True, True]
    assert batch[:, 0].tolist() == [-9.0, -9.0]
    assert kept.tolist() == [[-2.0, 4.0, -2.0], [-2.0, 0.0, 3.0]]


def test_balanced_weights_count_rare_classes_as_five():
    pred = torch.tensor([0, 0, 0, 0, 1, 2, 2, 2])
    w = balanced_weights(pred, 4)
    # class 0: 4 samples → 1/4; class 1: 1 sample (< 3) → counts as 5; class 2: 3 → 1/3
    assert torch.allclose(w, torch.tensor([0.25] * 4 + [0.2] + [1 / 3] * 3, dtype=w.dtype))


def test_hr_gate():
    acc = torch.tensor([0.9, 0.5, 0.8, 0.79])
    assert hr_gate_weights(acc, 0.8).tolist() == pytest.approx([0.9, 0.0, 0.8, 0.0])


def test_kl_known_value_and_temperature_only_on_teacher():
    t = torch.tensor([[math.log(3.0), 0.0]])  # softmax → [0.75, 0.25]
    s = torch.zeros(1, 2)  # softmax → [0.5, 0.5]
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_divergence(t, s, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # T=2 flattens the teacher only: p = softmax([log3/2, 0]) = [√3, 1]/(√3+1)
    p = torch.tensor([math.sqrt(3), 1.0], dtype=torch.float64) / (math.sqrt(3) + 1)
    expected_t2 = float((p * (p / 0.5).log()).sum())
    assert kl_divergence(t, s, 2.0).item() == pytest.approx(expected_t2, rel=1e-5)
    assert kl_divergence(s, s, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_js_is_symmetric_and_bounded():
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    assert js_divergence(a, b, 1.0).item() == pytest.approx(js_divergence(b, a, 1.0).item(),
                                                             rel=1e-5)
    assert 0 <= js_divergence(a * 50, -b * 50, 1.0).item() <= math.log(2) + 1e-6


# ------------------------------------------------------------------ architecture smoke
def _tiny_vit(num_classes: int) -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                             hidden_dim=16, mlp_dim=32, num_classes=num_classes)


def _bundle(channels=3, size=16, n=96, classes=3) -> DatasetBundle:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    imgs = (torch.rand(n, channels, size, size, generator=g) * 60).to(torch.uint8)
    imgs[:, :, : size // 2] += (labels * 60).to(torch.uint8)[:, None, None, None]
    spec = InputSpec(channels, size, (0.5,) * channels, (0.25,) * channels)
    info = DatasetInfo("toy", classes, spec, tuple(map(str, range(classes))), "synthetic")
    return DatasetBundle(info, TensorImages(imgs, labels), TensorImages(imgs[:30], labels[:30]))


ARCHS = {
    "resnet18": lambda: build_model(ModelSpec("resnet18", 3, 3, 16)),
    "allcnn": lambda: build_model(ModelSpec("allcnn", 3, 3, 16, kwargs={"width_mult": 0.25})),
    "tiny-vit": lambda: _tiny_vit(3),
    "timm": lambda: build_model(ModelSpec("timm:resnet10t", 3, 3, 16)),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_scar_runs_unchanged_on_any_architecture(arch):
    if arch == "timm":
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = ARCHS[arch]()
    bundle = _bundle()
    splits = make_splits(bundle, ForgetSpec.for_classes(0))
    noise = TensorImages((torch.rand(64, 3, 16, 16) * 255).to(torch.uint8),
                         torch.full((64,), -1))
    data = UnlearnData(input_spec=bundle.info.input_spec, num_classes=3, scenario="CR",
                       removed_classes=(0,), forget=splits.train_forget,
                       retain=splits.train_retain, surrogate=noise)
    method = build_method("scar", epochs=1, batch_size=16, surrogate_steps=1, stats="retain")
    new = method.unlearn(model, data)
    assert method.history_
    assert all(math.isfinite(h["loss_m"]) and math.isfinite(h["loss_td"])
               for h in method.history_)
    assert new is not model


# ------------------------------------------------------------------ forget batches, fused forward
def _forget_data(n=20, batch=8):
    from scar.methods.scar_method import TargetCache

    imgs = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 2, 2).clone()
    forget = TensorImages(imgs, torch.zeros(n, dtype=torch.long))
    data = UnlearnData(input_spec=InputSpec(1, 2, (0.0,), (1.0,)), num_classes=2,
                       scenario="CR", removed_classes=(0,), forget=forget)
    return data, forget, TargetCache(n, torch.device("cpu"))


def test_forget_batches_revisit_images_still_classified_correctly():
    from scar.methods.scar_method import ForgetBatches

    data, forget, targets = _forget_data()
    plain = [b.idx.tolist() for b in ForgetBatches(data, forget, targets, 8, revisit=0)]
    # Nothing known yet: the shuffled batches, whatever the revisit share.
    assert [b.idx.tolist() for b in ForgetBatches(data, forget, targets, 8, revisit=3)] == plain
    # Images 5 and 7 were correct when last seen, 6 wrong, the rest never seen.
    targets.observe(torch.tensor([5, 6, 7]), torch.tensor([True, False, True]))
    batches = ForgetBatches(data, forget, targets, 8, revisit=3)
    for b, shuffled in zip(batches, plain):
        extra = [i for i in (5, 7) if i not in shuffled]
        # The shuffled images come first, then the revisited ones (only 5 and 7 qualify, when
        # the shuffled batch does not hold them already), replacing the last shuffled ones.
        assert b.idx.tolist()[:batches.fresh] == shuffled[:batches.fresh]
        assert sorted(b.idx.tolist()[batches.fresh:]) == extra
        assert batches.fresh == len(shuffled) - len(extra)
        # The images are the ones the indices name, labels included.
        assert torch.allclose(b.x[:, 0, 0, 0] * 255, b.idx.float())
        assert b.y.tolist() == [0] * len(b.idx)


def test_scar_hr_never_revisits():
    torch.manual_seed(0)
    bundle = _bundle()
    splits = make_splits(bundle, ForgetSpec.random(fraction=0.2, seed=0))
    model = ARCHS["resnet18"]()
    data = UnlearnData(input_spec=bundle.info.input_spec, num_classes=3, scenario="HR",
                       forget=splits.train_forget, retain=splits.train_retain,
                       surrogate=splits.train_retain, original_test_acc=0.5)
    seen = []
    import scar.methods.scar_method as sm

    real = sm.ForgetBatches.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen.append(self.revisit)

    sm.ForgetBatches.__init__ = spy
    try:
        build_method("scar", epochs=1, batch_size=16, surrogate_steps=1, stats="retain",
                     revisit_share=0.5).unlearn(model, data)
    finally:
        sm.ForgetBatches.__init__ = real
    assert seen == [0]


@pytest.mark.parametrize("bn_train", [False, True])
def test_fused_forward_equals_separate_passes(bn_train):
    from scar.models.adapter import FeatureModel

    torch.manual_seed(0)
    model = ARCHS["resnet18"]()
    xf, xs = torch.randn(4, 3, 16, 16), torch.randn(6, 3, 16, 16)
    student = FeatureModel(model, head=None, example=xf[:2])
    method = build_method("scar", bn_train=bn_train)
    model.train(bn_train)
    with torch.no_grad():
        feats, logits, s_logits = method.forward(student, xf, xs)
        ref_feats, ref_logits = student(xf)
        ref_s = model(xs)
    assert torch.allclose(feats, ref_feats, atol=1e-5)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    assert torch.allclose(s_logits, ref_s, atol=1e-5)


def test_next_choice_targets_send_forget_images_to_the_teachers_next_class():
    from scar.methods.scar_method import next_choice_targets

    t = torch.tensor([[5.0, 2.0, 1.0], [4.0, 0.0, 3.0]])
    out = next_choice_targets(t, torch.tensor([0]))
    assert torch.equal(out, torch.tensor([[0.0, 2.0, 1.0], [0.0, 0.0, 3.0]]))  # batch min 0
    assert out.argmax(1).tolist() == [1, 2] and torch.equal(t[0], torch.tensor([5.0, 2.0, 1.0]))


def test_forget_distill_forgets_without_the_metric_term_and_is_class_removal_only(
        tiny_model, synth, cr_splits, hr_splits, tiny_surrogate):
    def data(splits, scenario):
        return UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                           scenario=scenario, removed_classes=splits.removed_classes,
                           forget=splits.train_forget, surrogate=tiny_surrogate,
                           stats=None, original_test_acc=0.9, seed=0)

    method = build_method("scar", lambda_1=0.0, forget_distill=1.0, stats="surrogate",
                          epochs=3, step_kl=0.05)
    d = data(cr_splits, "CR")
    model = method.unlearn(tiny_model, d)
    loader = d.loader("forget", 256, shuffle=False)
    with torch.no_grad():
        acc = torch.cat([model(b.x).argmax(1) == b.y for b in loader]).float().mean()
    assert float(acc) < 0.01 and d.touched().get("retain", 0) == 0
    with pytest.raises(ConfigError, match="class removal only"):
        method.unlearn(tiny_model, data(hr_splits, "HR"))


def test_forget_distill_reads_the_remembered_images_only():
    from scar.methods.scar_method import forget_distill_loss

    teacher = torch.tensor([[0.0, 3.0, 1.0], [0.0, 1.0, 2.0], [0.0, 2.0, 2.0]])
    student = torch.tensor([[4.0, 1.0, 0.0],   # still class 0 (its label): read
                            [0.0, 3.0, 1.0],   # forgotten: left out
                            [2.0, 1.0, 1.0]], requires_grad=True)  # still class 0: read
    labels = torch.tensor([0, 0, 0])
    remembered = forget_distill_loss(teacher, student, labels, kl_divergence, 1.0)
    expected = kl_divergence(teacher[[0, 2]], student[[0, 2]], 1.0)  # their mean, not / 3
    assert torch.allclose(remembered, expected)
    every = forget_distill_loss(teacher, student, labels, kl_divergence, 1.0, on="all")
    assert torch.allclose(every, kl_divergence(teacher, student, 1.0))
    remembered.backward()
    assert student.grad[1].abs().sum() == 0 and student.grad[0].abs().sum() > 0
    # Nothing remembered: zero, and still part of the graph (the step's backward must run).
    none = forget_distill_loss(teacher, student.detach()[[1]].requires_grad_(),
                               labels[:1], kl_divergence, 1.0)
    assert float(none) == 0.0 and none.requires_grad


def test_forget_distill_default_is_per_scenario_and_beta1_reaches_adam(
        tiny_model, synth, hr_splits, tiny_surrogate):
    from scar.methods.scar_method import DEFAULT_BETA1, DEFAULT_FORGET_DISTILL

    assert DEFAULT_FORGET_DISTILL["HR"] == 0 < DEFAULT_FORGET_DISTILL["CR"]
    method = build_method("scar", stats="surrogate", epochs=1, beta1=0.3)
    assert method.forget_distill is None
    data = UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                       scenario="HR", removed_classes=hr_splits.removed_classes,
                       forget=hr_splits.train_forget,
                       surrogate=tiny_surrogate, stats=None, original_test_acc=0.9, seed=0)
    method.unlearn(tiny_model, data)  # the default weight of random removal: no error
    _, opt = method.optimizer(tiny_model, "HR")
    assert opt.param_groups[0]["betas"] == (0.3, method.beta2)
    _, opt = build_method("scar").optimizer(tiny_model, "CR")
    assert opt.param_groups[0]["betas"][0] == DEFAULT_BETA1["CR"]
    with pytest.raises(ConfigError, match="beta1"):
        build_method("scar", beta1=1.0)
    with pytest.raises(ConfigError, match="forget_distill_on"):
        build_method("scar", forget_distill_on="some")


def test_next_choice_destination_is_the_highest_other_class_with_statistics():
    from scar.methods.scar_method import next_choice_class

    logits = torch.tensor([[5.0, 2.0, 1.0, 4.0], [1.0, 0.0, 3.0, 2.0], [0.0, 9.0, 1.0, 2.0]])
    labels = torch.tensor([0, 2, 0])
    # class 3 has no statistics (e.g. a second removed class): never a destination
    kept = torch.tensor([0, 1, 2])
    assert next_choice_class(logits, labels, kept).tolist() == [1, 0, 1]
    assert next_choice_class(logits, labels, torch.arange(4)).tolist() == [3, 3, 1]


@pytest.mark.parametrize("destination", ["mahalanobis", "next_choice"])
def test_the_destination_rule_picks_each_forget_images_target(destination, tiny_model, synth,
                                                              cr_splits, tiny_surrogate):
    """The run's targets come from the configured rule, and both rules forget the class without
    reading retain images. (On these fixtures the two rules agree on every image; that each
    rule is the one applied is pinned by test_destinations_follow_the_configured_rule.)"""
    from scar.methods.scar_method import next_choice_class

    d = UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                    scenario="CR", removed_classes=cr_splits.removed_classes,
                    forget=cr_splits.train_forget, surrogate=tiny_surrogate, stats=None,
                    original_test_acc=0.9, seed=0)
    method = build_method("scar", stats="surrogate", destination=destination)
    seen = []
    original_assign = method.assign_targets

    def spy(teacher, head, targets, batch):
        original_assign(teacher, head, targets, batch)
        with torch.no_grad():
            feats, logits = teacher(batch.x)
        expected = (next_choice_class(logits, batch.y, head.class_ids)
                    if destination == "next_choice" else head.nearest_wrong_class(feats, batch.y))
        seen.append(bool(torch.equal(targets.targets[batch.idx], expected)))

    method.assign_targets = spy
    model = method.unlearn(tiny_model, d)
    assert seen and seen[0]  # the first batch: every target fresh from the rule
    loader = d.loader("forget", 256, shuffle=False)
    with torch.no_grad():
        acc = torch.cat([model(b.x).argmax(1) == b.y for b in loader]).float().mean()
    assert float(acc) < 0.01 and d.touched().get("retain", 0) == 0


@pytest.mark.parametrize("destination", ["mahalanobis", "next_choice"])
def test_destinations_follow_the_configured_rule(destination):
    """SCAR.destinations: the head's nearest Gaussian or the logits' next choice, not both."""

    class Head:
        class_ids = torch.tensor([0, 1, 2])

        def nearest_wrong_class(self, feats, labels):
            return torch.full_like(labels, 2)

    logits = torch.tensor([[5.0, 4.0, 1.0], [0.0, 1.0, 3.0]])
    labels = torch.tensor([0, 2])
    method = build_method("scar", destination=destination)
    out = method.destinations(Head(), torch.zeros(2, 4), logits, labels)
    assert out.tolist() == ([1, 1] if destination == "next_choice" else [2, 2])


def test_step_size_when_the_original_sends_every_probe_image_to_the_removed_class(
        tiny_model, synth, cr_splits, tiny_surrogate, caplog):
    """Regression: when every surrogate image was predicted as the removed class (uniform noise
    and a small model, the README example at some seeds), the step-size probe kept no image, its
    KL was NaN at every rate, the search ended at LR_MIN and SCAR ran 300 steps without
    forgetting. Now the probe watches those images' kept-class outputs."""
    import copy
    import logging

    from scar.methods.step_size import LR_MIN

    model = copy.deepcopy(tiny_model).eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.bias[1] += 50.0  # class 1 (the removed one) wins on every image
    data = UnlearnData(input_spec=synth.info.input_spec, num_classes=synth.info.num_classes,
                       scenario="CR", removed_classes=cr_splits.removed_classes,
                       forget=cr_splits.train_forget, surrogate=tiny_surrogate, stats=None,
                       original_test_acc=0.9, seed=0)
    xs = next(iter(data.loader(tiny_surrogate, len(tiny_surrogate), shuffle=False))).x
    with torch.no_grad():
        assert (model(xs).argmax(1) == 1).all()
    original = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    x = next(iter(data.loader("forget", 32, shuffle=False))).x
    torch.nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
    method = build_method("scar")
    with caplog.at_level(logging.WARNING, logger="scar.methods.scar_method"):
        lr = method.calibrate(model, original, params, tiny_surrogate, data)
    assert math.isfinite(lr) and lr > 100 * LR_MIN
    assert "removed class for every one" in caplog.text
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), original.parameters()))
