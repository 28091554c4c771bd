#!/usr/bin/env bash
# Everything a session with a GPU checks, in ONE command (about 8 minutes on one H100):
#
#   1. tests:  pytest -m cuda tests/test_cuda.py (bf16 training, channels_last + compile, a GPU-trained
#              pyfunc predicting the same on CPU, split experts trained at once on their own streams)
#   2. mlflow: `mlflow run . -e split --env-manager local -P dataset=cifar100 -P epochs=2` on a generated
#              CIFAR-100 archive, the run checked (FINISHED, trained on cuda, test metrics logged)
#   3. bench:  python bench/gpu.py --out $OUT/gpu.json with the time that is left, less part 4's
#   4. jobs:   `ltexp tune --jobs 1` vs `--jobs 4` (ResNet-32, generated CIFAR-10-LT exp 0.01, 4 trials of
#              2 epochs each): whether several trials at once pay off on the GPU (study_wall_s of each;
#              on an H200 one job's study ran past the 55 s it first had: 90 s each now)
#
#   bash bench/gpu_check.sh              # all four
#   bash bench/gpu_check.sh bench        # only some parts (tests, mlflow, jobs, bench), e.g. to rerun one
#
# The GPU image has PyTorch but not MLflow/Optuna: their wheels travel in .whl/ (made here by
# bench/fetch_gpu_wheels.sh) and are installed into /tmp/site. Results go to $OUT (the device
# tool's output folder; ./gpu-check-out elsewhere): summary.txt, pytest.log, mlflow_run.log,
# mlflow_run.json, jobs.log, bench.log, gpu.json, env.txt (8 files: the device tool's limit). Exit status 0 only if every part passed.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
STARTED=$SECONDS
BUDGET_S="${GPU_CHECK_BUDGET_S:-470}"   # whole script; the benchmark gets what the other parts leave
OUT="${OUT:-$REPO/gpu-check-out}"
WORK="${GPU_CHECK_WORK:-/tmp/ltexp-gpu-check}"
PARTS="${*:-tests mlflow bench jobs}"
JOBS_RESERVE_S=190   # part 4: the archive (6 s on an H200) and two studies of at most 90 s each
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 GIT_PYTHON_REFRESH=quiet MPLBACKEND=Agg
# The CIFAR archives below are generated (tests/conftest.py), not the published files whose MD5
# ltexp checks before reading: let it read them.
export LTEXP_UNVERIFIED_CIFAR=1
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
note() { echo "[gpu_check $((SECONDS - STARTED)) s] $*" | tee -a "$SUMMARY"; }
# archive DIR NAME TRAIN_PER_CLASS: a generated CIFAR-format archive (tests/conftest.py), 100 test images per class
archive() {
  python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'tests')
from conftest import write_cifar_archive
write_cifar_archive(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), 100)" "$@"
}

# --- environment: carried wheels, `python` for MLproject commands, the repository on the path ----
source bench/device_env.sh
FAILED=0

# --- 1. CUDA tests ---------------------------------------------------------------------------------
if [[ " $PARTS " == *" tests "* ]]; then
  t0=$SECONDS
  # -o addopts="": the image may lack pytest-xdist, which pyproject.toml's addopts (-n auto) need.
  # GPU_CHECK_PYTEST_ARGS: e.g. '-k "bf16 or cuda_graphs"' to rerun some tests only.
  eval "timeout 240 python3 -m pytest -q -p no:cacheprovider -o addopts='' -m cuda tests/test_cuda.py \
    ${GPU_CHECK_PYTEST_ARGS:-}" >"$OUT/pytest.log" 2>&1
  rc=$?
  tail -5 "$OUT/pytest.log"
  if [ $rc = 0 ] && ! grep -q "skipped" <(tail -3 "$OUT/pytest.log"); then
    note "tests: PASS ($((SECONDS - t0)) s): $(tail -1 "$OUT/pytest.log")"
  else
    note "tests: FAIL rc=$rc ($((SECONDS - t0)) s): $(tail -1 "$OUT/pytest.log")"; FAILED=1
  fi
