"""Each non-public part of Optuna that ltexp uses, checked against the installed Optuna, so an
upgrade that moves one fails here with its name and the version, not deep inside a study."""


import optuna
import pytest

from ltexp.coord import optuna_internals
from ltexp.coord.storage import open_storage

VERSION = f"optuna {optuna.__version__}"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_trial_id_is_the_storage_key_of_live_and_frozen_trials(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", 60)
    study = optuna.create_study(study_name="ids", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    live = study.ask()
    frozen = study.trials[0]
    study_id = storage.get_study_id_from_name("ids")
    for trial in (live, frozen):
        expected = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        assert optuna_internals.trial_id(trial) == expected, f"{VERSION}: trial._trial_id is not the storage id"


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_running_trials_without_heartbeat_lists_exactly_those(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", 60)
    study = optuna.create_study(study_name="beats", storage=storage)
    other = optuna.create_study(study_name="other", storage=storage)
    beating, silent = study.ask(), study.ask()
    storage.record_heartbeat(optuna_internals.trial_id(beating))
    done = study.ask()
    study.tell(done, 1.0)
    other.ask()  # another study's silent trial is not this study's
    try:
        found = optuna_internals.running_trials_without_heartbeat(storage, study)
    except (ImportError, AttributeError) as exc:
        pytest.fail(f"{VERSION} moved RDBStorage's tables or session helper: {exc}")
    assert found == [optuna_internals.trial_id(silent)]


def test_failed_trials_are_logged_through_the_logger_ltexp_filters():
    import importlib

    import ltexp.tune.study  # installs its filter on the logger at import

    try:
        module = importlib.import_module("optuna.study._optimize")
    except ImportError as exc:
        pytest.fail(f"{VERSION} has no optuna.study._optimize: {exc}")
    assert module._logger.name == optuna_internals.TRIAL_FAILURE_LOGGER, VERSION
    assert any(isinstance(f, ltexp.tune.study._NoTraceback) for f in module._logger.filters)
