"""Post-hoc changes of a trained classifier, each chosen on validation (no retraining).

- `logit_adjust` (Menon et al. 2021): logits - tau * log(prior), written into the head's offset.
- `tau_normalise` (Kang et al. 2019): class c's logit divided by ||w_c||^tau, written into the
  head's per-class scales (the bias is scaled with the weights, so logits are divided exactly).

tau is chosen by validation accuracy over a fixed grid that includes 0 (the plain model); ties go
to the smaller tau, so a change that does not help is not made.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ltexp.losses import log_prior
from ltexp.metrics import hit_rate

LOGIT_ADJUST_TAUS = tuple(round(0.25 * i, 2) for i in range(13))   # 0, 0.25, ..., 3
TAU_NORM_TAUS = tuple(round(0.1 * i, 1) for i in range(21))         # 0, 0.1, ..., 2


def choose_tau(taus: Sequence[float], logits_for: Callable[[float], torch.Tensor], labels: torch.Tensor) -> tuple[float, float]:
    """The tau of `taus` whose logits have the best validation accuracy (the smallest on ties)."""
    best_tau, best_acc = taus[0], -1.0
    for tau in taus:
        acc = hit_rate(logits_for(tau).argmax(1) == labels)
        if acc > best_acc + 1e-12:
            best_tau, best_acc = tau, acc
    return float(best_tau), best_acc


@torch.no_grad()
def logit_adjust(model, val_logits: torch.Tensor, val_labels: torch.Tensor, train_counts) -> dict[str, float]:
    """Choose tau on validation and add -tau * log(prior) to the model's logits (its head offset)."""
    prior = log_prior(train_counts).to(val_logits.device)
    tau, acc = choose_tau(LOGIT_ADJUST_TAUS, lambda t: val_logits - t * prior, val_labels)
    model.head.offset -= tau * prior.to(model.head.offset.device)
    return {"posthoc_tau": tau, "posthoc_val_acc": acc}


@torch.no_grad()
def tau_normalise(model, val_logits: torch.Tensor, val_labels: torch.Tensor) -> dict[str, float]:
    """Choose tau on validation and divide each class's logit by ||w_c||^tau (via the head's scales)."""
    norms = model.head.linear.weight.norm(dim=1).clamp(min=1e-12)
    offset = model.head.offset
    # The head's logits are scales * (w.f + b) + offset: only the first part is normalised.
    raw = val_logits - offset.to(val_logits.device)
    n = norms.to(val_logits.device)
    tau, acc = choose_tau(TAU_NORM_TAUS, lambda t: raw / n.pow(t) + offset.to(val_logits.device), val_labels)
    model.head.scales.data /= norms.pow(tau)
    return {"posthoc_tau": tau, "posthoc_val_acc": acc}
