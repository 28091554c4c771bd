"""Optuna storages as ltexp opens them: URL defaults, heartbeats, the locks beside local files."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

import optuna

from ltexp import LtexpError, redact, tracking

# The Optuna storage when --storage is empty: the environment keeps a password off the command
# line, where `ps` and /proc/<pid>/cmdline show it to every local user.
STORAGE_ENV = "LTEXP_STORAGE"


def default_storage() -> str:
    """$LTEXP_STORAGE, else sqlite `optuna.db` beside an sqlite MLflow store (else in the working
    directory)."""
    if os.environ.get(STORAGE_ENV):
        return os.environ[STORAGE_ENV]
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{Path.cwd() / 'optuna.db'}"


def journal_path(url: str) -> str | None:
    """The file a journal storage URL names (`*.log`, `*.journal` or `journal:<path>`); else None."""
    if url.startswith("journal:"):
        return url[len("journal:"):]
    return url if url.endswith((".log", ".journal")) else None


def sqlite_lock_path(url: str) -> Path | None:
    """The lock file ltexp keeps beside an sqlite database (`sqlite:///<path>`); else None."""
    return Path(f"{url[len('sqlite:///'):]}.ltexp-lock") if url.startswith("sqlite:///") else None


def flock(path: Path, wait_s: float | None = None):
    """Take an exclusive lock on the file `path` (made if missing); returns the function that
    releases it, or None when it was not obtained in `wait_s` seconds (None: wait until it is)."""
    import fcntl

    handle = open(path, "a")
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if deadline is None else fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                handle.close()
                return None
            time.sleep(0.01)

    def release() -> None:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
    return release


def open_storage(url: str, heartbeat_s: int):
    """An Optuna storage: RDB URL (with heartbeats and retry of dead workers' trials) or a journal
    file (`*.log`, `*.journal` or `journal:<path>`). Unreachable storage -> one-line error."""
    try:
        if journal_path(url) is not None:
            from optuna.storages.journal import JournalFileBackend

            return optuna.storages.JournalStorage(JournalFileBackend(journal_path(url)))
        for attempt in range(4):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are wanted
                    return optuna.storages.RDBStorage(
                        url, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                            max_retry=2, inherit_intermediate_values=True),
                        engine_kwargs={"pool_pre_ping": True})
            except Exception as exc:
                # Workers started together on an empty database all create Optuna's tables; in
                # PostgreSQL the losers fail with "duplicate key ... pg_type_typname_nsp_index" or
                # "already exists" (optuna/optuna#1092). The tables exist by then: open again.
                if attempt == 3 or not re.search(r"already exists|duplicate key", str(exc)):
                    raise
                time.sleep(0.5 + attempt)
    except Exception as exc:  # sqlalchemy, driver and OS errors all mean the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LtexpError(f"cannot open Optuna storage {url}: {reason[:300]}") from None


def serve_dashboard(storage_url: str, host: str, port: int) -> None:
    """Optuna's dashboard (`optuna_dashboard.run_server`) on the study storage, until stopped.

    The storage is opened by `open_storage` first, which creates Optuna's tables: the dashboard
    opens an RDB storage with `skip_table_creation=True`, so on a fresh, empty database (a team
    stack whose workers have not started yet) it fails with `StorageInternalError`."""
    try:
        import optuna_dashboard
    except ImportError:
        raise LtexpError("ltexp dashboard needs optuna-dashboard: pip install optuna-dashboard "
                         "(or the ltexp[team] extra)") from None
    storage = open_storage(storage_url, heartbeat_s=60)
    print(f"Optuna dashboard of {redact(storage_url)} on http://{host}:{port}/dashboard", flush=True)
    optuna_dashboard.run_server(storage, host=host, port=port)
