"""Everything MLflow: the only module that imports mlflow.

One experiment run per `ltexp train` / `mlflow run` entry point. Under `mlflow run` the run
already exists (MLFLOW_RUN_ID) and is used as it is, without `set_experiment`. The store is
whatever MLFLOW_TRACKING_URI names; MLflow 3's default is `sqlite:///mlflow.db` in the working
directory.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shlex
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

# Artifact download progress bars would interleave with ltexp's own output.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# Asynchronous metric logging: with a buffering interval MLflow's worker waits on its stop event
# (merging what arrived into one batch write) instead of polling its queue with a 1 s timeout,
# so ending a run no longer waits up to 1 s for that poll (measured: ~2 s of bookkeeping per
# tuning trial went there). Units: whole seconds (MLflow parses an int).
os.environ.setdefault("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS", "1")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import ltexp  # noqa: E402
from ltexp import schema  # noqa: E402
from ltexp.processes import interrupt_reason, process_tags, stale_reason  # noqa: E402
from ltexp.stores import install_sqlite_settings  # noqa: E402

# Neither torch nor the configs are imported here (they are where they are used): `mlflow run`
# imports this module through ltexp/default_experiment.py, and should not pay for torch.
if TYPE_CHECKING:
    from ltexp.config import RunConfig

# SQLite stores in WAL mode: ~20 ms less per logged value on a disk (see ltexp/stores.py).
install_sqlite_settings()

HEARTBEAT_S = 10.0  # least seconds between two heartbeat writes of one run
# What a fresh environment needs to load and serve the model (ltexp itself travels as code).
MODEL_REQUIREMENTS = ["torch>=2.4,<3", "numpy>=1.24", "pandas>=2", "pillow>=9", "mlflow>=3.7,<4"]
# `mlflow run` logs entry-point parameters before our process starts; a parameter left at
# "auto" there cannot be overwritten (MLflow params are immutable), so the value actually used
# is logged beside it under this suffix.
RESOLVED_SUFFIX = ".resolved"
DEFAULT_EXPERIMENT = "ltexp"


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
    """The tags every run carries (docs/records.md, "What a run records")."""
    tags = {
        schema.METHOD: cfg.method.method,
        schema.DATASET: cfg.data.dataset,
        schema.DATA_NAME: cfg.data.short_name,
        schema.IMB_TYPE: cfg.data.imb_type,
        schema.IMB_FACTOR: str(cfg.data.imb_factor),
        schema.SEED: str(cfg.seed),
        schema.VERSION: ltexp.__version__,
        schema.ROLE: role,
    }
    commit = git_commit()
    if commit:
        tags[schema.GIT_COMMIT] = commit
    from ltexp.data.pack import pack_meta, pack_path

    packed = pack_path(cfg.data.dataset)
    if packed is not None:  # which images, whatever the file is called or where it lies
        meta = pack_meta(packed)
        tags.update({schema.PACK_SHA256: meta["sha256"], schema.PACK_SOURCE: meta["source"],
                     schema.DATA_NAME: meta["name"]})  # the images' name, e.g. folder:cifar10
    return tags


def param_value(value: Any) -> str:
    """How a setting is written as an MLflow param: booleans as true/false, everything else as str."""
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _same_value(logged: str, value: Any) -> bool:
    """Whether a param `mlflow run` logged as text means `value` ("0.01" == 0.01, "true" == True).

    `mlflow run` shell-quotes what it logs (`'0.5*val_acc'`), so the text is unquoted first.
    """
    try:
        words = shlex.split(logged)
        logged = words[0] if len(words) == 1 else logged
    except ValueError:
        pass
    if isinstance(value, bool):
        return logged.strip().lower() in (("true", "1", "yes", "on") if value else ("false", "0", "no", "off"))
    if isinstance(value, (int, float)):
        try:
            return float(logged) == float(value)
        except ValueError:
            return False
    return logged == str(value)


def as_logged(value: Any) -> Any:
    """A number as the store should hold it: a float that is exactly a float32 (what a tensor's
    `.item()` gives) becomes the shortest decimal naming that float32 (0.7450000047683716 ->
    0.745), so the UI and CSVs show the measured value, not float32's binary rounding. Floats
    computed in float64 and everything else pass unchanged."""
    if isinstance(value, float) and math.isfinite(value):
        single = np.float32(value)
        if float(single) == value:
            return float(str(single))
    return value


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    from ltexp.metrics import finite  # late: ltexp.metrics imports torch

    return {k: as_logged(v) for k, v in finite(metrics).items()}


def tracking_uri() -> str:
    """The tracking store in use (MLFLOW_TRACKING_URI, or MLflow's default sqlite:///mlflow.db)."""
    return mlflow.get_tracking_uri()


def store_identity(uri: str | None = None) -> str:
    """The tracking store `uri` (default: the one in use) names, the same from any working
    directory: a relative sqlite or file path is made absolute (`sqlite:///mlflow.db` in two
    folders is two stores); any other URI is itself."""
    uri = uri or tracking_uri()
    for scheme in ("sqlite:///", "file://"):
        if uri.startswith(scheme):
            path = uri[len(scheme):]
            return scheme + str(Path(path).expanduser().resolve()) if path and path != ":memory:" else uri
    if "://" not in uri:  # a bare path is a file store
        return "file://" + str(Path(uri).expanduser().resolve())
    return uri


def default_run_name(cfg: RunConfig, role: str = "experiment") -> str:
    """A readable run name: `split·cifar100·exp0.01·e200·s0` (`tune·digits·exp0.01·e100` for a
    study): the epochs tell a 10-epoch grid cell from a 200-epoch run of the same setting."""
    parts = [cfg.method.method if role != "tune" else "tune", cfg.data.short_name, f"{cfg.data.imb_type}{cfg.data.imb_factor:g}",
             f"e{cfg.optim.epochs}"]
    return "·".join(parts + ([f"s{cfg.seed}"] if role != "tune" else []))


def experiment_name(cfg: RunConfig) -> str:
    """--experiment, else $MLFLOW_EXPERIMENT_NAME (MLflow's own convention), else `ltexp`."""
    return cfg.tracking.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT


def default_experiment_id() -> str:
    """The id of experiment `ltexp`, created when missing: where `mlflow run` of this project puts
    its run when no experiment is named (ltexp/default_experiment.py), as `ltexp train` does."""
    client = MlflowClient()
    experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
    if experiment is None:
        try:
            return client.create_experiment(DEFAULT_EXPERIMENT)
        except mlflow.exceptions.MlflowException:  # created meanwhile by another process
            experiment = client.get_experiment_by_name(DEFAULT_EXPERIMENT)
            if experiment is None:
                raise
    return experiment.experiment_id


# Stores another process writes for us: their failures are that server's answers (`refusal`, an
# unreachable server), reported as such. Every other store (a database, a folder, a bucket) is
# written by this process, and a write it refuses (a full disk, a size limit) is reported by
# `_writing`.
SERVED_SCHEMES = ("http", "https", "mlflow-artifacts", "databricks")
# MLflow logs each failed database write with its traceback, and each failed queued write, before
# raising or recording it; ltexp reports them itself in one line (`_writing`, `Run.settle`).
for _name in ("mlflow.store.db.utils", "mlflow.utils.async_logging.async_logging_queue"):
    logging.getLogger(_name).setLevel(logging.CRITICAL)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Environment variables set to `values` inside the block (MLflow reads its HTTP retry
    settings per request), restored to what they were, unset ones unset, when it ends."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _served(uri: str) -> bool:
    return uri.split(":", 1)[0].lower() in SERVED_SCHEMES


@contextmanager
def _writing(what: str, where: str | None = None) -> Iterator[None]:
    """A write to the tracking store (or to the artifact location `where`): a failed one raises one
    `LtexpError` naming `what`, where and the reason (`ltexp.write_error`), e.g. "could not write
    params of run 3f2c… to sqlite:////work/mlflow.db: database or disk is full"."""
    where = where or store_identity()
    try:
        yield
    except ltexp.LtexpError:
        raise
    except (OSError, mlflow.exceptions.MlflowException) as exc:
        if _served(where) or refusal(exc) is not None:
            reason = unanswered(exc) if refusal(exc) is None else None
            if reason is not None:
                raise StoreUnreachable(tracking_uri(), f"{reason} (writing {what})") from None
            raise
        raise ltexp.write_error(what, where, exc) from exc


def _queued_failure(exc: mlflow.exceptions.MlflowException) -> mlflow.exceptions.MlflowException:
    """The first failed write inside `RunOperations.wait`'s error, which quotes each failure's repr
    (e.g. "[MlflowException('(sqlite3.OperationalError) disk I/O error\\n(Background ...')]")."""
    import re

    found = re.search(r": \[\w+\('(?:\([\w.]+\) )?(.+?)(?:\\n|'\))", str(exc))  # without SQLAlchemy's "(sqlite3.…)"
    return mlflow.exceptions.MlflowException(found.group(1)) if found else exc


# --- A tracking server that stops answering mid-run ---------------------------------------------

class StoreUnreachable(ltexp.LtexpError):
    """The tracking server stopped answering: `detail` says what was being written and why.
    `_guarded` completes the message with what became of the run and its checkpoint (`final`)."""

    def __init__(self, uri: str, detail: str, line: str | None = None, epoch: int = 0):
        self.uri, self.detail, self.epoch, self.final = uri, detail, epoch, line is not None
        super().__init__(line or f"tracking server {uri} stopped answering ({detail})")


# What MLflow's HTTP client raises when no answer came: connections refused, reset or timed out,
# or 5xx answers (a proxy before a dead server) until its retries ran out.
_NO_ANSWER = (r"Max retries exceeded|Failed to establish a new connection|Connection (?:refused|reset|aborted)"
              r"|RemoteDisconnected|timed out|too many \d{3} error responses")
_NO_ANSWER_REASON = (r"\[Errno -?\d+\] [^'\"()\\]+", r"Read timed out", r"too many \d{3} error responses",
                     r"Connection aborted", r"RemoteDisconnected")


def unanswered(exc: BaseException) -> str | None:
    """The short reason (e.g. `[Errno 111] Connection refused`) when `exc`, an MLflow error from
    an HTTP tracking server, says the server did not answer at all; None for any other error."""
    import re

    if not _served(tracking_uri()):
        return None
    text = " ".join(str(exc).split())
    if not re.search(_NO_ANSWER, text, re.IGNORECASE):
        return None
    for pattern in _NO_ANSWER_REASON:
        found = re.search(pattern, text)
        if found:
            return found.group(0).strip(" .,")
    return text[:200]


def _write_check_s() -> float:
    """Age (s) at which a queued write has reached a healthy store: MLflow's worker collects writes
    for MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS, then sends them in milliseconds. Waiting for one
    that old costs nothing on a healthy store, and surfaces a dead server at the next epoch end."""
    try:
        buffering = float(os.environ.get("MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS") or 0)
    except ValueError:
        buffering = 0.0
    return 2 * buffering + 3.0


# The last writes to a server that stopped answering (the reason, the FAILED status, what was still
# queued): one attempt each, 3 s at most, instead of HTTP_DEFAULTS' retries with back-off.
LAST_TRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "3"}


