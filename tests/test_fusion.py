"""Fusion rules on hand-built logits."""

import math

import pytest
import torch

from ltexp import LtexpError
from ltexp.fusion import (ExpertLayout, applicable_rules, fit_calibrated, fuse, fuse_absnorm, fuse_concat,
                          fuse_other, fuse_softmax, oracle_predict, route_accuracy, routing_accuracy)

# Four classes: head expert owns classes 0 and 2, tail expert owns 1 and 3 (owners need not be
# contiguous labels: ownership follows training-count rank).
LAYOUT = ExpertLayout(((0, 2), (1, 3)), (False, False), 4)
OTHER_LAYOUT = ExpertLayout(((0, 2), (1, 3)), (True, True), 4)


def test_concat_places_each_logit_at_its_owner_class():
    head = torch.tensor([[5.0, 1.0]])
    tail = torch.tensor([[2.0, 1.5]])
    assert fuse_concat([head, tail], LAYOUT).tolist() == [[5.0, 2.0, 1.0, 1.5]]


def test_tail_expert_outvoted_by_concat_rescued_by_absnorm():
    # A tail image: the head expert is unsure (3.0 vs 2.9), the tail expert is sure (2 vs -1).
    # concat compares raw logits and the head's 3.0 beats the tail's 2.0: the tail is outvoted.
    head = torch.tensor([[3.0, 2.9]])
    tail = torch.tensor([[2.0, -1.0]])
    assert fuse_concat([head, tail], LAYOUT).argmax(1).item() == 0
    # absnorm: head 3/5.9 = 0.508 and 2.9/5.9; tail 2/3 = 0.667 and -1/3: the tail expert wins.
    scores = fuse_absnorm([head, tail], LAYOUT)
    assert scores[0].tolist() == pytest.approx([3 / 5.9, 2 / 3, 2.9 / 5.9, -1 / 3])
    assert scores.argmax(1).item() == 1


def test_softmax_compares_each_experts_confidence():
    head = torch.tensor([[3.0, 2.9]])   # p = 0.525, 0.475
    tail = torch.tensor([[2.0, -1.0]])  # p = 0.953, 0.047
    log_p = fuse_softmax([head, tail], LAYOUT)
    assert log_p.exp()[0].tolist() == pytest.approx([0.52498, 0.95257, 0.47502, 0.04743], abs=1e-4)
    assert log_p.argmax(1).item() == 1


def test_other_rule_uses_the_other_experts_reject_probability():
    # The head expert says "other" (p_other large); the tail expert is torn between its classes.
    head = torch.tensor([[1.0, 0.0, 4.0]])   # own 0, own 2, other
    tail = torch.tensor([[2.0, 1.0, -3.0]])  # own 1, own 3, other
    ph = torch.softmax(head, 1)[0]
    pt = torch.softmax(tail, 1)[0]
    expected = torch.tensor([ph[0] * pt[2], pt[0] * ph[2], ph[1] * pt[2], pt[1] * ph[2]])
    got = fuse("other", [head, tail], OTHER_LAYOUT).exp()[0]
    assert got.tolist() == pytest.approx((expected / expected.sum()).tolist(), rel=1e-5)
    assert got.argmax().item() == 1
    # concat on the same experts ignores the reject column and picks the head class 0 (1.0 < 2.0 here,
    # so make the head logit larger to show the difference).
    head_big = torch.tensor([[3.0, 0.0, 6.0]])
    assert fuse_concat([head_big, tail], OTHER_LAYOUT).argmax(1).item() == 0
    assert fuse_other([head_big, tail], OTHER_LAYOUT).argmax(1).item() == 1


def test_other_rule_needs_other_labels():
    with pytest.raises(LtexpError, match="needs experts with an \"other\" label"):
        fuse("other", [torch.zeros(1, 2), torch.zeros(1, 2)], LAYOUT)
    assert "other" not in applicable_rules(LAYOUT) and "other" in applicable_rules(OTHER_LAYOUT)


def test_fused_outputs_are_normalised_log_probabilities():
    torch.manual_seed(0)
    outputs = [torch.randn(5, 2), torch.randn(5, 2)]
    for rule in ("concat", "absnorm", "softmax"):
        assert torch.allclose(fuse(rule, outputs, LAYOUT).exp().sum(1), torch.ones(5))


