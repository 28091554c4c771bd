"""Metrics on logits: accuracy overall / head / tail / many / medium / few, macro, ECE, NLL.

Names are those docs/records.md's "What a run records" lists (the caller adds the `val_` / `test_` prefix). A slice with no images
(e.g. no many-shot class in a small data set) gives NaN, and callers skip NaN when logging.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ltexp.data.longtail import ClassInfo

ECE_BINS = 15


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE with `bins` equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|."""
    if labels.numel() == 0:
        return float("nan")
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).float()
    # Bin b holds confidences in (b/bins, (b+1)/bins]; confidence 0 cannot occur for a max-prob.
    # |B|/N * |acc(B) - conf(B)| = |sum over B of (confidence - correct)| / N: no per-bin counts needed.
    bin_index = (confidence * bins).ceil().clamp(1, bins).long() - 1
    conf_sum = torch.bincount(bin_index, weights=confidence, minlength=bins)
    acc_sum = torch.bincount(bin_index, weights=correct, minlength=bins)
    return float((conf_sum - acc_sum).abs().sum() / labels.numel())


def per_class_accuracy(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Accuracy of each class (NaN for a class without images), label order."""
    labels = labels.cpu()
    correct = torch.bincount(labels[predicted.cpu() == labels], minlength=num_classes).double()
    total = torch.bincount(labels, minlength=num_classes).double()
    acc = correct / total
    return acc.numpy()


def hit_rate(hits: torch.Tensor) -> float:
    """The fraction of True entries as an exact Python fraction (count / total in float64), not
    a float32 mean: 149/200 is stored as 0.745, not 0.7450000047683716. NaN when empty."""
    n = hits.numel()
    return int(hits.sum()) / n if n else float("nan")


def _slice_acc(correct: torch.Tensor, mask: torch.Tensor) -> float:
    return hit_rate(correct[mask])


def accuracy_metrics(predicted: torch.Tensor, labels: torch.Tensor, info: ClassInfo) -> dict[str, float]:
    """acc, head_acc, tail_acc, many/medium/few_acc and macro_acc from predicted labels.

    Head / tail always use the default two-group split by training count, so every method is
    measured on the same classes.
    """
    predicted, labels = predicted.cpu(), labels.cpu()
    correct = predicted == labels
    is_head = torch.as_tensor(info.is_head)[labels]
    shot = info.shot[labels.numpy()]
    per_class = per_class_accuracy(predicted, labels, info.num_classes)
    return {
        "acc": _slice_acc(correct, torch.ones_like(correct)),
        "head_acc": _slice_acc(correct, is_head),
        "tail_acc": _slice_acc(correct, ~is_head),
        "many_acc": _slice_acc(correct, torch.as_tensor(shot == "many")),
        "medium_acc": _slice_acc(correct, torch.as_tensor(shot == "medium")),
        "few_acc": _slice_acc(correct, torch.as_tensor(shot == "few")),
        "macro_acc": float(np.nanmean(per_class)) if not np.isnan(per_class).all() else float("nan"),
    }


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, info: ClassInfo) -> dict[str, float]:
    """Every single-model metric: the accuracy family plus `ece` and `nll` (nats per image)."""
    logits, labels = logits.float().cpu(), labels.cpu()
    metrics = accuracy_metrics(logits.argmax(1), labels, info)
    metrics["ece"] = expected_calibration_error(F.softmax(logits, dim=1), labels)
    metrics["nll"] = float(F.cross_entropy(logits, labels)) if labels.numel() else float("nan")
    return metrics


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """(K, K) counts; row = true class, column = predicted class."""
    flat = labels.cpu() * num_classes + predicted.cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes).numpy()


def finite(metrics: dict[str, float]) -> dict[str, float]:
    """Drop NaN / inf entries (e.g. `many_acc` when no class has >100 images)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
