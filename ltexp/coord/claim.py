"""One protocol for a study's MLflow parent run: the first worker creates it, the rest join it."""

from __future__ import annotations

import time
import uuid

import optuna

from ltexp import schema


def parent_run_id(study: optuna.Study, grace_s: float = 1.0, wait_s: float = 300.0) -> str | None:
    """The MLflow run id of the study's parent run, or None when this worker is to create it.

    Workers started together (`docker compose up --scale worker=N`) would each create a parent
    run. The first to find the study without one writes a claim token, re-reads it after
    `grace_s` (the last writer wins, and every worker sees the same winner), and only the
    winner creates the run; the others wait for its run id (at most `wait_s`, then create their own).
    """
    value = study.user_attrs.get(schema.MLFLOW_RUN_ID)
    if value is None:
        token = f"claim:{uuid.uuid4().hex}"
        study.set_user_attr(schema.MLFLOW_RUN_ID, token)
        time.sleep(grace_s)
        value = study.user_attrs.get(schema.MLFLOW_RUN_ID)
        if value == token:
            return None
    deadline = time.monotonic() + wait_s
    while value.startswith("claim:") and time.monotonic() < deadline:
        time.sleep(1.0)
        value = study.user_attrs.get(schema.MLFLOW_RUN_ID)
    return None if value.startswith("claim:") else value


def record_parent_run(study: optuna.Study, run_id: str) -> bool:
    """Publish the parent run this worker opened (the claim's winner, or a worker that waited in
    vain), unless the study already names one; True when this call published it."""
    recorded = study.user_attrs.get(schema.MLFLOW_RUN_ID)
    if recorded is None or recorded.startswith("claim:"):
        study.set_user_attr(schema.MLFLOW_RUN_ID, run_id)
        return True
    return False
