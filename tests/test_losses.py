"""Losses against hand-computed values on tiny batches."""

import math

import pytest
import torch
import torch.nn.functional as F

from ltexp import LtexpError
from ltexp.config import LossConfig
from ltexp.losses import (LOSSES, Distilled, build_loss, effective_number_weights, head_for, ldam_margins, log_prior)

COUNTS = [90, 9, 1]
LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
LABELS = torch.tensor([0, 2])


def _ce_by_hand(logits, labels, weight=None):
    total, norm = 0.0, 0.0
    for row, y in zip(logits.tolist(), labels.tolist()):
        lse = math.log(sum(math.exp(v) for v in row))
        w = 1.0 if weight is None else float(weight[y])
        total += w * (lse - row[y])
        norm += w
    return total / norm


def test_ce_is_plain_cross_entropy():
    assert build_loss(LossConfig(loss="ce"), COUNTS)(LOGITS, LABELS).item() == pytest.approx(_ce_by_hand(LOGITS, LABELS))


def test_balanced_softmax_is_ce_on_logits_plus_log_prior():
    prior = [math.log(c / 100) for c in COUNTS]
    shifted = LOGITS + torch.tensor(prior)
    got = build_loss(LossConfig(loss="balanced_softmax"), COUNTS)(LOGITS, LABELS).item()
    assert got == pytest.approx(_ce_by_hand(shifted, LABELS), rel=1e-6)


@pytest.mark.parametrize("tau", [0.0, 0.5, 2.0])
def test_logit_adjusted_loss_uses_tau(tau):
    shifted = LOGITS + tau * torch.tensor([math.log(c / 100) for c in COUNTS])
    got = build_loss(LossConfig(loss="logit_adjust", tau=tau), COUNTS)(LOGITS, LABELS).item()
    assert got == pytest.approx(_ce_by_hand(shifted, LABELS), rel=1e-6)


def test_ldam_margins_scale_with_count_to_the_minus_quarter():
    m = ldam_margins([10000, 16, 1], max_margin=0.5)
    assert m.tolist() == pytest.approx([0.05, 0.25, 0.5])  # 10000^-1/4 = 0.1, 16^-1/4 = 0.5, 1


def test_drw_weights_are_effective_number_weights_summing_to_k():
    beta = 0.9999
    raw = [(1 - beta) / (1 - beta ** n) for n in COUNTS]
    expected = [r / sum(raw) * 3 for r in raw]
    assert effective_number_weights(COUNTS, beta).tolist() == pytest.approx(expected, rel=1e-5)


def test_ldam_subtracts_scaled_margin_and_reweights_after_drw_epoch():
    loss = build_loss(LossConfig(loss="ldam", ldam_max_margin=0.5, ldam_scale=30.0, drw_epoch=3), COUNTS)
    margins = ldam_margins(COUNTS, 0.5)
    adjusted = LOGITS.clone()
    for i, y in enumerate(LABELS.tolist()):
        adjusted[i, y] -= 30.0 * margins[y]
    loss.start_epoch(2)
    assert loss(LOGITS, LABELS).item() == pytest.approx(_ce_by_hand(adjusted, LABELS), rel=1e-5)
    loss.start_epoch(3)
    weights = effective_number_weights(COUNTS, 0.9999)
    assert loss(LOGITS, LABELS).item() == pytest.approx(_ce_by_hand(adjusted, LABELS, weights), rel=1e-5)
    assert head_for("ldam") == "cosine" and head_for("ce") == "linear"


def test_focal_loss_by_hand_and_gamma_zero_is_ce():
    gamma = 2.0
    p = F.softmax(LOGITS, dim=1)[torch.arange(2), LABELS]
    expected = float((-(1 - p) ** gamma * torch.log(p)).mean())
    assert build_loss(LossConfig(loss="focal", focal_gamma=gamma), COUNTS)(LOGITS, LABELS).item() == pytest.approx(expected)
    assert build_loss(LossConfig(loss="focal", focal_gamma=0.0), COUNTS)(LOGITS, LABELS).item() == pytest.approx(
        _ce_by_hand(LOGITS, LABELS))


def test_log_prior_and_unknown_loss():
    assert log_prior([3, 1]).exp().tolist() == pytest.approx([0.75, 0.25])
    with pytest.raises(LtexpError, match="unknown --loss 'hinge': allowed are auto, " + ", ".join(LOSSES)):
        LossConfig(loss="hinge")


def _kl_by_hand(teacher, student, t):
    p = [math.exp(v / t) for v in teacher]
    q = [math.exp(v / t) for v in student]
    p = [v / sum(p) for v in p]
    q = [v / sum(q) for v in q]
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_distilled_adds_t_squared_kl_over_the_teachers_classes():
    base = build_loss(LossConfig(loss="ce"), COUNTS)
    loss = Distilled(base, temperature=2.0, weight=0.5)
    inf = float("-inf")
    # Image 0 was taught on classes 0 and 1 (its group's expert), image 1 on class 2 alone.
    teacher = torch.tensor([[1.0, 3.0, inf], [inf, inf, 0.7]])
    expected_kl = (_kl_by_hand([1.0, 3.0], [2.0, 0.5], 2.0) + 0.0) / 2  # a one-class group has KL 0
    expected = _ce_by_hand(LOGITS, LABELS) + 0.5 * 4.0 * expected_kl
    assert loss(LOGITS, LABELS, teacher).item() == pytest.approx(expected, rel=1e-5)
    # No teacher, or weight 0: the base loss alone; a teacher equal to the student adds nothing.
    assert loss(LOGITS, LABELS).item() == pytest.approx(_ce_by_hand(LOGITS, LABELS), rel=1e-6)
    assert Distilled(base, 2.0, 0.0)(LOGITS, LABELS, teacher).item() == pytest.approx(_ce_by_hand(LOGITS, LABELS))
    same = LOGITS.masked_fill(torch.isinf(teacher), inf)
    assert loss(LOGITS, LABELS, same).item() == pytest.approx(_ce_by_hand(LOGITS, LABELS), rel=1e-6)


def test_distilled_wraps_the_balanced_loss_and_its_schedule():
    base = build_loss(LossConfig(loss="ldam", drw_epoch=2), COUNTS)
    loss = Distilled(base, 1.0, 1.0)
    assert loss.head == "cosine"
    loss.start_epoch(2)
    assert base.weight is not None  # DRW switched on through the wrapper
