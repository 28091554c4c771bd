"""Methods: each is a small object that tells the one engine what to train and how.

A method lists its experts (one owning every class for single-model methods), the `Stage`s each
expert trains through (sampler, loss, which parameters train, learning-rate settings), the head
its models need, an optional post-hoc step on the trained model (chosen on validation), and the
fusion rules that may turn its experts' outputs into one prediction. The engine runs stages in
order and never looks at a method's name; adding a method means adding a class here and an entry
in `METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from ltexp import choices, posthoc
from ltexp.choices import STUDENT, registry
from ltexp.data.longtail import ClassInfo, default_split_at, validate_split_at
from ltexp.fusion import applicable_rules
from ltexp.losses import BalancedSoftmax as BalancedSoftmaxLoss, Distilled, Loss, build_loss, head_for
from ltexp.schedules import Schedule, parse_milestones

if TYPE_CHECKING:
    from ltexp.models import Classifier

# Which parameters a stage updates.
TRAIN_NETWORK = "network"             # everything except the LWS scales
TRAIN_NETWORK_AND_SCALES = "network+scales"
TRAIN_SCALES = "scales"               # only the LWS scales; the rest frozen, BatchNorm in eval mode
TRAIN_HEAD = "head"                   # only the linear classifier; the rest frozen, BatchNorm in eval mode


# What a model of a method is: an expert owning classes, a router predicting the group, or a
# student over all classes taught by the experts.
EXPERT, ROUTER = "expert", "router"


@dataclass(frozen=True)
class Stage:
    """One phase of training: `epochs` epochs of SGD with a learning-rate schedule, on one loss."""

    name: str
    epochs: int
    sampler: str          # see ltexp.data.sampling.SAMPLERS
    trainable: str        # TRAIN_NETWORK, TRAIN_NETWORK_AND_SCALES, TRAIN_SCALES or TRAIN_HEAD
    lr: float
    momentum: float
    weight_decay: float
    schedule: Schedule    # the factor of `lr` per epoch of the stage
    loss: Loss
    sampler_options: dict = field(default_factory=dict)  # e.g. {"other_per_epoch": 40}
    reset_head: bool = False  # re-initialise the linear classifier first (classifier re-training)


@dataclass(frozen=True)
class ExpertSpec:
    """One model to train: the classes it owns and whether it has an extra "other" label.

    Its output index i means class `classes[i]`; index len(classes) is "other" when `other`.
    A single-model method is one expert that owns every class.
    """

    name: str
    classes: tuple[int, ...]
    other: bool = False
    other_per_epoch: int = 0  # "other" images drawn per epoch (expert_mode=other)
    role: str = EXPERT        # EXPERT, ROUTER or STUDENT
    routes: tuple[tuple[int, ...], ...] = ()  # a router's groups: output g means "a class in routes[g]"
    route_names: tuple[str, ...] = ()

    @property
    def num_outputs(self) -> int:
        return len(self.routes) if self.role == ROUTER else len(self.classes) + int(self.other)


class Baseline:
    """Cross-entropy (or `--loss`) on the long-tailed set, every image once per epoch."""

    name = "baseline"

    def __init__(self, cfg):
        self.cfg = cfg  # the run's `ltexp.config.RunConfig`

    @property
    def head(self) -> str:
        """The classifier head its models need (`linear`, `cosine` for LDAM)."""
        return head_for(self.cfg.loss.loss)

    @property
    def learn_scales(self) -> bool:
        return False

    def experts(self, info: ClassInfo) -> list[ExpertSpec]:
        """Single-model methods: one expert owning every class (label order)."""
        return [ExpertSpec("all", tuple(range(info.num_classes)))]

    def fusion_rules(self, layout) -> list[str]:
        """Rules that may fuse its experts; one expert owning every class needs only `concat` (identity)."""
        return ["concat"]

    def router(self, experts: list[ExpertSpec]) -> ExpertSpec | None:
        """A model that predicts which expert's group an image belongs to (None: no router)."""
        return None

    def student(self, info: ClassInfo) -> ExpertSpec | None:
        """A model over every class that the experts teach after they trained (None: no student)."""
        return None

    def _stage(self, info: ClassInfo, sampler: str, trainable: str = TRAIN_NETWORK) -> Stage:
        optim = self.cfg.optim
        schedule = Schedule(optim.lr_schedule, optim.epochs, optim.lr_step, optim.lr_gamma,
                            parse_milestones(optim.lr_milestones) if optim.lr_schedule == "multistep" else (),
                            optim.warmup_epochs)
        return Stage("train", optim.epochs, sampler, trainable, optim.lr, optim.momentum, optim.weight_decay,
                     schedule, build_loss(self.cfg.loss, info.train_counts))

    def stages(self, info: ClassInfo, spec: ExpertSpec | None = None) -> list[Stage]:
        """The stages of model `spec`, whose outputs have the training counts `info.train_counts`."""
        return [self._stage(info, "instance")]

    def posthoc(self, model: "Classifier", val_logits: torch.Tensor, val_labels: torch.Tensor,
                info: ClassInfo) -> dict[str, float]:
        """A post-hoc change of the trained model chosen on validation; returns what was chosen."""
        return {}


