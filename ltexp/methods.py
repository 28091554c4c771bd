"""Methods: each is a small object that tells the one engine which stages to run.

A `Stage` names the sampler, which parameters train, and its learning-rate settings. The engine
runs stages in order and never looks at a method's name; adding a method means adding a class
here and an entry in `METHODS`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ltexp.config import MethodConfig, OptimConfig

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


def _network_stage(optim: OptimConfig, sampler: str, trainable: str = TRAIN_NETWORK) -> Stage:
    return Stage("train", optim.epochs, sampler, trainable, optim.lr, optim.weight_decay,
                 optim.lr_step, optim.lr_gamma)


class Baseline:
    """Cross-entropy on the long-tailed set, every image once per epoch."""

    name = "baseline"

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    def stages(self, optim: OptimConfig) -> list[Stage]:
        return [_network_stage(optim, "instance")]


class Resample(Baseline):
    """Re-sampling: `over` (the paper's ROS), `under`, or class-`balanced` sampling."""

    name = "resample"

    def stages(self, optim: OptimConfig) -> list[Stage]:
        return [_network_stage(optim, self.cfg.sampling)]


class LWS(Baseline):
    """Learnable weight scaling of the classifier (Kang et al. 2019).

    `joint` (the paper): the scales train with the network from the start.
    `decoupled` (Kang et al.): cross-entropy training first, then only the scales train for
    `lws_epochs` epochs with class-balanced sampling (no weight decay: it would pull scales to 0).
    """

    name = "lws"

    def stages(self, optim: OptimConfig) -> list[Stage]:
        if self.cfg.lws_mode == "joint":
            return [_network_stage(optim, "instance", TRAIN_NETWORK_AND_SCALES)]
        scales = Stage("lws", self.cfg.lws_epochs, "balanced", TRAIN_SCALES, self.cfg.lws_lr, 0.0,
                       max(1, self.cfg.lws_epochs), 1.0)
        return [_network_stage(optim, "instance"), scales]


METHODS = {m.name: m for m in (Baseline, Resample, LWS)}


def build_method(cfg: MethodConfig):
    """The method object named by `cfg.method`."""
    return METHODS[cfg.method](cfg)
