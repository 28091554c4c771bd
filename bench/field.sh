#!/usr/bin/env bash
# The field's table and the paper's Table 3 on real CIFAR-10-LT, in ONE device call (issue 23):
# bench/field.py probes how many cells at once the GPU takes best (N = 1, 4, 8, 16), trains the
# tables with `ltexp grid --jobs`, stops at the budget and writes the reports and summary.json
# to $OUT (8 files at most: the device tool's limit).
#
# Before the call, here (no GPU needed):
#   bash bench/field.sh pack /tmp/c10/cifar10     # the five CIFAR-10 sets -> bench/data/cifar10-lt.ltpack
#                                                 # (from: mkdir -p /tmp/c10 && tar -xf ../shared/data/cifar10.tar -C /tmp/c10)
#   LEAN=1 bash bench/fetch_gpu_wheels.sh         # mlflow-skinny, Optuna and what they need that the image lacks
# The call (device tool), its timeout leaving time to rerun:
#   run(command="bash bench/field.sh", carry=[".whl", "bench/data"], timeout_s=560)
# Rehearsal on a CPU (tiny settings, the same code path):
#   FIELD_ARGS="--budget-s 400 --probe-jobs 1,2 --probe-epochs 2 --field-epochs 2 --paper-epochs 1 --field-seeds 0 \
#     --field-methods baseline,balanced_softmax --extra --device cpu --model smallcnn" bash bench/field.sh
set -uo pipefail
cd "$(dirname "$0")/.."
STARTED=$SECONDS
OUT="${OUT:-$PWD/field-out}"
WORK="${FIELD_WORK:-/tmp/ltexp-field}"
PACK="${FIELD_PACK:-bench/data/cifar10-lt.ltpack}"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 GIT_PYTHON_REFRESH=quiet MPLBACKEND=Agg
note() { echo "[field.sh $((SECONDS - STARTED)) s] $*"; }

if [ "${1:-}" = pack ]; then  # bash bench/field.sh pack <the cifar10 folder of ../shared/data/cifar10.tar>
  folder="${2:?give the unpacked cifar10 folder, e.g. /tmp/c10/cifar10}"
  mkdir -p "$(dirname "$PACK")" && rm -f "$PACK"
  # --preset field: a balanced holdout of 100 training images per class; --preset paper: its four
  # sets, validation 9:1 from the test set. Each image is stored once.
  python3 -m ltexp data --dataset "folder:$folder" --imb-type exp --imb-factor 0.01 --val-per-class 100 \
    --pack "$PACK" --output-dir "$WORK" | head -1
  for imb_type in exp step; do
    for factor in 0.1 0.01; do
      python3 -m ltexp data --dataset "folder:$folder" --imb-type $imb_type --imb-factor $factor --val-source paper \
        --pack "$PACK" --output-dir "$WORK" | head -1
    done
  done
  exit 0
fi

if [ ! -f "$PACK" ]; then
  note "FAIL: no $PACK (bash bench/field.sh pack <folder>, and carry bench/data)"; exit 1
fi
source bench/device_env.sh
# FIELD_ARGS: bench/field.py's flags (see its docstring); the default budget leaves the device
# call's start and the transfers their share of the 9 minutes.
eval "python3 bench/field.py --pack \"$PACK\" --out \"$OUT\" --work \"$WORK\" ${FIELD_ARGS:---budget-s 480}"
rc=$?
note "done rc=$rc"
exit $rc