class Resample(Baseline):
    """Re-sampling: `over` (the paper's ROS), `under`, or class-`balanced` sampling."""

    name = "resample"

    def stages(self, info: ClassInfo, spec: ExpertSpec | None = None) -> list[Stage]:
        return [self._stage(info, self.cfg.method.sampling)]


class LWS(Baseline):
    """Learnable weight scaling of the classifier (Kang et al. 2019).

    `joint` (the paper): the scales train with the network from the start.
    `decoupled` (Kang et al.): normal training first, then only the scales train for
    `lws_epochs` epochs with class-balanced sampling (no weight decay: it would pull scales to 0).
    """

    name = "lws"

    @property
    def learn_scales(self) -> bool:
        return True

    def stages(self, info: ClassInfo, spec: ExpertSpec | None = None) -> list[Stage]:
        m = self.cfg.method
        if m.lws_mode == "joint":
            return [self._stage(info, "instance", TRAIN_NETWORK_AND_SCALES)]
        scales = Stage("lws", m.lws_epochs, "balanced", TRAIN_SCALES, m.lws_lr, self.cfg.optim.momentum, 0.0,
                       Schedule(), build_loss(self.cfg.loss, info.train_counts))
        return [self._stage(info, "instance"), scales]


class BalancedSoftmax(Baseline):
    """Balanced softmax (Ren et al. 2020): the loss adds log(prior) to the logits."""

    name = "balanced_softmax"


class LogitAdjust(Baseline):
    """Logit-adjusted loss (Menon et al. 2021): the loss adds tau * log(prior) to the logits."""

    name = "logit_adjust"


class LDAMDRW(Baseline):
    """LDAM loss with deferred re-weighting (Cao et al. 2019), on a cosine classifier."""

    name = "ldam_drw"


class FocalMethod(Baseline):
    """Focal loss (Lin et al. 2017)."""

    name = "focal"


class LogitAdjustPosthoc(Baseline):
    """Post-hoc logit adjustment (Menon et al. 2021): train normally, then subtract tau * log(prior)
    from the logits, tau chosen on validation (no retraining; tau = 0 is the plain model)."""

    name = "logit_adjust_posthoc"

    def posthoc(self, model, val_logits, val_labels, info):
        return posthoc.logit_adjust(model, val_logits, val_labels, info.train_counts)


class TauNorm(Baseline):
    """tau-normalised classifier (Kang et al. 2019): each class's classifier divided by its weight
    norm to the power tau, tau chosen on validation (tau = 0 is the plain model)."""

    name = "tau_norm"

    def posthoc(self, model, val_logits, val_labels, info):
        return posthoc.tau_normalise(model, val_logits, val_labels)


class CRT(Baseline):
    """Classifier re-training (Kang et al. 2019): train normally, then re-initialise the linear
    classifier and train only it on frozen features with class-balanced sampling."""

    name = "crt"

    def stages(self, info: ClassInfo, spec: ExpertSpec | None = None) -> list[Stage]:
        m, optim = self.cfg.method, self.cfg.optim
        retrain = Stage("crt", m.crt_epochs, "balanced", TRAIN_HEAD, m.crt_lr, optim.momentum, optim.weight_decay,
                        Schedule(), build_loss(self.cfg.loss, info.train_counts), reset_head=True)
        return [self._stage(info, "instance"), retrain]


GROUP_NAMES = {2: ("head", "tail"), 3: ("head", "medium", "tail")}


