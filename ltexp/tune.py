"""Optuna tuning of split experts (`ltexp tune`); what it shares with `ltexp grid` to coordinate
workers (storages, the trial budget, the parent-run claim) is in `ltexp.coord`.

Search space (always): the split point(s) `split_at` over class ranks, `clip_norm` (off, or log
scale in [clip_min, clip_max]) and the fusion rule. Optional (`--search`): lr, weight_decay,
expert_mode, other_size, lws, num_groups. The objective is a validation metric of the honest
fused prediction; the test set is touched once, for the best trial's model.

MLflow shape: one parent run (role `tune`) for the study, one nested run (role `trial`) per
trial with its per-epoch validation curve and final state (COMPLETE / PRUNED / FAIL). Trying
another fusion rule never retrains experts, and an expert whose training settings were seen
before is reused (`ExpertCache`). Running the same command again continues the study
(`load_if_exists`) up to `n_trials` finished trials; with an RDB storage, heartbeats mark a
trial whose worker died and it is retried. `--jobs N` runs N trials at once on one machine
(`TuneJobs`: N-1 spawned helper processes, one trial budget, one parent run, one expert cache
folder).
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import re
import shutil
import sys
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import torch

from ltexp import LtexpError, lifecycle, processes, redact, schema, tracking
from ltexp.choices import COMPILE_NONE, FUSIONS, NEEDS_OTHER, NEEDS_ROUTER, SEQUENTIAL
from ltexp.config import RunConfig, TuneConfig
from ltexp.data.sources import parse_dataset
from ltexp.coord.budget import TrialBudget, state_counts
from ltexp.coord.claim import parent_run_id, record_parent_run
from ltexp.coord.storage import default_storage, open_storage
from ltexp.experiment import (ExpertCache, Prepared, build_experts, checkpointer, execute, expert_key, expert_steps,
                              fusion_table, prepare, train_expert)
from ltexp.progress import CountProgress
from ltexp.threads import job_threads


class _NoTraceback(logging.Filter):
    """Optuna logs a failed trial with its traceback. For a trial ended by Ctrl-C or SIGTERM, or
    by an ltexp error (one line that names the bad value), the message line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, LtexpError)):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("optuna.study._optimize").addFilter(_NoTraceback())

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
class _Expert:
    """One expert of a trial: from the cache (`steps` None) or in training (`steps` its epochs)."""

    spec: Any
    key: str
    model: Any
    steps: Any
    checkpoint: Any


