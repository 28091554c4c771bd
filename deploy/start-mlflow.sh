#!/bin/sh
# Start the team's MLflow tracking server with basic auth, every secret taken from the environment.
# docker-compose.yml's `mlflow` service runs this script, and so do the native setup (docs/team.md,
# "Team setup") and tests/test_team_service.py, so all three start the same server.
#
# Environment (required):
#   MLFLOW_BACKEND_STORE_URI        postgresql+psycopg://USER:PASSWORD@HOST:5432/mlflow
#                                   (an env var, not --backend-store-uri, so the password stays out
#                                   of the process list)
#   MLFLOW_AUTH_DATABASE_URI        postgresql+psycopg://USER:PASSWORD@HOST:5432/mlflow_auth
#   MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password (>= 12 characters), used on the first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY  the Flask secret for CSRF protection; the same on every server
#   MLFLOW_ARTIFACTS_DESTINATION    s3://BUCKET/PREFIX, with AWS_ACCESS_KEY_ID,
#                                   AWS_SECRET_ACCESS_KEY and MLFLOW_S3_ENDPOINT_URL for the store
# Optional: MLFLOW_AUTH_ADMIN_USERNAME (default admin), MLFLOW_AUTH_CONFIG_TEMPLATE (default: the
# basic_auth.ini beside this script), PYTHON (default python3).
# Arguments go to `mlflow server` (e.g. --host 0.0.0.0 --port 5000 --allowed-hosts ...).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
template=${MLFLOW_AUTH_CONFIG_TEMPLATE:-$here/basic_auth.ini}
for var in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI MLFLOW_AUTH_ADMIN_PASSWORD \
           MLFLOW_FLASK_SERVER_SECRET_KEY MLFLOW_ARTIFACTS_DESTINATION; do
  eval "value=\${$var:-}"
  if [ -z "$value" ]; then
    echo "start-mlflow.sh: error: $var is not set (see .env.example)" >&2
    exit 2
  fi
done

# basic_auth.ini has no environment interpolation, so the auth database URL (with its password) is
# written into a private copy of the template at start; MLflow reads it via MLFLOW_AUTH_CONFIG_PATH.
# configparser treats "%" as interpolation, so a percent-encoded password is escaped as "%%".
umask 077
MLFLOW_AUTH_CONFIG_PATH=$(mktemp "${TMPDIR:-/tmp}/mlflow-basic-auth.XXXXXX")
export MLFLOW_AUTH_CONFIG_PATH
"${PYTHON:-python3}" - "$template" "$MLFLOW_AUTH_CONFIG_PATH" <<'PY'
import configparser, os, sys
template, target = sys.argv[1], sys.argv[2]
config = configparser.ConfigParser()  # the parser MLflow reads the file with
if not config.read(template):
    sys.exit(f"start-mlflow.sh: error: cannot read the auth config template {template}")
config["mlflow"]["database_uri"] = os.environ["MLFLOW_AUTH_DATABASE_URI"].replace("%", "%%")
with open(target, "w") as f:
    config.write(f)
PY

# MLflow 3's background job runner (huey) serves GenAI features ltexp does not use; off unless asked.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec mlflow server --app-name basic-auth --serve-artifacts "$@"
