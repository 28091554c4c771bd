"""Training losses, each built from the training counts of the classes a model outputs.

A `Stage` (ltexp/methods.py) carries one built loss; the engine calls `loss(logits, labels)` and
`loss.start_epoch(epoch)` and knows no loss by name. Every loss here is a cross-entropy on
adjusted logits, optionally class-weighted:

- `ce`: plain cross-entropy.
- `balanced_softmax` (Ren et al. 2020): CE on `z + log pi`, pi = the training class prior.
- `logit_adjust` (Menon et al. 2021, loss form): CE on `z + tau * log pi`; tau = 1 is balanced softmax.
- `ldam` (Cao et al. 2019): CE on `z - s * m_y` at the true class, margins m_c proportional to
  n_c^(-1/4) and scaled so the largest is `ldam_max_margin`; trained on a cosine head whose logits
  are s * cos (s = `ldam_scale`), as the reference implementation. With deferred re-weighting
  (DRW) from epoch `drw_epoch`: class weights from the effective number of samples,
  (1 - beta) / (1 - beta^n_c), normalised to sum to K.
- `focal` (Lin et al. 2017): (1 - p_y)^gamma * CE.

`Distilled` wraps any of them for a student taught by experts (Xiang et al. 2020, "Learning From
Multiple Experts"): the base loss plus `weight * T^2 * KL(teacher || student)` at temperature T,
over the classes the image's teacher scores.

Counts include an expert's "other" label when it has one (its count is the images it draws per
epoch), so every loss is built from what the model really sees.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ltexp import LtexpError
from ltexp.choices import LOSS_OPTIONS, registry

# Heads a loss may require (ltexp/models.py builds them).
LINEAR_HEAD = "linear"
COSINE_HEAD = "cosine"


def log_prior(counts: Sequence[int]) -> torch.Tensor:
    """log of the class prior n_c / sum(n); a class with no image counts as one image."""
    n = torch.as_tensor(list(counts), dtype=torch.float32).clamp(min=1.0)
    return torch.log(n / n.sum())


def ldam_margins(counts: Sequence[int], max_margin: float) -> torch.Tensor:
    """LDAM margins m_c = C / n_c^(1/4), with C chosen so that the largest margin is `max_margin`."""
    n = torch.as_tensor(list(counts), dtype=torch.float64).clamp(min=1.0)
    m = n.pow(-0.25)
    return (m * (max_margin / m.max())).float()


def effective_number_weights(counts: Sequence[int], beta: float) -> torch.Tensor:
    """Class-balanced weights (Cui et al. 2019): (1 - beta) / (1 - beta^n_c), normalised to sum to K."""
    n = torch.as_tensor(list(counts), dtype=torch.float64).clamp(min=1.0)
    w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(n)).float()


class Loss:
    """A training loss: `loss(logits, labels)` -> scalar; `start_epoch(e)` before stage epoch e (from 1)."""

    head = LINEAR_HEAD

    def __init__(self, counts: Sequence[int]):
        self.counts = [int(c) for c in counts]
        self.weight: torch.Tensor | None = None  # class weights in use, or None

    def start_epoch(self, epoch: int) -> None:
        """Losses with a schedule (DRW) switch here; the others ignore it."""

    def adjusted(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(logits.device) if self.weight is not None else None
        return F.cross_entropy(self.adjusted(logits.float(), labels), labels, weight=weight)


class CrossEntropy(Loss):
    name = "ce"


class LogitAdjusted(Loss):
    """CE on z + tau * log(prior) (Menon et al. 2021); tau = 1 is balanced softmax."""

    name = "logit_adjust"

    def __init__(self, counts: Sequence[int], tau: float = 1.0):
        super().__init__(counts)
        self.tau = float(tau)
        self.offset = self.tau * log_prior(self.counts)

    def adjusted(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return logits + self.offset.to(logits.device)


class BalancedSoftmax(LogitAdjusted):
    """Balanced softmax (Ren et al. 2020): CE on z + log(prior)."""

    name = "balanced_softmax"

    def __init__(self, counts: Sequence[int]):
        super().__init__(counts, tau=1.0)


class LDAM(Loss):
    """LDAM margins (on a cosine head, logits = s * cos) with deferred re-weighting from `drw_epoch`."""

    name = "ldam"
    head = COSINE_HEAD

    def __init__(self, counts: Sequence[int], ldam_max_margin: float = 0.5, ldam_scale: float = 30.0,
                 drw_epoch: int = 0, drw_beta: float = 0.9999):
        super().__init__(counts)
        self.scale = float(ldam_scale)
        self.margins = ldam_margins(self.counts, ldam_max_margin)
        self.drw_epoch = int(drw_epoch)          # 0 = no re-weighting
        self.drw_weights = effective_number_weights(self.counts, drw_beta)

    def start_epoch(self, epoch: int) -> None:
        self.weight = self.drw_weights if self.drw_epoch and epoch >= self.drw_epoch else None

    def adjusted(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # The head already multiplies cosines by s, so the margin is subtracted in the same units.
        margin = self.margins.to(logits.device)[labels] * self.scale
        return logits - F.one_hot(labels, logits.shape[1]).to(logits.dtype) * margin[:, None]


class Focal(Loss):
    """Focal loss (Lin et al. 2017): mean over the batch of (1 - p_y)^gamma * -log p_y."""

    name = "focal"

    def __init__(self, counts: Sequence[int], focal_gamma: float = 1.0):
        super().__init__(counts)
        self.gamma = float(focal_gamma)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, labels[:, None]).squeeze(1)
        return (-(1.0 - log_p.exp()).pow(self.gamma) * log_p).mean()


class Distilled(Loss):
    """`base(logits, labels) + weight * T^2 * KL(softmax(a(t) / T) || softmax(a(z) / T))`, both
    softmaxes over the classes where the image's teacher logits `t` are finite (its expert's
    classes); `a` is the base loss's logit adjustment (identity for `ce`).

    T^2 keeps the distillation gradient's size independent of T (Hinton et al. 2015). Without
    teacher targets it is the base loss (a batch of images no expert taught).
    """

    name = "distilled"

    def __init__(self, base: Loss, temperature: float, weight: float):
        super().__init__(base.counts)
        self.base, self.temperature, self.weight_kd = base, float(temperature), float(weight)
        self.head = base.head

    def start_epoch(self, epoch: int) -> None:
        self.base.start_epoch(epoch)

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.base(logits, labels)
        if teacher is None or self.weight_kd == 0:
            return loss
        scored = torch.isfinite(teacher)
        t = self.temperature
        # Both sides in the space the base loss trains in (balanced softmax: z + log prior). On
        # training images a teacher is nearly one-hot, so a KL on raw logits would act as plain,
        # prior-biased cross-entropy and undo the balancing; within one group the prior offset is
        # the teacher's own training offset up to a constant, which a softmax ignores.
        student = self.base.adjusted(logits.float(), labels)
        teacher = self.base.adjusted(teacher.float(), labels)
        log_student = F.log_softmax((student / t).masked_fill(~scored, float("-inf")), dim=1)
        log_teacher = F.log_softmax((teacher / t).masked_fill(~scored, float("-inf")), dim=1)
        kl = (log_teacher.exp() * (log_teacher - log_student)).masked_fill(~scored, 0.0).sum(dim=1)
        return loss + self.weight_kd * t * t * kl.mean()


# Keyword arguments = the loss's settings in `choices.LOSS_OPTIONS` (`LossConfig` field names).
LOSSES = registry("loss", LOSS_OPTIONS, {cls.name: cls for cls in (CrossEntropy, BalancedSoftmax, LogitAdjusted, LDAM,
                                                                   Focal)})


def build_loss(settings, counts: Sequence[int]) -> Loss:
    """The loss named by `settings.loss` (a `config.LossConfig`), built with the settings it
    reads (`choices.LOSS_OPTIONS`), for classes with these training counts."""
    name = settings.loss
    if name not in LOSSES:
        raise LtexpError(f"unknown --loss {name!r}: allowed are {', '.join(LOSSES)}")
    return LOSSES[name](counts, **{option: getattr(settings, option) for option in LOSS_OPTIONS[name]})


def head_for(loss: str) -> str:
    """The classifier head a loss trains on (`linear`, or `cosine` for LDAM)."""
    return LOSSES[loss].head
