"""The search space of a study and its objective: which settings a trial draws (`SearchSpace`),
how they become a trial's config (`apply`), and the objective as a weighted sum of validation
metrics (`parse_objective`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import optuna

from ltexp import LtexpError
from ltexp.choices import COMPILE_NONE, FUSIONS, NEEDS_OTHER, NEEDS_ROUTER, SEQUENTIAL
from ltexp.config import RunConfig, TuneConfig
from ltexp.data.sources import parse_dataset


OBJECTIVE_KEYS = ("acc", "head_acc", "tail_acc", "many_acc", "medium_acc", "few_acc", "macro_acc", "routing_acc",
                  "ece", "nll")
TERM = re.compile(r"^\s*(?:([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*\*\s*)?(val_[a-z_]+)\s*$")


def parse_objective(text: str) -> list[tuple[float, str]]:
    """`0.5*val_acc+0.5*val_tail_acc` -> [(0.5, "acc"), (0.5, "tail_acc")]; `-` subtracts (e.g. ece)."""
    terms = []
    for sign, chunk in re.findall(r"([+-]?)([^+-]+(?:e-[0-9]+)?[^+-]*)", text.replace(" ", "")):
        match = TERM.match(chunk)
        if not match or match.group(2)[4:] not in OBJECTIVE_KEYS:
            raise LtexpError(f"--metric {text!r}: each term must be [weight*]val_<name> with name in "
                             f"{', '.join(OBJECTIVE_KEYS)}")
        weight = float(match.group(1) or 1.0)
        terms.append((-weight if sign == "-" else weight, match.group(2)[4:]))
    if not terms:
        raise LtexpError(f"--metric {text!r} is empty: use e.g. val_acc")
    return terms


def objective_value(terms: list[tuple[float, str]], val_metrics: dict[str, float]) -> float:
    return float(sum(w * val_metrics[k] for w, k in terms))


def default_model_name(dataset: str) -> str:
    """The registered-model name when --model-name is empty: `ltexp-<dataset>`, and for a folder
    data set `ltexp-folder-<folder name>`, for a list data set `ltexp-list-<root's name>`, for a
    pack `ltexp-pack-<file name without suffix>` (MLflow refuses '/' and ':' in a name)."""
    spec = parse_dataset(dataset)
    if not spec.location:
        return f"ltexp-{dataset}"
    path = Path(spec.location).expanduser().resolve()
    name = path.stem if spec.kind == "pack" else path.name
    return f"ltexp-{spec.kind}-" + re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")


@dataclass
class SearchSpace:
    """What the study searches, derived from `TuneConfig` and the number of classes."""

    num_classes: int
    tune: TuneConfig
    base: RunConfig

    @property
    def dims(self) -> list[str]:
        return self.tune.search_dims()

    def describe(self) -> dict[str, Any]:
        """A JSON-able description; a study is only resumed with an identical one."""
        hi = self.split_max
        return {"split_at": [self.tune.split_min, hi], "num_groups": [2, self.tune.max_groups] if "num_groups" in self.dims
                else self.base.split.num_groups, "clip_norm": ["off", self.tune.clip_min, self.tune.clip_max],
                "fusion": self.fusions(None), "extra": sorted(self.dims)}

    @property
    def split_max(self) -> int:
        return self.tune.split_max or self.num_classes - 1

    def validate(self) -> None:
        k = self.num_classes
        if self.split_max > k - 1:
            raise LtexpError(f"--split-max {self.split_max} is outside 1..{k - 1} (K = {k} classes)")
        groups = self.tune.max_groups if "num_groups" in self.dims else self.base.split.num_groups
        if self.split_max - self.tune.split_min + 1 < groups - 1:
            raise LtexpError(f"split range {self.tune.split_min}..{self.split_max} cannot hold {groups - 1} distinct "
                             f"split points for {groups} groups: widen --split-min/--split-max")
        if not self.fusions(None):
            raise LtexpError("--fusions leaves no rule for the searched expert mode(s): add e.g. concat")
        if self.base.split.router or self.base.split.distill or any(f in NEEDS_ROUTER for f in self.fusions(None)):
            raise LtexpError("tuning searches expert splits and fusion rules only: --router, --distill and the "
                             "router rule are for `ltexp train --method split` (set them false / leave them out)")
        if self.base.split.expert_concurrency != SEQUENTIAL:
            raise LtexpError(f"--expert-concurrency {self.base.split.expert_concurrency} is for `ltexp train --method "
                             f"split`: a study trains each trial's experts in lockstep, an epoch each in turn, and "
                             f"runs trials at once with --jobs")
        if self.base.optim.compile != COMPILE_NONE:
            # Compiling one ResNet takes longer than a short trial trains (bench/gpu.py,
            # bench/results/2026-11-28-h200-*), and every trial's experts are new models.
            raise LtexpError(f"--compile {self.base.optim.compile} is for `ltexp train`: each trial's new experts "
                             f"would be compiled again, each costing more than a short trial trains; "
                             f"leave --compile none")

    def fusions(self, expert_mode: str | None) -> list[str]:
        """Rules searched for an expert mode (None: the union)."""
        # Trials train experts only (no router, no student): rules that need a router are not searched.
        chosen = self.tune.fusion_list() or [f for f in FUSIONS if f not in NEEDS_ROUTER]
        modes = ["own", "other"] if "expert_mode" in self.dims else [self.base.split.expert_mode]
        if expert_mode is not None:
            modes = [expert_mode]
        return [f for f in chosen if "other" in modes or f not in NEEDS_OTHER]

    def suggest(self, trial: optuna.Trial) -> dict[str, dict[str, Any]]:
        """Sample one configuration; returns config sections to override."""
        split = {}
        groups = trial.suggest_int("num_groups", 2, self.tune.max_groups) if "num_groups" in self.dims \
            else self.base.split.num_groups
        split["num_groups"] = groups
        lo, ranks = self.tune.split_min, []
        for g in range(groups - 1):
            # Leave room for the remaining split points (ranks strictly increase).
            hi = self.split_max - (groups - 2 - g)
            name = "split_at" if groups == 2 and "num_groups" not in self.dims else f"split_at_{g}"
            ranks.append(trial.suggest_int(name, lo, hi))
            lo = ranks[-1] + 1
        split["split_at"] = ",".join(map(str, ranks))
        optim: dict[str, Any] = {}
        if trial.suggest_categorical("clip", ["off", "on"]) == "on":
            optim["clip_norm"] = trial.suggest_float("clip_norm", self.tune.clip_min, self.tune.clip_max, log=True)
        else:
            optim["clip_norm"] = 0.0
        if "lr" in self.dims:
            optim["lr"] = trial.suggest_float("lr", 1e-3, 0.5, log=True)
        if "weight_decay" in self.dims:
            optim["weight_decay"] = trial.suggest_float("weight_decay", 1e-5, 1e-2, log=True)
        mode = trial.suggest_categorical("expert_mode", ["own", "other"]) if "expert_mode" in self.dims \
            else self.base.split.expert_mode
        split["expert_mode"] = mode
        if "other_size" in self.dims and mode == "other":
            split["other_size"] = trial.suggest_categorical("other_size", ["mean", "min", "max"])
        if "lws" in self.dims:
            split["lws"] = trial.suggest_categorical("lws", [True, False])
        # Categorical choices must not change between trials: one fusion parameter per mode.
        name = "fusion" if "expert_mode" not in self.dims else f"fusion_{mode}"
        split["fusion"] = trial.suggest_categorical(name, self.fusions(mode))
        return {"split": split, "optim": optim}


def apply(base: RunConfig, overrides: dict[str, dict[str, Any]]) -> RunConfig:
    """A copy of `base` with section fields replaced (validated again by the dataclasses)."""
    return replace(base, **{section: replace(getattr(base, section), **values) for section, values in overrides.items()})


@dataclass
class SearchSpaceReplay:
    """Rebuild a trial's config overrides from its stored params (FixedTrial replays `suggest`)."""

    params: dict
    space: SearchSpace

    def overrides(self) -> dict[str, dict[str, Any]]:
        return self.space.suggest(optuna.trial.FixedTrial(self.params))
