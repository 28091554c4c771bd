# Sourced by the device-call scripts (bench/gpu_check.sh, bench/field.sh) from the repository root:
# installs the carried wheels (.whl/, made by bench/fetch_gpu_wheels.sh) that the GPU image lacks
# into /tmp/site, puts the repository and that folder on the paths, provides `python` (MLproject
# commands call it) and writes $OUT/env.txt (GPU, Python, torch, MLflow, Optuna versions).
# Needs: OUT, WORK, and a function `note` that logs one line.
if ! python3 -c "import mlflow, optuna" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    note "FAIL: mlflow/optuna missing and no .whl/ (run bench/fetch_gpu_wheels.sh, carry .whl)"; exit 1
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { note "FAIL: wheel install"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="/tmp/site/bin:$PATH"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! command -v python >/dev/null; then  # MLproject commands call `python`
  mkdir -p "$WORK/bin" && ln -sf "$(command -v python3)" "$WORK/bin/python" && export PATH="$WORK/bin:$PATH"
fi
{
  nvidia-smi 2>&1 | head -20
  python3 -c "import sys, torch, mlflow, optuna; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '-', 'mlflow', mlflow.__version__, 'optuna', optuna.__version__)"
} >"$OUT/env.txt" 2>&1
note "environment: $(tail -1 "$OUT/env.txt")"
