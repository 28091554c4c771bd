"""Everything MLflow: the only module that imports mlflow.

One experiment run per `ltexp train` / `mlflow run` entry point. Under `mlflow run` the run
already exists (MLFLOW_RUN_ID) and is used as it is, without `set_experiment`. The store is
whatever MLFLOW_TRACKING_URI names; MLflow 3's default is `sqlite:///mlflow.db` in the working
directory.
"""

from __future__ import annotations

import functools
import os
import subprocess
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

# Artifact download progress bars would interleave with ltexp's own output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Asynchronous metric logging: with a buffering interval MLflow's worker waits on its stop event
# (merging what arrived into one batch write) instead of polling its queue with a 1 s timeout,
# so ending a run no longer waits up to 1 s for that poll (measured: ~2 s of bookkeeping per
# tuning trial went there). Units: whole seconds (MLflow parses an int).
os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")
# MLflow warns, for every PythonModel without type hints (its own included), that type hints would
# enable input validation; ltexp's model accepts two input forms and validates them itself.
warnings.filterwarnings("ignore", message=r".*Add type hints to the `predict` method")

import mlflow  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import ltexp  # noqa: E402
from ltexp.config import RunConfig, flatten, to_dict
from ltexp.metrics import finite
from ltexp.stores import install_sqlite_settings

# SQLite stores in WAL mode: ~20 ms less per logged value on a disk (see ltexp/stores.py).
install_sqlite_settings()

ERROR_TAG = "ltexp.error"
MODEL_URI_TAG = "ltexp.model_uri"
# What a fresh environment needs to load and serve the model (ltexp itself travels as code).
MODEL_REQUIREMENTS = ["torch>=2.4,<3", "numpy>=1.24", "pandas>=2", "pillow>=9", "mlflow>=3.7,<4"]
# `mlflow run` logs entry-point parameters before our process starts; a parameter left at
# "auto" there cannot be overwritten (MLflow params are immutable), so the value actually used
# is logged beside it under this suffix.
RESOLVED_SUFFIX = ".resolved"