def _clear(experts: list[_Expert]) -> None:
    for e in experts:
        if e.checkpoint is not None:
            e.checkpoint.clear()


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
        tags = {**tracking.run_tags(cfg, "trial"), schema.TRIAL_NUMBER: str(trial.number),
                schema.TORCH_THREADS: str(torch.get_num_threads())}
        with self.parent.child(f"trial-{trial.number}", tags) as run:
            run.log_params({**{k: str(v) for k, v in trial.params.items()}, "trial_number": trial.number},
                           synchronous=False)
            method, specs, layout = build_experts(cfg, self.prep.data.info)
            # Experts train in lockstep, one epoch each in turn; after every epoch the pruner sees
            # the objective on the *fused* validation prediction of all experts, a number that is
            # comparable across trials whatever the split (an expert's own accuracy is not: a
            # 2-class head expert scores higher than an 8-class one).
            cadence = lifecycle.Cadence(lifecycle.Every.parse(cfg.tracking.checkpoint_every))
            experts = []
            for spec in specs:
                key = expert_key(cfg, spec)
                if self.cache.has(key):
                    model, _, _ = train_expert(cfg, method, spec, self.prep, None, False, self.cache)
                    experts.append(_Expert(spec, key, model, None, None))
                else:
                    self.cache.misses += 1
                    ckpt = checkpointer(cfg, spec, run.run_id, self.parent.run_id,
                                        f"trial {trial.number} expert {spec.name}", cadence)
                    model, steps = expert_steps(cfg, method, spec, self.prep, ckpt)
                    experts.append(_Expert(spec, key, model, steps, ckpt))
            step = 0
            try:
                while True:
                    t0 = time.perf_counter()
                    records = {}
                    for e in experts:
                        if e.steps is None:
                            continue
                        try:
                            records[e.spec.name] = next(e.steps)
                        except StopIteration as done:
                            e.steps = None
                            self.cache.put(e.key, e.model, done.value)
                    if not records:
                        break
                    step += 1
                    metrics = {f"{k}__expert_{name}": v for name, record in records.items() for k, v in record.items()
                               if k.startswith("val_") or k == "train_loss"}
                    # Epochs replayed from a checkpoint were reported by the trial this one retries.
                    replayed = all(step <= e.checkpoint.resumed_epoch for e in experts if e.spec.name in records)
                    if not replayed:
                        value, _ = self.fused(cfg, layout, [e.model for e in experts])
                        metrics["objective"] = value
                    compute += time.perf_counter() - t0
                    run.log_epoch({**metrics, "epoch": step})
                    if not replayed:
                        trial.report(value, step)
                        if trial.should_prune():
                            raise optuna.TrialPruned(f"pruned at epoch {step}: fused {self.space.tune.metric} "
                                                     f"{value:.4f}")
            except KeyboardInterrupt:
                # Ctrl-C / SIGTERM: Optuna fails the trial; queue its parameters so the next session
                # runs it first and its experts continue from their checkpoints.
                trial.study.enqueue_trial(trial.params, user_attrs={schema.RETRY_OF: trial.number})
                raise
            except optuna.TrialPruned:
                run.set_tags({schema.TRIAL_STATE: "PRUNED"})
                run.status = "KILLED"
                self._account(started, compute)
                _clear(experts)
                raise
            t0 = time.perf_counter()
            for e in experts:
                e.model.eval()
            value, val_metrics = self.fused(cfg, layout, [e.model for e in experts])
            compute += time.perf_counter() - t0
            overhead = self._account(started, compute)
            # One write for the trial's results (metrics and state tag together).
            # The final values end the per-epoch curves (the last epoch's step); the trial's times
            # have no curve, so they sit at step 0 (bars in MLflow's chart view).
            run.log_batch(metrics={**{f"val_{k}": v for k, v in val_metrics.items()}, "objective": value},
                          tags={schema.TRIAL_STATE: "COMPLETE"}, step=step,
                          summaries={"trial_time_s": self.trial_s[-1], "overhead_s": overhead})
            _clear(experts)
        return value

    def fused(self, cfg: RunConfig, layout, models: list) -> tuple[float, dict[str, float]]:
        """The objective and validation metrics of the experts' fused prediction (trial's rule)."""
        from ltexp.predictor import FusedPredictor

        predictor = FusedPredictor(models, layout, cfg.split.fusion, self.prep.data.info.class_names,
                                   self.prep.data.image_shape)
        val = (predictor.expert_outputs(self.prep.splits.val.images), self.prep.splits.val.labels)
        row = fusion_table(layout, val, self.prep.data.info, rules=[cfg.split.fusion]).iloc[0]
        val_metrics = {k[4:]: float(row[k]) for k in row.index if k.startswith("val_")}
        return objective_value(self.terms, val_metrics), val_metrics

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
    trials_run: int        # by this process
    trials_finished: int   # COMPLETE or PRUNED while it ran, by every job and worker of the study
    experts_trained: int   # by every job of this command, the test evaluation included
    experts_reused: int


def _trial_line(study: optuna.Study, trial: optuna.trial.FrozenTrial, metric: str) -> str:
    """What one finished trial did, for the progress line: state, value, and the best so far."""
    state = trial.state.name
    if state == "COMPLETE":
        best = study.best_trial
        return f"trial {trial.number} COMPLETE {metric} {trial.value:.4f} (best {best.value:.4f}, trial {best.number})"
    if state == "PRUNED":
        return f"trial {trial.number} PRUNED at epoch {trial.last_step}"
    return f"trial {trial.number} {state} (Optuna's warning above gives the reason; so does its MLflow run)"


