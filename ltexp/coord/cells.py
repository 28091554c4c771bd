"""A grid's cells as the trials of one Optuna study, each handed out to exactly one worker."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from ltexp import LtexpError, schema
from ltexp.coord.optuna_internals import trial_id
from ltexp.coord.storage import flock, open_storage, sqlite_lock_path

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
            release = flock(self.lock_path)
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
            beat = t.user_attrs.get(schema.CELL_HEARTBEAT)
            if t.state != optuna.trial.TrialState.RUNNING or beat is None or now - beat <= 2 * self.heartbeat_s:
                continue
            try:
                failed = self.storage.set_trial_state_values(trial_id(t), optuna.trial.TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                failed = False  # another worker got there first
            history = list(t.user_attrs.get(schema.RETRY_HISTORY, []))
            if failed and len(history) < _JOURNAL_MAX_RETRY:
                attrs = {k: v for k, v in t.user_attrs.items() if k != schema.CELL_HEARTBEAT}
                self._enqueue(int(t.params[CELL_PARAM]), {**attrs, schema.RETRY_HISTORY: history + [t.number]})

    def claim(self) -> CellClaim | None:
        """Take the lowest-numbered WAITING cell (None when there is none).

        A claimed trial whose cell already has a COMPLETE trial, or a
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
                if not self.storage.set_trial_state_values(trial_id(t), optuna.trial.TrialState.RUNNING):
                    continue
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            self.beat(trial_id(t))
            cell = int(t.params[CELL_PARAM])
            siblings = [s for s in self.cell_states()[cell] if s.number != t.number]
            first = next((s for s in siblings if s.state == optuna.trial.TrialState.COMPLETE or
                          (s.state == optuna.trial.TrialState.RUNNING and s.number < t.number)), None)
            if first is not None:
                self.storage.set_trial_user_attr(trial_id(t), schema.DUPLICATE_OF, first.number)
                self.storage.set_trial_state_values(trial_id(t), optuna.trial.TrialState.PRUNED)
                continue
            earlier = [s.user_attrs[schema.CELL_RUN_ID] for s in siblings
                       if s.state == optuna.trial.TrialState.FAIL and schema.CELL_RUN_ID in s.user_attrs]
            if schema.CELL_RUN_ID in t.user_attrs:  # inherited from the attempt this trial retries
                earlier.append(t.user_attrs[schema.CELL_RUN_ID])
            return CellClaim(trial_id(t), t.number, cell, sorted(set(earlier)))
        return None

    def beat(self, trial_id: int) -> None:
        """One heartbeat for a held cell."""
        if self.native_heartbeat:
            self.storage.record_heartbeat(trial_id)
        else:
            self.storage.set_trial_user_attr(trial_id, schema.CELL_HEARTBEAT, time.time())

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
    queue = CellQueue(study, storage, n_cells, heartbeat_s, sqlite_lock_path(storage_url))
    if created:
        study.set_user_attr(schema.GRID_SETTINGS, settings)
        for cell in range(n_cells):
            queue._enqueue(cell)
        study.set_user_attr(schema.CELLS_READY, n_cells)
        return queue, True
    deadline = time.monotonic() + wait_s
    while schema.CELLS_READY not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    saved = study.user_attrs.get(schema.GRID_SETTINGS)
    if saved is not None and saved != settings:
        raise LtexpError(f"grid {name!r} exists in {storage_url} with other cells or settings: choose "
                         f"another --grid-name (or leave it empty to name the grid after its settings)")
    if saved is None:
        study.set_user_attr(schema.GRID_SETTINGS, settings)
    if schema.CELLS_READY not in study.user_attrs:  # the creator died while enqueueing: repair
        queue.requeue_unfinished()
        study.set_user_attr(schema.CELLS_READY, n_cells)
    return queue, False
