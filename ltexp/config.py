"""Configuration: one frozen dataclass per concern, validated on construction.

The field names are the contract: CLI flag `--imb-factor` = MLproject parameter `imb_factor` =
MLflow param `imb_factor` (see `flatten`). Each field is declared with `setting(...)`: its help
text, its choices (taken from the module that implements them, never repeated here), whether
"auto" is allowed (a data-set or method dependent default, resolved by `resolve_config` before
anything is logged) and when it applies (a run logs only the settings its method uses).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields, is_dataclass, replace
from typing import Any, Callable

from ltexp import LtexpError
from ltexp.choices import (AUGMENTS, COMPILE_MODES, COMPILE_NONE, DEVICES, EXPERT_CONCURRENCY, EXPERT_MODES, LOSS_OPTIONS,
                           LOSSES, LWS_MODES, METHOD_LOSS, METHODS, MODEL_BODIES, NEEDS_OTHER, NEEDS_ROUTER, OTHER_SIZES,
                           RESAMPLINGS, SEQUENTIAL, STUDENT, STUDENT_SAMPLINGS)
from ltexp.choices import FUSIONS as FUSION_RULES
from ltexp.durations import Every
from ltexp.presets import CIFAR_VAL_PER_CLASS, DRW_START, PRESETS, RUN_PRESETS
from ltexp.data.longtail import IMB_TYPES, VAL_SOURCES
from ltexp.data.sources import parse_dataset
from ltexp.schedules import LR_SCHEDULES, parse_milestones

AUTO = "auto"
MODELS = (AUTO, *MODEL_BODIES)
FUSIONS = (AUTO, *FUSION_RULES, STUDENT)


def setting(default: Any, help: str, *, choices: tuple[str, ...] | None = None, auto: bool = False,
            when: Callable[["RunConfig"], bool] | None = None):
    """A config field with its help text, allowed choices, "auto" support and applicability.

    `when(cfg)` says whether the field changes what a resolved `cfg` runs; fields for which it
    is false are not logged (e.g. `sampling` on a baseline run). None = always applies.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "auto": auto, "when": when})


def _choice(flag: str, value: str, allowed) -> None:
    if value not in allowed:
        raise LtexpError(f"unknown --{flag} {value!r}: allowed are {', '.join(allowed)}")


# torch.Generator.manual_seed and numpy's RandomState take seeds in [0, 2**32): a seed outside
# would fail deep inside data loading or training.
SEED_RANGE = (0, 2**32 - 1)
# The largest float32 (torch.finfo(torch.float32).max): settings reach the model as float32
# scalars (the SGD step is `param.add_(grad, alpha=-lr)`), where a larger value overflows.
FLOAT32_MAX = 3.4028234663852886e38


def _check_section(section) -> None:
    """Every section's shared checks, before its own: a choice field holds one of its choices, a
    float field is a finite number a float32 can hold (NaN, inf and 1e308 would only surface
    later, as a NaN loss blamed on --lr or an overflow inside SGD), and a seed lies in SEED_RANGE."""
    for f in fields(section):
        value, flag = getattr(section, f.name), "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        if choices is not None:
            _choice(flag[2:], value, choices)
        if isinstance(value, float) and not math.isfinite(value):
            raise LtexpError(f"{flag} {value} is not a finite number")
        if isinstance(value, float) and abs(value) > FLOAT32_MAX:
            raise LtexpError(f"{flag} {value:g} is beyond float32's range (|x| <= {FLOAT32_MAX:.7g}), "
                             "the precision ltexp trains in")
        if f.name.endswith("seed") and isinstance(value, int) and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
            raise LtexpError(f"{flag} {value} is outside [{SEED_RANGE[0]}, {SEED_RANGE[1]}]: use e.g. 0, 1, 2")


def _is_cifar(cfg: "RunConfig") -> bool:
    return cfg.data.family == "cifar"