def run_study(base: RunConfig, tune: TuneConfig, progress: bool = True) -> TuneResult:
    """Create or resume the study, run the missing trials, evaluate the best once on test,
    log and register its model, and promote it to `champion` only if it beats the champion.

    `progress`: trials done / n_trials with an ETA after each trial (a bar on a terminal, a line
    elsewhere), in place of Optuna's own per-trial log lines."""
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

    try:
        study = optuna.create_study(study_name=study_name, storage=storage, pruner=build_pruner(tune.pruner),
                                    direction="maximize", load_if_exists=True)
    except Exception as exc:
        raise LtexpError(f"cannot create or load study {study_name!r} in {storage_url}: "
                         f"{str(exc).splitlines()[0][:300]}") from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise LtexpError(f"study {study_name!r} exists with direction {study.direction.name.lower()}; ltexp maximises "
                         f"a validation metric: choose another --study-name")
    saved = study.user_attrs.get(schema.SEARCH_SPACE)
    settings = {"search_space": description, "metric": tune.metric, "data": base.data.__dict__,
                "model": base.model.model}
    if saved is not None and saved != json.loads(json.dumps(settings, default=str)):
        raise LtexpError(f"study {study_name!r} exists with another search space, metric or data: choose another "
                         f"--study-name (saved: {json.dumps(saved)[:200]})")
    if saved is None:
        study.set_user_attr(schema.SEARCH_SPACE, json.loads(json.dumps(settings, default=str)))
    _set_sampler(study, tune.sampler, base.seed, storage_url)

    # Several jobs share their trained experts through a folder, removed when the study ends.
    shared = lifecycle.cache_dir() / "tune-experts" / uuid.uuid4().hex if tune.jobs > 1 else None
    with tracking.start_tune_run(base, study_name, parent_run_id(study)) as parent, _removed_at_exit(shared):
        if record_parent_run(study, parent.run_id):
            parent.log_params({"study_name": study_name, "storage": redact(storage_url), "sampler": tune.sampler,
                               "pruner": tune.pruner, "metric": tune.metric, "n_trials": tune.n_trials,
                               "jobs": tune.jobs,
                               "search_space": json.dumps(description), **{k: v for k, v in base.data.__dict__.items()},
                               "model": base.model.model, "epochs": base.optim.epochs, "seed": base.seed})
        # --jobs N: this process and N-1 helper processes each take an equal share of its threads.
        threads = job_threads(torch.get_num_threads(), tune.jobs)
        torch.set_num_threads(threads)
        parent.set_tags({schema.JOBS: str(tune.jobs), schema.TORCH_THREADS: str(threads),
                         schema.DEVICE: str(prep.device)})
        objective = Objective(base, space, terms, prep, parent, cache=ExpertCache(directory=shared))
        budget = TrialBudget(study, storage, storage_url, tune.n_trials)
        reporter = TrialReporter(study, tune.n_trials, tune.metric, progress)
        started = time.perf_counter()
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress line says it, with the ETA
        helpers = TuneJobs([JobArgs(base, tune, study_name, storage_url, parent.run_id, threads, index, shared)
                            for index in range(1, tune.jobs)])
        try:
            helpers.start()
            with frozen_heap():
                budget.optimize(objective, callbacks=[reporter] if progress else [], catch=(LtexpError,),
                                gc_after_trial=False)
            optimize_wall = time.perf_counter() - started
            helpers.wait(lambda: reporter(study, None))
        except BaseException as exc:
            # Ctrl-C from a terminal reached the helpers too: they get time to end on their own.
            helpers.stop(grace_s=10.0 if type(exc) is KeyboardInterrupt else 0.0)
            raise
        finally:
            optuna.logging.set_verbosity(verbosity)
            reporter.close()
        study_wall = time.perf_counter() - started
        complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        if not complete:
            raise LtexpError(f"study {study_name!r} has no complete trial (states: {state_counts(study)})")
        best = study.best_trial
        counts = state_counts(study)
        parent.log_metrics({"best_value": best.value, "trials_complete": counts.get("COMPLETE", 0),
                            "trials_pruned": counts.get("PRUNED", 0), "trials_failed": counts.get("FAIL", 0),
                            "study_wall_s": study_wall, "trials_run_here": len(objective.trial_s),
                            # Everything but training and validation scoring, Optuna's ask/tell and
                            # MLflow's run start/end included: this process's wall in the study
                            # (before it waits for its helper jobs) minus compute, per trial.
                            "overhead_s_per_trial": (optimize_wall - sum(objective.trial_s) + sum(objective.overhead_s))
                            / max(1, len(objective.trial_s)),
                            "overhead_fraction": (sum(objective.overhead_s) + optimize_wall - sum(objective.trial_s))
                            / optimize_wall if objective.trial_s else 0.0})
        log_plots(parent, study)

        # The best configuration, evaluated once on test; its experts usually come from the cache.
        best_cfg = apply(base, SearchSpaceReplay(best.params, space).overrides())
        # Tags, not params: the best trial changes as the study goes on, and several sessions or
        # workers write this one parent run (params are immutable; concurrent workers collided).
        parent.set_tags({f"ltexp.best.{k}": str(v) for k, v in best.params.items()}
                        | {schema.BEST_TRIAL: str(best.number), schema.BEST_SPLIT_AT: best_cfg.split.split_at,
                           schema.BEST_FUSION: best_cfg.split.fusion, schema.BEST_CLIP_NORM: str(best_cfg.optim.clip_norm)})
        result = execute(best_cfg, parent, prep, cache=objective.cache, expert_runs=False, shared_run=True)
        # Counted after the test evaluation, whose experts come from the cache too: what is printed.
        # Every job's experts: this process's and its helpers'.
        helpers_trained, helpers_reused = helpers.experts()
        experts_trained = objective.cache.misses + helpers_trained
        experts_reused = objective.cache.hits + helpers_reused
        parent.log_metrics({"experts_trained": experts_trained, "experts_reused": experts_reused})
        tracking.flush()
        name = tune.model_name or default_model_name(base.data.dataset)
        data_key = "|".join(str(getattr(base.data, f)) for f in tracking.DATA_KEY_FIELDS)
        version, promoted, decision = tracking.register_and_promote(parent.run_id, name, tune.metric, best.value, data_key)
        return TuneResult(parent.run_id, study_name, dict(best.params), float(best.value),
                          {k: v for k, v in result.metrics.items() if k.startswith("test_") and "__" not in k},
                          version, promoted, decision, len(objective.trial_s),
                          len(study.get_trials(deepcopy=False, states=TrialReporter.FINISHED)) - reporter.finished_before,
                          experts_trained, experts_reused)


