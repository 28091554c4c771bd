"""Optuna tuning of split experts: the only module that imports optuna.

Search space (always): the split point(s) `split_at` over class ranks, `clip_norm` (off, or log
scale in [clip_min, clip_max]) and the fusion rule. Optional (`--search`): lr, weight_decay,
expert_mode, other_size, lws, num_groups. The objective is a validation metric of the honest
fused prediction; the test set is touched once, for the best trial's model.

MLflow shape: one parent run (role `tune`) for the study, one nested run (role `trial`) per
trial with its per-epoch validation curve and final state (COMPLETE / PRUNED / FAIL). Trying
another fusion rule never retrains experts, and an expert whose training settings were seen
before is reused (`ExpertCache`). Running the same command again continues the study
(`load_if_exists`) up to `n_trials` finished trials; with an RDB storage, heartbeats mark a
trial whose worker died and it is retried.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from ltexp import LtexpError, tracking
from ltexp.config import RunConfig, TuneConfig
from ltexp.experiment import ExpertCache, Prepared, build_experts, execute, fusion_table, prepare, train_expert
from ltexp.fusion import NEEDS_OTHER, FUSIONS

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


def default_storage() -> str:
    """sqlite `optuna.db` beside an sqlite MLflow store (default: the working directory)."""
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def redact(url: str) -> str:
    """A storage URL fit for a param: the password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def open_storage(url: str, heartbeat_s: int):
    """An Optuna storage: RDB URL (with heartbeats and retry of dead workers' trials) or a journal
    file (`*.log`, `*.journal` or `journal:<path>`). Unreachable storage -> one-line error."""
    try:
        if url.startswith("journal:") or url.endswith((".log", ".journal")):
            from optuna.storages.journal import JournalFileBackend

            path = url[len("journal:"):] if url.startswith("journal:") else url
            return optuna.storages.JournalStorage(JournalFileBackend(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are wanted
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2),
                engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # sqlalchemy, driver and OS errors all mean the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LtexpError(f"cannot open Optuna storage {redact(url)}: {reason[:300]}") from None


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

    def fusions(self, expert_mode: str | None) -> list[str]:
        """Rules searched for an expert mode (None: the union)."""
        chosen = self.tune.fusion_list() or [f for f in FUSIONS]
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
class Objective:
    """The callable objective (optuna-examples style): holds the preloaded data and the expert cache."""

    base: RunConfig
    space: SearchSpace
    terms: list[tuple[float, str]]
    prep: Prepared
    parent: tracking.Run
    cache: ExpertCache = field(default_factory=ExpertCache)
    overhead_s: list[float] = field(default_factory=list)
    trial_s: list[float] = field(default_factory=list)

    def __call__(self, trial: optuna.Trial) -> float:
        started = time.perf_counter()
        compute = 0.0
        cfg = apply(self.base, self.space.suggest(trial))
        tags = {**tracking.run_tags(cfg, "trial"), "ltexp.trial_number": str(trial.number)}
        with self.parent.child(f"trial-{trial.number}", tags) as run:
            run.log_params({**{k: str(v) for k, v in trial.params.items()}, "trial_number": trial.number},
                           synchronous=False)
            method, specs, layout = build_experts(cfg, self.prep.data.info)
            step = 0
            models = []
            try:
                for spec in specs:
                    def on_epoch(record, spec=spec):
                        nonlocal step, compute
                        t_book = time.perf_counter()  # bookkeeping inside training: not compute
                        step += 1
                        run.log_epoch({**{f"{k}__expert_{spec.name}": v for k, v in record.items()
                                          if k.startswith("val_") or k == "train_loss"}, "epoch": step})
                        # The expert's validation score decides pruning (its own classes' accuracy).
                        trial.report(record["val_macro_acc"] if spec.other else record["val_acc"], step)
                        prune = trial.should_prune()
                        compute -= time.perf_counter() - t_book
                        if prune:
                            raise optuna.TrialPruned(f"pruned at step {step} ({spec.name} expert)")

                    t0 = time.perf_counter()
                    model, _, _ = train_expert(cfg, method, spec, self.prep, on_epoch, False, self.cache)
                    models.append(model)
                    compute += time.perf_counter() - t0
            except optuna.TrialPruned:
                run.set_tags({"ltexp.trial_state": "PRUNED"})
                run.status = "KILLED"
                self._account(started, compute)
                raise
            t0 = time.perf_counter()
            from ltexp.predictor import FusedPredictor

            predictor = FusedPredictor(models, layout, cfg.split.fusion, self.prep.data.info.class_names,
                                       self.prep.data.image_shape)
            val = (predictor.expert_outputs(self.prep.splits.val.images), self.prep.splits.val.labels)
            row = fusion_table(layout, val, self.prep.data.info, rules=[cfg.split.fusion]).iloc[0]
            val_metrics = {k[4:]: float(row[k]) for k in row.index if k.startswith("val_")}
            value = objective_value(self.terms, val_metrics)
            compute += time.perf_counter() - t0
            overhead = self._account(started, compute)
            # One write for the trial's results (metrics and state tag together).
            run.log_batch(metrics={**{f"val_{k}": v for k, v in val_metrics.items()}, "objective": value,
                                   "trial_time_s": self.trial_s[-1], "overhead_s": overhead},
                          tags={"ltexp.trial_state": "COMPLETE"})
        return value

    def _account(self, started: float, compute: float) -> float:
        total = time.perf_counter() - started
        self.trial_s.append(total)
        self.overhead_s.append(total - compute)
        return total - compute


@dataclass
class TuneResult:
    run_id: str
    study_name: str
    best_params: dict
    best_value: float
    test_metrics: dict
    version: int | None
    promoted: bool
    decision: str
    trials_run: int
    experts_trained: int
    experts_reused: int


def _state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


def run_study(base: RunConfig, tune: TuneConfig) -> TuneResult:
    """Create or resume the study, run the missing trials, evaluate the best once on test,
    log and register its model, and promote it to `champion` only if it beats the champion."""
    if base.method.method != "split":
        base = replace(base, method=replace(base.method, method="split"))
    terms = parse_objective(tune.metric)
    study_name = tune.study_name or f"ltexp-{base.data.dataset}-{base.data.imb_type}-{base.data.imb_factor}-{tune.metric}"
    prep = prepare(base)
    space = SearchSpace(prep.data.info.num_classes, tune, base)
    space.validate()  # before the storage is touched: a bad search space writes nothing
    description = space.describe()
    storage_url = tune.storage or default_storage()
    storage = open_storage(storage_url, tune.heartbeat_s)

    sampler = optuna.samplers.TPESampler(seed=base.seed) if tune.sampler == "tpe" else optuna.samplers.RandomSampler(seed=base.seed)
    pruner = {"median": optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2),
              "hyperband": optuna.pruners.HyperbandPruner(min_resource=2),
              "none": optuna.pruners.NopPruner()}[tune.pruner]
    try:
        study = optuna.create_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner,
                                    direction="maximize", load_if_exists=True)
    except Exception as exc:
        raise LtexpError(f"cannot create or load study {study_name!r} in {redact(storage_url)}: "
                         f"{str(exc).splitlines()[0][:300]}") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise LtexpError(f"study {study_name!r} exists with direction {study.direction.name.lower()}; ltexp maximises "
                         f"a validation metric: choose another --study-name")
    saved = study.user_attrs.get("ltexp.search_space")
    settings = {"search_space": description, "metric": tune.metric, "data": base.data.__dict__,
                "model": base.model.model}
    if saved is not None and saved != json.loads(json.dumps(settings, default=str)):
        raise LtexpError(f"study {study_name!r} exists with another search space, metric or data: choose another "
                         f"--study-name (saved: {json.dumps(saved)[:200]})")
    if saved is None:
        study.set_user_attr("ltexp.search_space", json.loads(json.dumps(settings, default=str)))

    with tracking.start_tune_run(base, study_name, study.user_attrs.get("ltexp.mlflow_run_id")) as parent:
        if "ltexp.mlflow_run_id" not in study.user_attrs:
            study.set_user_attr("ltexp.mlflow_run_id", parent.run_id)
            parent.log_params({"study_name": study_name, "storage": redact(storage_url), "sampler": tune.sampler,
                               "pruner": tune.pruner, "metric": tune.metric, "n_trials": tune.n_trials,
                               "search_space": json.dumps(description), **{k: v for k, v in base.data.__dict__.items()},
                               "model": base.model.model, "epochs": base.optim.epochs, "seed": base.seed})
        objective = Objective(base, space, terms, prep, parent)
        done = sum(n for state, n in _state_counts(study).items() if state in ("COMPLETE", "PRUNED"))
        remaining = max(0, tune.n_trials - done)
        started = time.perf_counter()
        if remaining:
            study.optimize(objective, n_trials=remaining, catch=(LtexpError,), gc_after_trial=False,
                           callbacks=[optuna.study.MaxTrialsCallback(
                               tune.n_trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))])
        study_wall = time.perf_counter() - started
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise LtexpError(f"study {study_name!r} has no complete trial (states: {_state_counts(study)})")
        best = study.best_trial
        counts = _state_counts(study)
        parent.log_metrics({"best_value": best.value, "trials_complete": counts.get("COMPLETE", 0),
                            "trials_pruned": counts.get("PRUNED", 0), "trials_failed": counts.get("FAIL", 0),
                            "experts_trained": objective.cache.misses, "experts_reused": objective.cache.hits,
                            "study_wall_s": study_wall,
                            # Everything but training and validation scoring, Optuna's ask/tell and
                            # MLflow's run start/end included: study wall minus compute, per trial.
                            "overhead_s_per_trial": (study_wall - sum(objective.trial_s) + sum(objective.overhead_s))
                            / max(1, len(objective.trial_s)),
                            "overhead_fraction": (sum(objective.overhead_s) + study_wall - sum(objective.trial_s))
                            / study_wall if objective.trial_s else 0.0})
        log_plots(parent, study)

        # The best configuration, evaluated once on test; its experts usually come from the cache.
        best_cfg = apply(base, SearchSpaceReplay(best.params, space).overrides())
        parent.log_params({f"best.{k}": v for k, v in best.params.items()}
                          | {"best.trial_number": best.number, "best.split_at": best_cfg.split.split_at,
                             "best.fusion": best_cfg.split.fusion, "best.clip_norm": best_cfg.optim.clip_norm})
        result = execute(best_cfg, parent, prep, cache=objective.cache, expert_runs=False)
        tracking.flush()
        name = tune.model_name or f"ltexp-{base.data.dataset}"
        data_key = "|".join(str(getattr(base.data, f)) for f in ("dataset", "imb_type", "imb_factor", "val_source",
                                                                 "val_per_class", "data_seed"))
        version, promoted, decision = tracking.register_and_promote(parent.run_id, name, tune.metric, best.value, data_key)
        return TuneResult(parent.run_id, study_name, dict(best.params), float(best.value),
                          {k: v for k, v in result.metrics.items() if k.startswith("test_") and "__" not in k},
                          version, promoted, decision, len(objective.trial_s), objective.cache.misses,
                          objective.cache.hits)


@dataclass
class SearchSpaceReplay:
    """Rebuild a trial's config overrides from its stored params (FixedTrial replays `suggest`)."""

    params: dict
    space: SearchSpace

    def overrides(self) -> dict[str, dict[str, Any]]:
        return self.space.suggest(optuna.trial.FixedTrial(self.params))


def log_plots(run: tracking.Run, study: optuna.Study) -> None:
    """Optimization history, parameter importances, slice and contour: HTML (plotly) and PNG."""
    from optuna import visualization as vis
    from optuna.visualization import matplotlib as vis_mpl

    from ltexp import plots

    for name in ("optimization_history", "param_importances", "slice", "contour", "intermediate_values"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # optuna's matplotlib backend is marked experimental
                figure = getattr(vis, f"plot_{name}")(study)
                run.log_text(figure.to_html(include_plotlyjs="cdn"), f"optuna/{name}.html")
                axes = getattr(vis_mpl, f"plot_{name}")(study)
            fig = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 7), max(fig.get_size_inches()[1], 5))
            run.log_figure(fig, f"optuna/{name}.png")
            plots.close(fig)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # e.g. importances need two complete trials with a varying parameter
            run.log_text(f"{name}: not available ({exc})", f"optuna/{name}.txt")
