"""`mlflow run` of this project with no experiment named puts its run in `ltexp`, as `ltexp train` does.

`mlflow run` creates its run before ltexp starts: in `--experiment-name` / `--experiment-id` (or
$MLFLOW_EXPERIMENT_NAME / $MLFLOW_EXPERIMENT_ID), else in the experiment MLflow's default
experiment providers name, else in `Default`. `LtexpProjectExperiment` is such a provider
(entry-point group `mlflow.default_experiment_provider`, declared in pyproject.toml, so it exists
once ltexp is pip-installed): it answers only inside the `mlflow run` command whose project is a
local folder with an MLproject named `ltexp`, and names experiment `ltexp` (created if missing).

MLflow loads the provider while `mlflow` itself is being imported, in every process that imports
it: this module imports neither mlflow nor torch, and `in_context` costs a dictionary lookup
outside `mlflow run`. MLflow calls stay in the ltexp/tracking package.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_NAME = "ltexp"


def _project_name(folder: Path) -> str | None:
    """The `name:` of the MLproject file in `folder` (MLflow accepts any case of `MLproject`)."""
    try:
        mlproject = next((p for p in folder.iterdir() if p.name.lower() == "mlproject" and p.is_file()), None)
    except OSError:
        return None
    if mlproject is None:
        return None
    import yaml  # an MLflow dependency; loaded only inside `mlflow run`

    try:
        spec = yaml.safe_load(mlproject.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    return spec.get("name") if isinstance(spec, dict) else None


class LtexpProjectExperiment:
    """MLflow default-experiment provider: `ltexp` for `mlflow run <this project>` with no experiment named."""

    def in_context(self) -> bool:
        if os.environ.get("MLFLOW_EXPERIMENT_NAME") or os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return False
        click = sys.modules.get("click")  # the `mlflow` command line is a click program
        ctx = click.get_current_context(silent=True) if click else None
        if ctx is None or ctx.command.name != "run" or getattr(ctx.command.callback, "__module__", "") != "mlflow.cli":
            return False
        params = ctx.params
        if params.get("experiment_name") or params.get("experiment_id") or not params.get("uri"):
            return False
        folder = Path(params["uri"]).expanduser()
        return folder.is_dir() and _project_name(folder) == PROJECT_NAME

    def get_experiment_id(self) -> str:
        from ltexp import tracking  # late: it imports mlflow, which is loading this module

        return tracking.default_experiment_id()
