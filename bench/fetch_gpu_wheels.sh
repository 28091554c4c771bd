#!/usr/bin/env bash
# Download into .whl/ the Python wheels that a GPU machine's image lacks for bench/gpu_check.sh:
# MLflow, Optuna and plotly with every dependency the image does not already hold, built for that
# machine (CPython 3.12, manylinux x86-64). The GPU machine has no network, so the wheels travel
# with the working tree; .whl/ is git-ignored and never committed.
#
#   bash bench/fetch_gpu_wheels.sh            # MLflow 3.17.2 + Optuna 5.0.0 (ltexp's tested versions)
#   MLFLOW_VERSION=3.18.0 bash bench/fetch_gpu_wheels.sh
#   LEAN=1 bash bench/fetch_gpu_wheels.sh     # mlflow-skinny + SQLAlchemy/Alembic + Optuna, no plotly:
#                                             # training and logging to a local sqlite store (bench/field.sh),
#                                             # small enough to travel beside a packed data set
#
# pip resolves the whole dependency tree for the target platform into a scratch folder; only
# the packages missing from the GPU image (IMAGE_HAS below: its pip list, as far as this tree
# goes) are copied into .whl/. The script fails if the result is over MAX_MIB (the device
# call's working tree holds 64 MiB in all) or holds two versions of one package.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
MLFLOW_VERSION="${MLFLOW_VERSION:-3.17.2}"
OPTUNA_VERSION="${OPTUNA_VERSION:-5.0.0}"
# Optuna's study plots (ltexp tune logs them; bench/gpu_check.sh's jobs part runs ltexp tune).
PLOTLY_VERSION="${PLOTLY_VERSION:-$("$PYTHON" -c 'import plotly; print(plotly.__version__)' 2>/dev/null || echo 7.1.0)}"
MAX_MIB="${MAX_MIB:-60}"
DEST=.whl

# Distributions of the dependency tree that the GPU image ('cuda') already holds.
IMAGE_HAS="aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi charset-normalizer click
cloudpickle contourpy cycler fonttools frozenlist h11 idna jinja2 joblib kiwisolver markupsafe matplotlib
multidict narwhals numpy packaging pandas pillow propcache protobuf pyarrow pyparsing python-dateutil pyyaml
requests scikit-learn scipy six threadpoolctl tqdm typing-extensions urllib3 werkzeug yarl zipp"

# pip matches each manylinux tag exactly: name the ones wheels of this tree are published with.
PLATFORMS=()
for tag in manylinux_2_34 manylinux_2_31 manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  PLATFORMS+=(--platform "${tag}_x86_64")
done

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
if [ "${LEAN:-0}" = 1 ]; then
  WANT=("mlflow-skinny==$MLFLOW_VERSION" "optuna==$OPTUNA_VERSION" sqlalchemy alembic)
else
  WANT=("mlflow==$MLFLOW_VERSION" "optuna==$OPTUNA_VERSION" "plotly==$PLOTLY_VERSION")
fi
"$PYTHON" -m pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$scratch" "${WANT[@]}" \
  2> >(grep -v "is ignored: it is neither" >&2)

normalise() { tr 'A-Z_.' 'a-z--'; }
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
for wheel in "$scratch"/*.whl; do
  name="$(basename "$wheel" | cut -d- -f1 | normalise)"
  if ! tr ' \n' '\n\n' <<<"$IMAGE_HAS" | grep -qx "$name"; then
    cp "$wheel" "$DEST/"
  fi
done

count=$(ls "$DEST"/*.whl | wc -l)
kib=$(du -ck "$DEST"/*.whl | tail -1 | cut -f1)
dupes=$(ls "$DEST" | cut -d- -f1 | normalise | sort | uniq -d)
echo "$count wheels, $((kib / 1024)) MiB in $DEST/ (${WANT[*]})"
if [ -n "$dupes" ]; then
  echo "error: two versions of: $dupes" >&2; exit 1
fi
if [ "$kib" -gt $((MAX_MIB * 1024)) ]; then
  echo "error: $((kib / 1024)) MiB is over the $MAX_MIB MiB limit" >&2; exit 1
fi
