"""Benchmark: serving a registered ltexp model through a real `mlflow models serve` process.

The script trains a small model on the embedded digits data set in a throw-away MLflow store
(`python -m ltexp train --method split --register-as ltexp-bench-serve`, which registers the
run's pyfunc model with alias `candidate`), starts `mlflow models serve -m
models:/ltexp-bench-serve@candidate --env-manager local -h 127.0.0.1 -p PORT` on a free loopback
port and measures it over HTTP. Nothing listens on anything but 127.0.0.1, and each server (its
whole process group, uvicorn workers included) is always terminated, on Ctrl-C and `kill`
(SIGTERM) too.

Per server configuration it prints:

1. Latency: `--requests` (100) sequential single-image POST /invocations requests over one
   keep-alive `requests.Session`, after `--warmup` (10) untimed ones: p50 / p90 / p99 / mean in
   ms. A request is timed from just before `session.post` to just after `response.json()`; the
   JSON bodies are encoded beforehand. Target: p50 < 20 ms. For diagnosis, also the p50 of GET
   /ping on the keep-alive session and of a single-image request on a new connection each time.
2. Throughput: `--batches` (40) sequential requests of `--batch` (256) images, after 3 untimed
   ones: images/s over the wall time. Target: >= 2,000 images/s. Then the same requests spread
   over `--threads` (2) client threads, each with its own session (0 skips it). The server's CPU
   time per request (its process group, from /proc) is shown too: unlike wall time it barely
   depends on what else runs on the machine.
3. Correctness: the served labels of the 500 digits test images equal those of the in-process
   `mlflow.pyfunc.load_model(...).predict` (OK / MISMATCH).

Server configurations (`--workers`, comma list): `default` runs `mlflow models serve` without
`-w` (MLflow's default: 1 uvicorn worker, unless MLFLOW_MODELS_WORKERS is set; this script unsets
it), a number N adds `-w N`; if the default turns out to be other than 1 worker, `-w 1` is added.
The uvicorn command each server ran (MLflow logs it) is printed. With `--what-if` (default on),
one more server runs MLflow's own scoring app (`mlflow.pyfunc.scoring_server.app`) under uvicorn
with a single difference, `gc.collect(); gc.freeze()` right after the model has loaded: the
effect of freezing the heap in `FusedExpertsModel.load_context` (ltexp/serving.py), which the
garbage-collection numbers below point to. It is a comparison only, not how the product serves.

Once, in this process:

- images/s of the in-process pyfunc `predict` on a 256-image batch, and the size in bytes of a
  256-image JSON request (`{"inputs": images.tolist()}`).
- Where a request's time goes: the median time of each step that the scoring server runs for a
  request, called in-process (MLflow's `scoring_server.invocations`, its JSON parsing
  `_parse_json_data`, the pyfunc `predict`, ltexp's `to_image_batch` and `FusedPredictor.predict`,
  `predictions_to_json`) for 1 and 256 images, plus the garbage collections a 256-image request
  triggers and `invocations` again with the heap frozen (`gc.freeze()`).
- The throughput of the same 256 images sent as base64 PNG (`dataframe_split`, column `image`,
  a request format the model accepts), on the default server.

CPU noise: the load that other processes put on the machine during each measurement is shown
(`others` = busy CPU of the whole machine minus this script and the server, in cores; Linux).
Numbers taken while `others` is well above 0 are unreliable; rerun on a quiet machine.

Run from the repository root (about 1.5 minutes on 2 idle CPU cores, up to about 3.5 when other
processes load them; most of it is training and server start-ups, and the speed of prediction
does not depend on the number of epochs):

    python bench/serve.py                       # split, 10 epochs; servers default, -w 2, what-if
    python bench/serve.py --workers default --no-what-if      # one server only (quicker)
    python bench/serve.py --method baseline --epochs 5 --json

`mlflow` must be on PATH (the venv's bin folder); the script puts its own interpreter's folder
first on PATH for its subprocesses.
"""

