"""Methods: each is a small object that tells the one engine which stages to run.

A `Stage` names the sampler, which parameters train, and its learning-rate settings. The engine
runs stages in order and never looks at a method's name; adding a method means adding a class
here and an entry in `METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ltexp.config import MethodConfig, OptimConfig, SplitConfig
from ltexp.data.longtail import ClassInfo, default_split_at, validate_split_at

# Which parameters a stage updates.
TRAIN_NETWORK = "network"             # everything except the LWS scales
TRAIN_NETWORK_AND_SCALES = "network+scales"
TRAIN_SCALES = "scales"               # only the LWS scales; the rest frozen, BatchNorm in eval mode


@dataclass(frozen=True)
class Stage:
    """One phase of training: `epochs` epochs of SGD with a step schedule."""

    name: str
    epochs: int
    sampler: str          # see ltexp.data.sampling.SAMPLERS
    trainable: str        # TRAIN_NETWORK, TRAIN_NETWORK_AND_SCALES or TRAIN_SCALES
    lr: float
    weight_decay: float
    lr_step: int
    lr_gamma: float
    sampler_options: dict = field(default_factory=dict)  # e.g. {"other_per_epoch": 40}


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

    @property
    def num_outputs(self) -> int:
        return len(self.classes) + int(self.other)


def _network_stage(optim: OptimConfig, sampler: str, trainable: str = TRAIN_NETWORK) -> Stage:
    return Stage("train", optim.epochs, sampler, trainable, optim.lr, optim.weight_decay,
                 optim.lr_step, optim.lr_gamma)


class Baseline:
    """Cross-entropy on the long-tailed set, every image once per epoch."""

    name = "baseline"

    def __init__(self, cfg: MethodConfig, split: SplitConfig | None = None):
        self.cfg = cfg
        self.split = split or SplitConfig()

    def experts(self, info: ClassInfo) -> list[ExpertSpec]:
        """Single-model methods: one expert owning every class (label order)."""
        return [ExpertSpec("all", tuple(range(info.num_classes)))]

    def stages(self, optim: OptimConfig, expert: ExpertSpec | None = None) -> list[Stage]:
        return [_network_stage(optim, "instance")]


class Resample(Baseline):
    """Re-sampling: `over` (the paper's ROS), `under`, or class-`balanced` sampling."""

    name = "resample"

    def stages(self, optim: OptimConfig, expert: ExpertSpec | None = None) -> list[Stage]:
        return [_network_stage(optim, self.cfg.sampling)]


class LWS(Baseline):
    """Learnable weight scaling of the classifier (Kang et al. 2019).

    `joint` (the paper): the scales train with the network from the start.
    `decoupled` (Kang et al.): cross-entropy training first, then only the scales train for
    `lws_epochs` epochs with class-balanced sampling (no weight decay: it would pull scales to 0).
    """

    name = "lws"

    def stages(self, optim: OptimConfig, expert: ExpertSpec | None = None) -> list[Stage]:
        if self.cfg.lws_mode == "joint":
            return [_network_stage(optim, "instance", TRAIN_NETWORK_AND_SCALES)]
        scales = Stage("lws", self.cfg.lws_epochs, "balanced", TRAIN_SCALES, self.cfg.lws_lr, 0.0,
                       max(1, self.cfg.lws_epochs), 1.0)
        return [_network_stage(optim, "instance"), scales]


GROUP_NAMES = {2: ("head", "tail"), 3: ("head", "medium", "tail")}


class Split(LWS):
    """The paper's method: one expert per group of classes ranked by training count.

    `expert_mode=own`: each expert trains only on its group's images. `expert_mode=other`:
    each expert also learns an "other" label, fed each epoch with a fresh random draw of
    `other_size` (mean / min / max own-class count) images of the other groups. Each expert
    uses LWS (`lws`, with `lws_mode`) like the paper, or plain cross-entropy.
    """

    name = "split"

    def experts(self, info: ClassInfo) -> list[ExpertSpec]:
        ranks = self.split.split_ranks()
        split = validate_split_at(ranks if ranks is not None else default_split_at(info.num_classes, self.split.num_groups),
                                  info.num_classes)
        groups = info.group_of(split)
        names = GROUP_NAMES.get(len(split) + 1) or tuple(f"group{g}" for g in range(len(split) + 1))
        order = info.rank_order
        specs = []
        for g, name in enumerate(names):
            owned = tuple(int(c) for c in order if groups[c] == g)
            counts = info.train_counts[list(owned)]
            other_n = int({"mean": np.mean, "min": np.min, "max": np.max}[self.split.other_size](counts))
            other = self.split.expert_mode == "other"
            specs.append(ExpertSpec(name, owned, other, max(1, other_n) if other else 0))
        return specs

    def stages(self, optim: OptimConfig, expert: ExpertSpec | None = None) -> list[Stage]:
        stages = LWS.stages(self, optim) if self.split.lws else Baseline.stages(self, optim)
        if expert is not None and expert.other:
            # The main stage draws every own image plus `other_per_epoch` "other" images.
            stages[0] = replace(stages[0], sampler="other", sampler_options={"other_per_epoch": expert.other_per_epoch})
        return stages


METHODS = {m.name: m for m in (Baseline, Resample, LWS, Split)}


def build_method(cfg: MethodConfig, split: SplitConfig | None = None):
    """The method object named by `cfg.method` (`split` settings matter to the split method only)."""
    return METHODS[cfg.method](cfg, split)