def _abandoned(run: "Run", exc: StoreUnreachable, active: bool) -> StoreUnreachable:
    """End `run` after its tracking server stopped answering and return the error's final line.

    One quick try marks it FAILED (`active`: it is still MLflow's active run); while the server is
    down that cannot work, so the line says the run stays RUNNING and how it gets closed (the
    resumed run closes it KILLED, or `ltexp runs sweep`), and which checkpoint is kept."""
    from ltexp import lifecycle

    marked = False
    with _environment(LAST_TRY_ENV):
        run._watch.clear()
        run._queued = []
        flush()  # what is still queued fails at once now (MLflow's queue logs nothing: see above)
        if active:
            try:
                mlflow.set_tag(schema.ERROR, f"tracking server stopped answering: {exc.detail}"[:5000])
                marked = True
            except Exception:
                pass
            try:  # MLflow leaves the run (its active-run stack) before it writes the status
                mlflow.end_run("FAILED")
            except Exception:
                marked = False
    if exc.final:  # said by a nested run already
        return exc
    epoch = exc.epoch or run.epoch
    root = run.parent_id or run.run_id
    kept = lifecycle.held_checkpoint(run.run_id) or lifecycle.held_checkpoint(root)
    status = (f"run {run.run_id} is marked FAILED" if marked else
              f"run {root} stays RUNNING (it cannot be marked FAILED while the server is down; the resumed run or "
              f"`ltexp runs sweep` closes it)")
    resume = (f"the checkpoint of epoch {kept} is kept, run the same command again once it is back to resume" if kept
              else "no checkpoint was written yet (see --checkpoint-every): run the same command again once it is back")
    line = (f"tracking server {exc.uri} stopped answering{f' during epoch {epoch}' if epoch else ''}: "
            f"{exc.detail}; {resume}; {status}")
    return StoreUnreachable(exc.uri, exc.detail, line, epoch)


