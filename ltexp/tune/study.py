"""`run_study`: one study session from the first trial to the registered model."""

from __future__ import annotations

import json
import logging
import time
import uuid
import warnings
from dataclasses import dataclass, replace

import optuna
import torch

from ltexp import LtexpError, lifecycle, redact, schema, tracking
from ltexp.config import RunConfig, TuneConfig
from ltexp.coord.budget import TrialBudget, state_counts
from ltexp.coord.claim import parent_run_id, record_parent_run
from ltexp.coord.optuna_internals import TRIAL_FAILURE_LOGGER
from ltexp.coord.storage import default_storage, open_storage
from ltexp.experiment import execute
from ltexp.training import ExpertCache, prepare
from ltexp.progress import CountProgress
from ltexp.threads import job_threads
from ltexp.tune.jobs import JobArgs, TuneJobs, frozen_heap, removed_at_exit
from ltexp.tune.objective import Objective
from ltexp.tune.samplers import build_pruner, set_sampler
from ltexp.tune.space import SearchSpace, SearchSpaceReplay, apply, default_model_name, parse_objective


class _NoTraceback(logging.Filter):
    """Optuna logs a failed trial with its traceback. For a trial ended by Ctrl-C or SIGTERM, or
    by an ltexp error (one line that names the bad value), the message line says it all."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, LtexpError)):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger(TRIAL_FAILURE_LOGGER).addFilter(_NoTraceback())


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
    set_sampler(study, tune.sampler, base.seed, storage_url)

    # Several jobs share their trained experts through a folder, removed when the study ends.
    shared = lifecycle.cache_dir() / "tune-experts" / uuid.uuid4().hex if tune.jobs > 1 else None
    with tracking.start_tune_run(base, study_name, parent_run_id(study)) as parent, removed_at_exit(shared):
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
