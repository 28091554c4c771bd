"""Networks. Every model is a `Classifier`: uint8 images in, logits out, with `features` / `head`.

- `resnet18`: CIFAR ResNet-18 (3x3 stem, no max-pool), the paper's model.
- `resnet32`: CIFAR ResNet-32 (He et al. 2016, option-A shortcuts), the model most published
  long-tail numbers use (LDAM-DRW, decoupling).
- `smallcnn`: three conv layers for 8x8 digits.
- `resnet10`, `resnet50`, `resnet152`, `resnext50_32x4d`: torchvision's ImageNet-scale ResNets
  (7x7 stem, max-pool) for the field's large benchmarks; `resnet10` is the BasicBlock [1, 1, 1, 1]
  net of OLTR (Liu et al. 2019) and classifier balancing (Kang et al. 2020). Their `fc` is dropped:
  the body ends at the pooled features, as every body here does. `build_model(weights=...)` loads
  a local state_dict file into the body (torchvision's names); nothing is ever downloaded.

The head is a linear layer with a per-class scale (LWS, Kang et al. 2019): logits_c =
s_c * (w_c . f + b_c). The scales are ones and frozen unless the method learns them.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ltexp import LtexpError
from ltexp.choices import MODEL_BODIES, registry


HEADS = ("linear", "cosine")
COSINE_SCALE = 30.0  # s of the cosine head: logits are s * cos, as LDAM's reference (Cao et al. 2019)


class ScaledLinearHead(nn.Module):
    """Linear classifier with learnable-or-frozen per-class weight scaling (LWS) and a fixed offset.

    logits_c = s_c * (w_c . f + b_c) + o_c. `kind="cosine"` uses s * cos(f, w_c) instead of
    w_c . f + b_c (LDAM's normalised classifier). The offset `o` is a buffer, zero unless a
    post-hoc step (logit adjustment) sets it.
    """

    def __init__(self, in_features: int, num_classes: int, learn_scales: bool = False, kind: str = "linear"):
        super().__init__()
        if kind not in HEADS:
            raise LtexpError(f"unknown head {kind!r}: allowed are {', '.join(HEADS)}")
        self.kind = kind
        self.linear = nn.Linear(in_features, num_classes, bias=kind == "linear")
        self.scales = nn.Parameter(torch.ones(num_classes), requires_grad=learn_scales)
        self.register_buffer("offset", torch.zeros(num_classes))

    def reset_classifier(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise the linear classifier (classifier re-training starts from scratch), with
        `nn.Linear`'s own distribution, drawn from `generator` (on the weights' device): experts
        that train at once in threads must not draw from torch's one global generator."""
        weight, bias = self.linear.weight, self.linear.bias
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5), generator=generator)
        if bias is not None:
            bound = 1 / math.sqrt(weight.shape[1]) if weight.shape[1] > 0 else 0.0
            nn.init.uniform_(bias, -bound, bound, generator=generator)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "cosine":
            raw = COSINE_SCALE * F.linear(F.normalize(features, dim=1), F.normalize(self.linear.weight, dim=1))
        else:
            raw = self.linear(features)
        return raw * self.scales + self.offset


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if shortcut == "conv":  # option B: 1x1 conv projection (ResNet-18)
                self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
            else:  # option A: subsample and zero-pad channels (CIFAR ResNet-32, no parameters)
                pad = planes - in_planes
                self.shortcut = _PadShortcut(stride, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _PadShortcut(nn.Module):
    def __init__(self, stride: int, pad: int):
        super().__init__()
        self.stride, self.pad = stride, pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))


def _resnet_body(in_channels: int, stem: int, widths, blocks, shortcut: str) -> tuple[nn.Module, int]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()]
    in_planes = stem
    for i, (width, count) in enumerate(zip(widths, blocks)):
        for j in range(count):
            stride = 2 if (i > 0 and j == 0) else 1
            layers.append(BasicBlock(in_planes, width, stride, shortcut))
            in_planes = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), in_planes


