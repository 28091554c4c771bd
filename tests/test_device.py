"""Device-resident data: the batched augmentation matches torchvision, samplers change frequencies."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from torchvision import transforms

from ltexp.data.device import CropFlip, DeviceImages, build_augment
from ltexp.data.sampling import build_sampler


def _candidates(image: torch.Tensor, padding: int, flip: bool) -> dict[bytes, tuple]:
    """Every output RandomCrop(padding)+flip can give, keyed by bytes -> (dy, dx, flipped)."""
    c, h, w = image.shape
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    out = {}
    for dy in range(2 * padding + 1):
        for dx in range(2 * padding + 1):
            crop = padded[:, dy:dy + h, dx:dx + w]
            out[crop.numpy().tobytes()] = (dy, dx, False)
            if flip:
                out[crop.flip(-1).numpy().tobytes()] = (dy, dx, True)
    return out


@pytest.mark.parametrize("padding,flip", [(4, True), (1, False)])
def test_crop_flip_matches_torchvision_distribution(padding, flip):
    torch.manual_seed(0)
    size = 8 * padding
    # Distinct pixel values, so every crop offset and flip gives a different output.
    image = (torch.arange(3 * size * size) % 251 + 1).to(torch.uint8).view(3, size, size)
    support = _candidates(image, padding, flip)
    n_outcomes = (2 * padding + 1) ** 2 * (2 if flip else 1)
    assert len(support) == n_outcomes
    draws = 40 * n_outcomes

    ours = CropFlip(padding, flip)(image.expand(draws, -1, -1, -1).contiguous(), torch.Generator().manual_seed(1))
    tv = transforms.Compose([transforms.RandomCrop(size, padding=padding)]
                            + ([transforms.RandomHorizontalFlip()] if flip else []))
    theirs = torch.stack([tv(image) for _ in range(draws)])

    keys = list(support)
    for outputs in (ours, theirs):
        seen = [o.numpy().tobytes() for o in outputs]
        assert set(seen) <= set(support)  # same support: only outputs torchvision can produce
        counts = np.array([seen.count(k) for k in keys])
        assert (counts > 0).all()
        assert chisquare(counts).pvalue > 1e-3  # uniform over offsets x flips, like torchvision
    assert ours.dtype == torch.uint8 and ours.shape == (draws, 3, size, size)


def test_no_augment_is_identity_and_padding_scales():
    batch = torch.randint(0, 255, (4, 1, 8, 8), dtype=torch.uint8)
    assert torch.equal(build_augment("none", 8)(batch), batch)
    assert build_augment("crop_flip", 32).padding == 4 and build_augment("crop", 8).padding == 1


def test_device_images_hold_uint8_and_cost_their_size():
    images = np.random.default_rng(0).integers(0, 255, (50, 32, 32, 3), dtype=np.uint8)
    dev = DeviceImages.from_numpy(images, np.arange(50) % 10, "cpu")
    assert dev.images.dtype == torch.uint8 and dev.images.shape == (50, 3, 32, 32)
    assert dev.nbytes == images.nbytes + 50 * 8
    assert torch.equal(dev.images[7].permute(1, 2, 0), torch.from_numpy(images[7]))


LABELS = torch.tensor([0] * 100 + [1] * 30 + [2] * 5)


def test_instance_sampler_visits_every_image_once():
    idx = build_sampler("instance")(LABELS, 3, torch.Generator().manual_seed(0))
    assert sorted(idx.tolist()) == list(range(len(LABELS)))


def test_over_sampler_brings_every_class_to_the_largest():
    idx = build_sampler("over")(LABELS, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(LABELS[idx]).tolist() == [100, 100, 100]
    # Every image of a minority class is included at least once.
    assert set(torch.nonzero(LABELS == 2).flatten().tolist()) <= set(idx.tolist())


def test_under_sampler_brings_every_class_to_the_smallest():
    idx = build_sampler("under")(LABELS, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(LABELS[idx]).tolist() == [5, 5, 5]
    assert len(set(idx.tolist())) == 15  # without replacement


def test_class_balanced_sampler_is_uniform_over_classes():
    gen = torch.Generator().manual_seed(0)
    seen = torch.cat([build_sampler("balanced")(LABELS, 3, gen) for _ in range(200)])
    freq = torch.bincount(LABELS[seen]).double() / len(seen)
    assert len(seen) == 200 * len(LABELS)
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.01)
    assert freq[0] < 100 / 135  # the instance frequency of class 0 would be 0.74