def build_pruner(name: str):
    """The study's pruner (`--pruner`); a pruner is per process, so every job builds the same one."""
    return {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2),
            "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=2),
            "none": optuna.pruners.NopPruner}[name]()


def _set_sampler(study: optuna.Study, name: str, seed: int, storage_url: str) -> None:
    study.sampler = build_sampler(name, seed, len(study.get_trials(deepcopy=False)))
    if "://" in storage_url and not storage_url.startswith("sqlite"):
        # A database server is shared by workers that all pass the same --seed and may start at
        # the same moment (compose replicas do): identically seeded samplers would propose the
        # same trials in every worker.
        study.sampler.reseed_rng()


class TrialReporter:
    """The progress line (or bar) of a study: one line per trial that finished since this process
    started, whichever worker ran it (this process, a `--jobs` helper, another machine), read from
    the storage after each of this process's trials and while it waits for its helpers."""

    FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)

    def __init__(self, study: optuna.Study, n_trials: int, metric: str, enabled: bool):
        self.n_trials, self.metric = n_trials, metric
        # Trials finished before this process (read without the budget's lock: display and the
        # command's count of trials finished while it ran).
        self.seen = {t.number for t in study.get_trials(deepcopy=False, states=self.FINISHED)}
        self.finished_before = len(self.seen)
        self.bar = CountProgress("tune", "trial", n_trials, min(n_trials, self.finished_before), enabled)
        self.enabled = enabled

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial | None) -> None:
        """Optuna callback (`trial`: the one this process just ended) and the helpers' poll (None)."""
        if not self.enabled:
            return
        finished = study.get_trials(deepcopy=False, states=self.FINISHED)  # one storage read
        new = sorted((t for t in finished if t.number not in self.seen), key=lambda t: t.datetime_complete)
        done = len(finished) - len(new)
        for t in new:
            self.seen.add(t.number)
            done += 1
            self.bar.update(min(done, self.n_trials), _trial_line(study, t, self.metric))
        if trial is not None and trial.state not in self.FINISHED:  # FAIL: said, not counted
            self.bar.update(min(len(finished), self.n_trials), _trial_line(study, trial, self.metric))

    def close(self) -> None:
        self.bar.close()


