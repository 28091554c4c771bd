"""Index samplers: which training images one epoch visits, drawn on the training device.

Re-sampling is just another index distribution over the device-resident set, so every method
shares one data path. Each sampler returns a 1-D int64 tensor of indices for one epoch.
"""

from __future__ import annotations

import torch


def _class_members(labels: torch.Tensor, num_classes: int) -> list[torch.Tensor]:
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    return list(torch.split(order, counts))


class InstanceSampler:
    """Every image once per epoch, in random order (plain instance-balanced training)."""

    name = "instance"

    def __call__(self, labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(labels.shape[0], device=labels.device, generator=generator)


class OverSampler:
    """Random over-sampling (the paper's ROS): every class drawn up to the largest class's count.

    Each class contributes all its images plus random repeats (with replacement) to reach
    `n_max`; the epoch has K * n_max images.
    """

    name = "over"

    def __call__(self, labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
        members = [m for m in _class_members(labels, num_classes) if len(m)]
        n_max = max(len(m) for m in members)
        parts = []
        for m in members:
            extra = torch.randint(0, len(m), (n_max - len(m),), device=labels.device, generator=generator)
            parts.append(torch.cat([m, m[extra]]))
        epoch = torch.cat(parts)
        return epoch[torch.randperm(len(epoch), device=labels.device, generator=generator)]


class UnderSampler:
    """Random under-sampling: every class drawn down to the smallest class's count, without replacement."""

    name = "under"

    def __call__(self, labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
        members = [m for m in _class_members(labels, num_classes) if len(m)]
        n_min = min(len(m) for m in members)
        parts = [m[torch.randperm(len(m), device=labels.device, generator=generator)[:n_min]] for m in members]
        epoch = torch.cat(parts)
        return epoch[torch.randperm(len(epoch), device=labels.device, generator=generator)]


class ClassBalancedSampler:
    """Class-balanced sampling (Kang et al. 2019): pick a class uniformly, then an image of it.

    The epoch has as many draws as there are training images, so its length matches
    instance sampling and only the class distribution changes.
    """

    name = "balanced"

    def __call__(self, labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
        counts = torch.bincount(labels, minlength=num_classes).to(torch.float32)
        weights = 1.0 / counts.clamp(min=1)[labels]
        return torch.multinomial(weights, labels.shape[0], replacement=True, generator=generator)


class OtherSubsampler:
    """For an expert with an "other" label (the last label): all own images plus a fresh random
    draw, without replacement, of `other_per_epoch` "other" images each epoch (the paper's
    sub-sampling of the other groups to an own-class count)."""

    name = "other"

    def __init__(self, other_per_epoch: int):
        self.other_per_epoch = other_per_epoch

    def __call__(self, labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
        other_label = num_classes - 1
        own = torch.nonzero(labels != other_label).flatten()
        others = torch.nonzero(labels == other_label).flatten()
        pick = torch.randperm(len(others), device=labels.device, generator=generator)[:self.other_per_epoch]
        epoch = torch.cat([own, others[pick]])
        return epoch[torch.randperm(len(epoch), device=labels.device, generator=generator)]


SAMPLERS = {s.name: s for s in (InstanceSampler, OverSampler, UnderSampler, ClassBalancedSampler, OtherSubsampler)}


def build_sampler(name: str, **options):
    """A sampler by name: `instance`, `over`, `under`, `balanced` or `other` (with `other_per_epoch`)."""
    return SAMPLERS[name](**options)
