"""`TrialBudget`: at most n trials done or running in a study, whatever the number of workers."""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from ltexp.coord.optuna_internals import running_trials_without_heartbeat, trial_id
from ltexp.coord.storage import flock, journal_path, sqlite_lock_path


def state_counts(study: optuna.Study) -> dict[str, int]:
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

        if journal_path(url) is not None:
            return "file", Path(f"{journal_path(url)}.ltexp-lock")
        if sqlite_lock_path(url) is not None:
            return "file", sqlite_lock_path(url)
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
            release = flock(self._target, self.wait_s)
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
        failed = []
        for orphan in running_trials_without_heartbeat(self.storage, self.study):
            try:
                if self.storage.set_trial_state_values(orphan, state=optuna.trial.TrialState.FAIL):
                    failed.append(orphan)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # ended meanwhile
        retry = self.storage.get_heartbeat_stale_trial_callback()
        for orphan in failed:
            if retry is not None:
                retry(self.study, self.storage.get_trial(orphan))

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
                self.storage.record_heartbeat(trial_id(trial))
            self.release()
            return objective(trial)
        return run
