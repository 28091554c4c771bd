"""SQLite connection settings for the default stores (MLflow's `mlflow.db`, Optuna's `optuna.db`).

Both stores are SQLAlchemy engines over SQLite files, and every logged value or Optuna
`suggest`/`report` is one committed transaction. In SQLite's default rollback-journal mode each
commit waits for the disk twice, and a tuning trial makes ~20 commits. In write-ahead-log mode with
`synchronous=NORMAL` a commit is an append to the `-wal` file, with no wait for the disk, and
durability is still kept against a crash of the process; only a power cut can lose the last
commits. WAL also lets readers (`mlflow ui`, a second tuning worker) run while a writer commits.

WAL needs the database on a local disk (SQLite's own rule: not on a network file system). Set
`LTEXP_SQLITE_WAL=0` to keep SQLite's defaults, e.g. for a store on NFS. PostgreSQL and other
databases are untouched.
"""

from __future__ import annotations

import os

ENV_SWITCH = "LTEXP_SQLITE_WAL"
_installed = False


def wal_enabled() -> bool:
    """Whether ltexp puts SQLite stores in WAL mode (`LTEXP_SQLITE_WAL`, default on)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def _on_connect(dbapi_connection, connection_record) -> None:
    import sqlite3

    if not isinstance(dbapi_connection, sqlite3.Connection) or not wal_enabled():
        return
    cursor = dbapi_connection.cursor()
    try:
        # journal_mode is stored in the file (one switch, kept for later connections);
        # synchronous is per connection. An in-memory database answers "memory" and stays so.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
    except sqlite3.OperationalError:
        pass  # e.g. a read-only file or one locked by another writer: its defaults still work
    finally:
        cursor.close()


def install_sqlite_settings() -> None:
    """Apply the WAL settings to every SQLite connection SQLAlchemy opens in this process
    (MLflow's and Optuna's engines alike). Idempotent."""
    global _installed
    if _installed:
        return
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "connect", _on_connect)
    _installed = True
