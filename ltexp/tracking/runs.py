"""The runs ltexp opens: an experiment's (or `mlflow run`'s), a study's parent, a grid's or a report's,
and nested expert and trial runs; each ends FINISHED, or FAILED / KILLED with its reason as a tag,
whatever happens inside (`_guarded`). Under `mlflow run` the run already exists (MLFLOW_RUN_ID)
and is used as it is, without `set_experiment`."""

from __future__ import annotations

import functools
import os
import shlex
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

import ltexp
from ltexp import schema
from ltexp.processes import interrupt_reason, process_tags
from ltexp.tracking.writes import (LAST_TRY_ENV, StoreUnreachable, _environment, _finite, _queued_failure, _write_check_s,
                                   _writing, as_logged, flush)

# Neither torch nor the configs are imported here (they are where they are used): `mlflow run`
# imports this package through ltexp/default_experiment.py, and should not pay for torch.
if TYPE_CHECKING:
    from ltexp.config import RunConfig


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


def identity_tags(role: str) -> dict[str, str]:
    """What any ltexp run is and which code wrote it: role, version and (in a git checkout) commit."""
    commit = git_commit()
    return {schema.ROLE: role, schema.VERSION: ltexp.__version__, **({schema.GIT_COMMIT: commit} if commit else {})}


def run_tags(cfg: RunConfig, role: str) -> dict[str, str]:
    """The tags every run carries (docs/records.md, "What a run records")."""
    tags = {
        schema.METHOD: cfg.method.method,
        schema.DATASET: cfg.data.dataset,
        schema.DATA_NAME: cfg.data.short_name,
        schema.IMB_TYPE: cfg.data.imb_type,
        schema.IMB_FACTOR: str(cfg.data.imb_factor),
        schema.SEED: str(cfg.seed),
        **identity_tags(role),
    }
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


def default_run_name(cfg: RunConfig, role: str = "experiment") -> str:
    """A readable run name: `split:own·cifar100·exp0.01·e200·s0` (`tune·digits·exp0.01·e100` for a
    study): the epochs tell a 10-epoch grid cell from a 200-epoch run of the same setting, and a
    split run names its experts' design (own classes only, or with an "other" label)."""
    from ltexp.config import used_settings

    data = [cfg.data.short_name, f"{cfg.data.imb_type}{cfg.data.imb_factor:g}", f"e{cfg.optim.epochs}"]
    if role == "tune":  # a study spans methods' settings and seeds
        return "·".join(["tune", *data])
    method = cfg.method.method
    if "expert_mode" in used_settings(cfg):
        method += f":{cfg.split.expert_mode}"
    return "·".join([method, *data, f"s{cfg.seed}"])


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
    tags = {**run_tags(cfg, "tune"), schema.STUDY_NAME: study_name, **process_tags()}
    with start_role_run(experiment_name(cfg), cfg.tracking.run_name or default_run_name(cfg, "tune"), "tune", tags,
                        previous_run_id) as run:
        yield run


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


def log_artifacts(local_dir: str | Path, artifact_path: str | None = None) -> None:
    """Every file under `local_dir` as artifacts of the active run."""
    with _writing(f"artifacts {artifact_path or local_dir}", mlflow.get_artifact_uri()):
        mlflow.log_artifacts(str(local_dir), artifact_path)


@contextmanager
def start_role_run(experiment: str, run_name: str, role: str, tags: dict[str, str],
                   resume_run_id: str | None = None) -> Iterator[Run]:
    """A parent run that is no experiment (role `tune`, `grid` or `report`): the `mlflow run`
    one when there is one (renamed `run_name`), else `resume_run_id` when that run still exists
    (a study's or grid's later session, or another worker; an `ltexp.error` a sweep left on it
    is cleared, as the run goes on), else a new run in `experiment`. Tagged with the role, the
    version and the commit beside `tags`; FAILED with the reason if the block raises."""
    # Taken out of the environment as mlflow.start_run() does, so nested runs below are new runs.
    launched = run_id = os.environ.pop("MLFLOW_RUN_ID", None) or None
    if run_id is None and resume_run_id:
        try:
            resumed = MlflowClient().get_run(resume_run_id)
            run_id = resume_run_id
            # Nested runs are created in the active experiment, not their parent's: make it the
            # parent's (else they land in Default, where a team server's users may not write).
            mlflow.set_experiment(experiment_id=resumed.info.experiment_id)
            if schema.ERROR in resumed.data.tags:  # e.g. closed by a sweep when its worker died
                MlflowClient().delete_tag(run_id, schema.ERROR)
        except mlflow.exceptions.MlflowException:
            run_id = None  # the study or grid outlived its tracking store: start a new parent run
    if run_id is None:
        mlflow.set_experiment(experiment)
    active = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
    with _guarded(active) as run:
        if launched:  # `mlflow run` gave the run a random name
            MlflowClient().update_run(run.run_id, name=run_name)
        mlflow.set_tags({**identity_tags(role), **tags})
        yield run
