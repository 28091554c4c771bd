"""Everything MLflow: the only package that imports mlflow (besides ltexp/serving.py, the pyfunc
model's own file, which MLflow's models-from-code contract makes import it).

The rest of ltexp calls the names below (`from ltexp import tracking; tracking.start_run(...)`):

- `writes`: which store is in use, how a failed write is reported (one line naming the store),
  the HTTP retry policy, numbers as the store should hold them;
- `runs`: the runs ltexp opens (experiment, study parent, grid, report, nested expert and trial
  runs), each ended FINISHED or FAILED / KILLED with its reason whatever happens inside;
- `registry`: registering a run's model and the promotion rule for `@candidate` / `@champion`;
- `store`: the pre-flight check of the tracking store, before any training;
- `history`: runs read back, the runs of dead processes closed (`sweep`), resume links.

What each run carries (tags, params, metrics, artifacts) is declared in ltexp/schema.py.
"""

from __future__ import annotations

import os

# Set before mlflow is imported (below), each only when the user has not chosen.
# Artifact download progress bars would interleave with ltexp's own output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Asynchronous metric logging: with a buffering interval MLflow's worker waits on its stop event
# (merging what arrived into one batch write) instead of polling its queue with a 1 s timeout,
# so ending a run no longer waits up to 1 s for that poll (measured: ~2 s of bookkeeping per
# tuning trial went there). Units: whole seconds (MLflow parses an int).
os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")

from ltexp.tracking.history import (download_artifact, experiment_ids, find_finished_run,  # noqa: E402
                                    link_resumed, mark_killed, own_experiment_ids, search_runs, sweep)
from ltexp.tracking.registry import (DATA_KEY_FIELDS, register_and_promote, register_model,  # noqa: E402
                                     validate_registered_name)
from ltexp.tracking.runs import (DEFAULT_EXPERIMENT, MODEL_REQUIREMENTS, RESOLVED_SUFFIX, Run,  # noqa: E402
                                 default_experiment_id, default_run_name, error_message, existing_run,
                                 experiment_name, fail_existing_run, git_commit, log_artifacts, param_value,
                                 run_tags, start_role_run, start_run, start_tune_run)
from ltexp.tracking.store import PROBE_ENV, check_store  # noqa: E402
from ltexp.tracking.writes import (HTTP_DEFAULTS, StoreUnreachable, as_logged, flush, refusal,  # noqa: E402
                                   store_identity, tracking_uri, unanswered)

__all__ = [
    # writes
    "HTTP_DEFAULTS", "StoreUnreachable", "as_logged", "flush", "refusal", "store_identity", "tracking_uri",
    "unanswered",
    # runs
    "DEFAULT_EXPERIMENT", "MODEL_REQUIREMENTS", "RESOLVED_SUFFIX", "Run", "default_experiment_id",
    "default_run_name", "error_message", "existing_run", "experiment_name", "fail_existing_run", "git_commit",
    "log_artifacts", "param_value", "run_tags", "start_role_run", "start_run", "start_tune_run",
    # registry
    "DATA_KEY_FIELDS", "register_and_promote", "register_model", "validate_registered_name",
    # store
    "PROBE_ENV", "check_store",
    # history
    "download_artifact", "experiment_ids", "find_finished_run", "link_resumed", "mark_killed",
    "own_experiment_ids", "search_runs", "sweep",
]