from __future__ import annotations

import argparse
import base64
import gc
import io
import json
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "ltexp-bench-serve"
MODEL_URI = f"models:/{MODEL_NAME}@candidate"
LATENCY_TARGET_P50_MS = 20.0
THROUGHPUT_TARGET = 2000.0
THROUGHPUT_WARMUP = 3
NOISY_CORES = 0.5  # outside load (cores) above which the report warns that timings are disturbed
HEADERS = {"Content-Type": "application/json"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Latency and throughput of `mlflow models serve` on an ltexp model.")
    parser.add_argument("--method", default="split", help="ltexp training method (default: split)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
    parser.add_argument("--requests", type=int, default=100, help="timed single-image requests (default: 100)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed single-image requests first (default: 10)")
    parser.add_argument("--batch", type=int, default=256, help="images per throughput request (default: 256)")
    parser.add_argument("--batches", type=int, default=40, help="timed throughput requests (default: 40)")
    parser.add_argument("--threads", type=int, default=2,
                        help="client threads of the concurrent run, 0 = skip (default: 2)")
    parser.add_argument("--workers", default="default,2",
                        help="comma list of server configurations: default (no -w) or a worker count "
                             "(default: default,2)")
    parser.add_argument("--what-if", action=argparse.BooleanOptionalAction, default=True,
                        help="also serve with the heap frozen after model load, for comparison (default: on)")
    parser.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for /ping (default: 120)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line with every number")
    parser.add_argument("--serve-frozen", nargs=2, metavar=("PORT", "MODEL_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.worker_configs = []
    for item in args.workers.split(","):
        item = item.strip()
        if item != "default" and not (item.isdigit() and int(item) > 0):
            parser.error(f"--workers: {item!r} is neither 'default' nor a positive integer")
        if item not in args.worker_configs:
            args.worker_configs.append(item)
    return args


# -- helpers --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def median_time(fn, repeats: int, warmup: int = 2, with_min: bool = False):
    """Median seconds of `fn()` over `repeats` calls after `warmup` untimed calls (and the minimum)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return (statistics.median(times), min(times)) if with_min else statistics.median(times)


def subprocess_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_MODELS_WORKERS", None)  # "default" means the CLI's own default
    return env


# -- CPU accounting (Linux /proc; everything is None elsewhere) ------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_s() -> float | None:
    """Busy CPU seconds of the whole machine since boot (user+nice+system+irq+softirq+steal)."""
    try:
        with open("/proc/stat") as f:
            parts = f.readline().split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in parts[:8])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def group_cpu_s(pgid: int) -> float | None:
    """CPU seconds of the live processes of process group `pgid`."""
    if not os.path.isdir("/proc"):
        return None
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields_ = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields_[2]) == pgid:  # field 5 of stat: pgrp
            total += int(fields_[11]) + int(fields_[12])  # utime, stime
    return total / CLK_TCK


class CpuWindow:
    """CPU time of the server group and of other processes over a `with` block."""

    def __init__(self, server_pgid: int | None):
        self.pgid = server_pgid

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.busy0 = machine_busy_s()
        self.own0 = sum(os.times()[:2])
        self.srv0 = group_cpu_s(self.pgid) if self.pgid else 0.0
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        busy1, own1 = machine_busy_s(), sum(os.times()[:2])
        srv1 = group_cpu_s(self.pgid) if self.pgid else 0.0
        self.server_s = None if self.srv0 is None or srv1 is None else max(srv1 - self.srv0, 0.0)
        if self.busy0 is None or busy1 is None or self.server_s is None:
            self.others_cores = None
        else:
            others = (busy1 - self.busy0) - (own1 - self.own0) - self.server_s
            self.others_cores = max(others, 0.0) / self.wall
        return False


# -- training and the server ----------------------------------------------------------------------

def train(tmp: Path, env: dict, args) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "ltexp", "train", "--method", args.method, "--epochs", str(args.epochs),
           "--no-progress", "--register-as", MODEL_NAME]
    done = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0 or f"registered {MODEL_NAME} version" not in done.stdout:
        raise SystemExit(f"training failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


class Server:
    """A server in its own process group; `close()` ends the whole group.

    config "default" or "N": `mlflow models serve` (with `-w N`); "what-if": this script's
    `--serve-frozen` mode, MLflow's scoring app under uvicorn with the heap frozen after load.
    """

    def __init__(self, tmp: Path, env: dict, config: str, startup_timeout: float, model_dir: str | None = None):
        self.config = config
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{config}-{self.port}.log"
        if config == "what-if":
            cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-frozen", str(self.port), str(model_dir)]
            self.label = "what-if: gc.freeze() after load"
        else:
            cmd = ["mlflow", "models", "serve", "-m", MODEL_URI, "--env-manager", "local", "-h", "127.0.0.1",
                   "-p", str(self.port)]
            if config != "default":
                cmd += ["-w", config]
            self.label = "default" if config == "default" else f"-w {config}"
        self.cli = " ".join(cmd)
        self._log = open(self.log_path, "w")
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        try:
            self._wait_ready(startup_timeout)
        except BaseException:
            self.close()
            raise
        self.startup_s = time.perf_counter() - start

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if requests.get(f"{self.url}/ping", timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            time.sleep(0.25)
        raise RuntimeError(f"server did not answer /ping within {timeout:.0f} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def uvicorn_command(self) -> str:
        if self.config == "what-if":
            return "uvicorn.run(mlflow.pyfunc.scoring_server.app:app) in-process, 1 worker, after gc.freeze()"
        match = re.search(r"Running command '([^']*)'", self.log())
        return match.group(1) if match else "(not logged)"

    def uvicorn_workers(self) -> int | None:
        if self.config == "what-if":
            return 1
        match = re.search(r"--workers (\d+)", self.uvicorn_command())
        return int(match.group(1)) if match else None

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(timeout=10)
            # the CLI process may be gone while uvicorn workers of its group live on
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        finally:
            self._log.close()


def serve_frozen(port: int, model_dir: str) -> None:
    """What-if server: MLflow's scoring app exactly as `mlflow models serve` runs it, heap frozen after load."""
    from mlflow.pyfunc import scoring_server

    os.environ[scoring_server._SERVER_MODEL_PATH] = Path(model_dir).resolve().as_uri()
    import uvicorn
    from mlflow.pyfunc.scoring_server.app import app  # loads the model (load_context) on import

    gc.collect()
    gc.freeze()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- measurements over HTTP -----------------------------------------------------------------------

def payload(images: np.ndarray) -> bytes:
    return json.dumps({"inputs": images.tolist()}).encode()


def png_payload(images: np.ndarray) -> bytes:
    from PIL import Image

    encoded = []
    for img in images:
        buffer = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buffer, format="PNG")
        encoded.append([base64.b64encode(buffer.getvalue()).decode()])
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": encoded}}).encode()


def post(session, url: str, body: bytes) -> list[dict]:
    response = session.post(f"{url}/invocations", data=body, headers=HEADERS, timeout=60)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:1000]}")
    return response.json()["predictions"]


def timed_ms(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def measure_latency(server: Server, images: np.ndarray, warmup: int, n: int) -> dict:
    url = server.url
    bodies = [payload(images[i:i + 1]) for i in range(len(images))]
    with requests.Session() as session:
        for i in range(warmup):
            post(session, url, bodies[i % len(bodies)])
        order = iter(range(warmup, warmup + n))
        with CpuWindow(server.proc.pid) as cpu:
            times = timed_ms(lambda: post(session, url, bodies[next(order) % len(bodies)]), n)
        ping = timed_ms(lambda: session.get(f"{url}/ping", timeout=10).raise_for_status(), 20)
    fresh = timed_ms(lambda: post(requests, url, bodies[0]), 20)  # module-level post: a new connection each
    return {"p50_ms": percentile(times, 50), "p90_ms": percentile(times, 90), "p99_ms": percentile(times, 99),
            "mean_ms": statistics.fmean(times), "min_ms": min(times), "max_ms": max(times), "requests": n,
            "ping_keepalive_p50_ms": percentile(ping, 50), "new_connection_p50_ms": percentile(fresh, 50),
            "server_cpu_ms_per_request": None if cpu.server_s is None else cpu.server_s / n * 1e3,
            "others_cores": cpu.others_cores}


def measure_throughput(server: Server, bodies: list[bytes], batch: int, n: int, threads: int) -> dict:
    """`n` requests of `batch` images spread over `threads` sessions; images/s over the wall time."""
    url = server.url
    per_thread = [list(range(t, n, threads)) for t in range(threads)]
    sessions = [requests.Session() for _ in range(threads)]
    try:
        for session in sessions:
            for i in range(THROUGHPUT_WARMUP):
                post(session, url, bodies[i % len(bodies)])
        errors: list[BaseException] = []
        request_times: list[float] = []
        lock = threading.Lock()
        barrier = threading.Barrier(threads + 1)

        def work(t: int) -> None:
            barrier.wait()
            local = []
            try:
                for i in per_thread[t]:
                    start = time.perf_counter()
                    post(sessions[t], url, bodies[i % len(bodies)])
                    local.append(time.perf_counter() - start)
            except BaseException as exc:  # noqa: BLE001 - re-raised after join
                errors.append(exc)
            with lock:
                request_times.extend(local)

        workers = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads)]
        for w in workers:
            w.start()
        with CpuWindow(server.proc.pid) as cpu:
            barrier.wait()
            for w in workers:
                w.join()
        if errors:
            raise errors[0]
    finally:
        for session in sessions:
            session.close()
    return {"images_per_s": n * batch / cpu.wall, "requests": n, "batch": batch, "threads": threads,
            "wall_s": cpu.wall, "request_p50_ms": percentile([t * 1e3 for t in request_times], 50),
            "server_cpu_ms_per_request": None if cpu.server_s is None else cpu.server_s / n * 1e3,
            "others_cores": cpu.others_cores}


