"""Every name a setting may take, torch-free.

The config offers these as its settings' choices and checks them when a command line is parsed,
so `ltexp --help` and a bad flag answer without importing torch. Each registry (methods, losses,
fusion rules, model bodies, devices, compile modes, augmentations) is keyed by the names here:
it is built with `registry`, which refuses at import a registry that adds, drops or reorders a
name, so the choices offered and what can run never disagree. Adding a loss, say, is its class,
one line in `ltexp.losses.LOSSES` and one line in `LOSS_OPTIONS` below.
"""

from __future__ import annotations

from typing import Iterable, Mapping, TypeVar

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda", "mps")

# How the training step's forward and backward run: eager PyTorch (`none`), `torch.compile`'s
# generated kernels (`default`), or those replayed as CUDA graphs (`reduce-overhead`, on CUDA; on
# other devices it compiles as `default`). See ltexp.engine.
COMPILE_NONE, COMPILE_CUDA_GRAPHS = "none", "reduce-overhead"
COMPILE_MODES = (COMPILE_NONE, "default", COMPILE_CUDA_GRAPHS)

# How a split's experts train: one after the other, or in threads beside each other (ltexp.concurrency).
SEQUENTIAL, THREADS = "sequential", "threads"
EXPERT_CONCURRENCY = (SEQUENTIAL, THREADS)

AUGMENTS = ("crop_flip", "crop", "none")            # ltexp.data.device.build_augment
# ltexp.models.BODIES: CIFAR-sized nets first, then torchvision's ImageNet-scale ResNets.
MODEL_BODIES = ("resnet18", "resnet32", "smallcnn", "resnet10", "resnet50", "resnet152", "resnext50_32x4d")

# Each loss (ltexp.losses.LOSSES) and the loss settings it reads: `LossConfig` fields, which are
# also the loss's keyword arguments. The others are not logged for a run that uses this loss.
LOSS_OPTIONS: Mapping[str, tuple[str, ...]] = {
    "ce": (),
    "balanced_softmax": (),
    "logit_adjust": ("tau",),
    "ldam": ("ldam_max_margin", "ldam_scale", "drw_epoch", "drw_beta"),
    "focal": ("focal_gamma",),
}
LOSSES = tuple(LOSS_OPTIONS)

# Each method (ltexp.methods.METHODS) and, for a method defined by its loss, the one loss it
# trains with (None: any loss, `ce` unless --loss says otherwise).
METHOD_LOSS: Mapping[str, str | None] = {
    "baseline": None,
    "resample": None,
    "lws": None,
    "split": None,
    "balanced_softmax": "balanced_softmax",
    "logit_adjust": "logit_adjust",
    "ldam_drw": "ldam",
    "focal": "focal",
    "logit_adjust_posthoc": None,
    "tau_norm": None,
    "crt": None,
}
METHODS = tuple(METHOD_LOSS)

RESAMPLINGS = ("over", "under", "balanced")   # samplers (ltexp/data/sampling.py) `resample` may use
LWS_MODES = ("joint", "decoupled")
EXPERT_MODES = ("own", "other")
OTHER_SIZES = ("mean", "min", "max")
STUDENT_SAMPLINGS = ("instance", *RESAMPLINGS)

# How a split's experts' outputs become one prediction (ltexp.fusion.FUSIONS), and what some need:
# experts trained with an "other" label (--expert-mode other) or a router model (--router true).
FUSIONS = ("concat", "absnorm", "softmax", "calibrated", "other", "calibrated_other", "router")
NEEDS_OTHER = frozenset({"other", "calibrated_other"})
NEEDS_ROUTER = frozenset({"router"})
STUDENT = "student"   # the split's distilled student, when it competes with the fusion rules


def registry(kind: str, names: Iterable[str], entries: Mapping[str, T]) -> dict[str, T]:
    """`entries` as a registry of `kind`, once its keys are exactly `names` in order (the order
    is the one `--help` lists and a grid runs); a mismatch is a programming error named here."""
    names, keys = tuple(names), tuple(entries)
    if keys != names:
        missing = [n for n in names if n not in entries]
        extra = [k for k in keys if k not in names]
        raise RuntimeError(f"the {kind} registry {list(keys)} disagrees with ltexp.choices {list(names)} "
                           f"(missing {missing}, not declared {extra}): declare each name once in ltexp/choices.py")
    return dict(entries)