@functools.cache
def git_commit() -> str | None:
    """The checkout's commit, when ltexp runs from a git work tree (None otherwise).

    Looked up once per process: every run (and every tuning trial) is tagged with it, and a
    `git` subprocess per run cost tens of milliseconds."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(cfg: RunConfig, role: str) -> dict[str, str]:
    """The tags every run carries (DESIGN.md §3)."""
    tags = {
        "ltexp.method": cfg.method.method,
        "ltexp.dataset": cfg.data.dataset,
        "ltexp.imb_type": cfg.data.imb_type,
        "ltexp.imb_factor": str(cfg.data.imb_factor),
        "ltexp.seed": str(cfg.seed),
        "ltexp.version": ltexp.__version__,
        "ltexp.role": role,
    }
    commit = git_commit()
    if commit:
        tags["ltexp.git_commit"] = commit
    return tags


def _same_value(logged: str, value: Any) -> bool:
    """Whether a param `mlflow run` logged as text means `value` ("0.01" == 0.01, "true" == True)."""
    if isinstance(value, bool):
        return logged.strip().lower() in (("true", "1", "yes", "on") if value else ("false", "0", "no", "off"))
    if isinstance(value, (int, float)):
        try:
            return float(logged) == float(value)
        except ValueError:
            return False
    return logged == str(value)


def tracking_uri() -> str:
    """The tracking store in use (MLFLOW_TRACKING_URI, or MLflow's default sqlite:///mlflow.db)."""
    return mlflow.get_tracking_uri()


class Run:
    """Handle on the active MLflow run, with the logging calls the experiment needs."""

    def __init__(self, run: mlflow.ActiveRun):
        self.run = run
        self.run_id = run.info.run_id
        # Status the run ends with when its block exits normally (e.g. KILLED for a pruned trial).
        self.status = "FINISHED"
        # The run's params as far as this process knows them: read from the store once (a run
        # made by `mlflow run` arrives with params), then kept up to date by `log_params`.
        self._params: dict[str, str] | None = None

    def log_config(self, cfg: RunConfig) -> None:
        """All resolved config fields as params, plus `config.json`."""
        self.log_params(flatten(cfg))
        mlflow.log_dict(to_dict(cfg), "config.json")

    def log_params(self, params: dict[str, Any], synchronous: bool = True) -> None:
        """Log params; one already on the run (e.g. logged by `mlflow run`) is kept, and a
        different value for it is logged beside it as `<name>.resolved` (params are immutable).

        `synchronous=False` queues them with the asynchronous metrics (one batch write later;
        the run's end waits for it)."""
        if self._params is None:
            self._params = dict(MlflowClient().get_run(self.run_id).data.params)
        existing = self._params
        out = {}
        for key, value in params.items():
            if key not in existing:
                out[key] = value
            elif not _same_value(existing[key], value):
                out[key + RESOLVED_SUFFIX] = value
        if out:
            mlflow.log_params(out, synchronous=synchronous)
            existing.update({k: str(v) for k, v in out.items()})

    def set_tags(self, tags: dict[str, Any]) -> None:
        mlflow.set_tags(tags)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Per-epoch metrics at step = global epoch; asynchronous so logging stays out of epoch time."""
        values = {k: v for k, v in record.items() if k not in ("epoch", "stage")}
        mlflow.log_metrics(finite(values), step=int(record["epoch"]), synchronous=False)

    def log_metrics(self, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(finite(metrics))

    def log_batch(self, metrics: dict[str, float] | None = None, tags: dict[str, Any] | None = None) -> None:
        """Metrics (step 0) and tags in one store write (`MlflowClient.log_batch`)."""
        from mlflow.entities import Metric, RunTag
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        MlflowClient().log_batch(self.run_id, metrics=[Metric(k, v, now, 0) for k, v in finite(metrics or {}).items()],
                                 tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()], synchronous=True)

    def log_figure(self, figure, path: str) -> None:
        mlflow.log_figure(figure, path)

    def log_text(self, text: str, path: str) -> None:
        mlflow.log_text(text, path)

    def log_table(self, frame, path: str) -> None:
        """A pandas DataFrame as a CSV artifact."""
        mlflow.log_text(frame.to_csv(index=False), path)

    @contextmanager
    def child(self, name: str, tags: dict[str, str]) -> Iterator["Run"]:
        """A nested run (e.g. one expert) under this one; FAILED with the reason if it raises."""
        with _guarded(mlflow.start_run(run_name=name, nested=True, tags=tags)) as run:
            run._params = {}  # a new run: no params to read back from the store
            yield run

    def log_model(self, predictor_dir: str | Path, input_example) -> str:
        """Log the pyfunc model (models-from-code `ltexp/serving.py`) and return its model URI.

        The signature declares the output columns and the `probabilities` param; the input
        side is validated by the model itself because it accepts two forms (uint8 arrays and
        encoded image bytes) that one MLflow input schema cannot describe.
        """
        from mlflow.models import ModelSignature
        from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

        package_dir = Path(ltexp.__file__).resolve().parent
        signature = ModelSignature(
            inputs=None,
            outputs=Schema([ColSpec("long", "label"), ColSpec("string", "class_name"), ColSpec("double", "score")]),
            params=ParamSchema([ParamSpec("probabilities", "boolean", False)]),
        )
        info = self._log_pyfunc(package_dir, predictor_dir, signature, input_example)
        mlflow.set_tag(MODEL_URI_TAG, info.model_uri)
        return info.model_uri

    @staticmethod
    def _log_pyfunc(package_dir: Path, predictor_dir, signature, input_example):
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package_dir / "serving.py"),
            artifacts={"predictor": str(predictor_dir)},
            code_paths=[str(package_dir)],
            signature=signature,
            input_example=input_example,
            pip_requirements=MODEL_REQUIREMENTS,
        )


@contextmanager
def _guarded(active: mlflow.ActiveRun) -> Iterator[Run]:
    """End `active` FINISHED, or FAILED (KILLED on Ctrl-C) with the error's one line as a tag."""
    run = Run(active)
    try:
        yield run
    except BaseException as exc:
        flush()
        if run.status == "FINISHED":  # a status chosen on purpose (pruned trial) is not an error
            mlflow.set_tag(ERROR_TAG, error_message(exc))
        mlflow.end_run(run.status if run.status != "FINISHED" else
                       "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        raise
    else:
        flush()
        mlflow.end_run(run.status)


@contextmanager
def start_run(cfg: RunConfig, role: str = "experiment") -> Iterator[Run]:
    """Open (or, under `mlflow run`, resume) the experiment run; mark it FAILED on any error.

    The error's one-line message is kept as the `ltexp.error` tag, and everything logged before
    the error stays in the run.
    """
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(cfg.tracking.experiment)
    with _guarded(mlflow.start_run(run_name=cfg.tracking.run_name or None)) as run:
        mlflow.set_tags(run_tags(cfg, role))
        yield run


@contextmanager
def start_tune_run(cfg: RunConfig, study_name: str, previous_run_id: str | None) -> Iterator[Run]:
    """The study's parent run (role `tune`): the `mlflow run` one, else the run of an earlier
    session of the same study (resumed), else a new one."""
    # Taken out of the environment as mlflow.start_run() does, so nested trial runs are new runs.
    run_id = os.environ.pop("MLFLOW_RUN_ID", None) or None
    if run_id is None and previous_run_id:
        try:
            MlflowClient().get_run(previous_run_id)
            run_id = previous_run_id
        except mlflow.exceptions.MlflowException:
            run_id = None  # the study outlived its tracking store: start a new parent run
    if run_id is None:
        mlflow.set_experiment(cfg.tracking.experiment)
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else (cfg.tracking.run_name or f"tune-{study_name}"))
    with _guarded(active) as run:
        mlflow.set_tags({**run_tags(cfg, "tune"), "ltexp.study_name": study_name})
        yield run


def flush() -> None:
    """Wait for asynchronously logged metrics to reach the store."""
    try:
        mlflow.flush_async_logging()
    except Exception:  # flushing must never hide the error being reported
        pass


def error_message(exc: BaseException) -> str:
    """One line for a tag or the terminal: the message, or the exception type when it has none."""
    text = str(exc).strip().splitlines()
    if isinstance(exc, ltexp.LtexpError) and text:
        return text[0][:5000]
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:5000]