def test_calibrated_fits_temperature_and_bias_and_beats_concat_on_nll():
    # Labels drawn from softmax(true_logits), so true_logits are calibrated. The head expert is
    # overconfident by a factor 4 and the tail expert shifted down by 3: the NLL-optimal fit is
    # T = (4, 1), b = (0, 3), which the convex fit must recover.
    torch.manual_seed(0)
    n = 20000
    true_logits = 2.0 * torch.randn(n, 4)
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1).flatten()
    head = 4.0 * true_logits[:, [0, 2]]
    tail = true_logits[:, [1, 3]] - 3.0
    params = fit_calibrated([head, tail], LAYOUT, labels)
    assert params["temperature"] == pytest.approx([4.0, 1.0], rel=0.05)
    assert params["bias"] == pytest.approx([0.0, 3.0], abs=0.1)
    nll = {rule: torch.nn.functional.nll_loss(fuse(rule, [head, tail], LAYOUT, params), labels).item()
           for rule in ("concat", "calibrated")}
    assert nll["calibrated"] < nll["concat"] - 0.2
    acc = {rule: (fuse(rule, [head, tail], LAYOUT, params).argmax(1) == labels).float().mean().item()
           for rule in ("concat", "calibrated")}
    assert acc["calibrated"] > acc["concat"]


def test_oracle_is_an_upper_bound_on_a_constructed_case():
    # Every expert is right within its own classes, but the head expert shouts on tail images.
    labels = torch.tensor([0, 2, 1, 3])
    head = torch.tensor([[5.0, 0.0], [0.0, 5.0], [9.0, 0.0], [0.0, 9.0]])
    tail = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 0.0], [0.0, 3.0]])
    oracle = oracle_predict([head, tail], LAYOUT, labels)
    fused = fuse("concat", [head, tail], LAYOUT).argmax(1)
    assert oracle.tolist() == [0, 2, 1, 3]                 # uses the true group: all right
    assert fused.tolist() == [0, 2, 0, 2]                  # honest: tail images routed to the head
    assert (oracle == labels).float().mean() >= (fused == labels).float().mean()
    assert routing_accuracy(fused, labels, LAYOUT) == 0.5


def test_layout_rejects_unowned_classes():
    with pytest.raises(ValueError):
        ExpertLayout(((0,), (1,)), (False, False), 3).group_of()
    assert math.isclose(routing_accuracy(torch.tensor([0, 1]), torch.tensor([0, 1]), LAYOUT), 1.0)


ROUTER_LAYOUT = ExpertLayout(((0, 2), (1, 3)), (False, False), 4, router=True)
# A 3-class head expert and a 1-class tail expert: the class-share prior log|G_g| matters.
UNEVEN_ROUTER_LAYOUT = ExpertLayout(((0, 1, 2), (3,)), (False, False), 4, router=True)


def test_a_perfect_router_reproduces_the_oracle():
    torch.manual_seed(0)
    head, tail = torch.randn(50, 2), torch.randn(50, 2)
    labels = torch.randint(0, 4, (50,))
    group = ROUTER_LAYOUT.group_of()[labels]
    router = torch.nn.functional.one_hot(group, 2).float() * 100.0  # certain of the true group
    fused = fuse("router", [head, tail, router], ROUTER_LAYOUT).argmax(1)
    assert torch.equal(fused, oracle_predict([head, tail], ROUTER_LAYOUT, labels))
    assert route_accuracy([head, tail, router], ROUTER_LAYOUT, labels) == 1.0
    assert routing_accuracy(fused, labels, ROUTER_LAYOUT) == 1.0


def test_a_uniform_router_weighs_each_experts_softmax_by_its_share_of_the_classes():
    head = torch.tensor([[2.0, 0.0, 1.0]])
    tail = torch.tensor([[5.0]])
    router = torch.zeros(1, 2)  # p(g|x) = 1/2 each under equal group priors
    p = fuse("router", [head, tail, router], UNEVEN_ROUTER_LAYOUT).exp()[0]
    # p(c|x) = (|G_g| / K) * softmax_g(c): the head group holds 3 of 4 classes, the tail 1.
    head_soft = torch.softmax(head[0], 0)
    assert p.tolist() == pytest.approx([0.75 * head_soft[0].item(), 0.75 * head_soft[1].item(),
                                        0.75 * head_soft[2].item(), 0.25])
    assert route_accuracy([head, tail, router], UNEVEN_ROUTER_LAYOUT, torch.tensor([3])) == 0.0  # says head


def test_router_rule_applies_only_with_a_router_and_others_ignore_it():
    assert "router" in applicable_rules(ROUTER_LAYOUT) and "router" not in applicable_rules(LAYOUT)
    with pytest.raises(LtexpError, match="needs a router model"):
        fuse("router", [torch.zeros(1, 2), torch.zeros(1, 2)], LAYOUT)
    head, tail, router = torch.tensor([[5.0, 1.0]]), torch.tensor([[2.0, 1.5]]), torch.tensor([[9.0, -9.0]])
    for rule in ("concat", "absnorm", "softmax"):  # the router's outputs never leak into them
        assert torch.equal(fuse(rule, [head, tail, router], ROUTER_LAYOUT), fuse(rule, [head, tail], LAYOUT))
