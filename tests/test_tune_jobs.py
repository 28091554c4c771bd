"""`ltexp tune --jobs N`: N worker processes on one machine share the study, its trial budget and
its parent run; the command evaluates and registers the best once; a SIGTERM ends every job."""

import fcntl
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from ltexp import lifecycle
from ltexp.config import TuneConfig, resolve_config
from ltexp.processes import pid_alive
from ltexp.threads import job_threads
from ltexp.tune import run_study

pytestmark = pytest.mark.e2e


def _runs(role):
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`ltexp.role` = '{role}'")


def _release_when_another_process_opens(lock, wait_s: float) -> None:
    """Unlock `lock` (an open, flock-ed file) once a process other than this one has the same file
    open, i.e. waits in `TrialBudget.take` for it (at most `wait_s`)."""
    path, deadline = os.path.realpath(lock.name), time.monotonic() + wait_s
    while time.monotonic() < deadline:
        opened = False
        for fd in Path("/proc").glob("[0-9]*/fd/*"):
            if fd.parts[2] == str(os.getpid()):
                continue
            try:
                opened = os.readlink(fd) == path
            except OSError:  # the process or descriptor went away meanwhile
                continue
            if opened:
                break
        if opened:
            break
        time.sleep(0.05)
    fcntl.flock(lock, fcntl.LOCK_UN)
    lock.close()


def test_job_threads_split_the_command_threads():
    assert [job_threads(4, jobs) for jobs in (1, 2, 3, 4, 8)] == [4, 2, 1, 1, 1]


def test_two_jobs_share_the_study_and_run_trials_at_once(mlflow_store, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the command's threads, whatever xdist gave
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    # The helper is a spawned interpreter that loads the data itself (7 s on an idle 2-core VM, more
    # under CI load): time enough for this process to run every trial alone. So the test holds the
    # study's trial-budget lock until the helper waits for it too, then lets both go.
    lock = open(tmp_path / "optuna.db.ltexp-lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    waiting = threading.Thread(target=_release_when_another_process_opens, args=(lock, 300.0), daemon=True)
    waiting.start()
    cfg = resolve_config({"optim": {"epochs": 6}, "method": {"method": "split", "lws_epochs": 1}})
    result = run_study(cfg, TuneConfig(n_trials=6, jobs=2, storage=storage, study_name="jobs", pruner="none"),
                       progress=False)
    waiting.join()

    trials = optuna.load_study(study_name="jobs", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 6  # the shared budget: exactly --n-trials
    (parent,) = _runs("tune")
    assert parent.info.status == "FINISHED" and parent.data.params["jobs"] == "2"
    assert parent.data.tags["ltexp.jobs"] == "2" and parent.data.tags["ltexp.torch_threads"] == "1"
    assert parent.data.tags["ltexp.device"] == "cpu"
    runs = _runs("trial")
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert {r.info.experiment_id for r in runs} == {parent.info.experiment_id}
    by_pid: dict[str, list] = {}
    for r in runs:
        by_pid.setdefault(r.data.tags["ltexp.pid"], []).append(r)
    mine = by_pid.pop(str(os.getpid()))
    ((helper_pid, theirs),) = by_pid.items()  # one helper process ran the others
    assert len(mine) == result.trials_run and len(mine) + len(theirs) == 6 == result.trials_finished
    assert {r.data.tags["ltexp.torch_threads"] for r in theirs} == {"1"}  # 2 threads shared by 2 jobs
    # At once: a helper's trial ran while one of this process's trials ran.
    assert any(a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time
               for a in mine for b in theirs)
    assert not pid_alive(int(helper_pid))  # the helper ended with the study
    # The jobs' shared expert folder is gone with the study.
    assert not list((lifecycle.cache_dir() / "tune-experts").glob("*"))
    # Every job's experts are counted: 6 trials of 2 experts, and the 2 of the test evaluation,
    # each either trained or taken from the cache (before, the helper's were left out).
    assert result.experts_trained + result.experts_reused == 6 * 2 + 2
    assert (parent.data.metrics["experts_trained"], parent.data.metrics["experts_reused"]) == \
        (result.experts_trained, result.experts_reused)
    # The best model is evaluated and registered once, by the command.
    assert "test_acc" in parent.data.metrics
    assert [int(v.version) for v in MlflowClient().search_model_versions("name = 'ltexp-digits'")] == [1]


def test_sigterm_ends_every_job_and_queues_their_trials_again(subprocess_env, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "ltexp", "tune", "--jobs", "2", "--n-trials", "4", "--epochs", "60",
           "--lws-epochs", "1", "--storage", storage, "--study-name", "term", "--pruner", "none", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    store = subprocess_env["MLFLOW_TRACKING_URI"][len("sqlite:///"):]
    # Running trials that have logged an epoch: both jobs are training, where a SIGTERM usually lands.
    query = ("SELECT t.value FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid AND t.key = 'ltexp.pid' "
             "JOIN tags n ON n.run_uuid = r.run_uuid AND n.key = 'ltexp.trial_number' WHERE r.status = 'RUNNING' "
             "AND EXISTS (SELECT 1 FROM metrics m WHERE m.run_uuid = r.run_uuid)")
    pids: set[str] = set()
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(pids) < 2:
        time.sleep(0.5)
        try:
            with sqlite3.connect(store) as conn:
                pids = {row[0] for row in conn.execute(query)}
        except sqlite3.OperationalError:  # the store's tables are not made yet
            continue
    assert len(pids) == 2, proc.stderr.read()[-3000:] if proc.poll() is not None else pids
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = proc.stderr.read()
    assert "Traceback" not in err, err[-3000:]
    assert "ltexp: tune job 1: terminated by signal SIGTERM" in err and "ltexp: terminated by signal SIGTERM" in err, err
    helper = (pids - {str(proc.pid)}).pop()
    assert not pid_alive(int(helper))
    assert not list((lifecycle.cache_dir() / "tune-experts").glob("*"))  # the shared expert folder too
    mlflow.set_tracking_uri(subprocess_env["MLFLOW_TRACKING_URI"])
    assert mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="attributes.status = 'RUNNING'") == []
    killed = [r for r in _runs("trial") if r.info.status == "KILLED"]
    assert {r.data.tags["ltexp.pid"] for r in killed} == pids
    assert all(r.data.tags["ltexp.error"].startswith("terminated by signal SIGTERM") for r in killed)
    # Each interrupted trial is queued again with its parameters, for the next session to run first.
    trials = optuna.load_study(study_name="term", storage=storage).get_trials()
    failed = [t for t in trials if t.state.name == "FAIL"]
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert len(failed) == 2 and sorted(t.user_attrs["ltexp.retry_of"] for t in waiting) == sorted(
        t.number for t in failed)