fi

# --- 2. mlflow run -e split on a generated CIFAR-100 archive ----------------------------------------
if [[ " $PARTS " == *" mlflow "* ]]; then
  t0=$SECONDS
  rm -rf "$WORK/mlflow" && mkdir -p "$WORK/mlflow"
  archive "$WORK/mlflow/data" cifar100 "${GPU_CHECK_PER_CLASS:-500}" >"$OUT/mlflow_run.log" 2>&1  # 500 / 100 per class
  export MLFLOW_TRACKING_URI="sqlite:///$WORK/mlflow/mlflow.db"
  # GPU_CHECK_MLFLOW_ARGS: extra flags, e.g. "-P model=smallcnn -P device=cpu" to rehearse on a CPU.
  timeout "${GPU_CHECK_MLFLOW_TIMEOUT:-200}" python3 -m mlflow run . -e split --env-manager local -P dataset=cifar100 -P epochs=2 \
    -P data_dir="$WORK/mlflow/data" -P download=false ${GPU_CHECK_MLFLOW_ARGS:-} >>"$OUT/mlflow_run.log" 2>&1
  rc=$?
  python3 - "$OUT/mlflow_run.json" >>"$OUT/mlflow_run.log" 2>&1 <<'PY'
import json, os, sys
import mlflow
runs = mlflow.search_runs(search_all_experiments=True, output_format="list",
                          filter_string="tags.`ltexp.role` = 'experiment'")
run = runs[0]
keys = ("test_acc", "test_head_acc", "test_tail_acc", "test_oracle_acc", "test_routing_acc", "train_time_s",
        "test_time_s", "train_images_per_s")
out = {"status": run.info.status, "device": run.data.tags.get("ltexp.device"), "fusion": run.data.tags.get("ltexp.fusion"),
       "error": run.data.tags.get("ltexp.error"), "epochs": run.data.params.get("epochs"),
       "dataset": run.data.params.get("dataset"), **{k: run.data.metrics.get(k) for k in keys}}
json.dump(out, open(sys.argv[1], "w"), indent=2)
print("RESULT", json.dumps(out))
want = os.environ.get("GPU_CHECK_DEVICE", "cuda")
ok = out["status"] == "FINISHED" and out["device"] == want and out["test_acc"] is not None
sys.exit(0 if ok else 1)
PY
  rc2=$?
  grep "RESULT" "$OUT/mlflow_run.log" | tail -1
  if [ $rc = 0 ] && [ $rc2 = 0 ]; then
    note "mlflow: PASS ($((SECONDS - t0)) s): $(grep RESULT "$OUT/mlflow_run.log" | tail -1 | cut -c8-400)"
  else
    note "mlflow: FAIL rc=$rc/$rc2 ($((SECONDS - t0)) s): $(tail -3 "$OUT/mlflow_run.log" | tr '\n' ' ' | cut -c1-400)"
    FAILED=1
  fi
  unset MLFLOW_TRACKING_URI
fi

# --- 3. the benchmark, with what is left of the budget (less what part 4 needs) ----------------------
if [[ " $PARTS " == *" bench "* ]]; then
  t0=$SECONDS
  reserve=0
  [[ " $PARTS " == *" jobs "* ]] && reserve=$JOBS_RESERVE_S
  left=$((BUDGET_S - (SECONDS - STARTED) - reserve))
  [ $left -lt 150 ] && left=150   # below this even the uncompiled sections do not fit
  # GPU_CHECK_BENCH_ARGS: e.g. "--sections epoch" to rerun some sections only.
  timeout $((left + 90)) python3 bench/gpu.py --budget-s "$left" --out "$OUT/gpu.json" ${GPU_CHECK_BENCH_ARGS:-} \
    >"$OUT/bench.log" 2>&1
  rc=$?
  grep "^\[" "$OUT/bench.log" | tail -40
  if [ $rc = 0 ]; then
    note "bench: PASS ($((SECONDS - t0)) s, budget $left s): $(python3 -c "
