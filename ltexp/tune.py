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
trial whose worker died and it is retried. `--jobs N` runs N trials at once on one machine
(`TuneJobs`: N-1 spawned helper processes, one trial budget, one parent run, one expert cache
folder).
"""

from __future__ import annotations

import gc
import json
import logging
import multiprocessing
import os
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

from ltexp import LtexpError, concurrency, lifecycle, redact, tracking
from ltexp.config import RunConfig, TuneConfig
from ltexp.engine import COMPILE_NONE
from ltexp.experiment import (ExpertCache, Prepared, build_experts, checkpointer, execute, expert_key, expert_steps,
                              fusion_table, prepare, train_expert)
from ltexp.fusion import NEEDS_OTHER, NEEDS_ROUTER, FUSIONS
from ltexp.progress import CountProgress


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


# The Optuna storage when --storage is empty: the environment keeps a password off the command
# line, where `ps` and /proc/<pid>/cmdline show it to every local user.
STORAGE_ENV = "LTEXP_STORAGE"


def default_storage() -> str:
    """$LTEXP_STORAGE, else sqlite `optuna.db` beside an sqlite MLflow store (else in the working
    directory)."""
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV]
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def default_model_name(dataset: str) -> str:
    """The registered-model name when --model-name is empty: `ltexp-<dataset>`, and for a folder
    data set `ltexp-folder-<folder name>` (MLflow refuses '/' and ':' in a name)."""
    if dataset.startswith("folder:"):
        folder = Path(dataset[len("folder:"):]).expanduser().resolve().name
        dataset = "folder-" + re.sub(r"[^A-Za-z0-9._-]+", "-", folder).strip("-.")
    return f"ltexp-{dataset}"


def _journal_path(url: str) -> str | None:
    """The file a journal storage URL names (`*.log`, `*.journal` or `journal:<path>`); else None."""
    if url.startswith("journal:"):
        return url[len("journal:"):]
    return url if url.endswith((".log", ".journal")) else None


def _sqlite_lock_path(url: str) -> Path | None:
    """The lock file ltexp keeps beside an sqlite database (`sqlite:///<path>`); else None."""
    return Path(f"{url[len('sqlite:///'):]}.ltexp-lock") if url.startswith("sqlite:///") else None


def _flock(path: Path, wait_s: float | None = None):
    """Take an exclusive lock on the file `path` (made if missing); returns the function that
    releases it, or None when it was not obtained in `wait_s` seconds (None: wait until it is)."""
    import fcntl

    handle = open(path, "a")
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if deadline is None else fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                return None
            time.sleep(0.01)

    def release() -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
    return release


def open_storage(url: str, heartbeat_s: int):
    """An Optuna storage: RDB URL (with heartbeats and retry of dead workers' trials) or a journal
    file (`*.log`, `*.journal` or `journal:<path>`). Unreachable storage -> one-line error."""
    try:
        if _journal_path(url) is not None:
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(_journal_path(url)))
        for attempt in range(4):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are wanted
                    return optuna.storages.RDBStorage(
                        url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                            max_retry=2, inherit_intermediate_values=True),
                        engine_kwargs={"pool_pre_ping": True})
            except Exception as exc:
                # Workers started together on an empty database all create Optuna's tables; in
                # PostgreSQL the losers fail with "duplicate key ... pg_type_typname_nsp_index" or
                # "already exists" (optuna/optuna#1092). The tables exist by then: open again.
                if attempt == 3 or not re.search(r"already exists|duplicate key", str(exc)):
                    raise
                time.sleep(0.5 + attempt)
    except Exception as exc:  # sqlalchemy, driver and OS errors all mean the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LtexpError(f"cannot open Optuna storage {url}: {reason[:300]}") from None


def serve_dashboard(storage_url: str, host: str, port: int) -> None:
    """Optuna's dashboard (`optuna_dashboard.run_server`) on the study storage, until stopped.

    The storage is opened by `open_storage` first, which creates Optuna's tables: the dashboard
    opens an RDB storage with `skip_table_creation=True`, so on a fresh, empty database (a team
    stack whose workers have not started yet) it fails with `StorageInternalError`."""
    try:
        import optuna_dashboard
    except ImportError:
        raise LtexpError("ltexp dashboard needs optuna-dashboard: pip install optuna-dashboard "
                         "(or the ltexp[team] extra)") from None
    storage = open_storage(storage_url, heartbeat_s=60)
    print(f"Optuna dashboard of {redact(storage_url)} on http://{host}:{port}/dashboard", flush=True)
    optuna_dashboard.run_server(storage, host=host, port=port)


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
        if self.base.split.expert_concurrency != concurrency.SEQUENTIAL:
            raise LtexpError(f"--expert-concurrency {self.base.split.expert_concurrency} is for `ltexp train --method "
                             f"split`: a study trains each trial's experts in lockstep, an epoch each in turn, and "
                             f"runs trials at once with --jobs")
        if self.base.optim.compile != COMPILE_NONE:
            # Measured on an H200 (bench/gpu.py): compiling one ResNet takes 17-28 s, more than a
            # short trial trains, and every trial's experts are new models compiled again.
            raise LtexpError(f"--compile {self.base.optim.compile} is for `ltexp train`: each trial's new experts "
                             f"would be compiled again (17-28 s each on an H200); leave --compile none")

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
        tags = {**tracking.run_tags(cfg, "trial"), "ltexp.trial_number": str(trial.number),
                "ltexp.torch_threads": str(torch.get_num_threads())}
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
                trial.study.enqueue_trial(trial.params, user_attrs={"ltexp.retry_of": trial.number})
                raise
            except optuna.TrialPruned:
                run.set_tags({"ltexp.trial_state": "PRUNED"})
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
            run.log_batch(metrics={**{f"val_{k}": v for k, v in val_metrics.items()}, "objective": value,
                                   "trial_time_s": self.trial_s[-1], "overhead_s": overhead},
                          tags={"ltexp.trial_state": "COMPLETE"}, step=step)  # the last epoch's step, not 0
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


def _state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts


class TrialBudget:
    """At most `n_trials` trials done or running in a study, however many workers share it.

    Optuna's MaxTrialsCallback counts after a trial ends, and the next trial is created later,
    in the next `ask`: two workers that finish together both count n - 1 and both start one more
    (seen: 5 trials for `--n-trials 4` with two workers on PostgreSQL). Here each worker counts
    and creates its next trial under one lock that every worker of the study takes, so the count
    a worker reads includes every trial another worker has started:

    - PostgreSQL: a session advisory lock keyed by the study name (every machine of a team);
    - MySQL: `GET_LOCK` on the same key;
    - sqlite database or journal file: an exclusive file lock beside it (one machine, as those
      storages are; the grid's claims take the same lock file);
    - any other storage: no lock, and the count is MaxTrialsCallback's.

    `optimize` runs the study this way: `take()` before the first trial and after each
    (`next_or_stop`, the last optimize callback); while it returns True the lock stays held until
    the trial exists and has its first heartbeat (the `wrap`ped objective is entered) or
    `release()`. So a RUNNING trial without a heartbeat, seen under the lock, belongs to a worker
    that died between creating it and its first heartbeat (seen: a SIGKILL right after a trial
    ended). Optuna never fails such a trial (its stale check reads heartbeats only), and it would
    hold one of the study's trials for good: `take()` fails it and queues it again. A lock not obtained in
    `wait_s` seconds (a worker's machine vanished while holding it; PostgreSQL drops the session
    when TCP gives up) is skipped with a warning: the study goes on, at worst one trial over.
    """

    COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.RUNNING)

    def __init__(self, study: optuna.Study, storage, storage_url: str, n_trials: int, wait_s: float = 120.0):
        self.study = study
        self.storage = storage
        self.n_trials = n_trials
        self.wait_s = wait_s
        self.counted = 0  # trials done or running at the last take()
        self._release = None  # callable that releases the held lock
        self._kind, self._target = self._lock_kind(storage, storage_url, study.study_name)

    @staticmethod
    def _lock_kind(storage, url: str, study_name: str) -> tuple[str, Any]:
        import hashlib

        if _journal_path(url) is not None:
            return "file", Path(f"{_journal_path(url)}.ltexp-lock")
        if _sqlite_lock_path(url) is not None:
            return "file", _sqlite_lock_path(url)
        digest = hashlib.blake2b(f"ltexp-tune:{study_name}".encode(), digest_size=8).digest()
        dialect = getattr(getattr(storage, "engine", None), "dialect", None)
        if dialect is not None and dialect.name == "postgresql":
            return "postgresql", int.from_bytes(digest, "big", signed=True)  # a bigint key
        if dialect is not None and dialect.name in ("mysql", "mariadb"):
            return "mysql", f"ltexp-tune-{digest.hex()}"  # GET_LOCK names: 64 characters at most
        return "none", None

    def _acquire(self) -> None:
        """Take the study's lock (waits up to `wait_s`; see the class docstring)."""
        if self._kind == "file":
            release = _flock(self._target, self.wait_s)
            if release is None:
                return self._give_up()
        elif self._kind in ("postgresql", "mysql"):
            from sqlalchemy import text

            take, give = ((text("SELECT pg_try_advisory_lock(:key)"), text("SELECT pg_advisory_unlock(:key)"))
                          if self._kind == "postgresql" else
                          (text("SELECT GET_LOCK(:key, 0)"), text("SELECT RELEASE_LOCK(:key)")))
            connection = self.storage.engine.connect()
            deadline = time.monotonic() + self.wait_s
            while not connection.execute(take, {"key": self._target}).scalar():
                if time.monotonic() > deadline:
                    connection.close()
                    return self._give_up()
                time.sleep(0.02)

            def release() -> None:
                try:
                    connection.execute(give, {"key": self._target})
                    connection.commit()
                finally:
                    # A session lock outlives the pooled connection's reset: never pool it.
                    connection.invalidate()
                    connection.close()
        else:
            return
        self._release = release

    def _give_up(self) -> None:
        print(f"ltexp: warning: no trial-budget lock for study {self.study.study_name!r} in {self.wait_s:g} s; "
              f"going on without it (at worst one trial over --n-trials)", file=sys.stderr, flush=True)

    def release(self) -> None:
        """Release the lock if held (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def take(self) -> bool:
        """Lock, fail stale trials, count; True (lock kept) when another trial may start."""
        self._acquire()
        try:
            if isinstance(self.storage, optuna.storages.RDBStorage):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    # A dead worker's RUNNING trial must not count. Optuna fails stale trials
                    # again just before its ask (one more query, which then finds none).
                    optuna.storages.fail_stale_trials(self.study)
                if self._release is not None and self.storage.get_heartbeat_interval() is not None:
                    self._fail_heartbeatless()
            self.counted = len(self.study.get_trials(deepcopy=False, states=self.COUNTED))
        except BaseException:
            self.release()
            raise
        if self.counted >= self.n_trials:
            self.release()
            return False
        return True

    def _fail_heartbeatless(self) -> None:
        """Fail the study's RUNNING trials that have no heartbeat, and queue each again as Optuna
        queues a stale one (the storage's retry callback). Only under the lock (see the class)."""
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.storage.scoped_session) as session:
            orphans = [trial_id for (trial_id,) in session.query(models.TrialModel.trial_id).filter(
                models.TrialModel.study_id == self.study._study_id,
                models.TrialModel.state == optuna.trial.TrialState.RUNNING,
                ~models.TrialModel.heartbeats.any())]
        failed = []
        for trial_id in orphans:
            try:
                if self.storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.FAIL):
                    failed.append(trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # ended meanwhile
        retry = self.storage.get_heartbeat_stale_trial_callback()
        for trial_id in failed:
            if retry is not None:
                retry(self.study, self.storage.get_trial(trial_id))

    def optimize(self, objective, callbacks=(), **optimize_kwargs) -> bool:
        """`study.optimize` until the study has `n_trials` done or running (this worker runs at
        most that many itself, failed ones included); False when no trial was due."""
        if not self.take():
            return False
        try:
            self.study.optimize(self.wrap(objective), n_trials=self.n_trials - self.counted,
                                callbacks=[*callbacks, self.next_or_stop], **optimize_kwargs)
        finally:
            self.release()
        return True

    def next_or_stop(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optimize callback (the last one): take the lock for the next trial, or stop the study."""
        if not self.take():
            study.stop()

    def wrap(self, objective):
        """The objective, releasing the lock first: by then Optuna has created the trial, and its
        first heartbeat is recorded here (Optuna's heartbeat thread may not have written it yet)."""
        def run(trial: optuna.Trial) -> float:
            if isinstance(self.storage, optuna.storages.RDBStorage) and self.storage.get_heartbeat_interval():
                self.storage.record_heartbeat(trial._trial_id)
            self.release()
            return objective(trial)
        return run


PARENT_RUN_ATTR = "ltexp.mlflow_run_id"


def _parent_run_id(study: optuna.Study, grace_s: float = 1.0, wait_s: float = 300.0) -> str | None:
    """The MLflow run id of the study's parent run, or None when this worker is to create it.

    Workers started together (`docker compose up --scale worker=N`) would each create a parent
    run. The first to find the study without one writes a claim token, re-reads it after
    `grace_s` (the last writer wins, and every worker sees the same winner), and only the
    winner creates the run; the others wait for its run id (at most `wait_s`, then create their own).
    """
    value = study.user_attrs.get(PARENT_RUN_ATTR)
    if value is None:
        token = f"claim:{uuid.uuid4().hex}"
        study.set_user_attr(PARENT_RUN_ATTR, token)
        time.sleep(grace_s)
        value = study.user_attrs.get(PARENT_RUN_ATTR)
        if value == token:
            return None
    deadline = time.monotonic() + wait_s
    while value.startswith("claim:") and time.monotonic() < deadline:
        time.sleep(1.0)
        value = study.user_attrs.get(PARENT_RUN_ATTR)
    return None if value.startswith("claim:") else value


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
    saved = study.user_attrs.get("ltexp.search_space")
    settings = {"search_space": description, "metric": tune.metric, "data": base.data.__dict__,
                "model": base.model.model}
    if saved is not None and saved != json.loads(json.dumps(settings, default=str)):
        raise LtexpError(f"study {study_name!r} exists with another search space, metric or data: choose another "
                         f"--study-name (saved: {json.dumps(saved)[:200]})")
    if saved is None:
        study.set_user_attr("ltexp.search_space", json.loads(json.dumps(settings, default=str)))
    _set_sampler(study, tune.sampler, base.seed, storage_url)

    # Several jobs share their trained experts through a folder, removed when the study ends.
    shared = lifecycle.cache_dir() / "tune-experts" / uuid.uuid4().hex if tune.jobs > 1 else None
    with tracking.start_tune_run(base, study_name, _parent_run_id(study)) as parent, _removed_at_exit(shared):
        recorded = study.user_attrs.get(PARENT_RUN_ATTR)
        if recorded is None or recorded.startswith("claim:"):
            study.set_user_attr(PARENT_RUN_ATTR, parent.run_id)
            parent.log_params({"study_name": study_name, "storage": redact(storage_url), "sampler": tune.sampler,
                               "pruner": tune.pruner, "metric": tune.metric, "n_trials": tune.n_trials,
                               "jobs": tune.jobs,
                               "search_space": json.dumps(description), **{k: v for k, v in base.data.__dict__.items()},
                               "model": base.model.model, "epochs": base.optim.epochs, "seed": base.seed})
        # --jobs N: this process and N-1 helper processes each take an equal share of its threads.
        threads = job_threads(torch.get_num_threads(), tune.jobs)
        torch.set_num_threads(threads)
        parent.set_tags({"ltexp.jobs": str(tune.jobs), "ltexp.torch_threads": str(threads),
                         "ltexp.device": str(prep.device)})
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
            raise LtexpError(f"study {study_name!r} has no complete trial (states: {_state_counts(study)})")
        best = study.best_trial
        counts = _state_counts(study)
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
                        | {"ltexp.best.trial_number": str(best.number), "ltexp.best.split_at": best_cfg.split.split_at,
                           "ltexp.best.fusion": best_cfg.split.fusion, "ltexp.best.clip_norm": str(best_cfg.optim.clip_norm)})
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


def job_threads(threads: int, jobs: int) -> int:
    """Torch threads for each of `jobs` processes sharing `threads`: an equal share, at least 1."""
    return max(1, threads // jobs)


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

    For a study's trials: importing torch, MLflow, Optuna and SQLAlchemy leaves about 500,000
    tracked objects, and every full collection walks them all, 0.13-0.45 s each on the 2-core VM,
    several times per study at random points of its trials. Inside the block a full collection
    walks only the objects made since (0.02-0.08 s). Tuning bookkeeping per trial, ten digits
    studies each: median 0.120 s before, 0.080 s with it (README, "Tuning bookkeeping"). The young
    generations are collected first, so little garbage is frozen; what is, is collected after."""
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
    lifecycle.install_signal_handlers()
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
        print(f"ltexp: tune job {args.index}: {lifecycle.interrupt_reason(exc)}", file=sys.stderr, flush=True)
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


# --- The grid's work queue (`ltexp grid`): cells handed out through the same Optuna storages -----
#
# One study per grid; each trial is one cell (its parameter `cell` is the cell's index). The
# worker that creates the study enqueues every cell once as a WAITING trial; workers claim
# WAITING trials with the storage's compare-and-set (`set_trial_state_values(..., RUNNING)`
# succeeds for exactly one of them: a row lock on PostgreSQL, sqlite's write lock, the journal's
# replay order), so a cell is never handed out twice. A claimed cell beats a heartbeat; a cell
# whose worker stopped beating for twice the interval is failed and put back as WAITING (RDB
# storages: Optuna's heartbeat and RetryHeartbeatStaleTrialCallback; journal files: the same rule
# with the heartbeat kept as a trial attribute), so a killed worker's cell is re-run, not lost.

CELL_PARAM = "cell"
RUN_ID_ATTR = "ltexp.run_id"
_HEARTBEAT_ATTR = "ltexp.heartbeat"  # unix seconds; journal storages only (RDB ones have a table)
_READY_ATTR = "ltexp.cells"           # set once every cell is enqueued
_SETTINGS_ATTR = "ltexp.grid"
_PARENT_ATTR = "ltexp.mlflow_run_id"
_JOURNAL_MAX_RETRY = 2                # as open_storage's RetryHeartbeatStaleTrialCallback(max_retry=2)


@dataclass
class CellClaim:
    """A cell this worker holds: the trial (id and number), the cell index and the MLflow runs
    of earlier attempts at the same cell that did not finish (to be marked KILLED)."""

    trial_id: int
    number: int
    cell: int
    earlier_run_ids: list[str] = field(default_factory=list)


class CellQueue:
    """The cells of one grid as trials of one Optuna study (see the comment above)."""

    def __init__(self, study: optuna.Study, storage, n_cells: int, heartbeat_s: int, lock_path: Path | None = None):
        self.study = study
        self.storage = storage
        self.n_cells = n_cells
        self.heartbeat_s = heartbeat_s
        self.native_heartbeat = isinstance(storage, optuna.storages.RDBStorage)
        self.lock_path = lock_path

    def _exclusive(self):
        """A context manager holding an exclusive lock on `lock_path` (sqlite storages).

        Through SQLAlchemy, sqlite runs the compare-and-set's SELECT outside the write
        transaction (it ignores FOR UPDATE), so two processes can both see a cell WAITING and
        both take it (measured: one cell of 48 ran twice with two workers). A file lock beside
        the database makes claiming and re-queueing one process at a time; sqlite serves one
        machine, where such a lock holds. PostgreSQL and MySQL lock the row; journal files
        order the operations in their log.
        """
        from contextlib import contextmanager, nullcontext

        if self.lock_path is None:
            return nullcontext()

        @contextmanager
        def locked():
            release = _flock(self.lock_path)
            try:
                yield
            finally:
                release()

        return locked()

    # -- reading the queue
    def trials(self) -> list[optuna.trial.FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def cell_states(self) -> dict[int, list[optuna.trial.FrozenTrial]]:
        """Every trial of every cell, by cell index (trial-number order)."""
        out: dict[int, list] = {i: [] for i in range(self.n_cells)}
        for t in self.trials():
            if CELL_PARAM in t.params:
                out.setdefault(int(t.params[CELL_PARAM]), []).append(t)
        return out

    def counts(self) -> dict[str, int]:
        """Cells done (a COMPLETE trial), running, waiting and failed (only FAIL/PRUNED trials)."""
        done = running = waiting = failed = 0
        for trials in self.cell_states().values():
            states = {t.state for t in trials}
            if optuna.trial.TrialState.COMPLETE in states:
                done += 1
            elif optuna.trial.TrialState.RUNNING in states:
                running += 1
            elif optuna.trial.TrialState.WAITING in states:
                waiting += 1
            else:
                failed += 1
        return {"done": done, "running": running, "waiting": waiting, "failed": failed}

    @property
    def parent_run_id(self) -> str | None:
        return self.study.user_attrs.get(_PARENT_ATTR)

    def set_parent_run_id(self, run_id: str) -> None:
        self.study.set_user_attr(_PARENT_ATTR, run_id)

    def wait_parent_run_id(self, wait_s: float = 60.0) -> str | None:
        """The parent run id, waiting up to `wait_s` seconds for the creating worker to set it."""
        deadline = time.monotonic() + wait_s
        while self.parent_run_id is None and time.monotonic() < deadline:
            time.sleep(0.5)
        return self.parent_run_id

    # -- changing it
    def _enqueue(self, cell: int, user_attrs: dict | None = None) -> None:
        self.study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState.WAITING, params={CELL_PARAM: cell},
            distributions={CELL_PARAM: optuna.distributions.IntDistribution(0, max(0, self.n_cells - 1))},
            user_attrs=user_attrs or {}))

    def requeue_unfinished(self) -> list[int]:
        """Enqueue again every cell that has no COMPLETE, RUNNING or WAITING trial (it failed, or
        its retries were used up): a rerun of the grid re-runs failed and killed cells."""
        live = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)
        with self._exclusive():
            cells = [cell for cell, trials in self.cell_states().items() if not any(t.state in live for t in trials)]
            for cell in cells:
                self._enqueue(cell)
        return cells

    def fail_stale(self) -> None:
        """Fail the cells whose worker stopped beating (2 x heartbeat) and put them back."""
        if self.native_heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # wanted, as heartbeats
                optuna.storages.fail_stale_trials(self.study)  # retried by the storage's callback
            return
        now = time.time()
        for t in self.trials():
            beat = t.user_attrs.get(_HEARTBEAT_ATTR)
            if t.state != optuna.trial.TrialState.RUNNING or beat is None or now - beat <= 2 * self.heartbeat_s:
                continue
            try:
                failed = self.storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                failed = False  # another worker got there first
            history = list(t.user_attrs.get("ltexp.retry_history", []))
            if failed and len(history) < _JOURNAL_MAX_RETRY:
                attrs = {k: v for k, v in t.user_attrs.items() if k != _HEARTBEAT_ATTR}
                self._enqueue(int(t.params[CELL_PARAM]), {**attrs, "ltexp.retry_history": history + [t.number]})

    def claim(self) -> CellClaim | None:
        """Take the lowest-numbered WAITING cell (None when there is none).

        Optuna's trial id is not public API but every storage call is keyed by it, hence
        `FrozenTrial._trial_id`. A claimed trial whose cell already has a COMPLETE trial, or a
        RUNNING one with a lower number (enqueued twice by workers repairing the queue at the
        same moment), is set PRUNED with `ltexp.duplicate_of` and the next one is tried.
        """
        with self._exclusive():
            return self._claim()

    def _claim(self) -> CellClaim | None:
        self.fail_stale()
        waiting = sorted((t for t in self.trials() if t.state == optuna.trial.TrialState.WAITING),
                         key=lambda t: t.number)
        for t in waiting:
            try:
                if not self.storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.RUNNING):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            self.beat(t._trial_id)
            cell = int(t.params[CELL_PARAM])
            siblings = [s for s in self.cell_states()[cell] if s.number != t.number]
            first = next((s for s in siblings if s.state == optuna.trial.TrialState.COMPLETE or
                          (s.state == optuna.trial.TrialState.RUNNING and s.number < t.number)), None)
            if first is not None:
                self.storage.set_trial_user_attr(t._trial_id, "ltexp.duplicate_of", first.number)
                self.storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.PRUNED)
                continue
            earlier = [s.user_attrs[RUN_ID_ATTR] for s in siblings
                       if s.state == optuna.trial.TrialState.FAIL and RUN_ID_ATTR in s.user_attrs]
            if RUN_ID_ATTR in t.user_attrs:  # inherited from the attempt this trial retries
                earlier.append(t.user_attrs[RUN_ID_ATTR])
            return CellClaim(t._trial_id, t.number, cell, sorted(set(earlier)))
        return None

    def beat(self, trial_id: int) -> None:
        """One heartbeat for a held cell."""
        if self.native_heartbeat:
            self.storage.record_heartbeat(trial_id)
        else:
            self.storage.set_trial_user_attr(trial_id, _HEARTBEAT_ATTR, time.time())

    def heartbeat(self, claim: CellClaim):
        """A context manager beating for `claim` every `heartbeat_s` seconds in a thread."""
        import threading
        from contextlib import contextmanager

        @contextmanager
        def beating():
            stop = threading.Event()

            def loop():
                while not stop.wait(self.heartbeat_s):
                    try:
                        self.beat(claim.trial_id)
                    except Exception:  # a missed beat is retried; the cell must not die of it
                        pass

            thread = threading.Thread(target=loop, name=f"ltexp-heartbeat-{claim.number}", daemon=True)
            thread.start()
            try:
                yield
            finally:
                stop.set()
                thread.join(timeout=10)

        return beating()

    def set_attrs(self, claim: CellClaim, attrs: dict[str, Any]) -> None:
        for key, value in attrs.items():
            self.storage.set_trial_user_attr(claim.trial_id, key, value)

    def finish(self, claim: CellClaim, value: float | None, attrs: dict[str, Any], ok: bool = True) -> bool:
        """End the cell's trial COMPLETE (with `value`) or FAIL; False when the storage had already
        failed it (its heartbeat was judged stale while it ran)."""
        self.set_attrs(claim, attrs)
        state = optuna.trial.TrialState.COMPLETE if ok else optuna.trial.TrialState.FAIL
        values = [float(value)] if ok else None
        try:
            return bool(self.storage.set_trial_state_values(claim.trial_id, state, values))
        except optuna.exceptions.UpdateFinishedTrialError:
            return False


def open_cell_queue(storage_url: str, name: str, n_cells: int, settings: dict, heartbeat_s: int,
                    wait_s: float = 60.0) -> tuple[CellQueue, bool]:
    """Create the grid's study and enqueue its cells, or join it; returns (queue, created).

    `settings` (JSON-able) describes the cells; joining a study made with other settings is an
    error. A worker that finds the study still being filled waits up to `wait_s` seconds for
    the creator, then repairs the queue itself (`requeue_unfinished`).
    """
    for attempt in range(3):
        try:
            storage = open_storage(storage_url, heartbeat_s)
            break
        except LtexpError:
            # Workers started together on an empty database race to create Optuna's tables
            # (PostgreSQL: duplicate key in pg_type); the loser finds them there a moment later.
            if attempt == 2:
                raise
            time.sleep(1.0 + attempt)
    settings = json.loads(json.dumps(settings, default=str))
    # The trial value is the cell's validation accuracy: bookkeeping, nothing is selected on it.
    sampler = optuna.samplers.RandomSampler(seed=0)
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, direction="maximize")
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
        created = False
    except Exception as exc:
        raise LtexpError(f"cannot create or load grid study {name!r} in {storage_url}: "
                         f"{str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__}") from None
    queue = CellQueue(study, storage, n_cells, heartbeat_s, _sqlite_lock_path(storage_url))
    if created:
        study.set_user_attr(_SETTINGS_ATTR, settings)
        for cell in range(n_cells):
            queue._enqueue(cell)
        study.set_user_attr(_READY_ATTR, n_cells)
        return queue, True
    deadline = time.monotonic() + wait_s
    while _READY_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    saved = study.user_attrs.get(_SETTINGS_ATTR)
    if saved is not None and saved != settings:
        raise LtexpError(f"grid {name!r} exists in {storage_url} with other cells or settings: choose "
                         f"another --grid-name (or leave it empty to name the grid after its settings)")
    if saved is None:
        study.set_user_attr(_SETTINGS_ATTR, settings)
    if _READY_ATTR not in study.user_attrs:  # the creator died while enqueueing: repair
        queue.requeue_unfinished()
        study.set_user_attr(_READY_ATTR, n_cells)
    return queue, False