class Run:
    """Handle on the active MLflow run, with the logging calls the experiment needs."""

    def __init__(self, run: mlflow.entities.Run):  # an ActiveRun, or a stored run (`existing_run`)
        self.run = run
        self.run_id = run.info.run_id
        # Status the run ends with when its block exits normally (e.g. KILLED for a pruned trial).
        self.status = "FINISHED"
        self.parent_id: str | None = None   # the run this one is nested in (its heartbeat too)
        self._last_beat = 0.0
        # The run's params as far as this process knows them: read from the store once (a run
        # made by `mlflow run` arrives with params), then kept up to date by `log_params`.
        self._params: dict[str, str] | None = None
        # Write at once instead of queueing (epochs, heartbeats, params): for a run logged from a
        # thread other than the main one (experts trained at once). MLflow's asynchronous queue is
        # one per process, and the flush at every run's end shuts it down and restarts it, which
        # fails a queueing call made meanwhile from another thread.
        self.synchronous = False
        # (what, RunOperations) of each queued write, which `settle` checks: MLflow's queue only
        # logs a write that failed, and the run would end FINISHED without it.
        self._queued: list[tuple[str, Any]] = []
        # The same writes with when they were queued and the epoch then, for `check_writes`.
        self._watch: list[tuple[float, int, str, Any]] = []
        self.epoch = 0  # the last epoch logged to this run (0: none yet)

    def _queue(self, what: str, operations) -> None:
        if operations is not None:  # a synchronous write returns None
            self._queued.append((what, operations))
            self._watch.append((time.monotonic(), self.epoch, what, operations))

    def check_writes(self) -> None:
        """Raise now for a queued write that failed (`_writing`), looking at those queued
        `_write_check_s()` ago or earlier: a server that stopped answering ends the run at the next
        epoch end after MLflow's retries for that write ran out, not at the run's end."""
        horizon = time.monotonic() - _write_check_s()
        while self._watch and self._watch[0][0] <= horizon:
            _, epoch, what, operations = self._watch.pop(0)
            try:
                operations.wait()
            except mlflow.exceptions.MlflowException as exc:
                try:
                    with _writing(what):
                        raise _queued_failure(exc) from None
                except StoreUnreachable as lost:
                    lost.epoch = epoch
                    raise

    def settle(self) -> None:
        """Wait for this run's queued writes (epochs, heartbeats, params); the first that failed
        raises `LtexpError` (`_writing`)."""
        flush()
        queued, self._queued = self._queued, []
        for what, operations in queued:
            try:
                operations.wait()
            except mlflow.exceptions.MlflowException as exc:
                with _writing(what):
                    raise _queued_failure(exc) from None

    def _artifact(self, path: str):
        """The `_writing` guard of one artifact of this run."""
        return _writing(f"artifact {path} of run {self.run_id}", self.run.info.artifact_uri)

    def log_config(self, cfg: RunConfig) -> None:
        """The settings this run's method uses as params (`config.used_settings`: no `sampling`
        on a baseline run, no empty values), plus every resolved field in `config.json`."""
        from ltexp.config import to_dict, used_settings

        self.log_params({k: v for k, v in used_settings(cfg).items() if v != ""})
        with self._artifact("config.json"):
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
                out[key] = param_value(value)
            elif not _same_value(existing[key], value):
                out[key + RESOLVED_SUFFIX] = param_value(value)
        if out:
            what = f"params of run {self.run_id}"
            with _writing(what):
                self._queue(what, mlflow.log_params(out, synchronous=synchronous or self.synchronous))
            existing.update(out)

    def set_tags(self, tags: dict[str, Any]) -> None:
        with _writing(f"tags of run {self.run_id}"):
            mlflow.set_tags(tags)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Per-epoch metrics at step = global epoch; asynchronous so logging stays out of epoch time."""
        values = {k: v for k, v in record.items() if k not in ("epoch", "stage")}
        self.epoch = int(record["epoch"])
        what = f"the metrics of epoch {record['epoch']} of run {self.run_id}"
        with _writing(what):
            self._queue(what, mlflow.log_metrics(_finite(values), step=int(record["epoch"]),
                                                 synchronous=self.synchronous))
        self.heartbeat()
        self.check_writes()

    def heartbeat(self) -> None:
        """Refresh `ltexp.heartbeat` (unix seconds) on this run and its parent, at most every
        HEARTBEAT_S so fast epochs do not load the store; `ltexp runs sweep` reads it."""
        now = time.time()
        if now - self._last_beat < HEARTBEAT_S:
            return
        self._last_beat = now
        client = MlflowClient()
        for run_id in filter(None, (self.run_id, self.parent_id)):
            what = f"the heartbeat of run {run_id}"
            with _writing(what):
                self._queue(what, client.set_tag(run_id, schema.HEARTBEAT, f"{now:.0f}", synchronous=self.synchronous))

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        with _writing(f"metrics of run {self.run_id}"):
            mlflow.log_metrics(_finite(metrics), step=step)

    def log_batch(self, metrics: dict[str, float] | None = None, tags: dict[str, Any] | None = None,
                  step: int = 0, summaries: dict[str, float] | None = None) -> None:
        """Metrics (at `step`), summaries (at step 0) and tags in one store write
        (`MlflowClient.log_batch`)."""
        from mlflow.entities import Metric, RunTag
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        points = [Metric(k, v, now, step) for k, v in _finite(metrics or {}).items()]
        points += [Metric(k, v, now, 0) for k, v in _finite(summaries or {}).items()]
        with _writing(f"metrics and tags of run {self.run_id}"):
            MlflowClient().log_batch(self.run_id, metrics=points,
                                     tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()], synchronous=True)

    def log_history(self, history: list[dict[str, Any]], suffix: str) -> None:
        """Per-epoch records (`epoch` = step) as curves named `<key><suffix>`, e.g. one expert's
        `val_acc__expert_tail` on its split parent; in batches of MLflow's 1,000-metric limit."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        points = [Metric(f"{k}{suffix}", v, now, int(record["epoch"]))
                  for record in history for k, v in _finite({k: v for k, v in record.items()
                                                             if k not in ("epoch", "stage")}).items()]
        with _writing(f"curves{suffix} of run {self.run_id}"):
            for start in range(0, len(points), 1000):
                MlflowClient().log_batch(self.run_id, metrics=points[start:start + 1000], synchronous=True)

    def log_figure(self, figure, path: str) -> None:
        with self._artifact(path):
            mlflow.log_figure(figure, path)

    def log_text(self, text: str, path: str) -> None:
        with self._artifact(path):
            mlflow.log_text(text, path)

    def log_table(self, frame, path: str) -> None:
        """A pandas DataFrame as a CSV artifact."""
        floats = frame.select_dtypes("float").columns
        frame = frame.assign(**{c: frame[c].map(as_logged) for c in floats})
        self.log_text(frame.to_csv(index=False), path)

    @contextmanager
    def child(self, name: str, tags: dict[str, str]) -> Iterator["Run"]:
        """A nested run (e.g. one expert) under this one; FAILED with the reason if it raises."""

        active = mlflow.active_run()
        # Under this run when it is the active one; else (a run opened by another process, see
        # `existing_run`) by its id, in its experiment, without making it active here.
        where = {} if active is not None and active.info.run_id == self.run_id else \
            {"parent_run_id": self.run_id, "experiment_id": self.run.info.experiment_id}
        with _writing(f"nested run {name} of run {self.run_id}"):
            active = mlflow.start_run(run_name=name, nested=True, tags={**tags, **process_tags()}, **where)
        with _guarded(active) as run:
            run.parent_id = self.run_id
            run._params = {}  # a new run: no params to read back from the store
            run.synchronous = threading.current_thread() is not threading.main_thread()
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
        with _writing(f"the model of run {self.run_id}", self.run.info.artifact_uri):
            info = self._log_pyfunc(package_dir, predictor_dir, signature, input_example)
        self.set_tags({schema.MODEL_URI: info.model_uri})
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