def served_labels(url: str, images: np.ndarray, batch: int) -> list[int]:
    labels = []
    with requests.Session() as session:
        for start in range(0, len(images), batch):
            labels += [p["label"] for p in post(session, url, payload(images[start:start + batch]))]
    return labels


# -- in-process reference and breakdown -----------------------------------------------------------

class GcCounter:
    """Counts garbage collections per generation and the time spent in them (gc.callbacks)."""

    def __init__(self):
        self.counts = [0, 0, 0]
        self.seconds = 0.0
        self._start = 0.0

    def __call__(self, phase, info):
        if phase == "start":
            self.counts[info["generation"]] += 1
            self._start = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._start


def in_process(tmp: Path, test_images: np.ndarray, batch_images: np.ndarray) -> tuple[dict, list[int], str]:
    """Load the registered model in this process; time predict and each step of the server's handler."""
    from io import StringIO

    import mlflow
    import torch
    from mlflow.pyfunc import scoring_server

    from ltexp.predictor import to_image_batch

    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    warnings.filterwarnings("ignore", message=".*type hints.*")
    tracking_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    start = time.perf_counter()
    model = mlflow.pyfunc.load_model(MODEL_URI)
    load_s = time.perf_counter() - start
    model_dir = mlflow.artifacts.download_artifacts(artifact_uri=MODEL_URI, dst_path=str(tmp / "model"),
                                                    tracking_uri=tracking_uri)
    predictor = model.unwrap_python_model().predictor
    input_schema = model.metadata.get_input_schema()
    labels = model.predict(test_images)["label"].tolist()

    def invoke(body):
        result = scoring_server.invocations(body, "application/json", model, input_schema)
        if result.status != 200:
            raise RuntimeError(f"in-process invocations: {result.status} {result.response[:500]}")

    def steps(images: np.ndarray, repeats: int) -> dict:
        """Per step [median ms, min ms]."""
        body = payload(images)
        parsed = scoring_server._parse_json_data(body, model.metadata, input_schema)
        frame = model.predict(parsed.data)

        def timed(fn, n):
            return median_time(fn, n, with_min=True)

        out = {
            "invocations_ms": timed(lambda: invoke(body), repeats),
            "parse_json_data_ms": timed(lambda: scoring_server._parse_json_data(
                body, model.metadata, input_schema), repeats),
            "pyfunc_predict_ms": timed(lambda: model.predict(parsed.data), repeats),
            "to_image_batch_ms": timed(lambda: to_image_batch(parsed.data, predictor.image_shape), repeats),
            "fused_predictor_predict_ms": timed(lambda: predictor.predict(images), repeats),
            "predictions_to_json_ms": timed(lambda: scoring_server.predictions_to_json(frame, StringIO()), repeats),
        }
        return {k: [v[0] * 1e3, v[1] * 1e3] for k, v in out.items()}

    one = test_images[:1]
    with CpuWindow(None) as cpu:
        predict_1_s, predict_1_min = median_time(lambda: model.predict(one), 50, warmup=5, with_min=True)
        predict_batch_s, predict_batch_min = median_time(lambda: model.predict(batch_images), 20, warmup=5,
                                                         with_min=True)
        steps_1, steps_batch = steps(one, 50), steps(batch_images, 10)

    # Garbage collection during 256-image requests, then the same with the heap frozen.
    body = payload(batch_images)
    counter = GcCounter()
    gc.callbacks.append(counter)
    repeats = 15
    try:
        for _ in range(3):
            invoke(body)
        counter.counts, counter.seconds = [0, 0, 0], 0.0
        wall = sum(timed_ms(lambda: invoke(body), repeats))
        gc_info = {"tracked_objects": len(gc.get_objects()), "requests": repeats,
                   "collections_per_request": [c / repeats for c in counter.counts],
                   "gc_ms_per_request": counter.seconds / repeats * 1e3, "invocations_mean_ms": wall / repeats}
        gc.collect()
        gc.freeze()
        try:
            counter.counts, counter.seconds = [0, 0, 0], 0.0
            wall = sum(timed_ms(lambda: invoke(body), repeats))
            gc_info.update(frozen_gc_ms_per_request=counter.seconds / repeats * 1e3,
                           frozen_invocations_mean_ms=wall / repeats,
                           frozen_collections_per_request=[c / repeats for c in counter.counts])
        finally:
            gc.unfreeze()
    finally:
        gc.callbacks.remove(counter)

    result = {
        "load_model_s": load_s,
        "torch_threads": torch.get_num_threads(),
        "pyfunc_predict_1_ms": predict_1_s * 1e3,
        "pyfunc_predict_1_min_ms": predict_1_min * 1e3,
        "pyfunc_predict_batch_images_per_s": len(batch_images) / predict_batch_s,
        "pyfunc_predict_batch_best_images_per_s": len(batch_images) / predict_batch_min,
        "pyfunc_predict_batch_ms": predict_batch_s * 1e3,
        "payload_bytes_batch": len(payload(batch_images)),
        "payload_bytes_batch_png": len(png_payload(batch_images)),
        "payload_bytes_1": len(payload(one)),
        "steps_1": steps_1,
        "steps_batch": steps_batch,
        "gc": gc_info,
        "others_cores": cpu.others_cores,
    }
    return result, labels, model_dir