import json; r = json.load(open('$OUT/gpu.json')); print(json.dumps(r['targets']))")"
  else
    note "bench: FAIL rc=$rc ($((SECONDS - t0)) s): $(tail -3 "$OUT/bench.log" | tr '\n' ' ' | cut -c1-400)"; FAILED=1
  fi
fi

# --- 4. ltexp tune --jobs 1 vs --jobs N on one device (the time kept for it: JOBS_RESERVE_S) --------
if [[ " $PARTS " == *" jobs "* ]]; then
  t0=$SECONDS
  rm -rf "$WORK/jobs" && mkdir -p "$WORK/jobs"
  archive "$WORK/jobs/data" cifar10 "${GPU_CHECK_JOBS_PER_CLASS:-5000}" >"$OUT/jobs.log" 2>&1
  export MLFLOW_TRACKING_URI="sqlite:///$WORK/jobs/mlflow.db"
  rc=0
  for jobs in 1 ${GPU_CHECK_JOBS_N:-4}; do
    # GPU_CHECK_JOBS_ARGS: e.g. "--model smallcnn --device cpu" to rehearse on a CPU.
    timeout "${GPU_CHECK_JOBS_TIMEOUT:-90}" python3 -m ltexp tune --dataset cifar10 --data-dir "$WORK/jobs/data" \
      --download false --model resnet32 --epochs 2 --lws-epochs 1 --n-trials 4 --pruner none --no-progress \
      --study-name "jobs$jobs" --storage "sqlite:///$WORK/jobs/optuna.db" --model-name "jobs$jobs" --jobs "$jobs" \
      ${GPU_CHECK_JOBS_ARGS:-} >>"$OUT/jobs.log" 2>&1 || rc=$?
  done
  python3 - >>"$OUT/jobs.log" 2>&1 <<'PY'
import json
import mlflow
rows = []
for run in mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string="tags.`ltexp.role` = 'tune'", order_by=["attributes.start_time"]):
    trials = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
    rows.append({"jobs": int(run.data.params["jobs"]), "status": run.info.status, "device": run.data.tags.get("ltexp.device"),
                 "study_wall_s": run.data.metrics.get("study_wall_s"), "trials": len(trials),
                 "processes": len({t.data.tags.get("ltexp.pid") for t in trials}),
                 "trial_s_mean": sum((t.info.end_time - t.info.start_time) / 1000 for t in trials) / max(1, len(trials))})
if len(rows) == 2 and all(r["study_wall_s"] for r in rows):
    # Trials run at once vs one at a time: wall of the study, and trial throughput (trials per
    # second of one job times the jobs; N would mean the device had room for N trials at once).
    rows.append({"jobs_over_one_wall": rows[1]["study_wall_s"] / rows[0]["study_wall_s"],
                 "trial_throughput_gain": rows[1]["jobs"] * rows[0]["trial_s_mean"] / rows[1]["trial_s_mean"]})
print("RESULT", json.dumps(rows))
PY
  grep "RESULT" "$OUT/jobs.log" | tail -1
  if [ $rc = 0 ] && grep -q '"jobs_over_one_wall"' "$OUT/jobs.log"; then
    note "jobs: PASS ($((SECONDS - t0)) s): $(grep RESULT "$OUT/jobs.log" | tail -1 | cut -c8-600)"
  else
    note "jobs: FAIL rc=$rc ($((SECONDS - t0)) s): $(tail -3 "$OUT/jobs.log" | tr '\n' ' ' | cut -c1-400)"; FAILED=1
  fi
  unset MLFLOW_TRACKING_URI
fi

note "done in $((SECONDS - STARTED)) s; $([ $FAILED = 0 ] && echo 'all parts passed' || echo 'SOME PARTS FAILED')"
exit $FAILED