def _uses_lws(cfg: "RunConfig") -> bool:
    return cfg.method.method == "lws" or (cfg.method.method == "split" and cfg.split.lws)


def _is_split(cfg: "RunConfig") -> bool:
    return cfg.method.method == "split"


def _lr_schedule(*kinds: str):
    return lambda cfg: cfg.optim.lr_schedule in kinds


def _loss_option(name: str):
    return lambda cfg: name in LOSS_OPTIONS[cfg.loss.loss]


@dataclass(frozen=True)
class DataConfig:
    """Which images, how they are made long-tailed, and how validation is carved out."""

    dataset: str = setting("digits", "digits (embedded default), cifar10, cifar100, folder:<path>, "
                                     "list:<root>:<train.txt>,<test.txt> (split files of '<path> <label>' lines) or "
                                     "pack:<file> (made by ltexp data --pack)")
    data_dir: str = setting("data", "folder holding (or receiving) the CIFAR archives", when=_is_cifar)
    imb_type: str = setting("exp", "long-tail profile: exp or step", choices=IMB_TYPES)
    imb_factor: float = setting(0.01, "smallest / largest class count, in (0, 1]; 1 keeps the counts")
    val_source: str = setting("holdout", "holdout (balanced, from unused training images) or paper "
                                         "(9:1 split of the test set)", choices=VAL_SOURCES)
    val_per_class: int = setting(0, "holdout validation images per class (auto: digits 20, CIFAR-10 100, "
                                    "CIFAR-100 20, folders 10)", auto=True,
                                 when=lambda cfg: cfg.data.val_source == "holdout")
    image_size: int = setting(32, "side in pixels that folder images are resized to",
                              when=lambda cfg: cfg.data.family == "folder")
    augment: str = setting(AUTO, "crop_flip, crop or none (auto: crop_flip for 32 px, crop for digits)",
                           choices=(AUTO, *AUGMENTS), auto=True)
    download: bool = setting(True, "download missing CIFAR archives (true/false)", when=_is_cifar)
    data_seed: int = setting(0, "seed of the long-tail subsample and validation carve (fixed by default, so "
                                "every --seed trains on the same images)")

    def __post_init__(self) -> None:
        parse_dataset(self.dataset)  # one line naming what is allowed
        _check_section(self)
        if not (isinstance(self.imb_factor, (int, float)) and 0 < self.imb_factor <= 1):
            raise LtexpError(f"--imb-factor {self.imb_factor!r} is outside (0, 1]: use e.g. 0.1 or 0.01 (1 = keep counts)")
        if self.val_per_class < 0:
            raise LtexpError(f"--val-per-class {self.val_per_class} must be >= 0 (0 = data set default)")
        if self.image_size < 4:
            raise LtexpError(f"--image-size {self.image_size} must be >= 4 pixels")

    @property
    def short_name(self) -> str:
        """The data set in a few characters, for run and model names (`DatasetSpec.short_name`)."""
        return parse_dataset(self.dataset).short_name

    @property
    def family(self) -> str:
        """`digits`, `cifar`, `folder` or `pack`: the preset family used for data-set defaults (a
        pack's defaults are those of the family it was packed from, `resolve_config`)."""
        kind = parse_dataset(self.dataset).kind
        return {"cifar10": "cifar", "cifar100": "cifar", "list": "folder"}.get(kind, kind)


@dataclass(frozen=True)
class ModelConfig:
    """The network: `auto` picks ResNet-18 for 32-px images (the paper) and a small CNN for 8x8;
    the torchvision ResNets serve the ImageNet-scale benchmarks (docs/large-benchmarks.md)."""

    model: str = setting(AUTO, "smallcnn, resnet18 (the paper), resnet32 (the field's CIFAR net), or torchvision's "
                               "ImageNet-scale resnet10, resnet50, resnet152, resnext50_32x4d (auto: by image size)",
                         choices=MODELS, auto=True)
    weights: str = setting("", "path to a local state_dict file loaded into the body before training, with "
                               "torchvision's names for its ResNets (fc.* is skipped: the head trains from scratch), "
                               "e.g. ImageNet weights for --preset places_lt; empty = random init. Never downloaded")

    def __post_init__(self) -> None:
        _check_section(self)


