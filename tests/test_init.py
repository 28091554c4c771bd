"""ltexp's one redaction (`ltexp.redact`) and the user-facing error that applies it."""

import subprocess
import sys

import pytest

from ltexp import LtexpError, redact


@pytest.mark.parametrize("text,expected", [
    ("tracking store postgresql+psycopg://ltexp:s3cr/et@db:5432/mlflow (MLFLOW_TRACKING_URI)",
     "tracking store postgresql+psycopg://ltexp:***@db:5432/mlflow (MLFLOW_TRACKING_URI)"),
    ("http://alice:pw@host:5000 then https://bob:x@other", "http://alice:***@host:5000 then https://bob:***@other"),
    ("host=db user=ltexp password=hunter2 dbname=optuna", "host=db user=ltexp password=*** dbname=optuna"),
    ("postgresql://db/optuna?user=ltexp&password=hunter2&sslmode=require",
     "postgresql://db/optuna?user=ltexp&password=***&sslmode=require"),
    # Nothing secret: left as it is.
    ("http://alice@host:5000/api", "http://alice@host:5000/api"),
    ("sqlite:///runs/mlflow.db", "sqlite:///runs/mlflow.db"),
    ("models:/ltexp-digits@champion", "models:/ltexp-digits@champion"),
])
def test_redact_masks_every_url_password_and_nothing_else(text, expected):
    assert redact(text) == expected


def test_an_ltexp_error_never_carries_a_password():
    exc = LtexpError("cannot open Optuna storage postgresql+psycopg://ltexp:hunter2@127.0.0.1:1/optuna: refused")
    assert "hunter2" not in str(exc) and "ltexp:***@127.0.0.1" in str(exc)


def test_the_cli_prints_a_tracking_server_error_without_its_password(subprocess_env, tmp_path):
    # Port 1 on loopback: nothing listens, so the pre-flight probe fails (connection refused).
    env = {**subprocess_env, "MLFLOW_TRACKING_URI": "http://alice:hunter2@127.0.0.1:1"}
    proc = subprocess.run([sys.executable, "-m", "ltexp", "train", "--epochs", "1", "--no-progress"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "hunter2" not in proc.stdout + proc.stderr
    assert proc.stderr.startswith("ltexp: error: tracking server http://alice:***@127.0.0.1:1 ")
    assert "Traceback" not in proc.stderr
