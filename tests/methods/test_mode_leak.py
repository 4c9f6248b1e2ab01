"""Train/eval modes survive every helper, and SCAR's frozen teacher stays frozen.

Regression for a leak: ``class_statistics`` restored the flag of a wrapper that starts in train
mode, so the teacher it was given came back in train mode and its BatchNorm running statistics
drifted during SCAR with ``stats=retain`` / ``surrogate``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from scar.data.base import BatchLoader
from scar.evaluation.outputs import compute_outputs
from scar.methods import UnlearnData
from scar.methods.base import check_below, predict
from scar.methods.scar_method import SCAR
from scar.methods.self_forget import SCARSelfForget
from scar.methods.statistics import class_statistics
from scar.models.adapter import FeatureModel
from scar.training.trainer import evaluate_accuracy


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _mixed(model: nn.Module) -> nn.Module:
    """Train mode with BatchNorm frozen (what SCAR's student looks like)."""
    model = copy.deepcopy(model).train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    return model


def _bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()
            if "running_" in k or "num_batches_tracked" in k}


@pytest.mark.parametrize("start", ["eval", "train", "mixed"])
def test_helpers_restore_every_module_mode(tiny_model, synth, start):
    model = {"eval": copy.deepcopy(tiny_model).eval(),
             "train": copy.deepcopy(tiny_model).train(),
             "mixed": _mixed(tiny_model)}[start]
    spec = synth.info.input_spec
    before, bn = _flags(model), _bn_state(model)
    loader = BatchLoader(synth.test, spec, batch_size=64)
    class_statistics(model, synth.test, spec, num_classes=4)
    assert _flags(model) == before
    class_statistics(FeatureModel(model), synth.test, spec, num_classes=4, by="predictions")
    assert _flags(model) == before
    predict(model, loader)
    check_below(model, loader, 0.5)
    compute_outputs(model, loader)
    evaluate_accuracy(model, synth.test, spec, torch.device("cpu"))
    assert _flags(model) == before
    for k, v in _bn_state(model).items():  # every pass above ran in eval mode
        assert torch.equal(v, bn[k]), k


def test_feature_model_reports_the_wrapped_mode(tiny_model):
    assert FeatureModel(copy.deepcopy(tiny_model).eval()).training is False
    assert FeatureModel(copy.deepcopy(tiny_model).train()).training is True


class _TeacherSpy:
    """Mixin: keep the frozen teacher of a run, its BatchNorm buffers before the run, and the
    train flags of its modules at every forward pass."""

    def _unlearn(self, model, original, data):
        self.teacher = original
        self.bn_before = _bn_state(original)
        self.train_flags_seen: set[bool] = set()

        def hook(module, _inputs):
            self.train_flags_seen.add(module.training)

        handles = [m.register_forward_pre_hook(hook) for m in original.modules()
                   if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        try:
            return super()._unlearn(model, original, data)
        finally:
            for h in handles:
                h.remove()


class SpySCAR(_TeacherSpy, SCAR):
    pass


class SpySelfForget(_TeacherSpy, SCARSelfForget):
    pass


@pytest.mark.parametrize("variant", ["stored", "retain", "surrogate", "self_forget"])
def test_scar_teacher_stays_in_eval_and_its_batchnorm_is_unchanged(
        tiny_model, synth, cr_splits, tiny_surrogate, variant):
    spec = synth.info.input_spec
    stats = class_statistics(tiny_model, synth.train, spec, num_classes=4)
    data = UnlearnData(input_spec=spec, num_classes=4, scenario="CR", removed_classes=(1,),
                       forget=cr_splits.train_forget, retain=cr_splits.train_retain,
                       surrogate=tiny_surrogate, stats=stats)
    common = dict(epochs=1, batch_size=16, surrogate_steps=2)
    if variant == "self_forget":
        method = SpySelfForget(**common, synth_steps=2, min_proxies=16, max_proxies=16)
    else:
        method = SpySCAR(**common, stats=variant, bn_train=True)
    method.unlearn(tiny_model, data)
    assert method.train_flags_seen == {False}, "the teacher ran with batch statistics"
    after = _bn_state(method.teacher)
    assert after.keys() == method.bn_before.keys() and after
    for k, v in after.items():
        assert torch.equal(v, method.bn_before[k]), f"teacher buffer {k} changed"