def existing_run(run_id: str) -> Run:
    """A handle on a run another process has open (the parent run of `ltexp tune --jobs N`):
    `child` nests new runs under it; this process never ends or activates it."""
    return Run(MlflowClient().get_run(run_id))


@contextmanager
def _guarded(active: mlflow.ActiveRun) -> Iterator[Run]:
    """End `active` FINISHED, or FAILED (KILLED on Ctrl-C) with the error's one line as a tag.

    A run whose queued writes failed ends FAILED too (`Run.settle`). When the store refuses even
    the reason and the status (a full disk), the error that ended the run is raised all the same."""
    run = Run(active)
    try:
        yield run
        run.settle()
    except BaseException as exc:
        if isinstance(exc, StoreUnreachable):  # every further write would wait for retries, in vain
            raise _abandoned(run, exc, active=True) from None
        flush()
        try:
            if run.status == "FINISHED":  # a status chosen on purpose (pruned trial) is not an error
                mlflow.set_tag(schema.ERROR, error_message(exc))
        except Exception:
            pass  # the store refuses writes: the error below says why, the run stays RUNNING
        try:  # MLflow leaves the run (its active-run stack) before it writes the status
            mlflow.end_run(run.status if run.status != "FINISHED" else
                           "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        except Exception:
            pass
        raise
    else:
        try:
            with _writing(f"the end ({run.status}) of run {run.run_id}"):
                mlflow.end_run(run.status)
        except StoreUnreachable as exc:  # MLflow has left the run already
            raise _abandoned(run, exc, active=False) from None


@contextmanager
def start_run(cfg: RunConfig, role: str = "experiment") -> Iterator[Run]:
    """Open (or, under `mlflow run`, resume) the experiment run; mark it FAILED on any error.

    The error's one-line message is kept as the `ltexp.error` tag, and everything logged before
    the error stays in the run.
    """
    name = cfg.tracking.run_name or default_run_name(cfg, role)
    existing = os.environ.get("MLFLOW_RUN_ID")
    if not existing:
        mlflow.set_experiment(experiment_name(cfg))

    with _writing("a new run" if not existing else f"run {existing}"):
        active = mlflow.start_run(run_name=None if existing else name)
    with _guarded(active) as run:
        if existing:  # `mlflow run` gave the run a random name; a readable one replaces it
            MlflowClient().update_run(run.run_id, name=name)
        run.set_tags({**run_tags(cfg, role), **process_tags()})
        yield run


@contextmanager
def start_tune_run(cfg: RunConfig, study_name: str, previous_run_id: str | None) -> Iterator[Run]:
    """The study's parent run (role `tune`): the `mlflow run` one, else the run of an earlier
    session of the same study (resumed), else a new one."""
    # Taken out of the environment as mlflow.start_run() does, so nested trial runs are new runs.
    launched = run_id = os.environ.pop("MLFLOW_RUN_ID", None) or None
    if run_id is None and previous_run_id:
        try:
            previous = MlflowClient().get_run(previous_run_id)
            run_id = previous_run_id
            # Nested trial runs are created in the active experiment: make it the parent's (else
            # they land in Default, where a team server's users may not write).
            mlflow.set_experiment(experiment_id=previous.info.experiment_id)
            if schema.ERROR in previous.data.tags:  # e.g. closed by a sweep when its worker died: it goes on
                MlflowClient().delete_tag(run_id, schema.ERROR)
        except mlflow.exceptions.MlflowException:
            run_id = None  # the study outlived its tracking store: start a new parent run
    if run_id is None:
        mlflow.set_experiment(experiment_name(cfg))
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else (cfg.tracking.run_name or
                                                                          default_run_name(cfg, "tune")))
    with _guarded(active) as run:
        if launched:  # `mlflow run` gave the run a random name
            MlflowClient().update_run(run.run_id, name=cfg.tracking.run_name or default_run_name(cfg, "tune"))

        mlflow.set_tags({**run_tags(cfg, "tune"), schema.STUDY_NAME: study_name, **process_tags()})
        yield run


