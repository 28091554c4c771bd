"""A shared PostgreSQL for the MLflow tracking store and the Optuna study, with two workers at once.

The `postgres_url` fixture (conftest.py) starts a throw-away PostgreSQL cluster on a loopback port
(initdb + pg_ctl from the Debian packages `.ci/run` installs), or uses LTEXP_TEST_POSTGRES_URL.
"""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest

pytestmark = pytest.mark.e2e


def test_two_workers_share_one_study_and_one_tracking_store(postgres_url, tmp_path):
    base = postgres_url.rstrip("/")
    if base.count("/") > 2:  # a URL with a database: use it for both stores
        tracking_uri = storage = base
    else:
        tracking_uri, storage = f"{base}/mlflow", f"{base}/optuna"
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "ltexp", "tune", "--n-trials", "4", "--epochs", "3", "--lws-epochs", "1",
           "--storage", storage, "--study-name", "shared", "--pruner", "none"]
    # The first worker creates the study and its parent run; then two more join at once.
    first = subprocess.run([*cmd[:5], "1", *cmd[6:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    workers = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
    trials = optuna.load_study(study_name="shared", storage=storage).get_trials()
    done = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
    # The study's budget: workers count and start trials under one advisory lock (TrialBudget).
    assert len(done) == len(trials) == 4
    assert len({t.number for t in trials}) == len(trials)
    mlflow.set_tracking_uri(tracking_uri)
    parents = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="tags.`ltexp.role` = 'tune'")
    assert len(parents) == 1  # every worker logged into the study's one parent run
    trial_runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string="tags.`ltexp.role` = 'trial'")
    assert len(trial_runs) == len(trials)
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parents[0].info.run_id}
    versions = mlflow.MlflowClient().search_model_versions("name = 'ltexp-digits'")
    assert len(versions) == 3  # each session registers its best as a candidate
    assert mlflow.MlflowClient().get_model_version_by_alias("ltexp-digits", "champion") is not None
