"""Metrics on hand-built predictions."""

import math

import numpy as np
import pytest
import torch

from ltexp.data.longtail import ClassInfo
from ltexp.metrics import accuracy_metrics, classification_metrics, confusion_matrix, expected_calibration_error, finite

# Four classes: 0 and 1 head (many, medium shots), 2 and 3 tail (few).
INFO = ClassInfo(("a", "b", "c", "d"), np.array([150, 40, 10, 5]))


def test_accuracy_slices():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    predicted = torch.tensor([0, 0, 1, 0, 2, 0, 0, 0])
    m = accuracy_metrics(predicted, labels, INFO)
    assert m["acc"] == pytest.approx(4 / 8)
    assert m["head_acc"] == pytest.approx(3 / 4)
    assert m["tail_acc"] == pytest.approx(1 / 4)
    assert m["many_acc"] == 1.0 and m["medium_acc"] == 0.5 and m["few_acc"] == pytest.approx(0.25)
    assert m["macro_acc"] == pytest.approx((1 + 0.5 + 0.5 + 0) / 4)


def test_macro_differs_from_acc_on_unbalanced_test():
    labels = torch.tensor([0, 0, 0, 3])
    m = accuracy_metrics(torch.tensor([0, 0, 0, 0]), labels, INFO)
    assert m["acc"] == 0.75 and m["macro_acc"] == 0.5  # classes without images are ignored
    assert math.isnan(m["medium_acc"]) and "medium_acc" not in finite(m)


def test_ece_hand_computed():
    # Two images at confidence 0.9 (one right), two at 0.6 (both right):
    # bins: |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.2 + 0.2
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.4)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == pytest.approx(0.0)


def test_nll_and_full_metrics():
    logits = torch.log(torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    m = classification_metrics(logits, torch.tensor([0, 1]), INFO)
    assert m["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.25)) / 2, rel=1e-5)
    assert m["acc"] == 0.5


def test_confusion_matrix_rows_are_true_classes():
    cm = confusion_matrix(torch.tensor([1, 1, 0]), torch.tensor([0, 1, 0]), 2)
    assert cm.tolist() == [[1, 1], [0, 1]]


def test_accuracies_are_exact_fractions_not_float32_means():
    # 149 of 200 right: a float32 mean gives 0.7450000047683716, the fraction is 0.745.
    predicted = torch.tensor([0] * 149 + [1] * 51)
    labels = torch.zeros(200, dtype=torch.long)
    m = accuracy_metrics(predicted, labels, INFO)
    assert m["acc"] == m["many_acc"] == m["head_acc"] == 0.745
    assert float((predicted == labels).float().mean()) != 0.745  # what the old mean stored