def flush() -> None:
    """Wait for asynchronously logged metrics to reach the store."""
    try:
        mlflow.flush_async_logging()
    except Exception:  # flushing must never hide the error being reported
        pass


def error_message(exc: BaseException) -> str:
    """One line for a tag or the terminal: the message, or the exception type when it has none."""
    if isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM (processes.Terminated)

        return interrupt_reason(exc)
    text = ltexp.redact(str(exc)).strip().splitlines()  # a library's message may quote a URL
    if isinstance(exc, ltexp.LtexpError) and text:
        return text[0][:5000]
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:5000]


def fail_existing_run(reason: str) -> None:
    """Mark the run that `mlflow run` created FAILED, for errors raised before it was opened."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    client = MlflowClient()
    client.set_tag(run_id, schema.ERROR, reason[:5000])
    client.set_terminated(run_id, "FAILED")


def register_model(run_id: str, name: str, alias: str = "candidate", extra: dict[str, str] | None = None) -> int:
    """Register the run's pyfunc model as a new version of `name` and point `alias` at it.

    The version is tagged with the run's data set, method and test metrics, and `extra`, all in
    the request that creates it. Aliases only; the deprecated stages are never used. Returns the
    version number.
    """
    from ltexp import LtexpError

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        raise LtexpError(f"--run-id {run_id!r} is not a run in {mlflow.get_tracking_uri()}") from None
    model_uri = run.data.tags.get(schema.MODEL_URI)
    if not model_uri:
        raise LtexpError(f"run {run_id} has no ltexp model (status {run.info.status}): train it to the end first")
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("ltexp.") and k not in (schema.MODEL_URI, schema.ERROR)}
    tags.update({f"ltexp.{k}": f"{v:.6g}" for k, v in run.data.metrics.items() if k.startswith("test_")})
    tags[schema.RUN_ID] = run_id
    version = mlflow.register_model(model_uri, name, tags={**tags, **(extra or {})})
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


# The data settings that make two validation figures comparable, as `ltexp tune` keys them.
DATA_KEY_FIELDS = ("dataset", "imb_type", "imb_factor", "val_source", "val_per_class", "data_seed")


def _alias_holder(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


def _validation_figure(client: MlflowClient, version, metric: str, data_key: str) -> float | None:
    """The version's value of `metric` on the data configuration `data_key`, or None when it was
    measured on other data or not at all. A tuned version carries its figure as tags; a version
    registered by hand (`ltexp register`) has it in its run's metrics and params."""
    tags = version.tags
    if schema.VAL_METRIC_VALUE in tags:
        same = tags.get(schema.DATA_CONFIG) == data_key and tags.get(schema.VAL_METRIC) == metric
        return float(tags[schema.VAL_METRIC_VALUE]) if same else None
    try:
        run = client.get_run(tags.get(schema.RUN_ID) or version.run_id)
    except (mlflow.exceptions.MlflowException, TypeError):
        return None
    settings = {**run.data.params, **{k.removeprefix("ltexp."): v for k, v in run.data.tags.items()}}
    if "|".join(settings.get(f, "") for f in DATA_KEY_FIELDS) != data_key or metric not in run.data.metrics:
        return None
    return float(run.data.metrics[metric])