def _smallcnn_body(in_channels: int) -> tuple[nn.Module, int]:
    def block(cin, cout):
        return [nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    body = nn.Sequential(*block(in_channels, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 128),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return body, 128


def _torchvision_body(in_channels: int, make) -> tuple[nn.Module, int]:
    """torchvision's ResNet `make(torchvision.models)`, randomly initialised, with its `fc` made an
    identity, so it returns the pooled features and its state_dict keeps torchvision's names."""
    from torchvision import models as tv  # here, not at import: serving a small model need not load it

    net = make(tv)
    stem = net.conv1
    if in_channels != stem.in_channels:
        # ImageNet's stem takes RGB; grey images (digits) get a stem of the same shape for one
        # channel, initialised as torchvision initialises its own convolutions.
        net.conv1 = nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    num_features = net.fc.in_features
    net.fc = nn.Identity()
    return net, num_features


BODIES = registry("model body", MODEL_BODIES, {
    "resnet18": lambda c: _resnet_body(c, 64, (64, 128, 256, 512), (2, 2, 2, 2), "conv"),
    "resnet32": lambda c: _resnet_body(c, 16, (16, 32, 64), (5, 5, 5), "pad"),
    "smallcnn": _smallcnn_body,
    "resnet10": lambda c: _torchvision_body(c, lambda tv: tv.resnet.ResNet(tv.resnet.BasicBlock, [1, 1, 1, 1])),
    "resnet50": lambda c: _torchvision_body(c, lambda tv: tv.resnet50(weights=None)),
    "resnet152": lambda c: _torchvision_body(c, lambda tv: tv.resnet152(weights=None)),
    "resnext50_32x4d": lambda c: _torchvision_body(c, lambda tv: tv.resnext50_32x4d(weights=None)),
})


class Classifier(nn.Module):
    """Normalisation + feature extractor + (LWS-capable) linear head.

    Takes uint8 (or float in 0..255) images (N, C, H, W); `mean` / `std` are per-channel in
    0..255 units, computed on the training set, and travel with the weights.
    """

    def __init__(self, arch: str, in_channels: int, num_classes: int, mean, std, learn_scales: bool = False,
                 head: str = "linear"):
        super().__init__()
        if arch not in BODIES:
            raise LtexpError(f"unknown --model {arch!r}: allowed are {', '.join(BODIES)}")
        self.arch = arch
        self.body, self.num_features = BODIES[arch](in_channels)
        self.head = ScaledLinearHead(self.num_features, num_classes, learn_scales, head)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.to(self.mean.dtype) - self.mean) / self.std
        return self.body(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def build_model(arch: str, image_shape: tuple[int, int, int], num_classes: int, mean, std,
                learn_scales: bool = False, head: str = "linear", weights: str = "") -> Classifier:
    """A `Classifier` for images of shape (H, W, C); `arch="auto"` picks by image size; `head`
    is `linear` or `cosine`; `weights`, when given, is a state_dict file loaded into the body
    (`load_body_weights`), else the body keeps its random initialisation."""
    height, _, channels = image_shape
    if arch == "auto":
        arch = "resnet18" if height >= 32 else "smallcnn"
    model = Classifier(arch, channels, num_classes, mean, std, learn_scales, head)
    if weights:
        load_body_weights(model, weights)
    return model


def load_body_weights(model: Classifier, path: str) -> None:
    """Load the state_dict file at `path` into `model.body`, refusing one that does not fit.

    The file holds tensors only (`torch.load(weights_only=True)`), keyed as the body names them:
    for the torchvision bodies, torchvision's own names, so a `torchvision.models.resnet50`
    state_dict fits `resnet50`. Its `fc.*` entries (torchvision's 1000-class classifier) are
    skipped: the head is ltexp's own and trains from scratch. A missing `num_batches_tracked`
    (files older than PyTorch 0.4.1) is filled in by BatchNorm itself.
    """
    file = Path(path).expanduser()
    flag = f"--weights {path!r}"
    if not file.is_file():
        raise LtexpError(f"{flag}: no such file (a local state_dict file for the body; ltexp never downloads weights)")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a file torch.save wrote, or one holding objects besides tensors
        # torch's message is a page (and suggests weights_only=False); its cause is one sentence.
        text = " ".join(str(exc).split())
        cause = text.partition("WeightsUnpickler error: ")[2].split(" Check the documentation")[0].split(". ")[0]
        reason = cause or f"{type(exc).__name__}: {text}"
        raise LtexpError(f"{flag} is not a state_dict file that torch.load(weights_only=True) reads "
                         f"({reason[:200]})") from None
    if not isinstance(saved, dict):
        raise LtexpError(f"{flag} holds a {type(saved).__name__}, not a state_dict (a dict of name -> tensor)")
    other = next((k for k, v in saved.items() if not isinstance(v, torch.Tensor)), None)
    if other is not None:  # e.g. a training checkpoint that wraps the state_dict with other entries
        raise LtexpError(f"{flag} is not a state_dict: its entry {other!r} is a {type(saved[other]).__name__}, "
                         "not a tensor (save the body's state_dict alone)")
    state = {k: v for k, v in saved.items() if not k.startswith("fc.")}
    expected = model.body.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise LtexpError(f"{flag} does not fit --model {model.arch}: {len(missing)} missing keys {missing[:3]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    wrong = [k for k in state if state[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise LtexpError(f"{flag} does not fit --model {model.arch} for these images: {k} has shape "
                         f"{tuple(state[k].shape)} in the file, the body needs {tuple(expected[k].shape)}")
    model.body.load_state_dict(state)


def channel_stats(images_nhwc) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..255 units) of uint8 NHWC images, for normalisation."""
    x = torch.as_tensor(images_nhwc).to(torch.float64)
    dims = tuple(range(x.ndim - 1))
    std = x.std(dim=dims).clamp(min=1.0)  # a constant channel must not divide by zero
    return x.mean(dim=dims).tolist(), std.tolist()
