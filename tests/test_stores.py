"""SQLite stores run in WAL mode (fast commits), unless LTEXP_SQLITE_WAL=0."""

import sqlite3

import pytest
import sqlalchemy

import ltexp.tracking  # noqa: F401  (installs the settings, as every ltexp process does)
from ltexp import stores


def _modes(path):
    engine = sqlalchemy.create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        modes = (conn.exec_driver_sql("PRAGMA journal_mode").scalar(),
                 conn.exec_driver_sql("PRAGMA synchronous").scalar())
    engine.dispose()
    return modes


def test_sqlite_engines_use_wal(tmp_path, monkeypatch):
    monkeypatch.delenv(stores.ENV_SWITCH, raising=False)
    assert _modes(tmp_path / "a.db") == ("wal", 1)  # synchronous 1 = NORMAL
    # The journal mode is kept in the file: a plain sqlite3 connection sees it too.
    assert sqlite3.connect(tmp_path / "a.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("value", ["0", "false", "off"])
def test_switch_off_keeps_sqlite_defaults(tmp_path, monkeypatch, value):
    monkeypatch.setenv(stores.ENV_SWITCH, value)
    assert _modes(tmp_path / "b.db") == ("delete", 2)  # SQLite's defaults: rollback journal, FULL


@pytest.mark.fresh_store  # made here, by MLflow under ltexp's settings
def test_mlflow_store_is_wal(mlflow_store, tmp_path):
    import mlflow

    with mlflow.start_run():
        mlflow.log_metric("x", 1.0)
    assert sqlite3.connect(tmp_path / "mlflow.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
