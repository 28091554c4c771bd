"""The only place ltexp reaches past Optuna's public API; tests/test_optuna_internals.py fails
loudly, naming the Optuna version, when a new Optuna moves one of these.

- `trial_id`: every storage call (`set_trial_state_values`, `record_heartbeat`, ...) is keyed
  by a trial's storage id, which `Trial` and `FrozenTrial` hold only as `_trial_id`.
- `running_trials_without_heartbeat`: Optuna's stale check reads heartbeats only, and no public
  call lists the RUNNING trials that never had one (a worker killed between creating its trial
  and the first heartbeat); the query reads RDBStorage's own tables.
- `TRIAL_FAILURE_LOGGER`: the logger through which `Study.optimize` reports a failed trial with
  its traceback (ltexp filters the traceback of a trial ended by Ctrl-C or an ltexp error).
"""

from __future__ import annotations

import optuna

TRIAL_FAILURE_LOGGER = "optuna.study._optimize"


def trial_id(trial: optuna.Trial | optuna.trial.FrozenTrial) -> int:
    """The storage id of a live or frozen trial (its `number` is the study-wide count, not the id)."""
    return trial._trial_id


def running_trials_without_heartbeat(storage: optuna.storages.RDBStorage, study: optuna.Study) -> list[int]:
    """Storage ids of `study`'s RUNNING trials with no heartbeat row in an RDB storage."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    study_id = storage.get_study_id_from_name(study.study_name)
    with _create_scoped_session(storage.scoped_session) as session:
        return [tid for (tid,) in session.query(models.TrialModel.trial_id).filter(
            models.TrialModel.study_id == study_id,
            models.TrialModel.state == optuna.trial.TrialState.RUNNING,
            ~models.TrialModel.heartbeats.any())]