def _ranks_above(figure: float, version: int, value: float, mine: int) -> bool:
    """Whether a version with `figure` ranks above this one (`value`, version `mine`): a higher
    figure, or the same figure registered earlier, so that two workers of one study registering
    the same best trial at once agree on one of them."""
    return figure > value or (figure == value and version < mine)


def register_and_promote(run_id: str, name: str, metric: str, value: float, data_key: str) -> tuple[int, bool, str]:
    """Register the run's model as `candidate`; make it `champion` only if it beats the champion.

    The champion is beaten when it was chosen on the same data configuration (`data_key`) and
    the same validation metric, and the new value is strictly higher; the old champion then
    becomes `previous`. With no champion yet, the new version becomes champion only if no
    existing version ranks above it on the same data and metric (a higher figure, or the same
    figure registered earlier; one registered by hand included). Moving `candidate` from a
    version that tuning did not put there is said. The comparison and the decision are tags on
    the new version and the returned line.

    Workers of one team finish at once and decide at once: a version crowned by a worker that
    could not yet see a better one, registered beside it, hands `champion` to the better one
    (`_settle_champion`), so the alias ends on the best version whatever the order of writes.
    """
    client = MlflowClient()
    old_candidate = _alias_holder(client, name, "candidate")
    # The figure is part of the registration: a worker deciding beside this one reads it at once.
    judged_on = {schema.VAL_METRIC: metric, schema.VAL_METRIC_VALUE: repr(float(value)), schema.DATA_CONFIG: data_key}
    version = register_model(run_id, name, "candidate", extra=judged_on)
    tags: dict[str, str] = {}
    champion = _alias_holder(client, name, "champion")
    rival = None
    if champion is None:
        others = [(v, _validation_figure(client, v, metric, data_key))
                  for v in client.search_model_versions(f"name = '{name}'") if int(v.version) != version]
        above = [(v, figure) for v, figure in others
                 if figure is not None and _ranks_above(figure, int(v.version), value, version)]
        if above:
            rival = max(above, key=lambda pair: (pair[1], -int(pair[0].version)))
            promote, decision = False, (f"not made @champion: v{rival[0].version} has {metric} {rival[1]:.6g} "
                                        f">= {value:.6g} on the same data")
        else:
            promote, decision = True, f"v{version} is now @champion ({metric} {value:.6g}; no champion before)"
    elif champion.tags.get(schema.DATA_CONFIG) != data_key or champion.tags.get(schema.VAL_METRIC) != metric:
        promote, decision = False, (f"kept champion v{champion.version}: it was chosen on "
                                    f"{champion.tags.get(schema.DATA_CONFIG)} / {champion.tags.get(schema.VAL_METRIC)}, "
                                    f"not comparable with {data_key} / {metric}")
    else:
        old = float(champion.tags[schema.VAL_METRIC_VALUE])
        promote = value > old
        decision = (f"v{version} is now @champion ({metric} {value:.6g}; previous champion v{champion.version}, "
                    f"{old:.6g})" if promote else
                    f"kept champion v{champion.version}: {metric} {value:.6g} <= {old:.6g}")
    compared = champion or (rival[0] if rival else None)
    if compared is not None:
        tags[schema.COMPARED_TO] = str(compared.version)
    if old_candidate is not None and schema.VAL_METRIC_VALUE not in old_candidate.tags:
        decision += f"; @candidate moved from v{old_candidate.version}, which ltexp tune had not set"
    tags[schema.PROMOTION] = decision
    # Tagged before the alias moves: a worker that settles the alias reads every crowned decision.
    for key, val in tags.items():
        client.set_model_version_tag(name, str(version), key, val)
    if promote:
        if champion is not None:
            client.set_registered_model_alias(name, "previous", champion.version)
        client.set_registered_model_alias(name, "champion", str(version))
        better = _settle_champion(client, name, version, metric, value, data_key)
        if better is not None:
            promote = False
            decision += (f"; then v{better.version}, crowned beside it with {metric} "
                         f"{float(better.tags[schema.VAL_METRIC_VALUE]):.6g}, ranks above it and holds @champion")
            client.set_model_version_tag(name, str(version), schema.PROMOTION, decision)
    return version, promote, decision


# How far apart two workers' registrations can be when one decided without seeing the other: at
# most one worker's register-decide-tag-alias sequence (a few requests: seconds, a minute on a
# loaded server). Versions crowned further apart are history (a champion moved by hand since
# stays where it was put).
SETTLE_WINDOW_S = 600


def _settle_champion(client: MlflowClient, name: str, version: int, metric: str, value: float, data_key: str):
    """After crowning `version`: the best version that another worker crowned beside it on the
    same data and metric, now made `champion`, or None when `version` ranks above them all.

    A worker decides on what the registry held when it looked; one that looked before a better
    version existed may set the alias after that version's worker did. Every worker settles after
    its own write and every crowned version is tagged before its write, so the last worker to
    write sees every crowned figure and leaves the alias on the best of them."""
    versions = client.search_model_versions(f"name = '{name}'")
    (mine,) = [v for v in versions if int(v.version) == version]
    beside = [v for v in versions if int(v.version) != version
              and abs(v.creation_timestamp - mine.creation_timestamp) <= SETTLE_WINDOW_S * 1000
              and v.tags.get(schema.PROMOTION, "").startswith(f"v{v.version} is now @champion")
              and v.tags.get(schema.DATA_CONFIG) == data_key and v.tags.get(schema.VAL_METRIC) == metric]
    above = [v for v in beside if _ranks_above(float(v.tags[schema.VAL_METRIC_VALUE]), int(v.version), value, version)]
    if not above:
        return None
    best = max(above, key=lambda v: (float(v.tags[schema.VAL_METRIC_VALUE]), -int(v.version)))
    client.set_registered_model_alias(name, "champion", str(best.version))
    return best


