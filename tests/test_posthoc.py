"""Post-hoc logit adjustment and tau-normalisation: chosen on validation, tau = 0 is the plain model."""

import pytest
import torch

from ltexp.losses import log_prior
from ltexp.models import build_model
from ltexp.posthoc import choose_tau, logit_adjust, tau_normalise


def _model(k=3):
    torch.manual_seed(0)
    model = build_model("smallcnn", (8, 8, 1), k, [8.0], [4.0]).eval()
    with torch.no_grad():
        model.head.linear.weight.mul_(torch.tensor([[3.0], [1.0], [0.5]]))  # unequal class norms
    return model


def _images(n=64):
    torch.manual_seed(1)
    return torch.randint(0, 16, (n, 1, 8, 8), dtype=torch.uint8)


def test_choose_tau_takes_the_best_and_the_smallest_on_ties():
    labels = torch.tensor([1, 1])
    logits = {0.0: torch.tensor([[1.0, 0.0], [1.0, 0.0]]), 1.0: torch.tensor([[0.0, 1.0], [0.0, 1.0]]),
              2.0: torch.tensor([[0.0, 1.0], [0.0, 1.0]])}
    assert choose_tau([0.0, 1.0, 2.0], logits.__getitem__, labels) == (1.0, 1.0)


def test_logit_adjustment_with_tau_zero_is_the_plain_model():
    model, images = _model(), _images()
    plain = model(images).detach()
    labels = plain.argmax(1)  # the plain model is perfect on these labels: tau = 0 must be kept
    chosen = logit_adjust(model, plain, labels, [100, 10, 1])
    assert chosen["posthoc_tau"] == 0.0 and chosen["posthoc_val_acc"] == 1.0
    assert torch.equal(model(images).detach(), plain)


def test_logit_adjustment_subtracts_tau_log_prior():
    model, images = _model(), _images()
    plain = model(images).detach()
    counts = [100, 10, 1]
    target = (plain - 3.0 * log_prior(counts)).argmax(1)  # labels a strong adjustment gets right
    assert not torch.equal(target, plain.argmax(1))
    chosen = logit_adjust(model, plain, target, counts)
    tau = chosen["posthoc_tau"]
    assert tau > 0 and chosen["posthoc_val_acc"] == 1.0
    assert torch.allclose(model(images).detach(), plain - tau * log_prior(counts), atol=1e-5)


def test_tau_norm_with_tau_zero_is_the_plain_model_and_tau_divides_by_norms():
    model, images = _model(), _images()
    plain = model(images).detach()
    assert tau_normalise(model, plain, plain.argmax(1))["posthoc_tau"] == 0.0
    assert torch.allclose(model(images).detach(), plain)
    norms = model.head.linear.weight.detach().norm(dim=1)
    target = (plain / norms).argmax(1)
    if torch.equal(target, plain.argmax(1)):
        pytest.skip("these random weights give the same argmax for every tau")
    chosen = tau_normalise(model, plain, target)
    assert chosen["posthoc_val_acc"] == 1.0
    tau = chosen["posthoc_tau"]
    assert torch.allclose(model(images).detach(), plain / norms.pow(tau), atol=1e-5)
