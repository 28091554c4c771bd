"""Data that lives on the training device as uint8 and is augmented there in batches.

Keeping uint8 on the device is airbench's habit: 4x less memory than float32 and no host->device
copy per step; conversion to float and normalisation happen inside the model (`Classifier`), so
the served model takes the same uint8 images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ltexp.choices import AUGMENTS, registry


@dataclass
class DeviceImages:
    """Images (N, C, H, W) uint8 and labels (N,) int64, both on one device."""

    images: torch.Tensor
    labels: torch.Tensor
    # Optional per-image soft targets (N, K) a distillation loss reads (a teacher's logits, -inf
    # outside the classes the teacher scores); None for plain training.
    soft_targets: torch.Tensor | None = None

    @classmethod
    def from_numpy(cls, images_nhwc: np.ndarray, labels: np.ndarray, device: torch.device | str) -> "DeviceImages":
        images = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).contiguous()
        return cls(images.to(device), torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device))

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def nbytes(self) -> int:
        """Device memory held by the images and labels, in bytes."""
        return self.images.numel() * self.images.element_size() + self.labels.numel() * 8


class CropFlip:
    """Batched `RandomCrop(size, padding)` + optional `RandomHorizontalFlip()` on uint8 (N,C,H,W).

    Matches torchvision's semantics: zero padding of `padding` pixels on every side, a crop
    offset drawn uniformly from 0..2*padding in each axis per image, and a flip with
    probability 1/2 per image. Crop and flip are one gather, so the batch is copied once.
    """

    def __init__(self, padding: int, flip: bool):
        self.padding = padding
        self.flip = flip

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n, c, h, w = images.shape
        p = self.padding
        if p == 0 and not self.flip:
            return images
        device = images.device
        padded = torch.nn.functional.pad(images, (p, p, p, p)) if p else images
        oy = torch.randint(0, 2 * p + 1, (n, 1), device=device, generator=generator)
        ox = torch.randint(0, 2 * p + 1, (n, 1), device=device, generator=generator)
        rows = oy + torch.arange(h, device=device)                      # (N, H)
        cols = torch.arange(w, device=device).expand(n, w)
        if self.flip:
            flip = torch.rand(n, 1, device=device, generator=generator) < 0.5
            cols = torch.where(flip, (w - 1) - cols, cols)
        cols = ox + cols                                                # (N, W)
        batch = torch.arange(n, device=device)[:, None, None]
        # Advanced indexing puts the indexed dims first: (N, H, W, C) -> back to (N, C, H, W).
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def build_augment(name: str, image_size: int) -> CropFlip:
    """`crop_flip` (CIFAR's standard), `crop` (for digits, where a flip changes the class) or `none`.

    Padding is 4 px for 32-px images (the CIFAR recipe) and scales with the image (1 px at 8x8).
    """
    padding = max(1, round(image_size / 8))
    return registry("augmentation", AUGMENTS, {"crop_flip": CropFlip(padding, True), "crop": CropFlip(padding, False),
                                               "none": CropFlip(0, False)})[name]