class Split(LWS):
    """The paper's method: one expert per group of classes ranked by training count.

    `expert_mode=own`: each expert trains only on its group's images. `expert_mode=other`:
    each expert also learns an "other" label, fed each epoch with a fresh random draw of
    `other_size` (mean / min / max own-class count) images of the other groups. Each expert
    uses LWS (`lws`, with `lws_mode`) like the paper, or plain training.

    Two honest designs beyond the paper's fusion rules: `router` adds a model that predicts the
    group (balanced softmax over the groups; the `router` fusion rule mixes the experts with it),
    `distill` adds a student over every class trained with `--loss` plus the teaching of each
    image's own group expert (`losses.Distilled`); the student competes with the fusion rules on
    validation and, when chosen, is served alone.
    """

    name = "split"

    @property
    def learn_scales(self) -> bool:
        return self.cfg.split.lws

    def experts(self, info: ClassInfo) -> list[ExpertSpec]:
        split_cfg = self.cfg.split
        ranks = split_cfg.split_ranks()
        split = validate_split_at(ranks if ranks is not None else default_split_at(info.num_classes, split_cfg.num_groups),
                                  info.num_classes)
        groups = info.group_of(split)
        names = GROUP_NAMES.get(len(split) + 1) or tuple(f"group{g}" for g in range(len(split) + 1))
        order = info.rank_order
        specs = []
        for g, name in enumerate(names):
            owned = tuple(int(c) for c in order if groups[c] == g)
            counts = info.train_counts[list(owned)]
            other_n = int({"mean": np.mean, "min": np.min, "max": np.max}[split_cfg.other_size](counts))
            # No more "other" images can be drawn per epoch than the other groups have.
            other_n = min(max(1, other_n), int(info.train_counts.sum() - counts.sum()))
            other = split_cfg.expert_mode == "other"
            specs.append(ExpertSpec(name, owned, other, other_n if other else 0))
        return specs

    def fusion_rules(self, layout) -> list[str]:
        chosen = self.cfg.split.fusion
        if chosen == STUDENT:
            return []  # the student alone is served; the experts are its teachers
        return applicable_rules(layout) if chosen == "auto" else [chosen]

    def router(self, experts: list[ExpertSpec]) -> ExpertSpec | None:
        """The group router (`--router true`): one output per expert's group."""
        if not self.cfg.split.router:
            return None
        return ExpertSpec(ROUTER, (), role=ROUTER, routes=tuple(e.classes for e in experts),
                          route_names=tuple(e.name for e in experts))

    def student(self, info: ClassInfo) -> ExpertSpec | None:
        """The distilled student over every class (`--distill true`)."""
        return ExpertSpec(STUDENT, tuple(range(info.num_classes)), role=STUDENT) if self.cfg.split.distill else None

    def stages(self, info: ClassInfo, spec: ExpertSpec | None = None) -> list[Stage]:
        if spec is not None and spec.role == ROUTER:
            # Balanced softmax over the groups: the router's p(g|x) assumes equal group priors,
            # which the `router` rule turns into the class-balanced test prior.
            return [replace(self._stage(info, "instance"), name=ROUTER, loss=BalancedSoftmaxLoss(info.train_counts))]
        if spec is not None and spec.role == STUDENT:
            split_cfg = self.cfg.split
            stage = self._stage(info, split_cfg.student_sampling)
            return [replace(stage, name=STUDENT, loss=Distilled(stage.loss, split_cfg.distill_temperature,
                                                                split_cfg.distill_weight))]
        stages = LWS.stages(self, info, spec) if self.cfg.split.lws else Baseline.stages(self, info, spec)
        if spec is not None and spec.other:
            # The main stage draws every own image plus `other_per_epoch` "other" images.
            stages[0] = replace(stages[0], sampler="other", sampler_options={"other_per_epoch": spec.other_per_epoch})
        return stages


# A method defined by its loss trains with that loss only: `choices.METHOD_LOSS`, which the config reads.
METHODS = registry("method", choices.METHODS, {m.name: m for m in (Baseline, Resample, LWS, Split, BalancedSoftmax,
                                                                   LogitAdjust, LDAMDRW, FocalMethod, LogitAdjustPosthoc,
                                                                   TauNorm, CRT)})


def build_method(cfg):
    """The method object named by `cfg.method.method` (`cfg`: a `ltexp.config.RunConfig`)."""
    return METHODS[cfg.method.method](cfg)
