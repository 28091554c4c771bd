"""Configuration: one frozen dataclass per concern, validated on construction.

The field names are the contract: CLI flag `--imb-factor` = MLproject parameter `imb_factor` =
MLflow param `imb_factor` (see `flatten`). Data-set dependent defaults (epochs, learning
rate, model, ...) are written as "auto" on the command line and resolved by `resolve_config`
before anything is logged, so a run's params always hold the values actually used.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any

from ltexp import LtexpError

DATASETS = ("digits", "cifar10", "cifar100")  # plus "folder:<path>"
IMB_TYPES = ("exp", "step")
VAL_SOURCES = ("holdout", "paper")
MODELS = ("auto", "smallcnn", "resnet18", "resnet32")
AUGMENTS = ("auto", "crop_flip", "crop", "none")
SAMPLINGS = ("over", "under", "balanced")
EXPERT_MODES = ("own", "other")
OTHER_SIZES = ("mean", "min", "max")
FUSIONS = ("auto", "concat", "absnorm", "softmax", "calibrated", "other", "calibrated_other")
LWS_MODES = ("joint", "decoupled")
DEVICES = ("auto", "cpu", "cuda", "mps")


def _choice(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LtexpError(f"unknown --{flag} {value!r}: allowed are {', '.join(allowed)}")


@dataclass(frozen=True)
class DataConfig:
    """Which images, how they are made long-tailed, and how validation is carved out."""

    dataset: str = "digits"
    data_dir: str = "data"
    imb_type: str = "exp"
    imb_factor: float = 0.01
    val_source: str = "holdout"
    # Balanced validation images per class for val_source=holdout; 0 = the data set's default.
    val_per_class: int = 0
    # Side length in pixels that folder images are resized to (CIFAR is 32, digits 8).
    image_size: int = 32
    augment: str = "auto"
    # Download CIFAR archives with torchvision's utilities when they are missing.
    download: bool = True
    # Seed of the long-tail subsample and the validation carve; fixed by default (as LDAM-DRW)
    # so runs with different --seed train on the same images.
    data_seed: int = 0

    def __post_init__(self) -> None:
        if not (self.dataset in DATASETS or self.dataset.startswith("folder:")):
            raise LtexpError(
                f"unknown --dataset {self.dataset!r}: allowed are {', '.join(DATASETS)} or folder:<path>"
            )
        if self.dataset.startswith("folder:") and not self.dataset[len("folder:"):]:
            raise LtexpError("--dataset folder: needs a path, e.g. folder:/data/my_images")
        _choice("imb-type", self.imb_type, IMB_TYPES)
        if not (isinstance(self.imb_factor, (int, float)) and 0 < self.imb_factor <= 1):
            raise LtexpError(f"--imb-factor {self.imb_factor!r} is outside (0, 1]: use e.g. 0.1 or 0.01 (1 = keep counts)")
        _choice("val-source", self.val_source, VAL_SOURCES)
        if self.val_per_class < 0:
            raise LtexpError(f"--val-per-class {self.val_per_class} must be >= 0 (0 = data set default)")
        if self.image_size < 4:
            raise LtexpError(f"--image-size {self.image_size} must be >= 4 pixels")
        _choice("augment", self.augment, AUGMENTS)

    @property
    def family(self) -> str:
        """`digits`, `cifar` or `folder`: the preset family used for data-set defaults."""
        if self.dataset.startswith("cifar"):
            return "cifar"
        return "folder" if self.dataset.startswith("folder:") else "digits"


@dataclass(frozen=True)
class ModelConfig:
    """The network: `auto` picks ResNet-18 for 32-px images (the paper) and a small CNN for 8x8."""

    model: str = "auto"

    def __post_init__(self) -> None:
        _choice("model", self.model, MODELS)


@dataclass(frozen=True)
class OptimConfig:
    """SGD with a step schedule; the paper's CIFAR settings are the CIFAR defaults."""

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    lr_step: int = 150  # epochs between learning-rate decays
    lr_gamma: float = 0.1
    clip_norm: float = 0.0  # max global L2 norm of the gradient; 0 = no clipping

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise LtexpError(f"--epochs {self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise LtexpError(f"--batch-size {self.batch_size} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LtexpError(f"--lr {self.lr} must be a positive number")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise LtexpError("--weight-decay must be >= 0 and --momentum in [0, 1)")
        if self.lr_step < 1 or not 0 < self.lr_gamma <= 1:
            raise LtexpError(f"--lr-step {self.lr_step} must be >= 1 and --lr-gamma {self.lr_gamma} in (0, 1]")
        if self.clip_norm < 0 or not math.isfinite(self.clip_norm):
            raise LtexpError(f"--clip-norm {self.clip_norm} must be >= 0 (0 = off)")


@dataclass(frozen=True)
class MethodConfig:
    """What makes a method: see `ltexp.methods.METHODS`."""

    method: str = "baseline"
    sampling: str = "over"  # resample: over (the paper's ROS), under, balanced
    lws_mode: str = "decoupled"  # lws: joint (the paper) or decoupled (Kang et al. 2019)
    lws_epochs: int = 10  # epochs of scale-only training in decoupled LWS
    lws_lr: float = 0.1

    def __post_init__(self) -> None:
        from ltexp.methods import METHODS  # late: methods imports config

        _choice("method", self.method, tuple(METHODS))
        _choice("sampling", self.sampling, SAMPLINGS)
        _choice("lws-mode", self.lws_mode, LWS_MODES)
        if self.lws_epochs < 1:
            raise LtexpError(f"--lws-epochs {self.lws_epochs} must be >= 1")
        if self.lws_lr <= 0:
            raise LtexpError(f"--lws-lr {self.lws_lr} must be > 0")


@dataclass(frozen=True)
class SplitConfig:
    """Class-group experts (method `split`): groups, expert training and fusion.

    Classes ranked by training count are cut into `num_groups` contiguous groups at the ranks
    in `split_at` ("" = equal numbers of classes); one expert per group.
    """

    num_groups: int = 2
    split_at: str = ""
    expert_mode: str = "own"      # own: only its group's images; other: plus one "other" label
    other_size: str = "mean"      # "other" images per epoch = mean / min / max own-class count
    fusion: str = "auto"          # auto = the rule with the best validation accuracy
    lws: bool = True              # LWS in each expert (the paper); lws_mode picks joint/decoupled

    def __post_init__(self) -> None:
        if self.num_groups < 2:
            raise LtexpError(f"--num-groups {self.num_groups} must be >= 2 (one expert per group)")
        if self.split_at:
            parts = [p.strip() for p in str(self.split_at).split(",")]
            if not all(p.lstrip("-").isdigit() for p in parts):
                raise LtexpError(f"--split-at {self.split_at!r} must be comma-separated class ranks, e.g. 5 or 3,6")
            if len(parts) != self.num_groups - 1:
                raise LtexpError(f"--split-at {self.split_at!r} gives {len(parts) + 1} groups but --num-groups is "
                                 f"{self.num_groups}: give num_groups - 1 ranks")
        _choice("expert-mode", self.expert_mode, EXPERT_MODES)
        _choice("other-size", self.other_size, OTHER_SIZES)
        _choice("fusion", self.fusion, FUSIONS)
        if self.fusion in ("other", "calibrated_other") and self.expert_mode != "other":
            raise LtexpError(f"--fusion {self.fusion} needs --expert-mode other (experts without an \"other\" label)")

    def split_ranks(self) -> tuple[int, ...] | None:
        """The group start ranks, or None for the default equal split."""
        return tuple(int(p) for p in str(self.split_at).split(",")) if self.split_at else None


@dataclass(frozen=True)
class TrackingConfig:
    """Where the run is recorded. The tracking URI itself comes from MLFLOW_TRACKING_URI."""

    experiment: str = "ltexp"
    run_name: str = ""
    register_as: str = ""         # register the run's model under this name when it finishes
    alias: str = "candidate"      # alias set on that registered version


@dataclass(frozen=True)
class RunConfig:
    """Everything one experiment needs; `flatten(cfg)` is what gets logged as MLflow params."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 0
    device: str = "auto"
    preset: str = "ltexp"  # the protocol the "auto" and unset fields came from (RUN_PRESETS)

    def __post_init__(self) -> None:
        _choice("device", self.device, DEVICES)
        _choice("preset", self.preset, tuple(RUN_PRESETS))


SEARCHABLE = ("lr", "weight_decay", "expert_mode", "other_size", "lws", "num_groups")
PRUNERS = ("median", "hyperband", "none")
SAMPLERS_OPTUNA = ("tpe", "random")


@dataclass(frozen=True)
class TuneConfig:
    """An Optuna study over split experts (`ltexp tune`); see ltexp/tune.py for the search space."""

    n_trials: int = 20            # trials that must end COMPLETE or PRUNED; a rerun continues to it
    study_name: str = ""          # "" = ltexp-<dataset>-<imb_type>-<imb_factor>-<metric>
    storage: str = ""             # "" = sqlite optuna.db beside the MLflow sqlite store (or in cwd)
    metric: str = "val_acc"       # validation objective, e.g. val_tail_acc or 0.5*val_acc+0.5*val_tail_acc
    search: str = ""              # extra dimensions, comma-separated, from SEARCHABLE
    split_min: int = 1            # smallest rank a group may start at
    split_max: int = 0            # largest; 0 = K-1
    max_groups: int = 3           # upper bound when num_groups is searched
    fusions: str = ""             # rules to search, comma-separated; "" = every applicable rule
    clip_min: float = 0.5         # clip_norm search range (log scale), plus "off"
    clip_max: float = 50.0
    pruner: str = "median"
    sampler: str = "tpe"
    heartbeat_s: int = 60         # RDB storages: a trial silent this long x2 is failed and retried
    model_name: str = ""          # registered model; "" = ltexp-<dataset>

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise LtexpError(f"--n-trials {self.n_trials} must be >= 1")
        extra = [d for d in self.search_dims() if d not in SEARCHABLE]
        if extra:
            raise LtexpError(f"unknown --search dimension {extra[0]!r}: allowed are {', '.join(SEARCHABLE)}")
        if self.split_min < 1 or (self.split_max and self.split_max < self.split_min):
            raise LtexpError(f"--split-min {self.split_min} / --split-max {self.split_max}: need 1 <= min <= max")
        if not 0 < self.clip_min <= self.clip_max:
            raise LtexpError(f"--clip-min {self.clip_min} / --clip-max {self.clip_max}: need 0 < min <= max")
        if self.max_groups < 2:
            raise LtexpError(f"--max-groups {self.max_groups} must be >= 2")
        unknown = [f for f in self.fusion_list() if f not in FUSIONS or f == "auto"]
        if unknown:
            raise LtexpError(f"unknown fusion {unknown[0]!r} in --fusions: allowed are {', '.join(FUSIONS[1:])}")
        _choice("pruner", self.pruner, PRUNERS)
        _choice("sampler", self.sampler, SAMPLERS_OPTUNA)
        if self.heartbeat_s < 1:
            raise LtexpError(f"--heartbeat-s {self.heartbeat_s} must be >= 1")

    def search_dims(self) -> list[str]:
        return [d.strip() for d in self.search.split(",") if d.strip()]

    def fusion_list(self) -> list[str]:
        return [f.strip() for f in self.fusions.split(",") if f.strip()]


# Data-set dependent defaults, applied to every field the user left at "auto".
# Digits: sized so the quickstart (`mlflow run . -e baseline`) takes well under a minute on 2 CPU cores.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar": {"model": "resnet18", "epochs": 200, "batch_size": 128, "lr": 0.1,
              "weight_decay": 2e-4, "lr_step": 150, "augment": "crop_flip", "val_per_class": 0},
    "digits": {"model": "smallcnn", "epochs": 100, "batch_size": 64, "lr": 0.05,
               "weight_decay": 5e-4, "lr_step": 70, "augment": "crop", "val_per_class": 20},
    "folder": {"model": "resnet18", "epochs": 30, "batch_size": 64, "lr": 0.05,
               "weight_decay": 5e-4, "lr_step": 20, "augment": "crop_flip", "val_per_class": 10},
}
# Holdout validation images per class for CIFAR (the source has 5,000 / 500 per class).
CIFAR_VAL_PER_CLASS = {"cifar10": 100, "cifar100": 20}
AUTO = "auto"


# Whole protocols (`--preset`): field values applied by `resolve_config` to every field that is
# unset or "auto", before the data-set defaults above. "ltexp": those defaults and a balanced
# holdout validation set. "paper": the paper's protocol (its Table 1) on any data set: ResNet-18,
# SGD momentum 0.9, lr 0.1, weight decay 2e-4, batch 128, StepLR 150 / 0.1 (so no decay within
# its 100 epochs), LWS trained jointly, validation carved 9:1 from the test set; split clips
# gradients at norm 5. `by_method` holds the values that apply to one method only.
RUN_PRESETS: dict[str, dict[str, Any]] = {
    "ltexp": {},
    "paper": {"model": "resnet18", "epochs": 100, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
              "weight_decay": 2e-4, "lr_step": 150, "lr_gamma": 0.1, "lws_mode": "joint", "val_source": "paper",
              "by_method": {"split": {"clip_norm": 5.0}}},
}


def apply_preset(sections: dict[str, dict[str, Any]], preset: str) -> dict[str, dict[str, Any]]:
    """A copy of `sections` with `RUN_PRESETS[preset]` filled into the fields left unset or "auto"."""
    _choice("preset", preset, tuple(RUN_PRESETS))
    values = dict(RUN_PRESETS[preset])
    method = sections.get("method", {}).get("method", MethodConfig.method)
    values.update(values.pop("by_method", {}).get(method, {}))
    classes = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "method": MethodConfig,
               "split": SplitConfig, "tracking": TrackingConfig}
    out = {name: dict(section) for name, section in sections.items()}
    for key, value in values.items():
        section = next(name for name, cls in classes.items() if key in {f.name for f in fields(cls)})
        if out.setdefault(section, {}).get(key, AUTO) == AUTO:
            out[section][key] = value
    return out


def resolve_config(sections: dict[str, dict[str, Any]], seed: int = 0, device: str = "auto",
                   preset: str = "ltexp") -> RunConfig:
    """Build a validated `RunConfig` from per-section values, filling "auto" from `PRESETS`.

    `sections` maps section name (data, model, optim, method, tracking) to field values as the
    CLI parsed them; a value of "auto" (or a missing key) means "the data set's default", or the
    `preset` protocol's value (`RUN_PRESETS`) where it has one.
    """
    sections, protocol = apply_preset(sections, preset), preset  # `preset` is reused below for PRESETS
    data_values = {k: v for k, v in sections.get("data", {}).items() if v != AUTO}
    data = DataConfig(**data_values)
    preset = PRESETS[data.family]
    if data.family == "folder" and data.image_size < 32:
        preset = {**preset, "model": "smallcnn", "augment": "crop"}

    def fill(cls, values: dict[str, Any]):
        names = {f.name for f in fields(cls)}
        out = {}
        for name in names:
            value = values.get(name, AUTO)
            if value == AUTO:
                if name in preset:
                    value = preset[name]
                else:
                    continue
            out[name] = value
        return cls(**out)

    if data.augment == AUTO or "augment" not in data_values:
        data = replace(data, augment=data_values.get("augment", preset["augment"]))
    if data.val_per_class == 0:
        default_val = CIFAR_VAL_PER_CLASS.get(data.dataset, preset["val_per_class"])
        data = replace(data, val_per_class=default_val)
    method = fill(MethodConfig, sections.get("method", {}))
    # The paper clips expert gradients at norm 5; single-model methods default to no clipping.
    preset = {**preset, "clip_norm": 5.0 if method.method == "split" else 0.0}
    return RunConfig(
        data=data,
        model=fill(ModelConfig, sections.get("model", {})),
        optim=fill(OptimConfig, sections.get("optim", {})),
        method=method,
        split=fill(SplitConfig, sections.get("split", {})),
        tracking=fill(TrackingConfig, sections.get("tracking", {})),
        seed=int(seed),
        device=device,
        preset=protocol,
    )


def flatten(cfg: Any) -> dict[str, Any]:
    """Flatten nested dataclasses to `{"imb_factor": 0.01, ...}` for `mlflow.log_params`.

    Field names are unique across sections, so each param has the same name as its CLI flag
    (with underscores) and its MLproject parameter.
    """
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        items = flatten(value).items() if is_dataclass(value) else [(f.name, value)]
        for key, item in items:
            if key in out:
                raise ValueError(f"config field {key!r} is defined twice")  # a programming error
            out[key] = item
    return out


def to_dict(cfg: Any) -> dict[str, Any]:
    """The nested config as plain dicts (for the logged `config.json`)."""
    return dataclasses.asdict(cfg)