# Seeds of the helpers' samplers: apart from the command's (--seed) and from each other's.
JOB_SEED_STRIDE = 7919


@dataclass(frozen=True)
class JobArgs:
    """What a helper process of `ltexp tune --jobs N` needs (pickled to it by `multiprocessing`)."""

    base: RunConfig
    tune: TuneConfig
    study_name: str
    storage_url: str
    parent_run_id: str
    threads: int
    index: int
    expert_dir: Path | None  # the jobs' shared expert cache (`ExpertCache.directory`)


@contextmanager
def _removed_at_exit(folder: Path | None):
    try:
        yield folder
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def frozen_heap():
    """Keep the objects alive at entry out of Python's full garbage collections while the block
    runs (`gc.freeze`), and give them back at exit (`gc.unfreeze`).

    For a study's trials: importing torch, MLflow, Optuna and SQLAlchemy leaves hundreds of
    thousands of tracked objects that never die, and every full collection walks them all, several
    times per study at random points of its trials. Inside the block a full collection walks only
    the objects made since (its effect on the bookkeeping per trial: docs/gpu.md, "Tuning bookkeeping").
    The young generations are collected first, so little garbage is frozen; what is, is collected
    after."""
    gc.collect(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def tune_job(args: JobArgs, expert_counts=None) -> None:
    """A helper process of `ltexp tune --jobs N`: run trials of the study, nested in the command's
    parent run, until the study's trial budget is spent. The final test evaluation, the model and
    its registration are the command's, done once. Exit code 2 on an ltexp error, 130 when
    interrupted (SIGTERM, like Ctrl-C, fails the running trial and queues it again).

    `expert_counts`: a shared array (`TuneJobs`) where this job leaves how many experts it
    trained and reused, at slots 2 * (index - 1) and the next, whichever way it ends."""
    processes.install_signal_handlers()
    torch.set_num_threads(args.threads)
    cache = ExpertCache(directory=args.expert_dir)
    try:
        prep = prepare(args.base)
        space = SearchSpace(prep.data.info.num_classes, args.tune, args.base)
        storage = open_storage(args.storage_url, args.tune.heartbeat_s)
        study = optuna.load_study(study_name=args.study_name, storage=storage, pruner=build_pruner(args.tune.pruner))
        _set_sampler(study, args.tune.sampler, args.base.seed + JOB_SEED_STRIDE * args.index, args.storage_url)
        objective = Objective(args.base, space, parse_objective(args.tune.metric), prep,
                              tracking.existing_run(args.parent_run_id), cache=cache)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with frozen_heap():
            TrialBudget(study, storage, args.storage_url, args.tune.n_trials).optimize(
                objective, catch=(LtexpError,), gc_after_trial=False)
    except LtexpError as exc:
        print(f"ltexp: tune job {args.index}: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print(f"ltexp: tune job {args.index}: {processes.interrupt_reason(exc)}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if expert_counts is not None:
            expert_counts[2 * (args.index - 1): 2 * args.index] = [cache.misses, cache.hits]


class TuneJobs:
    """The helper processes of `ltexp tune --jobs N` (N-1 of them; the command is the first job).

    Spawned, not forked: a fork would copy this process's CUDA context, MLflow's logging threads
    and open database connections. Each loads the data itself (about as long as importing torch,
    MLflow and Optuna: seconds) and takes the study's trials through the same `TrialBudget` lock,
    so the study stops at exactly --n-trials whichever job runs them."""

    def __init__(self, jobs: list[JobArgs]):
        context = multiprocessing.get_context("spawn")
        # Experts trained and reused by each helper, in pairs, written by the helper as it ends.
        self.expert_counts = context.Array("q", 2 * len(jobs))
        # daemon: a helper never outlives the command (multiprocessing terminates it at exit).
        self.processes = [context.Process(target=tune_job, args=(job, self.expert_counts),
                                          name=f"ltexp-tune-job-{job.index}", daemon=True) for job in jobs]

    def experts(self) -> tuple[int, int]:
        """Experts trained and reused by all helpers together (read once they have ended)."""
        counts = self.expert_counts[:]
        return sum(counts[0::2]), sum(counts[1::2])

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def wait(self, poll=None, every_s: float = 1.0) -> None:
        """Wait for every helper to end (calling `poll` every `every_s` meanwhile); a helper that
        failed gets a warning: its trials are failed and retried by the others, not lost."""
        for process in self.processes:
            while process.is_alive():
                process.join(every_s)
                if poll is not None:
                    poll()
            if process.exitcode != 0:
                print(f"ltexp: warning: {process.name} (pid {process.pid}) ended with exit code {process.exitcode}; "
                      f"its running trial, if any, is retried by the study", file=sys.stderr, flush=True)

    def stop(self, grace_s: float = 10.0, kill_s: float = 30.0) -> None:
        """End the helpers after this process was interrupted or failed: a Ctrl-C from a terminal
        reaches them too, so each gets `grace_s` to end on its own, then SIGTERM (its running
        trial ends KILLED and is queued again), then SIGKILL after `kill_s`."""
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            if process.pid is not None:
                process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            if process.pid is not None:
                process.join(kill_s)
                if process.is_alive():
                    print(f"ltexp: warning: {process.name} (pid {process.pid}) did not end {kill_s:g} s after "
                          f"SIGTERM: killed; its trial is retried by the study's next session", file=sys.stderr,
                          flush=True)
                    process.kill()
                    process.join()


def build_sampler(name: str, seed: int, trials_so_far: int):
    """The study's sampler, seeded with the run seed *and* the number of trials already in the
    study: a resumed study must not draw the same sequence again (a sampler seeded with the run
    seed alone re-proposes, after a restart, exactly the parameters it has already evaluated)."""
    session_seed = (seed * 1_000_003 + trials_so_far) % 2**32
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=session_seed)
    return optuna.samplers.RandomSampler(seed=session_seed)


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

    # A parameter with one value over the complete trials that have it carries no information and
    # makes Optuna warn ("unique value length is less than 2"): `clip` when every trial clipped, or
    # the conditional `clip_norm` when only one trial clipped. The per-parameter plots leave it out.
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    varying = sorted({k for t in complete for k in t.params
                      if len({repr(u.params[k]) for u in complete if k in u.params}) > 1})
    for name in ("optimization_history", "param_importances", "slice", "contour", "intermediate_values"):
        kwargs = {"params": varying} if name in ("param_importances", "slice", "contour") else {}
        try:
            if name in ("slice", "contour", "param_importances") and len(varying) < (2 if name == "contour" else 1):
                raise ValueError(f"needs {'two parameters' if name == 'contour' else 'a parameter'} that varied "
                                 f"across complete trials (varied: {', '.join(varying) or 'none'})")
            if name == "intermediate_values" and not any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
                raise ValueError("no trial reported a value per epoch")  # Optuna would warn and draw nothing
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the matplotlib backend
                # On a small study Optuna's importance estimate warns that a parameter's regimes hold
                # fewer than 2 trials; the plot still says what it can, and the user can do nothing.
                warnings.filterwarnings("ignore", message="Some regimes for parameter", category=UserWarning)
                warnings.filterwarnings("ignore", message="Target and region quantiles select the same set",
                                        category=UserWarning)
                figure = getattr(vis, f"plot_{name}")(study, **kwargs)
                run.log_text(figure.to_html(include_plotlyjs="cdn"), f"optuna/{name}.html")
                axes = getattr(vis_mpl, f"plot_{name}")(study, **kwargs)
            fig = axes.flat[0].figure if hasattr(axes, "flat") else axes.figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 7), max(fig.get_size_inches()[1], 5))
            run.log_figure(fig, f"optuna/{name}.png")
            plots.close(fig)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # e.g. importances need two complete trials with a varying parameter
            run.log_text(f"{name}: not available ({exc})", f"optuna/{name}.txt")
