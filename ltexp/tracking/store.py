"""The pre-flight check of the tracking store (`check_store`): before any training, one line saying
why a URI, an sqlite file, a database or a server cannot take a run."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
from mlflow.tracking import MlflowClient

from ltexp.tracking.writes import CREDENTIAL_HINT, _environment


# The pre-flight probe of a server: one retry, 10 s per attempt (worst case ~25 s when unreachable).
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
             "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
SUPPORTED_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")


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
