"""Outputs collection and accuracy metrics: known answers from hand-built logits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from scar.data.base import Batch, BatchLoader, InputSpec, TensorImages
from scar.errors import ConfigError
from scar.evaluation.metrics import SPLITS, accuracy, per_class_accuracy, split_accuracies
from scar.evaluation.outputs import Outputs, compute_outputs, evaluate_splits

# preds = argmax per row = [0, 1, 0, 2]; labels [0, 1, 2, 2] → 3 of 4 correct.
LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5], [0.0, 0.0, 5.0]])
LABELS = torch.tensor([0, 1, 2, 2])


class ModeProbe(nn.Module):
    """Flatten + Linear that records whether it ran in training mode and with autograd."""

    def __init__(self, in_features: int = 16, num_classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)
        self.seen_training: list[bool] = []
        self.seen_grad: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen_training.append(self.training)
        self.seen_grad.append(torch.is_grad_enabled())
        return self.fc(x.flatten(1))


def _loader(n: int, batch_size: int = 4) -> BatchLoader:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 3
    spec = InputSpec(channels=1, size=4, mean=(0.5,), std=(0.5,))
    return BatchLoader(TensorImages(images, labels), spec, batch_size=batch_size)


def test_outputs_probs_preds_len():
    out = Outputs(LOGITS, LABELS)
    assert len(out) == 4
    assert out.num_classes == 3
    assert out.preds().tolist() == [0, 1, 0, 2]
    torch.testing.assert_close(out.probs().sum(1), torch.ones(4))
    assert out.logits.dtype == torch.float32 and out.labels.dtype == torch.int64


def test_outputs_rejects_mismatched_shapes():
    with pytest.raises(ConfigError, match="labels"):
        Outputs(LOGITS, LABELS[:3])
    with pytest.raises(ConfigError, match=r"\[N, C\]"):
        Outputs(torch.zeros(4), LABELS)


def test_accuracy_known_answer():
    assert accuracy(Outputs(LOGITS, LABELS)) == pytest.approx(0.75)


def test_accuracy_empty_is_nan():
    assert math.isnan(accuracy(Outputs.empty(3)))


def test_per_class_accuracy_with_empty_class_is_nan():
    # class 0: 1/1, class 1: 1/1, class 2: 1/2 (row 2 predicted 0), class 3: no samples.
    acc = per_class_accuracy(Outputs(LOGITS, LABELS), num_classes=4)
    np.testing.assert_allclose(acc[:3], [1.0, 1.0, 0.5])
    assert np.isnan(acc[3])


def test_per_class_accuracy_rejects_out_of_range_labels():
    with pytest.raises(ConfigError, match="Labels must lie"):
        per_class_accuracy(Outputs(LOGITS, LABELS), num_classes=2)


def test_split_accuracies_keys_and_values():
    out = Outputs(LOGITS, LABELS)
    res = split_accuracies({s: out for s in SPLITS})
    assert list(res) == [
        "acc/train_forget",
        "acc/train_retain",
        "acc/test",
        "acc/test_forget",
        "acc/test_retain",
    ]
    assert all(v == pytest.approx(0.75) for v in res.values())


def test_split_accuracies_rejects_unknown_split():
    with pytest.raises(ConfigError, match="allowed"):
        split_accuracies({"validation": Outputs(LOGITS, LABELS)})


@pytest.mark.parametrize("start_training", [True, False])
def test_compute_outputs_eval_mode_no_grad_and_restores_mode(start_training):
    model = ModeProbe().train(start_training)
    out = compute_outputs(model, _loader(10))
    assert len(out) == 10 and out.num_classes == 3
    assert out.labels.tolist() == [i % 3 for i in range(10)]
    assert model.seen_training == [False, False, False]  # 3 batches of <= 4, all in eval mode
    assert not any(model.seen_grad)
    assert model.training is start_training
    assert not out.logits.requires_grad


def test_compute_outputs_matches_direct_forward():
    model = ModeProbe().eval()
    loader = _loader(7, batch_size=3)
    out = compute_outputs(model, loader)
    x = torch.cat([b.x for b in loader])
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x))


def test_evaluate_splits_empty_split_takes_width_from_others():
    model = ModeProbe()
    empty: list[Batch] = []
    res = evaluate_splits(model, {"train_forget": _loader(5), "test_forget": empty})
    assert list(res) == ["train_forget", "test_forget"]
    assert len(res["test_forget"]) == 0 and res["test_forget"].num_classes == 3
    assert math.isnan(accuracy(res["test_forget"]))


def test_evaluate_splits_all_empty_takes_width_from_model():
    res = evaluate_splits(ModeProbe(num_classes=5), {"test": []})
    assert res["test"].logits.shape == (0, 5)
