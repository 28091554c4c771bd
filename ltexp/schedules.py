"""Learning-rate schedules: the factor each epoch's learning rate is the base rate times.

Torch-free, so the config can name the choices; the engine hands `Schedule.factor` to torch's
`LambdaLR`, whose state a checkpoint keeps. Epochs count from 1, as ltexp logs them.

- `step`: x `gamma` every `step` epochs (torch's StepLR; the paper's StepLR 150 / 0.1);
- `multistep`: x `gamma` after each of `milestones` (Cao et al. 2019: x 0.01 after epoch 160,
  x 0.0001 after 180, i.e. milestones 160,180 with gamma 0.01);
- `cosine`: from the base rate down to 0 over the stage (torch's CosineAnnealingLR, T_max = epochs);
- `constant`: the base rate throughout (the short second stages of LWS and cRT).

Any schedule may start with a linear warm-up: epoch e <= `warmup` uses e / `warmup` of its
rate (Cao et al.'s 5 epochs: lr x 1/5, 2/5, ..., 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

LR_SCHEDULES = ("step", "multistep", "cosine")


def parse_milestones(text: str) -> tuple[int, ...]:
    """`"160,180"` -> (160, 180); raises ValueError unless they are increasing positive integers."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    values = tuple(int(p) for p in parts)  # ValueError for a non-integer
    if any(v < 1 for v in values) or list(values) != sorted(set(values)):
        raise ValueError(text)
    return values


@dataclass(frozen=True)
class Schedule:
    """One stage's learning-rate factor per epoch (see the module docstring)."""

    kind: str = "constant"
    epochs: int = 1                     # the stage's length (cosine)
    step: int = 1                       # step: epochs between decays
    gamma: float = 1.0                  # step / multistep: the decay factor
    milestones: tuple[int, ...] = ()    # multistep: the rate is multiplied by gamma after each
    warmup: int = 0                     # epochs of linear warm-up at the start

    def factor(self, epoch: int) -> float:
        """The multiplier of the base learning rate in `epoch` (1-based)."""
        if self.kind == "step":
            value = self.gamma ** ((epoch - 1) // self.step)
        elif self.kind == "multistep":
            value = self.gamma ** sum(epoch > m for m in self.milestones)
        elif self.kind == "cosine":
            value = 0.5 * (1.0 + math.cos(math.pi * (epoch - 1) / self.epochs))
        else:
            value = 1.0
        if epoch <= self.warmup:
            value *= epoch / self.warmup
        return value