# -- report ---------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def fmt(value, spec: str, none: str = "n/a") -> str:
    return none if value is None else format(value, spec)


def print_report(r: dict, args) -> None:
    ref = r["in_process"]
    print(f"\nmlflow models serve benchmark: {args.method} model on digits ({args.epochs} epochs, trained in "
          f"{r['train_s']:.0f} s); {r['cpus']} CPUs, Python {r['python']}, mlflow {r['mlflow']}, torch {r['torch']}, "
          f"uvicorn {r['uvicorn']}; load average at start {r['loadavg_start']:.2f}")
    for s in r["servers"]:
        lat, thr = s["latency"], s["throughput"]
        print(f"\nserver `{s['config']}`: {s['cli']}")
        print(f"  uvicorn: {s['uvicorn_command']}")
        print(f"  uvicorn workers: {s['uvicorn_workers']}; torch threads per worker: {r['server_torch_threads']}; "
              f"answering /ping {s['startup_s']:.1f} s after start")
        print(f"  latency, 1 image, {lat['requests']} sequential requests (after {args.warmup} warm-up), keep-alive:")
        print(f"    p50 {lat['p50_ms']:6.2f} ms   p90 {lat['p90_ms']:6.2f} ms   p99 {lat['p99_ms']:6.2f} ms   "
              f"mean {lat['mean_ms']:6.2f} ms   (min {lat['min_ms']:.2f}, max {lat['max_ms']:.2f})")
        print(f"    target p50 < {LATENCY_TARGET_P50_MS:.0f} ms: {verdict(lat['p50_ms'] < LATENCY_TARGET_P50_MS)}"
              f"   [server CPU {fmt(lat['server_cpu_ms_per_request'], '.2f')} ms/request, "
              f"others {fmt(lat['others_cores'], '.2f')} cores]")
        print(f"    GET /ping keep-alive p50 {lat['ping_keepalive_p50_ms']:.2f} ms; 1 image on a new connection "
              f"each p50 {lat['new_connection_p50_ms']:.2f} ms")
        print(f"  throughput, {thr['batch']}-image requests (target >= {THROUGHPUT_TARGET:,.0f} images/s):")
        rows = [thr] + ([s["throughput_concurrent"]] if s.get("throughput_concurrent") else [])
        for t in rows:
            plural = "s" if t["threads"] > 1 else " "
            print(f"    {t['threads']} client thread{plural}: {t['images_per_s']:7.0f} images/s"
                  f"  {verdict(t['images_per_s'] >= THROUGHPUT_TARGET):<13}  ({t['requests']} requests, "
                  f"p50 {t['request_p50_ms']:.1f} ms; server CPU {fmt(t['server_cpu_ms_per_request'], '.1f')} "
                  f"ms/request; others {fmt(t['others_cores'], '.2f')} cores)")
        if s.get("throughput_png"):
            t = s["throughput_png"]
            print(f"    1 client thread, same images as base64 PNG (dataframe_split): "
                  f"{t['images_per_s']:7.0f} images/s "
                  f"({t['requests']} requests, server CPU {fmt(t['server_cpu_ms_per_request'], '.1f')} ms/request; "
                  f"others {fmt(t['others_cores'], '.2f')} cores)")
        print(f"  served labels of {r['test_images']} test images == in-process labels: {s['correctness']}")

    print("\nserver configurations compared (1-image p50 / mean; 256-image throughput):")
    print(f"  {'config':<34} {'workers':>7} {'p50 ms':>8} {'mean ms':>8} {'img/s 1 thr':>12} {'img/s conc':>11}"
          f" {'srv CPU ms/req':>15}")
    for s in r["servers"]:
        conc = s.get("throughput_concurrent")
        print(f"  {s['config']:<34} {str(s['uvicorn_workers']):>7} {s['latency']['p50_ms']:8.2f} "
              f"{s['latency']['mean_ms']:8.2f} {s['throughput']['images_per_s']:12.0f} "
              f"{(format(conc['images_per_s'], '11.0f') if conc else '-'.rjust(11))} "
              f"{fmt(s['throughput']['server_cpu_ms_per_request'], '15.1f', 'n/a'.rjust(15))}")
    print(f"  of the `mlflow models serve` settings: lowest p50 {r['fastest_latency']}; highest 1-thread throughput "
          f"{r['fastest_throughput']}" + (f"; highest concurrent throughput {r['fastest_concurrent']}"
                                          if r["fastest_concurrent"] else ""))

    print(f"\nin-process reference (this process, torch threads {ref['torch_threads']}; other processes used "
          f"{fmt(ref['others_cores'], '.2f')} cores meanwhile):")
    print(f"  mlflow.pyfunc.load_model: {ref['load_model_s']:.2f} s")
    print(f"  pyfunc predict, batch {args.batch}: {ref['pyfunc_predict_batch_images_per_s']:8.0f} images/s "
          f"(median {ref['pyfunc_predict_batch_ms']:.2f} ms per batch; best batch "
          f"{ref['pyfunc_predict_batch_best_images_per_s']:.0f} images/s)")
    print(f"  pyfunc predict, 1 image : {ref['pyfunc_predict_1_ms']:.2f} ms median, "
          f"{ref['pyfunc_predict_1_min_ms']:.2f} ms best")
    print(f"  JSON request size for {args.batch} images: {ref['payload_bytes_batch']:,} bytes "
          f"({ref['payload_bytes_batch'] / args.batch:.0f} per image) as {{\"inputs\": images.tolist()}}, "
          f"{ref['payload_bytes_batch_png']:,} bytes as base64 PNG; 1 image: {ref['payload_bytes_1']} bytes")
    print("\nwhere a request's time goes (median ms of each server-side step, in-process):")
    print("  (median, min in brackets)")
    print(f"  {'step':<40} {'1 image':>17} {f'{args.batch} images':>19}")
    names = [("invocations_ms", "scoring_server.invocations (whole)"),
             ("parse_json_data_ms", "  _parse_json_data (JSON -> ndarray)"),
             ("pyfunc_predict_ms", "  pyfunc predict"),
             ("to_image_batch_ms", "    ltexp to_image_batch"),
             ("fused_predictor_predict_ms", "    FusedPredictor.predict"),
             ("predictions_to_json_ms", "  predictions_to_json")]
    for key, label in names:
        one, many = ref["steps_1"][key], ref["steps_batch"][key]
        print(f"  {label:<40} {one[0]:8.3f} ({one[1]:6.3f}) {many[0]:9.2f} ({many[1]:7.2f})")
    g = ref["gc"]
    print(f"  garbage collection, {args.batch}-image invocations, mean of {g['requests']} "
          f"({g['tracked_objects']:,} objects tracked):")
    print(f"    normal heap : {g['invocations_mean_ms']:7.1f} ms per request, "
          f"of which gc {g['gc_ms_per_request']:6.1f} ms"
          f" (collections per request gen0/1/2: {'/'.join(f'{c:.2f}' for c in g['collections_per_request'])})")
    print(f"    gc.freeze() : {g['frozen_invocations_mean_ms']:7.1f} ms per request, of which gc "
          f"{g['frozen_gc_ms_per_request']:6.1f} ms")
    first = r["servers"][0]
    overhead = first["latency"]["p50_ms"] - ref["steps_1"]["invocations_ms"][1]
    print(f"  HTTP stack + client, 1 image (server `{first['config']}` p50 minus in-process invocations min): "
          + (f"{overhead:.2f} ms" if overhead >= 0 else "n/a (in-process timing disturbed)"))
    if ref["others_cores"] is not None and ref["others_cores"] > NOISY_CORES:
        print(f"  WARNING: other processes used {ref['others_cores']:.2f} cores during the in-process timings; "
              "torch's threads then stall and these numbers overstate the cost (rerun on a quiet machine)")