def fail_existing_run(reason: str) -> None:
    """Mark the run that `mlflow run` created FAILED, for errors raised before it was opened."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    client = MlflowClient()
    client.set_tag(run_id, ERROR_TAG, reason[:5000])
    client.set_terminated(run_id, "FAILED")


def register_model(run_id: str, name: str, alias: str = "candidate") -> int:
    """Register the run's pyfunc model as a new version of `name` and point `alias` at it.

    The version is tagged with the run's data set, method and test metrics. Aliases only; the
    deprecated stages are never used. Returns the version number.
    """
    from ltexp import LtexpError

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise LtexpError(f"--run-id {run_id!r} is not a run in {mlflow.get_tracking_uri()}") from None
    model_uri = run.data.tags.get(MODEL_URI_TAG)
    if not model_uri:
        raise LtexpError(f"run {run_id} has no ltexp model (status {run.info.status}): train it to the end first")
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("ltexp.") and k not in (MODEL_URI_TAG, ERROR_TAG)}
    tags.update({f"ltexp.{k}": f"{v:.6g}" for k, v in run.data.metrics.items() if k.startswith("test_")})
    tags["ltexp.run_id"] = run_id
    version = mlflow.register_model(model_uri, name, tags=tags)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def register_and_promote(run_id: str, name: str, metric: str, value: float, data_key: str) -> tuple[int, bool, str]:
    """Register the run's model as `candidate`; make it `champion` only if it beats the champion.

    The champion is beaten when it was chosen on the same data configuration (`data_key`) and
    the same validation metric, and the new value is strictly higher; the old champion then
    becomes `previous`. The comparison and the decision are tags on the new version.
    """
    client = MlflowClient()
    version = register_model(run_id, name, "candidate")
    tags = {"ltexp.val_metric": metric, "ltexp.val_metric_value": repr(float(value)), "ltexp.data_config": data_key}
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except mlflow.exceptions.MlflowException:
        champion = None
    if champion is None:
        promote, decision = True, f"promoted: no champion yet ({metric} = {value:.6g})"
    elif champion.tags.get("ltexp.data_config") != data_key or champion.tags.get("ltexp.val_metric") != metric:
        promote, decision = False, (f"kept champion v{champion.version}: it was chosen on "
                                    f"{champion.tags.get('ltexp.data_config')} / {champion.tags.get('ltexp.val_metric')}, "
                                    f"not comparable with {data_key} / {metric}")
    else:
        old = float(champion.tags["ltexp.val_metric_value"])
        promote = value > old
        decision = (f"promoted: {metric} {value:.6g} > champion v{champion.version} {old:.6g}" if promote else
                    f"kept champion v{champion.version}: {metric} {value:.6g} <= {old:.6g}")
    if champion is not None:
        tags["ltexp.compared_to_version"] = str(champion.version)
    tags["ltexp.promotion"] = decision
    for key, val in tags.items():
        client.set_model_version_tag(name, str(version), key, val)
    if promote:
        if champion is not None:
            client.set_registered_model_alias(name, "previous", champion.version)
        client.set_registered_model_alias(name, "champion", str(version))
    return version, promote, decision