@dataclass(frozen=True)
class OptimConfig:
    """SGD with a step schedule; the paper's CIFAR settings are the CIFAR defaults."""

    epochs: int = setting(200, "epochs of the main stage (auto: CIFAR 200, digits 100)", auto=True)
    batch_size: int = setting(128, "images per step (auto: CIFAR 128, digits 64)", auto=True)
    lr: float = setting(0.1, "initial SGD learning rate (auto: CIFAR 0.1, digits 0.05)", auto=True)
    momentum: float = setting(0.9, "SGD momentum, in [0, 1)")
    weight_decay: float = setting(2e-4, "L2 weight decay (auto: CIFAR 2e-4)", auto=True)
    lr_schedule: str = setting("step", "learning-rate schedule: step (x lr_gamma every lr_step epochs), multistep "
                                       "(x lr_gamma after each of lr_milestones) or cosine (to 0 over the stage)",
                               choices=LR_SCHEDULES)
    lr_step: int = setting(150, "step schedule: epochs between learning-rate decays (auto: CIFAR 150)", auto=True,
                           when=_lr_schedule("step"))
    lr_gamma: float = setting(0.1, "step / multistep schedule: learning-rate decay factor",
                              when=_lr_schedule("step", "multistep"))
    lr_milestones: str = setting("", "multistep schedule: epochs after which the rate is multiplied by lr_gamma, "
                                     "comma-separated, e.g. 160,180", when=_lr_schedule("multistep"))
    warmup_epochs: int = setting(0, "linear learning-rate warm-up over the first N epochs (epoch e: e/N of the rate); "
                                    "0 = none")
    clip_norm: float = setting(0.0, "clip the gradient's global L2 norm to this, 0 = off (auto: 5 for split, as "
                                    "the paper; else 0)", auto=True)
    compile: str = setting(COMPILE_NONE, "torch.compile the training step: none, default, or reduce-overhead "
                                         "(CUDA graphs; on a GPU the fast one at batch 128, see docs/gpu.md). "
                                         "Compiling costs time before the first step (bench/results); a stage "
                                         "that changes what trains compiles again", choices=COMPILE_MODES)

    def __post_init__(self) -> None:
        _check_section(self)
        if self.epochs < 1:
            raise LtexpError(f"--epochs {self.epochs} must be >= 1")
        if self.batch_size < 1:
            raise LtexpError(f"--batch-size {self.batch_size} must be >= 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise LtexpError(f"--lr {self.lr} must be a positive number")
        if self.weight_decay < 0:
            raise LtexpError(f"--weight-decay {self.weight_decay} must be >= 0")
        if not 0 <= self.momentum < 1:
            raise LtexpError(f"--momentum {self.momentum} must be in [0, 1)")
        if self.lr_step < 1 or not 0 < self.lr_gamma <= 1:
            raise LtexpError(f"--lr-step {self.lr_step} must be >= 1 and --lr-gamma {self.lr_gamma} in (0, 1]")
        if self.lr_schedule == "multistep":
            try:
                milestones = parse_milestones(self.lr_milestones)
            except ValueError:
                milestones = ()
            if not milestones or milestones[-1] > self.epochs:
                raise LtexpError(f"--lr-milestones {self.lr_milestones!r} must be increasing epochs in [1, "
                                 f"{self.epochs}] for --lr-schedule multistep, e.g. 160,180")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise LtexpError(f"--warmup-epochs {self.warmup_epochs} must be in [0, --epochs {self.epochs})")
        if self.clip_norm < 0 or not math.isfinite(self.clip_norm):
            raise LtexpError(f"--clip-norm {self.clip_norm} must be >= 0 (0 = off)")


@dataclass(frozen=True)
class MethodConfig:
    """What makes a method: see `ltexp.methods.METHODS` (named in `ltexp.choices`)."""

    method: str = setting("baseline", "the method: " + ", ".join(METHODS), choices=METHODS)
    sampling: str = setting("over", "resample: over (the paper's ROS), under or balanced", choices=RESAMPLINGS,
                            when=lambda cfg: cfg.method.method == "resample")
    lws_mode: str = setting("decoupled", "lws: joint (the paper) or decoupled (Kang et al. 2019)", choices=LWS_MODES,
                            when=_uses_lws)
    lws_epochs: int = setting(10, "lws decoupled: epochs of scale-only training",
                              when=lambda cfg: _uses_lws(cfg) and cfg.method.lws_mode == "decoupled")
    lws_lr: float = setting(0.1, "lws decoupled: learning rate of the scales",
                            when=lambda cfg: _uses_lws(cfg) and cfg.method.lws_mode == "decoupled")
    crt_epochs: int = setting(10, "crt: epochs of classifier re-training on frozen features",
                              when=lambda cfg: cfg.method.method == "crt")
    crt_lr: float = setting(0.1, "crt: learning rate of the re-trained classifier",
                            when=lambda cfg: cfg.method.method == "crt")

    def __post_init__(self) -> None:
        _check_section(self)
        for name in ("lws_epochs", "crt_epochs"):
            if getattr(self, name) < 1:
                raise LtexpError(f"--{name.replace('_', '-')} {getattr(self, name)} must be >= 1")
        for name in ("lws_lr", "crt_lr"):
            if not getattr(self, name) > 0:
                raise LtexpError(f"--{name.replace('_', '-')} {getattr(self, name)} must be > 0")


@dataclass(frozen=True)
class LossConfig:
    """The training loss (ltexp/losses.py), built per model from its own class counts."""

    loss: str = setting(AUTO, "training loss: " + ", ".join(LOSSES) + " (auto: the method's own, else ce)",
                        choices=(AUTO, *LOSSES), auto=True)
    tau: float = setting(1.0, "logit_adjust: tau, the weight of log(prior) added to the logits",
                         when=_loss_option("tau"))
    ldam_max_margin: float = setting(0.5, "ldam: the largest class margin (that of the rarest class)",
                                     when=_loss_option("ldam_max_margin"))
    ldam_scale: float = setting(30.0, "ldam: s, the scale of the cosine logits",
                                when=_loss_option("ldam_scale"))
    drw_epoch: int = setting(0, "ldam: epoch of each stage from which class-balanced re-weighting is on; 0 = never "
                                "(auto: 80 per cent of --epochs, then +1, as Cao et al. 160 of 200)", auto=True,
                             when=_loss_option("drw_epoch"))
    drw_beta: float = setting(0.9999, "ldam: beta of the effective-number re-weighting", when=_loss_option("drw_beta"))
    focal_gamma: float = setting(1.0, "focal: gamma, the focusing exponent", when=_loss_option("focal_gamma"))

    def __post_init__(self) -> None:
        _check_section(self)
        if self.ldam_max_margin <= 0 or self.ldam_scale <= 0:
            raise LtexpError(f"--ldam-max-margin {self.ldam_max_margin} and --ldam-scale {self.ldam_scale} must be > 0")
        if self.drw_epoch < 0:
            raise LtexpError(f"--drw-epoch {self.drw_epoch} must be >= 0 (0 = no re-weighting)")
        if not 0 < self.drw_beta < 1:
            raise LtexpError(f"--drw-beta {self.drw_beta} must be in (0, 1)")
        if self.focal_gamma < 0 or not math.isfinite(self.tau):
            raise LtexpError(f"--focal-gamma {self.focal_gamma} must be >= 0 and --tau {self.tau} finite")


@dataclass(frozen=True)
class SplitConfig:
    """Class-group experts (method `split`): groups, expert training and fusion.

    Classes ranked by training count are cut into `num_groups` contiguous groups at the ranks
    in `split_at` ("" = equal numbers of classes); one expert per group.
    """

    num_groups: int = setting(2, "split: number of class groups / experts (2 = head, tail)", when=_is_split)
    split_at: str = setting("", "split: class ranks where groups 2.. start, e.g. 5 or 3,6 (empty: equal numbers of "
                                "classes)", when=lambda cfg: _is_split(cfg) and bool(cfg.split.split_at))
    expert_mode: str = setting("own", "split: own (each expert sees only its classes) or other (plus an \"other\" "
                                      "label)", choices=EXPERT_MODES, when=_is_split)
    other_size: str = setting("mean", "split, expert_mode other: \"other\" images per epoch = mean, min or max "
                                      "own-class count", choices=OTHER_SIZES,
                              when=lambda cfg: _is_split(cfg) and cfg.split.expert_mode == "other")
    fusion: str = setting(AUTO, "split: " + ", ".join(FUSIONS) + " (auto: best on validation)", choices=FUSIONS,
                          when=_is_split)
    lws: bool = setting(True, "split: LWS in every expert (true/false); --lws-mode picks joint/decoupled",
                        when=_is_split)
    router: bool = setting(False, "split: also train a router that predicts the group (balanced softmax over the "
                                  "groups), for the fusion rule `router`", when=_is_split)
    distill: bool = setting(False, "split: also train one student over all classes, taught by the experts (each "
                                   "training image by its own group's expert); it competes as `student`",
                            when=_is_split)
    distill_temperature: float = setting(2.0, "split, distill: softmax temperature of the teaching (KL) term",
                                         when=lambda cfg: _is_split(cfg) and cfg.split.distill)
    distill_weight: float = setting(1.0, "split, distill: weight of the teaching term beside the student's --loss",
                                    when=lambda cfg: _is_split(cfg) and cfg.split.distill)
    expert_concurrency: str = setting(SEQUENTIAL, "split: sequential (the experts train one after the other) or "
                                                    "threads (at once, one Python thread each, sharing the torch "
                                                    "threads; on CUDA each on its own stream)",
                                      choices=EXPERT_CONCURRENCY, when=_is_split)
    student_sampling: str = setting("instance", "split, distill: the student's sampler: instance (every image once "
                                                "per epoch), over, under or balanced", choices=STUDENT_SAMPLINGS,
                                    when=lambda cfg: _is_split(cfg) and cfg.split.distill)

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
        _check_section(self)
        if self.fusion in NEEDS_OTHER and self.expert_mode != "other":
            raise LtexpError(f"--fusion {self.fusion} needs --expert-mode other (experts without an \"other\" label)")
        if self.fusion in NEEDS_ROUTER and not self.router:
            raise LtexpError("--fusion router needs --router true (a router model to predict the group)")
        if self.fusion == STUDENT and not self.distill:
            raise LtexpError(f"--fusion {STUDENT} needs --distill true (a student to serve)")
        if self.distill_temperature <= 0 or self.distill_weight < 0:
            raise LtexpError(f"--distill-temperature {self.distill_temperature} must be > 0 and --distill-weight "
                             f"{self.distill_weight} >= 0")

    def split_ranks(self) -> tuple[int, ...] | None:
        """The group start ranks, or None for the default equal split."""
        return tuple(int(p) for p in str(self.split_at).split(",")) if self.split_at else None


def _never(cfg: "RunConfig") -> bool:
    return False


@dataclass(frozen=True)
class TrackingConfig:
    """Where the run is recorded. The tracking URI itself comes from MLFLOW_TRACKING_URI.

    Bookkeeping only: none of these changes what is trained, so none is logged as a param (the
    experiment and run name are the run's own; a registration shows in the model registry).
    """

    experiment: str = setting("", "MLflow experiment (empty: $MLFLOW_EXPERIMENT_NAME, else ltexp; under `mlflow run` "
                                  "its --experiment-name decides)", when=_never)
    run_name: str = setting("", "MLflow run name (empty: <method>·<dataset>·<imb_type><imb_factor>·e<epochs>·s<seed>)",
                            when=_never)
    register_as: str = setting("", "register the run's model under this name when the run ends (empty: don't)",
                               when=_never)
    alias: str = setting("candidate", "alias given to that registered version", when=_never)
    checkpoint_every: str = setting("5m", "checkpoint every N epochs (e.g. 5) or after that much training time (e.g. "
                                          "5m, 30s); 0 = never. Checkpoints are kept in $LTEXP_CACHE/checkpoints "
                                          "(default ~/.cache/ltexp), keyed by the resolved configuration, and removed "
                                          "when the run ends", when=_never)
    resume: bool = setting(True, "continue from the last checkpoint of the identical configuration (true/false; "
                                 "--no-resume = false)", when=_never)

    def __post_init__(self) -> None:
        _check_section(self)
        Every.parse(self.checkpoint_every)


@dataclass(frozen=True)
class RunConfig:
    """Everything one experiment needs; `flatten(cfg)` is what gets logged as MLflow params."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = setting(0, "training seed")
    device: str = setting(AUTO, "auto, cpu, cuda or mps", choices=DEVICES)
    preset: str = setting("ltexp", "the protocol unset and auto fields come from: ltexp (the data set's defaults, "
                                   "holdout validation), paper (the paper's Table 1), field (Cao et al.'s CIFAR-LT) "
                                   "or imagenet_lt / places_lt / inat18 (ltexp/presets.py)")

    def __post_init__(self) -> None:
        _check_section(self)
        _choice("preset", self.preset, tuple(RUN_PRESETS))
        if self.optim.compile != COMPILE_NONE and self.split.expert_concurrency != SEQUENTIAL:
            # torch.compile's tracing and CUDA-graph trees are per process, not made for two
            # threads compiling and replaying at once.
            raise LtexpError(f"--compile {self.optim.compile} needs --expert-concurrency sequential, "
                             f"not {self.split.expert_concurrency}")


SEARCHABLE = ("lr", "weight_decay", "expert_mode", "other_size", "lws", "num_groups")
PRUNERS = ("median", "hyperband", "none")
SAMPLERS_OPTUNA = ("tpe", "random")


@dataclass(frozen=True)
class TuneConfig:
    """An Optuna study over split experts (`ltexp tune`); see ltexp/tune/space.py for the search space."""

    n_trials: int = setting(20, "trials to finish (COMPLETE or PRUNED); rerunning continues the study up to this")
    study_name: str = setting("", "Optuna study name (empty: ltexp-<dataset>-<imb_type>-<imb_factor>-<metric>)")
    storage: str = setting("", "Optuna storage, RDB URL (sqlite:///..., postgresql://...) or journal file (*.log); "
                               "empty: $LTEXP_STORAGE (keeps a password off the command line), else sqlite "
                               "optuna.db beside the MLflow sqlite store")
    metric: str = setting("val_acc", "validation objective, e.g. val_acc, val_tail_acc, 0.5*val_acc+0.5*val_tail_acc")
    search: str = setting("", "extra dimensions, comma-separated: " + ", ".join(SEARCHABLE))
    split_min: int = setting(1, "smallest class rank a group may start at")
    split_max: int = setting(0, "largest class rank a group may start at (0: K-1)")
    max_groups: int = setting(3, "most groups when num_groups is searched")
    fusions: str = setting("", "fusion rules searched, comma-separated (empty: all that apply)")
    clip_min: float = setting(0.5, "clip_norm search range, lower end (log scale; \"off\" is always a choice)")
    clip_max: float = setting(50.0, "clip_norm search range, upper end")
    pruner: str = setting("median", "median, hyperband or none", choices=PRUNERS)
    sampler: str = setting("tpe", "tpe or random (seeded with --seed)", choices=SAMPLERS_OPTUNA)
    heartbeat_s: int = setting(60, "RDB heartbeat interval in seconds; a trial silent for twice this is failed "
                                   "and retried")
    model_name: str = setting("", "registered model name (empty: ltexp-<dataset>, for a folder data set "
                                  "ltexp-folder-<folder name>)")
    jobs: int = setting(1, "trials run at once by this command: worker processes on this machine sharing the "
                           "study and device, each with an equal share of --threads (small models leave a GPU idle)")

    def __post_init__(self) -> None:
        _check_section(self)
        if self.jobs < 1:
            raise LtexpError(f"--jobs {self.jobs} must be >= 1 (trials run at once on this machine)")
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
        unknown = [f for f in self.fusion_list() if f not in FUSION_RULES]
        if unknown:
            raise LtexpError(f"unknown fusion {unknown[0]!r} in --fusions: allowed are {', '.join(FUSION_RULES)}")
        _check_section(self)
        if self.heartbeat_s < 1:
            raise LtexpError(f"--heartbeat-s {self.heartbeat_s} must be >= 1")

    def search_dims(self) -> list[str]:
        return [d.strip() for d in self.search.split(",") if d.strip()]

    def fusion_list(self) -> list[str]:
        return [f.strip() for f in self.fusions.split(",") if f.strip()]



def apply_preset(sections: dict[str, dict[str, Any]], preset: str) -> dict[str, dict[str, Any]]:
    """A copy of `sections` with `RUN_PRESETS[preset]` filled into the fields left unset or "auto"."""
    _choice("preset", preset, tuple(RUN_PRESETS))
    values = dict(RUN_PRESETS[preset])
    method = sections.get("method", {}).get("method", MethodConfig.method)
    values.update(values.pop("by_method", {}).get(method, {}))
    classes = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "method": MethodConfig,
               "loss": LossConfig, "split": SplitConfig, "tracking": TrackingConfig}
    out = {name: dict(section) for name, section in sections.items()}
    for key, value in values.items():
        section = next(name for name, cls in classes.items() if key in {f.name for f in fields(cls)})
        if out.setdefault(section, {}).get(key, AUTO) == AUTO:
            out[section][key] = value
    return out


def resolve_config(sections: dict[str, dict[str, Any]], seed: int = 0, device: str = "auto",
                   preset: str = "ltexp") -> RunConfig:
    """Build a validated `RunConfig` from per-section values, filling "auto" from `PRESETS`.

    `sections` maps section name (data, model, optim, method, loss, split, tracking) to field
    values as the CLI parsed them; a value of "auto" (or a missing key) means "the data set's
    (or method's) default", or the `preset` protocol's value (`RUN_PRESETS`) where it has one.
    """
    sections, protocol = apply_preset(sections, preset), preset  # `preset` is reused below for PRESETS
    data_values = {k: v for k, v in sections.get("data", {}).items() if v != AUTO}
    data = DataConfig(**data_values)
    family, side, packed_val = data.family, data.image_size, None
    if family == "pack":  # the defaults of the data set it was packed from, its images' size
        from ltexp.data.pack import default_val_per_class, pack_meta, pack_path

        meta = pack_meta(pack_path(data.dataset))
        family, side = meta["family"], meta["image_shape"][0]
        packed_val = default_val_per_class(meta, data) if data.val_per_class == 0 else None
    preset = PRESETS[family]
    if family == "folder" and side < 32:
        preset = {**preset, "model": "smallcnn", "augment": "crop"}

    def fill(cls, values: dict[str, Any], defaults: dict[str, Any]):
        out = {}
        for f in fields(cls):
            value = values.get(f.name, AUTO)
            if value == AUTO and f.metadata.get("auto"):
                value = defaults.get(f.name, AUTO)
            if value != AUTO or (f.metadata.get("choices") and AUTO in f.metadata["choices"]):
                out[f.name] = value
        return cls(**out)

    if data.augment == AUTO:
        data = replace(data, augment=preset["augment"])
    if data.val_per_class == 0:
        data = replace(data, val_per_class=packed_val or CIFAR_VAL_PER_CLASS.get(data.dataset, preset["val_per_class"]))
    method = fill(MethodConfig, sections.get("method", {}), {})
    # The paper clips expert gradients at norm 5; single-model methods default to no clipping.
    optim = fill(OptimConfig, sections.get("optim", {}), {**preset, "clip_norm": 5.0 if method.method == "split" else 0.0})
    loss_values = dict(sections.get("loss", {}))
    fixed = METHOD_LOSS[method.method]
    given = loss_values.get("loss", AUTO)
    if fixed and given not in (AUTO, fixed):
        raise LtexpError(f"--method {method.method} trains with --loss {fixed}, not {given!r}: leave --loss at auto, "
                         f"or use --method baseline --loss {given}")
    loss = fill(LossConfig, loss_values, {"loss": fixed or "ce", "drw_epoch": int(DRW_START * optim.epochs) + 1})
    return RunConfig(
        data=data,
        model=fill(ModelConfig, sections.get("model", {}), preset),
        optim=optim,
        method=method,
        loss=loss,
        split=fill(SplitConfig, sections.get("split", {}), {}),
        tracking=fill(TrackingConfig, sections.get("tracking", {}), {}),
        seed=int(seed),
        device=device,
        preset=protocol,
    )


def flatten(cfg: Any) -> dict[str, Any]:
    """Flatten nested dataclasses to `{"imb_factor": 0.01, ...}`, every field.

    Field names are unique across sections, so each key is the CLI flag (with underscores) and
    the MLproject parameter.
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


def setting_fields(cfg: Any) -> dict[str, dataclasses.Field]:
    """Every leaf field of a (nested) config instance by name, with its metadata."""
    out: dict[str, dataclasses.Field] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out.update(setting_fields(value))
        else:
            out[f.name] = f
    return out


# Fields that never change what is trained or evaluated, with the reason; every other field does
# (tests/test_config_coverage.py trains with each changed and compares the results).
BOOKKEEPING_FIELDS = {
    "experiment": "where the run is recorded",
    "run_name": "what the run is called",
    "register_as": "whether the finished model is also registered",
    "alias": "which alias the registered version gets",
    "download": "only whether a missing CIFAR archive is fetched; the images read are the same",
    "device": "which hardware computes; results agree up to floating-point precision",
    "expert_concurrency": "whether a split's experts train one after the other or at once; each draws from its "
                          "own seeded generators either way, so results agree up to floating-point rounding "
                          "(a CPU convolution's sums depend on its thread count, which changes at once)",
    "compile": "how the training step's kernels are made (eager or torch.compile); results agree up to "
               "floating-point rounding",
    "checkpoint_every": "how often training state is saved; a resumed run ends with the same weights",
    "resume": "whether a saved checkpoint is continued; it ends with the weights of an uninterrupted run",
}


def used_settings(cfg: RunConfig) -> dict[str, Any]:
    """The settings that change what `cfg` runs, as MLflow params (what `log_config` logs).

    A field whose `when` is false for this configuration (e.g. `sampling` on a baseline run,
    `tau` without the logit_adjust loss, the tracking fields) is left out.
    """
    meta = setting_fields(cfg)
    return {k: v for k, v in flatten(cfg).items() if meta[k].metadata.get("when") is None or meta[k].metadata["when"](cfg)}


def to_dict(cfg: Any) -> dict[str, Any]:
    """The nested config as plain dicts (for the logged `config.json`)."""
    return dataclasses.asdict(cfg)
