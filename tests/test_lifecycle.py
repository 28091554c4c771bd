"""Runs survive being killed: checkpoints and resume, SIGTERM, the sweep of dead runs, store failures.

Real `ltexp train` processes, real signals sent by pid, real sqlite stores and a real HTTP listener
on loopback. Digits, a few epochs: each process spends most of its time importing.
"""

import glob
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from ltexp import lifecycle
from ltexp.config import LossConfig, MethodConfig, OptimConfig, RunConfig
from ltexp.data import build_long_tail
from ltexp.data.device import DeviceImages, build_augment
from ltexp.data.sources import load_digits_source
from ltexp.engine import fit, predict_logits
from ltexp.methods import build_method
from ltexp.models import build_model, channel_stats

TEST_KEYS_IGNORED = {"test_time_s"}  # wall time; every other test metric must match exactly


def _ltexp(args, env, cwd, **kw):
    return subprocess.run([sys.executable, "-m", "ltexp", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=kw.pop("timeout", 600), **kw)


@pytest.fixture
def env(subprocess_env, tmp_path):
    """CLI environment with its own checkpoint cache and one torch thread (bit-identical floats)."""
    return {**subprocess_env, "LTEXP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _runs(uri):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def _test_metrics(run):
    return {k: v for k, v in run.data.metrics.items() if k.startswith("test_") and k not in TEST_KEYS_IGNORED}


def _start(args, env, cwd):
    return subprocess.Popen([sys.executable, "-m", "ltexp", "train", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_mid_training(args, env, cwd, sig):
    """Start `ltexp train args`, send `sig` by pid once it has written a checkpoint (or, when it
    resumes, once it says so), a few epochs later: inside an epoch, not at a boundary."""
    proc = _start(args, env, cwd)
    pattern = os.path.join(env["LTEXP_CACHE"], "checkpoints", "*.pt")
    resuming, first = bool(glob.glob(pattern)), ""
    if resuming:  # wait for "resuming from epoch ..." (printed with flush) rather than the file
        first = proc.stdout.readline()
        assert first.startswith("resuming from epoch"), first
        said = time.time()
        while time.time() < said + 300 and proc.poll() is None and \
                max(os.path.getmtime(p) for p in glob.glob(pattern)) < said:
            time.sleep(0.005)  # until this process has written a checkpoint of its own
    deadline = time.time() + 300
    while not resuming and time.time() < deadline and not glob.glob(pattern) and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, f"training ended before it could be killed: {proc.communicate()[1][-2000:]}"
    time.sleep(0.1)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, first + out, err


def _reference_metrics(args, monkeypatch):
    """The uninterrupted run, in this process (one torch thread, as the CLI runs get)."""
    from ltexp.cli import _sections, build_parser
    from ltexp.config import resolve_config
    from ltexp.experiment import run_experiment

    parsed = build_parser().parse_args(["train", *args, "--no-resume", "--experiment", "reference"])
    cfg = resolve_config(_sections(parsed), seed=parsed.seed, device=parsed.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_experiment(cfg)
    finally:
        torch.set_num_threads(threads)
    return {k: v for k, v in result.metrics.items() if k.startswith("test_") and k not in TEST_KEYS_IGNORED
            and v == v}  # NaN (no many-shot class in digits) is not logged


def test_sigterm_then_sigkill_then_resume_equals_the_uninterrupted_run(env, tmp_path, monkeypatch):
    """A split run (two experts, each with an LWS stage) is stopped by SIGTERM, resumed, killed by
    SIGKILL, and resumed again: its test metrics equal the uninterrupted run's exactly."""
    args = ["--method", "split", "--epochs", "20", "--lws-epochs", "2", "--checkpoint-every", "1", "--no-progress"]
    monkeypatch.setenv("LTEXP_CACHE", env["LTEXP_CACHE"])
    reference = _reference_metrics(args, monkeypatch)
    assert len(reference) >= 12  # acc, head/tail/shots, macro, ece, nll, oracle, routing
    checkpoints = os.path.join(env["LTEXP_CACHE"], "checkpoints", "*.pt")
    assert not glob.glob(checkpoints)  # a finished run keeps none

    code, _, err = _kill_mid_training(args, env, tmp_path, signal.SIGTERM)
    assert code == 143 and "terminated by signal SIGTERM" in err and "Traceback" not in err
    code, out, _ = _kill_mid_training(args, env, tmp_path, signal.SIGKILL)
    assert code == -signal.SIGKILL and out.startswith("resuming from epoch")
    final = _ltexp(["train", *args], env, tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    lines = [line for line in final.stdout.splitlines() if line.startswith("resuming from epoch")]
    assert lines, final.stdout[-2000:]

    runs = [r for r in _runs(env["MLFLOW_TRACKING_URI"])
            if MlflowClient().get_experiment(r.info.experiment_id).name == "ltexp"]
    assert not [r for r in runs if r.info.status == "RUNNING"]  # the SIGKILLed ones were swept
    parents = {r.info.run_id: r for r in runs if r.data.tags["ltexp.role"] == "experiment"}
    assert len(parents) == 3
    last = next(r for r in parents.values() if r.info.status == "FINISHED")
    second = parents[last.data.tags["ltexp.resumed_from"]]
    first = parents[second.data.tags["ltexp.resumed_from"]]
    assert f"of run {second.info.run_id}" in lines[0]
    # Interrupted runs are closed KILLED, say why, and name the run that continued them.
    assert first.info.status == second.info.status == "KILLED"
    assert first.data.tags["ltexp.resumed_by"] == second.info.run_id
    assert second.data.tags["ltexp.resumed_by"] == last.info.run_id
    assert first.data.tags["ltexp.error"].startswith("terminated by signal SIGTERM")
    assert "is gone" in second.data.tags["ltexp.error"]  # closed by the sweep of the final command
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in (first.info.run_id, second.info.run_id)]
    assert children and all(c.info.status in ("KILLED", "FINISHED") for c in children)
    # Bit-identical to the uninterrupted run with the same seed.
    logged = _test_metrics(last)
    assert set(logged) == set(reference), set(logged) ^ set(reference)
    assert logged == pytest.approx(reference, rel=0, abs=1e-7)  # float32 -> float64 in the store
    # The final run's experts carry the whole metric history, the epochs before the kills included.
    for child in (r for r in runs if r.data.tags.get("mlflow.parentRunId") == last.info.run_id):
        steps = [m.step for m in MlflowClient().get_metric_history(child.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, 23)), child.data.tags["ltexp.expert"]
    assert not glob.glob(checkpoints)


def test_no_resume_flag():
    from ltexp.cli import _sections, build_parser
    from ltexp.config import resolve_config

    for flags, expected in (([], True), (["--no-resume"], False), (["--resume", "false"], False)):
        parsed = build_parser().parse_args(["train", *flags])
        assert resolve_config(_sections(parsed)).tracking.resume is expected


def test_fit_resumes_bit_identical_across_a_stage_boundary(tmp_path, monkeypatch):
    """In-process: LWS decoupled has two stages; stop inside the second, resume, compare weights."""
    monkeypatch.setenv("LTEXP_CACHE", str(tmp_path))
    data = build_long_tail(load_digits_source(), "exp", 0.1, "holdout", 20, seed=0)
    cfg = RunConfig(optim=OptimConfig(epochs=4, batch_size=64, lr=0.05, lr_step=2),
                    method=MethodConfig("lws", lws_mode="decoupled", lws_epochs=3), loss=LossConfig(loss="ce"))
    stages = build_method(cfg).stages(data.info)
    train = DeviceImages.from_numpy(data.train_images, data.train_labels, "cpu")
    val = DeviceImages.from_numpy(data.val_images, data.val_labels, "cpu")

    def model():
        torch.manual_seed(0)
        mean, std = channel_stats(data.train_images)
        return build_model("smallcnn", data.image_shape, data.info.num_classes, mean, std)

    def run(m, checkpoint=None, on_epoch=None):
        return fit(m, train, val, stages, data.info, batch_size=64, clip_norm=0.0, augment=build_augment("crop", 8),
                   seed=3, checkpoint=checkpoint, on_epoch=on_epoch)

    reference = model()
    ref = run(reference)

    def stop_at_6(record):
        if record["epoch"] == 6:
            raise KeyboardInterrupt

    ckpt = lifecycle.Checkpointer("k", lifecycle.Every(epochs=1))
    with pytest.raises(KeyboardInterrupt):
        run(model(), ckpt, stop_at_6)
    seen = []
    resumed_model = model()
    ckpt = lifecycle.Checkpointer("k", lifecycle.Every(epochs=1))
    result = run(resumed_model, ckpt, seen.append)
    assert ckpt.resumed_epoch == 5  # epoch 6 was interrupted before its checkpoint
    assert [r["epoch"] for r in seen] == list(range(1, 8))  # the first 5 replayed, then 6 and 7
    assert result.best_epoch == ref.best_epoch and result.best_val_acc == ref.best_val_acc
    assert [h["val_acc"] for h in result.history] == [h["val_acc"] for h in ref.history]
    assert torch.equal(predict_logits(resumed_model, val.images), predict_logits(reference, val.images))
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed_model.state_dict()[key]), key
    # The run completed: its final state is kept (until the experiment clears it) and resumes as done.
    seen.clear()
    again = model()
    run(again, lifecycle.Checkpointer("k", lifecycle.Every(epochs=1)), seen.append)
    assert len(seen) == 7 and torch.equal(predict_logits(again, val.images), predict_logits(reference, val.images))
    # resume=False (--no-resume) ignores the checkpoint and trains from epoch 1.
    seen.clear()
    ckpt = lifecycle.Checkpointer("k", lifecycle.Every(epochs=1), resume=False)
    run(model(), ckpt, seen.append)
    assert ckpt.resumed_epoch == 0 and [r["epoch"] for r in seen] == list(range(1, 8))


def test_a_cadence_decides_once_per_epoch():
    cadence = lifecycle.Cadence(lifecycle.Every(epochs=2))
    assert [cadence.due(e) for e in (1, 2, 3, 4)] == [False, True, False, True]
    timed = lifecycle.Cadence(lifecycle.Every(seconds=0.2))
    assert not timed.due(1)
    time.sleep(0.25)
    assert timed.due(2) and timed.due(2) and not timed.due(3)  # one decision per epoch, shared by experts


# --------------------------------------------------------------------------------------------
# The sweep


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_closes_runs_whose_process_is_gone(env, tmp_path, mlflow_store):
    client = MlflowClient()
    experiment = client.create_experiment("sweep")
    host = socket.gethostname()
    now = time.time()
    runs = {
        "dead_here": {"ltexp.host": host, "ltexp.pid": str(_dead_pid()), "ltexp.heartbeat": f"{now:.0f}"},
        "alive_here": {"ltexp.host": host, "ltexp.pid": str(os.getpid()), "ltexp.heartbeat": f"{now - 3600:.0f}"},
        "silent_elsewhere": {"ltexp.host": "other-host", "ltexp.pid": "1", "ltexp.heartbeat": f"{now - 120:.0f}"},
        "fresh_elsewhere": {"ltexp.host": "other-host", "ltexp.pid": "1", "ltexp.heartbeat": f"{now:.0f}"},
        "not_ltexp": {},
    }
    ids = {name: client.create_run(experiment, run_name=name, tags=tags).info.run_id for name, tags in runs.items()}
    proc = _ltexp(["runs", "sweep", "--older-than", "60s"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    status = {name: client.get_run(run_id).info.status for name, run_id in ids.items()}
    assert status == {"dead_here": "KILLED", "alive_here": "RUNNING", "silent_elsewhere": "KILLED",
                      "fresh_elsewhere": "RUNNING", "not_ltexp": "RUNNING"}
    assert "is gone" in client.get_run(ids["dead_here"]).data.tags["ltexp.error"]
    assert "no heartbeat from other-host" in client.get_run(ids["silent_elsewhere"]).data.tags["ltexp.error"]
    assert ids["dead_here"] in proc.stdout and ids["silent_elsewhere"] in proc.stdout
    assert "2 stale run(s) closed" in proc.stdout


def test_train_sweeps_its_experiment_on_start(env, tmp_path, mlflow_store):
    client = MlflowClient()
    experiment = client.create_experiment("ltexp")
    stale = client.create_run(experiment, tags={"ltexp.host": socket.gethostname(), "ltexp.pid": str(_dead_pid())})
    proc = _ltexp(["train", "--epochs", "1", "--no-progress"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"closed stale run {stale.info.run_id}" in proc.stderr
    assert client.get_run(stale.info.run_id).info.status == "KILLED"
    fresh = [r for r in _runs(env["MLFLOW_TRACKING_URI"]) if r.info.run_id != stale.info.run_id]
    assert fresh[0].data.tags["ltexp.pid"] and fresh[0].data.tags["ltexp.host"] == socket.gethostname()
    assert float(fresh[0].data.tags["ltexp.heartbeat"]) > time.time() - 600


# --------------------------------------------------------------------------------------------
# Store failures: one line, before any training


def test_two_first_runs_on_a_fresh_sqlite_store_both_succeed(env, tmp_path):
    env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh.db'}"}
    procs = [subprocess.Popen([sys.executable, "-m", "ltexp", "train", "--epochs", "1", "--no-progress"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert [code for code, _ in results] == [0, 0], [err[-2000:] for _, err in results]
    assert len([r for r in _runs(env["MLFLOW_TRACKING_URI"]) if r.info.status == "FINISHED"]) == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _one_error_line(proc):
    assert proc.returncode != 0
    # MLflow's own INFO lines (store creation) may precede it; ltexp says one thing.
    lines = [line for line in proc.stderr.splitlines() if line.strip() and " INFO mlflow" not in line]
    assert len(lines) == 1 and lines[0].startswith("ltexp: error: "), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_unreachable_tracking_server_fails_fast(env, tmp_path):
    """With the probe's own settings (one retry, short timeout: tracking.PROBE_ENV), not MLflow's
    seven retries; how long that takes is a benchmark's business, not a test's."""
    from ltexp.tracking import PROBE_ENV

    assert int(PROBE_ENV["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) <= 1
    uri = f"http://127.0.0.1:{_free_port()}"
    proc = _ltexp(["train", "--epochs", "1", "--no-progress"], {**env, "MLFLOW_TRACKING_URI": uri}, tmp_path)
    line = _one_error_line(proc)
    assert f"tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable" in line


def _start_tracking_server(root, port, env):
    """A real `mlflow server` on loopback (its sqlite store and artifacts under `root`), in a process
    group of its own so that `_kill_tracking_server` ends its uvicorn worker too."""
    import urllib.request

    with open(root / "server.log", "a") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                   f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts"),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 180
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
            return server
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                _kill_tracking_server(server)
                pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-3000:]}")
            time.sleep(0.2)


def _kill_tracking_server(server):
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


def test_tracking_server_dying_mid_run_ends_it_in_one_line_and_the_same_command_resumes(env, tmp_path):
    import re

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {**env, "MLFLOW_TRACKING_URI": uri}
    args = ["--epochs", "200", "--checkpoint-every", "1", "--no-progress"]
    checkpoints = os.path.join(env["LTEXP_CACHE"], "checkpoints", "*.pt")
    (tmp_path / "server").mkdir()
    server = _start_tracking_server(tmp_path / "server", port, env)
    try:
        proc = _start(args, env, tmp_path)
        deadline = time.time() + 300
        while time.time() < deadline and not glob.glob(checkpoints) and proc.poll() is None:
            time.sleep(0.05)  # until an epoch is trained and logged
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        _kill_tracking_server(server)
        out, err = proc.communicate(timeout=600)
        line = _one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        assert proc.returncode == 2
        found = re.fullmatch(
            rf"ltexp: error: tracking server {re.escape(uri)} stopped answering during epoch (\d+): "
            r"\[Errno \d+\] Connection refused \(writing the metrics of epoch \1 of run (\w+)\); the checkpoint of "
            r"epoch (\d+) is kept, run the same command again once it is back to resume; run \2 stays RUNNING "
            r"\(it cannot be marked FAILED while the server is down; the resumed run or `ltexp runs sweep` closes it\)",
            line)
        assert found, line
        failed_at, first, kept = int(found.group(1)), found.group(2), int(found.group(3))
        assert 1 <= failed_at <= kept < 200 and glob.glob(checkpoints)

        server = _start_tracking_server(tmp_path / "server", port, env)  # back, with the same store
        final = _ltexp(["train", *args], env, tmp_path)
        assert final.returncode == 0, final.stderr[-3000:]
        assert f"resuming from epoch {kept} of run {first}" in final.stdout
        client = MlflowClient(uri)
        old = client.get_run(first)
        assert old.info.status == "KILLED"  # closed by the second command (its sweep, then the link)
        new = client.get_run(old.data.tags["ltexp.resumed_by"])
        assert new.info.status == "FINISHED" and new.data.tags["ltexp.resumed_from"] == first
        # The epochs the dead server never got are in the resumed run: the whole curve, then the shipped model's.
        assert [m.step for m in client.get_metric_history(new.info.run_id, "val_acc")] == list(range(1, 202))
        assert not glob.glob(checkpoints)
    finally:
        _kill_tracking_server(server)


class _Refuse(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."}')

    do_POST = do_GET

    def log_message(self, *args):
        pass


def test_unauthenticated_server_names_the_credential_variables(env, tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        proc = _ltexp(["train", "--epochs", "1", "--no-progress"], {**env, "MLFLOW_TRACKING_URI": uri}, tmp_path)
    finally:
        server.shutdown()
    line = _one_error_line(proc)
    assert f"tracking server {uri} refused access (HTTP 401)" in line
    assert "MLFLOW_TRACKING_USERNAME" in line and "MLFLOW_TRACKING_TOKEN" in line


def test_unsupported_scheme_is_one_line(env, tmp_path):
    proc = _ltexp(["train", "--epochs", "1"], {**env, "MLFLOW_TRACKING_URI": "ftp://example/store"}, tmp_path)
    assert "unsupported tracking URI 'ftp://example/store'" in _one_error_line(proc)


def _text_file(tmp_path):
    (tmp_path / "notes.txt").write_text("not a database\n")
    return f"sqlite:///{tmp_path / 'notes.txt'}", ["is not usable: sqlite says 'file is not a database'",
                                                   "it starts with b'not a database\\n'"]


def _folder(tmp_path):
    (tmp_path / "stores").mkdir()
    return f"sqlite:///{tmp_path / 'stores'}", [f"{tmp_path / 'stores'} is a folder, not an SQLite file",
                                                f"sqlite:///{tmp_path / 'stores' / 'mlflow.db'}"]


def _postgres_down(tmp_path):
    port = _free_port()  # nothing listens there
    return f"postgresql+psycopg://ltexp:s3cret@127.0.0.1:{port}/mlflow", [
        f"tracking store postgresql+psycopg://ltexp:***@127.0.0.1:{port}/mlflow (MLFLOW_TRACKING_URI): cannot connect",
        "Connection refused"]


@pytest.mark.parametrize("store", [_text_file, _folder, _postgres_down])
def test_a_store_that_cannot_open_fails_at_once_without_mlflows_retries(env, tmp_path, store):
    uri, fragments = store(tmp_path)
    proc = _ltexp(["train", "--epochs", "1", "--no-progress"], {**env, "MLFLOW_TRACKING_URI": uri}, tmp_path)
    line = _one_error_line(proc)  # also: no "SQLAlchemy engine could not be created ... retried" warnings
    assert proc.returncode == 2
    assert all(fragment in line for fragment in fragments), line
    assert "s3cret" not in proc.stderr and "retried" not in proc.stderr


def _ltexp_without_root_powers(args, env, cwd):
    """`ltexp args`, where root drops the capabilities that let it ignore file modes."""
    if os.getuid() != 0:
        return _ltexp(args, env, cwd)
    if not shutil.which("setpriv"):
        pytest.skip("running as root without util-linux setpriv: file modes cannot be enforced")
    return subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--",
                           sys.executable, "-m", "ltexp", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_read_only_store_file_and_folder(env, tmp_path):
    shared = tmp_path / "ro"
    shared.mkdir()
    try:
        store = shared / "mlflow.db"
        proc = _ltexp(["runs", "sweep"], {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}"}, shared)
        assert proc.returncode == 0, proc.stderr[-2000:]  # creates the store
        os.chmod(store, 0o444)
        child_env = {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "HOME": str(shared),
                     "LTEXP_CACHE": str(shared / "cache")}
        proc = _ltexp_without_root_powers(["train", "--epochs", "1", "--no-progress"], child_env, shared)
        line = _one_error_line(proc)
        assert f"tracking store sqlite:///{store}" in line and "read-only" in line
        fresh = shared / "sub" / "new.db"
        fresh.parent.mkdir(mode=0o555)
        proc = _ltexp_without_root_powers(["train", "--epochs", "1", "--no-progress"],
                                          {**child_env, "MLFLOW_TRACKING_URI": f"sqlite:///{fresh}"}, shared)
        assert "cannot be created: folder" in _one_error_line(proc)
    finally:
        os.chmod(shared / "sub", 0o755)  # let pytest clean up


# --------------------------------------------------------------------------------------------
# Inputs rejected before work


@pytest.mark.parametrize("args,fragment", [
    (["--register-as", "bad/name"], "--register-as 'bad/name' is not a valid registered-model name"),
    (["--device", "mps"], "--device mps asked for, but torch sees no Apple MPS device"),
    (["--method", "split", "--num-groups", "20"], "--num-groups 20 is more than the 10 classes"),
])
def test_bad_input_is_one_line_before_training(env, tmp_path, args, fragment):
    proc = _ltexp(["train", "--epochs", "1", "--no-progress", *args], env, tmp_path)
    assert fragment in _one_error_line(proc)
    # Nothing trained: no run finished, and a run that was opened says why it failed.
    for run in _runs(env["MLFLOW_TRACKING_URI"]):
        assert run.info.status == "FAILED" and fragment in run.data.tags["ltexp.error"]


def test_unwritable_ltexp_cache_is_one_line_before_training(env, tmp_path):
    # Under a regular file: unwritable even for root (tests may run as root, where chmod is no bar).
    (tmp_path / "a-file").write_text("not a folder")
    cache = tmp_path / "a-file" / "cache"
    proc = _ltexp(["train", "--epochs", "1", "--no-progress"], {**env, "LTEXP_CACHE": str(cache)}, tmp_path)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert line == (f"ltexp: error: LTEXP_CACHE={cache} is not a writable directory: cannot write "
                    f"{cache / 'checkpoints'} (Not a directory); point LTEXP_CACHE at one")
    (run,) = _runs(env["MLFLOW_TRACKING_URI"])
    assert run.info.status == "FAILED" and "LTEXP_CACHE=" in run.data.tags["ltexp.error"]
    assert "val_acc" not in run.data.metrics  # refused before the first epoch, not after training


def test_registry_names_mlflow_refuses():
    from ltexp import LtexpError, tracking

    tracking.validate_registered_name("ltexp-digits", "candidate")
    for name, alias, match in (("bad/name", "", "Names cannot contain"), ("a:b", "", "Names cannot contain"),
                               ("ok", "v3", "--alias 'v3' is reserved"), ("ok", "latest", "reserved"),
                               ("ok", "bad alias!", "--alias 'bad alias!' is not a valid alias")):
        with pytest.raises(LtexpError, match=match):
            tracking.validate_registered_name(name, alias)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_tampered_cifar_file_is_never_unpickled(env, tmp_path):
    import pickle

    from conftest import write_cifar_archive

    folder = write_cifar_archive(tmp_path / "cifar", "cifar10", 20, 5)
    with open(folder / "data_batch_1", "wb") as fh:
        pickle.dump({"data": _Exploit(), "labels": []}, fh, protocol=2)
    strict = {k: v for k, v in env.items() if k != "LTEXP_UNVERIFIED_CIFAR"}
    proc = _ltexp(["data", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar")], strict, tmp_path)
    line = _one_error_line(proc)
    assert "data_batch_1 is not the published CIFAR file (MD5" in line and "it was not loaded" in line
    # Even when unverified files are allowed, the loader builds arrays only: no code runs.
    proc = _ltexp(["data", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar")],
                  {**env, "LTEXP_UNVERIFIED_CIFAR": "1"}, tmp_path)
    assert "refusing to load posix.system" in _one_error_line(proc)
    assert not (tmp_path / "pwned").exists()


def test_sweep_closes_a_run_whose_mlflow_run_environment_never_started_ltexp(env, tmp_path, mlflow_store):
    from conftest import REPO

    # No conda here (MLFLOW_CONDA_HOME points nowhere): `mlflow run` without --env-manager local
    # opens the run, then fails setting up the project's conda environment.
    failed = subprocess.run([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "baseline"],
                            env={**env, "MLFLOW_CONDA_HOME": str(tmp_path / "no-conda")}, cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode != 0
    (left,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert left.info.status == "RUNNING" and "ltexp.pid" not in left.data.tags  # what MLflow leaves behind
    time.sleep(1.1)  # older than the 1 s limit below, measured from the run's start
    proc = _ltexp(["runs", "sweep", "--older-than", "1s"], env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    closed = MlflowClient().get_run(left.info.run_id)
    assert closed.info.status == "KILLED"
    assert "`mlflow run` of entry point 'baseline' never started ltexp" in closed.data.tags["ltexp.error"]
    assert left.info.run_id in proc.stdout


def _ended(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie that its new parent has not reaped yet counts)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_sigterm_to_mlflow_run_alone_ends_its_training_child_and_the_run_killed(env, tmp_path, mlflow_store):
    """Kubernetes and Slurm signal the top `mlflow run` process only: ltexp, its child, must end too."""
    from conftest import REPO

    log = tmp_path / "mlflow-run.log"
    with open(log, "w") as err:
        launcher = subprocess.Popen([sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "baseline",
                                     "--env-manager", "local", "-P", "epochs=400", "-P", "checkpoint_every=1"],
                                    env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=err)
    trainer = None
    try:
        checkpoints = os.path.join(env["LTEXP_CACHE"], "checkpoints", "*.pt")
        deadline = time.time() + 300
        while time.time() < deadline and not glob.glob(checkpoints) and launcher.poll() is None:
            time.sleep(0.05)  # until ltexp has trained an epoch
        assert launcher.poll() is None, log.read_text()[-3000:]
        (run,) = _runs(mlflow_store)
        trainer = int(run.data.tags["ltexp.pid"])
        assert run.info.status == "RUNNING" and trainer != launcher.pid and not _ended(trainer)

        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=120) == -signal.SIGTERM  # `mlflow run` has no handler: it ends at once
        while time.time() < deadline and not _ended(trainer):
            time.sleep(0.05)
        assert _ended(trainer), "ltexp kept training after `mlflow run` was terminated"
        ended = MlflowClient().get_run(run.info.run_id)
        assert ended.info.status == "KILLED"
        assert ended.data.tags["ltexp.error"] == (f"terminated by signal SIGTERM (pid {trainer}): the `mlflow run` "
                                                  f"process {launcher.pid} that started it has ended")
        assert glob.glob(checkpoints)  # kept: the same command resumes
    finally:
        if launcher.poll() is None:
            launcher.kill()
        if trainer is not None and not _ended(trainer):
            os.kill(trainer, signal.SIGKILL)


def test_a_grid_helper_whose_command_died_while_it_started_ends_before_training(env, tmp_path, mlflow_store):
    """`ltexp grid --jobs N` killed while a helper is still importing: the kernel cannot tell that
    helper (it had not asked yet) and init adopts it; it sees its parent is not the command that
    named itself in LTEXP_PARENT_PID and ends with the reason instead of training on alone."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that is certainly not the helper's parent
    helper = subprocess.Popen([sys.executable, "-m", "ltexp", "train", "--epochs", "400", "--no-progress"],
                              env={**env, "LTEXP_PARENT_PID": str(gone.pid)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = helper.communicate(timeout=300)
    assert helper.returncode == 143, err[-3000:]
    assert err.strip().splitlines()[-1] == (f"ltexp: terminated by signal SIGTERM (pid {helper.pid}): the "
                                            f"`ltexp grid --jobs` process {gone.pid} that started it has ended")
    assert _runs(mlflow_store) == []  # it ended before starting a run