# ---------------------------------------------------------------------------------------------
# Store checks, run lifecycle (sweep, resume links) and registry names, all before any training.

# MLflow's HTTP defaults (7 retries with backoff 2, 120 s timeout) make an unreachable server
# hang for minutes; a training run should instead fail within seconds. Set only when the user
# has not chosen (MLflow reads these variables at every request).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
for _name, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)
# The pre-flight probe of a server: one retry, 10 s per attempt (worst case ~25 s when unreachable).
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
SUPPORTED_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
CREDENTIAL_HINT = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (basic auth) or MLFLOW_TRACKING_TOKEN "
                   "(bearer token) for this server")


def refusal(exc: BaseException) -> str | None:
    """One line for a tracking server's 401 or 403 met mid-command (a run, a tag, a model
    version), naming the user and what ltexp needs; None for any other exception."""
    code = getattr(exc, "error_code", None)
    if code not in ("PERMISSION_DENIED", "UNAUTHENTICATED"):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    who = f"user {user!r}" if user else "this client (no MLFLOW_TRACKING_USERNAME)"
    status = exc.get_http_status_code()
    what = " ".join(str(getattr(exc, "message", exc)).split())[:200]
    if code == "UNAUTHENTICATED":
        return (f"tracking server {mlflow.get_tracking_uri()} refused the login of {who} (HTTP {status}: {what}): "
                f"{CREDENTIAL_HINT}")
    return (f"tracking server {mlflow.get_tracking_uri()} refused {who} (HTTP {status}: {what}): ltexp needs EDIT on "
            f"the experiment it logs to, and on the registered model it registers to; ask the admin to grant it "
            f"(python deploy/add-user.py {user or '<user>'} --experiment <name> --model <name> --permission EDIT)")


def _uri_source() -> str:
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "MLflow's default"


def _sqlite_path(uri: str) -> Path | None:
    rest = uri[len("sqlite://"):]
    if not rest or rest.startswith("/:memory:"):
        return None
    return Path(rest[1:].split("?", 1)[0]) if rest.startswith("/") else Path(rest.split("?", 1)[0])


