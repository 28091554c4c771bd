"""Tuning throughput through the authenticated team service: 1 worker vs 2 workers, same budget.

Starts the native team stack (deploy/native_stack.py: PostgreSQL, SeaweedFS, MLflow with basic
auth), adds an EDIT user, then runs the same study budget (`--n-trials`, digits) once with one
`ltexp tune` worker and once with two workers started together on a fresh study, and prints the
stack's start time and trials per minute (finished trials / wall time of the whole session).

    python bench/team.py --n-trials 6 --epochs 2 [--auth-cache-ttl 0]

Each worker runs torch with --threads threads (default 1). --auth-cache-ttl overrides the
basic-auth credential cache of deploy/basic_auth.ini (0 = check the password on every request).
"""

from __future__ import annotations

import argparse
import configparser
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "deploy"))
import native_stack  # noqa: E402


def run_session(stack, login, study: str, workers: int, args, root: Path) -> tuple[float, int]:
    """Run `workers` tune processes on one fresh study; return (wall seconds, finished trials)."""
    import optuna

    env = dict(os.environ, MLFLOW_TRACKING_URI=stack.tracking_uri, MLFLOW_TRACKING_USERNAME=login[0],
               MLFLOW_TRACKING_PASSWORD=login[1], OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)
    cmd = [sys.executable, "-m", "ltexp", "tune", "--dataset", "digits", "--n-trials", str(args.n_trials),
           "--epochs", str(args.epochs), "--lws-epochs", "1", "--pruner", "none", "--storage", stack.db_url("optuna"),
           "--study-name", study, "--experiment", "bench-team", "--model-name", f"bench-{study}"]
    started = time.perf_counter()
    procs = []
    for i in range(workers):
        cwd = root / f"{study}-{i}"
        cwd.mkdir()
        procs.append(subprocess.Popen([*cmd, "--seed", str(i)], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    for proc in procs:
        _, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"worker failed: {err[-2000:]}")
    wall = time.perf_counter() - started
    trials = optuna.load_study(study_name=study, storage=stack.db_url("optuna")).get_trials()
    return wall, sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-trials", type=int, default=6, help="study budget (finished trials), both sessions")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--auth-cache-ttl", type=int, default=None,
                        help="override auth_cache_ttl_seconds of deploy/basic_auth.ini (0 = off)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="ltexp-bench-team-"))
    root.chmod(0o755)  # PostgreSQL runs as the postgres user when we are root
    try:
        if args.auth_cache_ttl is not None:
            config = configparser.ConfigParser()
            config.read(REPO / "deploy" / "basic_auth.ini")
            config["mlflow"]["auth_cache_ttl_seconds"] = str(args.auth_cache_ttl)
            with open(root / "basic_auth.ini", "w") as f:
                config.write(f)
            os.environ["MLFLOW_AUTH_CONFIG_TEMPLATE"] = str(root / "basic_auth.ini")
        with native_stack.team_stack(root / "stack") as stack:
            print(f"native stack ready in {stack.start_s['total']:.1f} s (postgres {stack.start_s['postgres']:.1f} s, "
                  f"seaweedfs {stack.start_s['seaweedfs']:.1f} s, mlflow {stack.start_s['mlflow']:.1f} s)")
            login = ("bench", "bench-" + os.urandom(8).hex())
            admin_env = dict(os.environ, MLFLOW_TRACKING_URI=stack.tracking_uri,
                             MLFLOW_TRACKING_USERNAME=stack.admin_username,
                             MLFLOW_TRACKING_PASSWORD=stack.admin_password, NEW_USER_PASSWORD=login[1])
            subprocess.run([sys.executable, str(REPO / "deploy" / "add-user.py"), login[0], "--experiment",
                            "bench-team", "--permission", "EDIT"], env=admin_env, check=True, capture_output=True)
            results = {}
            for workers in (1, 2):
                wall, done = run_session(stack, login, f"w{workers}", workers, args, root)
                results[workers] = (wall, done)
                print(f"{workers} worker(s): {done} trials in {wall:.1f} s = {60 * done / wall:.2f} trials/min")
            speedup = (results[2][1] / results[2][0]) / (results[1][1] / results[1][0])
            print(f"2 workers / 1 worker throughput: {speedup:.2f}x  (auth cache ttl: "
                  f"{args.auth_cache_ttl if args.auth_cache_ttl is not None else 'from deploy/basic_auth.ini'})")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
