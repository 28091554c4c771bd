"""Fusion rules: every experts' outputs -> one score per class, without knowing the image's group.

Each rule is a pure tensor function `rule(outputs, layout, params) -> (N, K) log-scores`;
`softmax` of the result is the fused class distribution and `argmax` the prediction. `outputs`
holds one (N, n_e [+1]) logit tensor per expert: column i is the expert's i-th owned class, the
last column its "other" label when it has one.

- `concat` (the paper, §4): each class takes its owner's logit.
- `absnorm` (the paper, §5.5): each expert's own logits divided by their sum of absolute values.
- `softmax`: each expert's softmax over its own classes, concatenated.
- `calibrated`: concat of z_e / T_e + b_e, a temperature and a group bias per expert fitted on
  validation by minimising the fused negative log-likelihood.
- `other` (the paper's variant): P(c) ~ p_owner(c) * prod over other experts of p_e(other).
- `calibrated_other`: `other` with a fitted temperature and bias per expert.
- `router`: a mixture of experts, p(c|x) = p(g(c)|x) * p(c|x, g(c)). A router model (trained with
  balanced softmax over the groups, so its p(g|x) assumes equal group priors) gives p(g|x); under a
  class-balanced test prior a group's prior is its share of the classes, so log |G_g| is added to
  its log-probability. p(c|x, g) is the owner's softmax over its own classes (experts trained with
  a balanced loss, e.g. `--loss balanced_softmax`, give a prior-corrected one). Needs a router
  (`--router true`); its outputs are the last entry of `outputs`.

`oracle_predict` is the paper's measurement (route each image to its true group's expert): an
upper bound, never a fused prediction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ltexp import LtexpError, choices
from ltexp.choices import NEEDS_OTHER, NEEDS_ROUTER, registry
from ltexp.metrics import hit_rate


@dataclass(frozen=True)
class ExpertLayout:
    """Which classes each expert owns (label indices, in the expert's output order)."""

    owners: tuple[tuple[int, ...], ...]
    has_other: tuple[bool, ...]
    num_classes: int
    router: bool = False  # outputs end with a router's (N, num_experts) group logits

    def group_of(self) -> torch.Tensor:
        """Class -> index of the expert that owns it."""
        group = torch.full((self.num_classes,), -1, dtype=torch.long)
        for e, classes in enumerate(self.owners):
            group[list(classes)] = e
        if (group < 0).any():
            raise ValueError("every class must be owned by exactly one expert")
        return group


def _own(outputs: Sequence[torch.Tensor], layout: ExpertLayout) -> list[torch.Tensor]:
    return [out[:, :len(cls)].float() for out, cls in zip(outputs, layout.owners)]


def _scatter(parts: Sequence[torch.Tensor], layout: ExpertLayout) -> torch.Tensor:
    """Place each expert's per-own-class scores into the (N, K) label-order matrix."""
    n = parts[0].shape[0]
    scores = torch.empty(n, layout.num_classes, dtype=parts[0].dtype, device=parts[0].device)
    for part, classes in zip(parts, layout.owners):
        scores[:, list(classes)] = part
    return scores


def fuse_concat(outputs, layout: ExpertLayout, params: dict | None = None) -> torch.Tensor:
    return _scatter(_own(outputs, layout), layout)


def fuse_absnorm(outputs, layout: ExpertLayout, params: dict | None = None) -> torch.Tensor:
    # Divide by the L1 norm of the expert's own logits per image (eps: an all-zero row stays 0).
    return _scatter([z / z.abs().sum(dim=1, keepdim=True).clamp(min=1e-12) for z in _own(outputs, layout)], layout)


def fuse_softmax(outputs, layout: ExpertLayout, params: dict | None = None) -> torch.Tensor:
    return _scatter([F.log_softmax(z, dim=1) for z in _own(outputs, layout)], layout)


def _other_rule(outputs, layout: ExpertLayout, temperature=None, bias=None) -> torch.Tensor:
    """log p_owner(c) + sum over the other experts of log p_e(other) (+ owner bias)."""
    g = len(layout.owners)
    temperature = temperature if temperature is not None else torch.ones(g)
    bias = bias if bias is not None else torch.zeros(g)
    log_probs = [F.log_softmax(out.float() / temperature[e], dim=1) for e, out in enumerate(outputs[:g])]
    log_other = [lp[:, -1] if layout.has_other[e] else torch.zeros_like(lp[:, 0]) for e, lp in enumerate(log_probs)]
    total_other = torch.stack(log_other).sum(dim=0)
    parts = []
    for e, (lp, classes) in enumerate(zip(log_probs, layout.owners)):
        # p_owner(c) keeps the owner's own "other" mass out: it is the joint of "c, as far as
        # the owner can tell" with "not mine" from every other expert.
        parts.append(lp[:, :len(classes)] + (total_other - log_other[e])[:, None] + bias[e])
    return _scatter(parts, layout)


def fuse_other(outputs, layout: ExpertLayout, params: dict | None = None) -> torch.Tensor:
    if not all(layout.has_other):
        raise LtexpError("fusion 'other' needs experts with an \"other\" label (--expert-mode other)")
    return _other_rule(outputs, layout)


def _scaled_concat(outputs, layout: ExpertLayout, temperature, bias) -> torch.Tensor:
    """concat of z_e / T_e + b_e: raw logits on one calibrated scale."""
    return _scatter([z / temperature[e] + bias[e] for e, z in enumerate(_own(outputs, layout))], layout)


def _with_params(form: Callable, rule: str):
    def apply(outputs, layout: ExpertLayout, params: dict | None = None) -> torch.Tensor:
        if not params:
            raise ValueError(f"fusion {rule!r} needs parameters fitted on validation (fit_rule)")
        return form(outputs, layout, torch.as_tensor(params["temperature"], dtype=torch.float32),
                    torch.as_tensor(params["bias"], dtype=torch.float32))

    apply.__name__ = f"fuse_{rule}"
    return apply


def _group_scores(outputs, layout: ExpertLayout) -> torch.Tensor:
    """(N, G) log p(g|x) + log |G_g|: the router's group log-probabilities under the
    class-balanced test prior (up to a constant)."""
    shares = torch.tensor([math.log(len(c)) for c in layout.owners])
    route = outputs[len(layout.owners)].float()
    return F.log_softmax(route, dim=1) + shares.to(route.device)


def fuse_router(outputs, layout: ExpertLayout, params: dict | None = None) -> torch.Tensor:
    """log p(g|x) + log |G_g| + log p_owner(c|x) (see the module docstring)."""
    if not layout.router:
        raise LtexpError("fusion 'router' needs a router model (--router true)")
    groups = _group_scores(outputs, layout)
    parts = [F.log_softmax(z, dim=1) + groups[:, e, None] for e, z in enumerate(_own(outputs, layout))]
    return _scatter(parts, layout)


def route_accuracy(outputs, layout: ExpertLayout, labels: torch.Tensor) -> float:
    """The router's own accuracy: how often its most likely group (class-share prior included,
    as `router` fuses it) is the image's true group."""
    predicted = _group_scores(outputs, layout).argmax(1).cpu()
    return hit_rate(predicted == layout.group_of()[labels.cpu()])


fuse_calibrated = _with_params(_scaled_concat, "calibrated")
fuse_calibrated_other = _with_params(_other_rule, "calibrated_other")


def fit_temperature_bias(form: Callable, outputs, layout: ExpertLayout, labels: torch.Tensor, steps: int = 200) -> dict:
    """Per-expert temperature and bias minimising the fused NLL of `form` on (validation) `labels`.

    Optimised as inverse temperature s_e = 1 / T_e and bias b_e, in which the NLL of `calibrated`
    is convex (a softmax of functions linear in s and b), so L-BFGS finds the global optimum. The
    first expert's bias is fixed at 0: only differences matter.
    """
    g = len(layout.owners)
    outputs = [o.detach().float().cpu() for o in outputs]
    labels = labels.cpu()
    inverse_t = torch.ones(g, requires_grad=True)
    free_bias = torch.zeros(g - 1, requires_grad=True)
    optimizer = torch.optim.LBFGS([inverse_t, free_bias], lr=1.0, max_iter=steps, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        bias = torch.cat([torch.zeros(1), free_bias])
        loss = F.cross_entropy(form(outputs, layout, 1.0 / inverse_t, bias), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    # The optimum has s > 0 unless an expert is anti-informative; 1e-3 caps T at 1000 (a flat expert).
    return {"temperature": (1.0 / inverse_t.detach().clamp(min=1e-3)).tolist(),
            "bias": [0.0] + free_bias.detach().tolist()}


def fit_calibrated(outputs, layout: ExpertLayout, labels: torch.Tensor) -> dict:
    return fit_temperature_bias(_scaled_concat, outputs, layout, labels)


def fit_calibrated_other(outputs, layout: ExpertLayout, labels: torch.Tensor) -> dict:
    return fit_temperature_bias(_other_rule, outputs, layout, labels)


FUSIONS: dict[str, Callable] = registry("fusion rule", choices.FUSIONS, {
    "concat": fuse_concat,
    "absnorm": fuse_absnorm,
    "softmax": fuse_softmax,
    "calibrated": fuse_calibrated,
    "other": fuse_other,
    "calibrated_other": fuse_calibrated_other,
    "router": fuse_router,
})
FITTED = {"calibrated": fit_calibrated, "calibrated_other": fit_calibrated_other}  # fitted on validation


def applicable_rules(layout: ExpertLayout) -> list[str]:
    """Rules that can run on these experts (`other` rules need "other" labels on every expert,
    `router` a router)."""
    return [name for name in FUSIONS
            if (name not in NEEDS_OTHER or all(layout.has_other)) and (name not in NEEDS_ROUTER or layout.router)]


def fit_rule(name: str, outputs, layout: ExpertLayout, labels: torch.Tensor) -> dict:
    """The rule's fitted parameters ({} for rules without any)."""
    return FITTED[name](outputs, layout, labels) if name in FITTED else {}


def fuse(name: str, outputs, layout: ExpertLayout, params: dict | None = None) -> torch.Tensor:
    """Normalised log-probabilities (N, K) of rule `name`."""
    if name not in FUSIONS:
        raise LtexpError(f"unknown --fusion {name!r}: allowed are {', '.join(FUSIONS)}")
    return F.log_softmax(FUSIONS[name](outputs, layout, params), dim=1)


def oracle_predict(outputs, layout: ExpertLayout, labels: torch.Tensor) -> torch.Tensor:
    """The paper's measurement: each image goes to the expert of its *true* group (uses labels)."""
    group = layout.group_of()[labels.cpu()]
    predicted = torch.empty_like(labels.cpu())
    for e, (out, classes) in enumerate(zip(_own(outputs, layout), layout.owners)):
        rows = group == e
        predicted[rows] = torch.as_tensor(classes)[out.cpu()[rows].argmax(dim=1)]
    return predicted


def routing_accuracy(predicted: torch.Tensor, labels: torch.Tensor, layout: ExpertLayout) -> float:
    """Fraction of images whose predicted class lies in their true class's group."""
    group = layout.group_of()
    return hit_rate(group[predicted.cpu()] == group[labels.cpu()])
