"""What a kill costs: a real `ltexp train` is SIGKILLed after its checkpoint at epoch `--kill-at`,
the identical command is run again, and its wall time and test metrics are compared with an
uninterrupted run of the same command (`--no-resume`). One torch thread, a fresh store and cache.

    python bench/resume.py                                    # digits split, 100 epochs, kill at 60
    python bench/resume.py --kill-at 30 -- --method baseline --epochs 50

Arguments after `--` are passed to `ltexp train` (default: `--method split --epochs 100`).
"""

from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-at", type=int, default=60, help="epoch after whose checkpoint the run is killed")
    parser.add_argument("--every", default="10", help="--checkpoint-every of the runs (default: 10 epochs)")
    parser.add_argument("train_args", nargs="*", default=["--method", "split", "--epochs", "100"])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="ltexp-resume-"))
    env = dict(os.environ, OMP_NUM_THREADS="1", LTEXP_CACHE=str(root / "cache"),
               MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    command = [sys.executable, "-m", "ltexp", "train", "--no-progress", "--checkpoint-every", args.every,
               *args.train_args]

    def timed(extra):
        started = time.perf_counter()
        proc = subprocess.run(command + extra, cwd=root, env=env, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return time.perf_counter() - started, proc.stdout

    fresh_s, fresh_out = timed(["--no-resume", "--experiment", "fresh"])

    started = time.perf_counter()
    proc = subprocess.Popen(command + ["--experiment", "resumed"], cwd=root, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen, killed_at = {}, None
    while proc.poll() is None and killed_at is None:
        for path in glob.glob(str(root / "cache" / "checkpoints" / "*.pt")):
            mtime = os.path.getmtime(path)
            if seen.get(path) == mtime:
                continue
            seen[path] = mtime
            try:
                epoch = torch.load(path, map_location="cpu", weights_only=True)["global_epoch"]
            except Exception:  # replaced while reading: look again
                continue
            if epoch >= args.kill_at:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = epoch
                break
        time.sleep(0.002)
    proc.wait()
    killed_s = time.perf_counter() - started
    assert killed_at is not None, "the run finished before the kill"
    resumed_s, resumed_out = timed(["--experiment", "resumed"])

    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])

    def test_metrics(experiment):
        runs = mlflow.search_runs(experiment_names=[experiment], output_format="list",
                                  filter_string="attributes.status = 'FINISHED' and tags.`ltexp.role` = 'experiment'")
        return {k: v for k, v in runs[0].data.metrics.items() if k.startswith("test_") and k != "test_time_s"}

    fresh, resumed = test_metrics("fresh"), test_metrics("resumed")
    print(" ".join(command))
    print(f"fresh run:               {fresh_s:7.1f} s wall")
    print(f"killed after epoch {killed_at:>4}: {killed_s:7.1f} s wall")
    print(f"resumed command:         {resumed_s:7.1f} s wall ({resumed_s / fresh_s:.2f} of the fresh run)")
    print(next(line for line in resumed_out.splitlines() if line.startswith("resuming")))
    print(f"test metrics identical: {fresh == resumed} ({len(fresh)} metrics; test_acc {fresh['test_acc']:.4f} vs "
          f"{resumed['test_acc']:.4f})")


if __name__ == "__main__":
    main()
