"""`--n-trials` is a study's budget, not each worker's: workers sharing a study stop at exactly n.

Workers here are real processes running `TrialBudget.optimize` (what `ltexp tune` runs) with a
quick objective, so that many trials end at nearly the same moment: the race the budget's lock
closes (Optuna's MaxTrialsCallback let two workers that finished together each start one more).
"""

import subprocess
import sys
import time

import optuna
import pytest

from ltexp import LtexpError
from ltexp.coord.budget import TrialBudget
from ltexp.coord.optuna_internals import trial_id
from ltexp.coord.storage import open_storage

WORKER = """
import random, sys, time
import optuna
from ltexp.coord.budget import TrialBudget
from ltexp.coord.storage import open_storage

url, name, n_trials, wait_s, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
optuna.logging.set_verbosity(optuna.logging.WARNING)
storage = open_storage(url, 60)
study = optuna.load_study(study_name=name, storage=storage, sampler=optuna.samplers.RandomSampler(seed=seed))
rng = random.Random(seed)

def objective(trial):
    time.sleep(rng.uniform(0.0, 0.02))  # trials of different workers end at nearly the same time
    return trial.suggest_float("x", 0.0, 1.0)

print("loaded", flush=True)  # the study is open: what follows is the budget's doing
TrialBudget(study, storage, url, n_trials, wait_s=wait_s).optimize(objective)
"""


def _workers(url: str, name: str, n_trials: int, count: int, wait_s: float = 120.0) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", WORKER, url, name, str(n_trials), str(wait_s), str(seed)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for seed in range(count)]


def _finish(workers: list[subprocess.Popen]) -> list[str]:
    errors = []
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        errors.append(err)
    return errors


def _storage_url(kind: str, tmp_path, postgres_url=None) -> str:
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    if kind == "journal":
        return str(tmp_path / "optuna.journal")
    base = postgres_url.rstrip("/")
    return base if base.count("/") > 2 else f"{base}/optuna"


@pytest.fixture(params=["sqlite", "journal", "postgresql"])
def storage_url(request, tmp_path):
    if request.param == "postgresql":
        return _storage_url("postgresql", tmp_path, request.getfixturevalue("postgres_url"))
    return _storage_url(request.param, tmp_path)


def test_four_workers_sharing_a_study_stop_at_exactly_n_trials(storage_url, request):
    name = f"budget-{request.node.callspec.id}-{time.time_ns()}"
    optuna.create_study(study_name=name, storage=open_storage(storage_url, 60), direction="maximize")
    _finish(_workers(storage_url, name, n_trials=24, count=4))
    trials = optuna.load_study(study_name=name, storage=open_storage(storage_url, 60)).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 24
    assert sorted(t.number for t in trials) == list(range(24))


def test_a_worker_starts_no_trial_while_another_holds_the_budget_lock(storage_url, request):
    name = f"held-{request.node.callspec.id}-{time.time_ns()}"
    storage = open_storage(storage_url, 60)
    study = optuna.create_study(study_name=name, storage=storage, direction="maximize")
    holder = TrialBudget(study, storage, storage_url, n_trials=3)
    assert holder.take() and holder.counted == 0  # the lock is held now
    try:
        (worker,) = _workers(storage_url, name, n_trials=3, count=1)
        assert worker.stdout.readline() == "loaded\n"
        time.sleep(1.0)  # ample for 3 trials of at most 0.02 s
        assert worker.poll() is None and study.get_trials() == []
    finally:
        holder.release()
    _finish([worker])
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 3


def test_a_lock_held_past_wait_s_is_skipped_with_a_warning(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url, 60)
    study = optuna.create_study(study_name="stuck", storage=storage, direction="maximize")
    holder = TrialBudget(study, storage, url, n_trials=2)
    assert holder.take()
    try:
        (err,) = _finish(_workers(url, "stuck", n_trials=2, count=1, wait_s=0.5))
    finally:
        holder.release()
    assert "no trial-budget lock for study 'stuck' in 0.5 s; going on without it" in err
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"] * 2


def test_a_worker_whose_trials_all_fail_stops_after_n_of_its_own(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url, 60)
    study = optuna.create_study(study_name="failing", storage=storage, direction="maximize")

    def objective(trial):
        raise LtexpError("this configuration cannot train")

    assert TrialBudget(study, storage, url, n_trials=3).optimize(objective, catch=(LtexpError,))
    assert [t.state.name for t in study.get_trials()] == ["FAIL"] * 3
    # Failed trials are not counted: running again tries 3 more (it does not stop at once).
    assert TrialBudget(study, storage, url, n_trials=3).optimize(lambda trial: 1.0, catch=(LtexpError,))
    assert [t.state.name for t in study.get_trials()] == ["FAIL"] * 3 + ["COMPLETE"] * 3
    assert not TrialBudget(study, storage, url, n_trials=3).optimize(lambda trial: 1.0)  # nothing due


# The test plays the other workers with `study.ask()`, outside `Study.optimize`, which Optuna
# warns about on a storage with heartbeats; ltexp's own trials run inside `optimize`.
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_trial_whose_worker_died_before_its_first_heartbeat_is_failed_and_retried(tmp_path):
    """A worker killed between creating its trial and the trial's first heartbeat (seen: SIGKILL
    right after a trial ended) leaves a RUNNING trial that Optuna's stale check never fails: it
    would hold one of the study's trials for good. The budget fails it and queues it again; a
    RUNNING trial with a live heartbeat still counts."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url, 60)
    study = optuna.create_study(study_name="orphan", storage=storage, direction="maximize")
    alive = study.ask()
    storage.record_heartbeat(trial_id(alive))  # another worker's trial, beating
    orphan = study.ask()  # a trial created by a worker that died before its first heartbeat
    budget = TrialBudget(study, storage, url, n_trials=3)
    assert budget.take() and budget.counted == 1  # the live trial counts, the orphan does not
    budget.release()
    states = {t.number: t.state.name for t in study.get_trials()}
    assert states[alive.number] == "RUNNING" and states[orphan.number] == "FAIL"
    retry = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == orphan.number]
    assert [t.state.name for t in retry] == ["WAITING"]  # queued again, as Optuna retries a stale trial
    assert budget.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0))
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") == 2 and states.count("RUNNING") == 1  # 3 = n_trials, the live one included
    assert study.get_trials()[retry[0].number].state.name == "COMPLETE"
