"""Writing to the tracking store: which store, how a failed write is reported (one line, the
store named), the HTTP retry policy, and numbers as the store should hold them."""

from __future__ import annotations

import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import mlflow
import numpy as np

import ltexp
from ltexp.stores import install_sqlite_settings

# SQLite stores in WAL mode: ~20 ms less per logged value on a disk (see ltexp/stores.py).
install_sqlite_settings()

# MLflow's HTTP defaults (7 retries with backoff 2, 120 s timeout) make an unreachable server
# hang for minutes; a training run should instead fail within seconds. Set only when the user
# has not chosen (MLflow reads these variables at every request).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
for _name, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_name, _value)


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


def flush() -> None:
    """Wait for asynchronously logged metrics to reach the store."""
    try:
        mlflow.flush_async_logging()
    except Exception:  # flushing must never hide the error being reported
        pass


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
