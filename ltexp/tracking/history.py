"""Runs read back and closed: search, the runs of processes that died (`sweep`), and the links
between a run and the one that resumed it."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow.tracking import MlflowClient

import ltexp
from ltexp import schema
from ltexp.processes import stale_reason
from ltexp.tracking.runs import experiment_name

if TYPE_CHECKING:
    from ltexp.config import RunConfig


def experiment_ids(names: list[str] | None) -> list[str]:
    """Ids of the named experiments that exist (all experiments when `names` is None)."""
    client = MlflowClient()
    if names is None:
        return [e.experiment_id for e in client.search_experiments(max_results=50000)]
    ids = []
    for name in names:
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            ids.append(experiment.experiment_id)
    return ids


def own_experiment_ids(cfg: RunConfig) -> list[str]:
    """The experiment this process will log to: the `mlflow run` run's, else `experiment_name(cfg)`."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if run_id:
        try:
            return [MlflowClient().get_run(run_id).info.experiment_id]
        except mlflow.exceptions.MlflowException:
            return []
    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return [os.environ["MLFLOW_EXPERIMENT_ID"]]
    return experiment_ids([experiment_name(cfg)])


def running_runs(ids: list[str]) -> list[dict]:
    """RUNNING runs of the experiments `ids`: id, name, experiment, start time (s) and tags."""
    if not ids:
        return []
    runs = MlflowClient().search_runs(ids, filter_string="attributes.status = 'RUNNING'", max_results=50000)
    return [{"run_id": r.info.run_id, "run_name": r.info.run_name, "experiment_id": r.info.experiment_id,
             "start_time_s": (r.info.start_time or 0) / 1000.0, "tags": dict(r.data.tags)} for r in runs]


def close_run(run_id: str, status: str, reason: str) -> None:
    """End a run of another (dead) process with `status`, the reason in `ltexp.error`."""
    client = MlflowClient()
    client.set_tag(run_id, schema.ERROR, reason[:5000])
    client.set_terminated(run_id, status)


_LINKING = threading.Lock()


def link_resumed(old_run_id: str, new_run_id: str) -> None:
    """Record that `new_run_id` continues `old_run_id`: the old run is closed KILLED (if still
    RUNNING) and tagged `ltexp.resumed_by`; the new one is tagged `ltexp.resumed_from`.

    Once per pair: experts resuming at once (in threads) each link their common parent runs, and
    two writes of one new tag at the same moment collide in the store (a UNIQUE constraint)."""
    if not old_run_id or old_run_id == new_run_id:
        return
    client = MlflowClient()
    with _LINKING:
        try:
            old = client.get_run(old_run_id)
        except mlflow.exceptions.MlflowException:
            return  # another store, or deleted: nothing to close
        if old.data.tags.get(schema.RESUMED_BY) == new_run_id:
            return  # linked already, by another expert of the same run
        client.set_tag(old_run_id, schema.RESUMED_BY, new_run_id)
        if old.info.status == "RUNNING":
            client.set_tag(old_run_id, schema.ERROR, f"interrupted; training continued by run {new_run_id}")
            client.set_terminated(old_run_id, "KILLED")
        client.set_tag(new_run_id, schema.RESUMED_FROM, old_run_id)


def search_runs(experiment_names: list[str] | None = None, filter_string: str = "",
                experiment_ids: list[str] | None = None, max_results: int = 100_000):
    """`mlflow.search_runs` as a pandas DataFrame (columns `metrics.*`, `params.*`, `tags.*`,
    `run_id`, `status`, ...); an experiment that does not exist gives an empty frame."""
    import pandas as pd

    if experiment_names is not None:
        client = MlflowClient()
        found = [client.get_experiment_by_name(name) for name in experiment_names]
        ids = [e.experiment_id for e in found if e is not None]
        experiment_ids = (experiment_ids or []) + ids
        if not experiment_ids:
            return pd.DataFrame()
    try:
        return mlflow.search_runs(experiment_ids=experiment_ids, filter_string=filter_string,
                                  max_results=max_results, output_format="pandas")
    except mlflow.exceptions.MlflowException as exc:
        raise ltexp.LtexpError(f"--filter {filter_string!r}: {str(exc).splitlines()[0][:300]}") from None


def find_finished_run(experiment_id: str, tag: str, value: str) -> str | None:
    """The id of a FINISHED run of the experiment whose tag `tag` equals `value` (None if none)."""
    runs = mlflow.search_runs(experiment_ids=[experiment_id], output_format="list", max_results=1,
                              filter_string=f"tags.`{tag}` = '{value}' and attributes.status = 'FINISHED'")
    return runs[0].info.run_id if runs else None


def mark_killed(run_id: str, reason: str) -> bool:
    """End a run left RUNNING by a worker that died: KILLED, with the reason as `ltexp.error`."""
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
    except mlflow.exceptions.MlflowException:
        return False
    client.set_tag(run_id, schema.ERROR, reason[:5000])
    client.set_terminated(run_id, "KILLED")
    return True


def download_artifact(run_id: str, path: str, dst: str | Path) -> Path | None:
    """Download one artifact file of a run into `dst`; None when the run has no such file."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=str(dst)))
    except (mlflow.exceptions.MlflowException, OSError):
        return None


def sweep(experiment_ids: list[str], older_than_s: float = 900.0) -> list[dict]:
    """Close RUNNING runs of `experiment_ids` whose process died (KILLED, reason in `ltexp.error`);
    return what was closed (run_id, run_name, experiment_id, reason, ...)."""

    closed = []
    for run in running_runs(experiment_ids):
        reason = stale_reason(run["tags"], run["start_time_s"], older_than_s)
        if reason is None:
            continue
        close_run(run["run_id"], "KILLED", f"closed by sweep: {reason}")
        closed.append({**run, "reason": reason})
    return closed