@contextmanager
def _sqlite_creation_lock(path: Path) -> Iterator[None]:
    """Serialise the first creation of an sqlite store across processes: two runs that create the
    same fresh store at once would otherwise both run MLflow's schema migration, and one dies."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; MLflow's own behaviour
        yield
        return
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_sqlite(uri: str, path: Path) -> None:
    from ltexp import LtexpError

    folder = path.parent if str(path.parent) else Path(".")
    where = f"tracking store {uri} ({_uri_source()})"
    if not folder.is_dir():
        raise LtexpError(f"{where}: folder {folder} does not exist: create it or set MLFLOW_TRACKING_URI to another path")
    if path.is_dir():
        raise LtexpError(f"{where}: {path} is a folder, not an SQLite file: name a file in it, e.g. "
                         f"MLFLOW_TRACKING_URI=sqlite:///{path / 'mlflow.db'}")
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            raise LtexpError(f"{where} is read-only for this user: make {path} writable (chmod u+rw) or set "
                             f"MLFLOW_TRACKING_URI=sqlite:///<a writable file>")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise LtexpError(f"{where}: folder {folder} is not writable and sqlite needs it for its journal: "
                             f"make it writable or move the store")
        _probe_sqlite_read(where, path)
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise LtexpError(f"{where} cannot be created: folder {folder} is not writable; make it writable or set "
                         f"MLFLOW_TRACKING_URI=sqlite:///<a writable file>")


def check_store() -> str:
    """Fail early, in one line, when the tracking store cannot take a run; returns its URI.

    Checks the URI scheme, an sqlite file and folder (created under a lock the first time), and
    an HTTP server's reachability and credentials (within ~25 s).
    """
    from ltexp import LtexpError

    uri = mlflow.get_tracking_uri()
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if "://" in uri or uri.startswith("sqlite:") else "file"
    if len(scheme) == 1:  # a Windows drive letter, e.g. C:\\mlruns
        scheme = "file"
    if scheme not in SUPPORTED_SCHEMES:
        raise LtexpError(f"unsupported tracking URI {uri!r} ({_uri_source()}): scheme {scheme!r} is not one of "
                         f"{', '.join(SUPPORTED_SCHEMES)}; use e.g. sqlite:///mlflow.db or http://host:5000")
    path = _sqlite_path(uri) if scheme == "sqlite" else None
    if path is not None:
        _check_sqlite(uri, path)
    if scheme in ("postgresql", "mysql", "mssql"):
        _probe_database(uri, scheme)
    try:
        with _environment(PROBE_ENV if scheme in ("http", "https") else {}):
            if path is not None:
                with _sqlite_creation_lock(path):
                    MlflowClient().search_experiments(max_results=1)
                    _probe_sqlite_write(path)
            else:
                MlflowClient().search_experiments(max_results=1)
    except LtexpError:
        raise
    except Exception as exc:
        raise LtexpError(_store_error(uri, scheme, exc)) from None
    return uri


DB_CONNECT_TIMEOUT_S = 10  # the pre-flight connection to a database store: libpq's / MySQL's connect_timeout


def _probe_database(uri: str, scheme: str) -> None:
    """One connection to a database store before MLflow opens it, with a connect timeout.

    MLflow's engine retries a failed first connection 10 times with growing sleeps (~100 s), so
    a wrong host, port or password, or a database that is down, took two minutes to report; and
    without `connect_timeout` a host that drops packets waits for the kernel's TCP timeout. A
    `connect_timeout` given in the URI's query is kept."""
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    from ltexp import LtexpError

    where = f"tracking store {uri} ({_uri_source()})"
    try:
        url = sqlalchemy.engine.make_url(uri)
        connect_args = {} if scheme == "mssql" or "connect_timeout" in url.query else \
            {"connect_timeout": DB_CONNECT_TIMEOUT_S}
        engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args=connect_args)
    except (ImportError, sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as exc:
        raise LtexpError(f"{where} cannot be opened: {type(exc).__name__}: {exc} (install its driver, e.g. "
                         f"pip install 'psycopg[binary]' for postgresql+psycopg://)") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as exc:
        reason = " ".join(str(exc.orig).split())[:300]
        raise LtexpError(f"{where}: cannot connect ({reason}): start the database or fix MLFLOW_TRACKING_URI") from None
    finally:
        engine.dispose()


def _probe_sqlite_read(where: str, path: Path) -> None:
    """Open the existing file once with sqlite itself and read its schema: a file that is no
    database (a text file, a torn copy) fails here at once, where MLflow's engine would retry
    the same open 10 times with growing sleeps (~100 s) before giving up."""
    import sqlite3

    from ltexp import LtexpError

    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=rw", uri=True, timeout=30)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:  # its subclass OperationalError too
        if "locked" in str(exc):
            return  # busy for 30 s with another process's write: MLflow's own calls wait for it
        with open(path, "rb") as fh:
            head = fh.read(16)
        magic = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
        what = "" if head == magic else f"; it starts with {head!r}, an SQLite database with {magic!r}"
        raise LtexpError(f"{where} is not usable: sqlite says '{exc}'{what}: name an SQLite file, or a new "
                         f"one that MLflow will create") from None


def _probe_sqlite_write(path: Path) -> None:
    """A write transaction that changes nothing: catches read-only files a permission check misses."""
    import sqlite3

    from ltexp import LtexpError

    try:
        con = sqlite3.connect(str(path), timeout=30)
        try:
            con.execute("BEGIN IMMEDIATE")
            con.execute("CREATE TABLE IF NOT EXISTS _ltexp_probe (x)")  # a write, rolled back
            con.rollback()
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        raise LtexpError(f"tracking store sqlite:///{path} cannot be written ({exc}): make the file and its folder "
                         f"writable or set MLFLOW_TRACKING_URI to another store") from None


def _store_error(uri: str, scheme: str, exc: Exception) -> str:
    text = " ".join(str(exc).split())
    status = None
    import re

    match = re.search(r"error code (\d{3})", text) or re.search(r"\b(401|403)\b", text)
    if match:
        status = int(match.group(1))
    if getattr(exc, "error_code", None) in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        status = exc.get_http_status_code()  # the REST error's code maps back to 401 / 403
    if status in (401, 403) or "UNAUTHENTICATED" in text or "PERMISSION_DENIED" in text:
        code = f"HTTP {status}" if status else "access denied"
        return f"tracking server {uri} refused access ({code}): {CREDENTIAL_HINT}"
    if scheme in ("http", "https") and re.search(r"Max retries|Connection|refused|timed out|Timeout|resolve", text, re.I):
        return (f"tracking server {uri} ({_uri_source()}) is unreachable: start it, or fix MLFLOW_TRACKING_URI "
                f"({text[:160]})")
    return f"tracking store {uri} ({_uri_source()}) is not usable: {type(exc).__name__}: {text[:240]}"


def validate_registered_name(name: str, alias: str | None = None, flag: str = "--register-as") -> None:
    """Reject, before training, a registered-model name or alias that MLflow's registry refuses."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_name

    from ltexp import LtexpError

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise LtexpError(f"{flag} {name!r} is not a valid registered-model name: {exc.message} "
                         f"(use e.g. ltexp-digits)") from None
    if alias:
        try:
            _validate_model_alias_name(alias)
        except MlflowException as exc:
            raise LtexpError(f"--alias {alias!r} is not a valid alias: {exc.message}") from None
        if alias.lower() == "latest" or (alias[0] in "vV" and alias[1:].isdigit()):
            raise LtexpError(f"--alias {alias!r} is reserved by MLflow: use e.g. candidate or champion")


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


# --- Reading runs back and the grid / report runs (`ltexp grid`, `ltexp report`) ---------------

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


def log_artifacts(local_dir: str | Path, artifact_path: str | None = None) -> None:
    """Every file under `local_dir` as artifacts of the active run."""
    with _writing(f"artifacts {artifact_path or local_dir}", mlflow.get_artifact_uri()):
        mlflow.log_artifacts(str(local_dir), artifact_path)


@contextmanager
def start_role_run(experiment: str, run_name: str, role: str, tags: dict[str, str],
                   resume_run_id: str | None = None) -> Iterator[Run]:
    """A run that is no experiment (role `grid` or `report`): the `mlflow run` one when there is
    one, else `resume_run_id` when that run still exists (a grid's later session or another
    worker), else a new run in `experiment`. FAILED with the reason if the block raises."""
    run_id = os.environ.pop("MLFLOW_RUN_ID", None) or None  # nested runs below must be new runs
    if run_id is None and resume_run_id:
        try:
            resumed = MlflowClient().get_run(resume_run_id)
            run_id = resume_run_id
            # Nested runs go to the *active* experiment, not their parent's: make it the parent's.
            mlflow.set_experiment(experiment_id=resumed.info.experiment_id)
        except mlflow.exceptions.MlflowException:
            run_id = None  # the grid outlived its tracking store: start a new parent run
    if run_id is None:
        mlflow.set_experiment(experiment)
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
    with _guarded(active) as run:
        commit = git_commit()
        mlflow.set_tags({schema.ROLE: role, schema.VERSION: ltexp.__version__, **tags,
                         **({schema.GIT_COMMIT: commit} if commit else {})})
        yield run


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