def run_server(tmp, env, config, args, test_images, bodies, png_bodies, expected, model_dir) -> dict:
    server = Server(tmp, env, config, args.startup_timeout, model_dir)
    try:
        entry = {"config": server.label, "cli": server.cli, "uvicorn_command": server.uvicorn_command(),
                 "uvicorn_workers": server.uvicorn_workers(), "startup_s": server.startup_s}
        entry["latency"] = measure_latency(server, test_images, args.warmup, args.requests)
        entry["throughput"] = measure_throughput(server, bodies, args.batch, args.batches, 1)
        if args.threads > 1:
            entry["throughput_concurrent"] = measure_throughput(server, bodies, args.batch, args.batches, args.threads)
        if png_bodies:
            entry["throughput_png"] = measure_throughput(server, png_bodies, args.batch, max(args.batches // 2, 1), 1)
        got = served_labels(server.url, test_images, args.batch)
        n = len(expected)
        entry["correctness"] = "OK" if got == expected else (
            f"MISMATCH ({sum(a != b for a, b in zip(got, expected))} of {n} differ)"
            if len(got) == n else f"MISMATCH ({len(got)} labels for {n} images)")
    finally:
        server.close()
    return entry


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.serve_frozen:
        serve_frozen(int(args.serve_frozen[0]), args.serve_frozen[1])
        return 0
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the finally blocks stop the server and clean up.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    started = time.perf_counter()
    sys.path.insert(0, str(REPO))
    import mlflow
    import torch
    import uvicorn

    from ltexp.data.sources import load_digits_source

    test_images = load_digits_source().test_images
    n = len(test_images)
    batch_images = np.take(test_images, np.arange(args.batch) % n, axis=0)
    result: dict = {"method": args.method, "epochs": args.epochs, "cpus": os.cpu_count(), "mlflow": mlflow.__version__,
                    "torch": torch.__version__, "uvicorn": uvicorn.__version__, "python": platform.python_version(),
                    "test_images": n, "loadavg_start": os.getloadavg()[0], "servers": [],
                    "server_torch_threads": (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
                                             if os.environ.get("OMP_NUM_THREADS")
                                             else f"torch default ({torch.get_num_threads()} here)")}

    with tempfile.TemporaryDirectory(prefix="ltexp-bench-serve-") as tmp_name:
        tmp = Path(tmp_name)
        env = subprocess_env(tmp)
        result["train_s"] = train(tmp, env, args)
        result["in_process"], expected, model_dir = in_process(tmp, test_images, batch_images)
        count = min(args.batches, 8)
        bodies = [payload(np.take(test_images, np.arange(i * args.batch, (i + 1) * args.batch) % n, axis=0))
                  for i in range(count)]
        png_bodies = [png_payload(np.take(test_images, np.arange(i * args.batch, (i + 1) * args.batch) % n, axis=0))
                      for i in range(count)]
        configs = list(args.worker_configs)
        i = 0
        while i < len(configs):
            config = configs[i]
            i += 1
            entry = run_server(tmp, env, config, args, test_images, bodies, png_bodies if i == 1 else None,
                               expected, model_dir)
            result["servers"].append(entry)
            if config == "default" and entry["uvicorn_workers"] not in (None, 1) and "1" not in configs:
                configs.append("1")
        cli_servers = list(result["servers"])
        if args.what_if:
            result["servers"].append(run_server(tmp, env, "what-if", args, test_images, bodies, None, expected,
                                                model_dir))

    result["fastest_latency"] = min(cli_servers, key=lambda s: s["latency"]["p50_ms"])["config"]
    result["fastest_throughput"] = max(cli_servers, key=lambda s: s["throughput"]["images_per_s"])["config"]
    conc = [s for s in cli_servers if s.get("throughput_concurrent")]
    result["fastest_concurrent"] = (max(conc, key=lambda s: s["throughput_concurrent"]["images_per_s"])["config"]
                                    if conc else None)
    result["targets"] = {"latency_p50_ms": LATENCY_TARGET_P50_MS, "throughput_images_per_s": THROUGHPUT_TARGET}
    result["total_s"] = time.perf_counter() - started
    print_report(result, args)
    print(f"\ntotal {result['total_s']:.0f} s")
    if args.json:
        print(json.dumps(result))
    return 0 if all(s["correctness"] == "OK" for s in result["servers"]) else 1


if __name__ == "__main__":
    sys.exit(main())
