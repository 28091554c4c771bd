"""`--expert-concurrency`: a split's experts trained at once, one thread each; results in order,
torch's threads shared, a failure or an interruption stopping every expert, real runs that overlap."""

import _thread
import os
import signal
import subprocess
import sys
import threading
import time

import mlflow
import pytest
import torch

from ltexp import LtexpError, concurrency
from ltexp.concurrency import between_steps, resolve, run_at_once
from ltexp.config import resolve_config
from ltexp.experiment import run_experiment

CPU = torch.device("cpu")


def test_resolve_the_way():
    assert resolve("threads", experts=2) == "threads"
    assert resolve("threads", experts=1) == "sequential"  # one model: nothing trains beside it
    assert resolve("sequential", experts=4) == "sequential"
    with pytest.raises(LtexpError, match="unknown --expert-concurrency 'both': allowed are sequential, threads"):
        resolve("both", experts=2)


def test_bad_value_is_one_clear_line():
    with pytest.raises(LtexpError, match="unknown --expert-concurrency 'parallel'"):
        resolve_config({"method": {"method": "split"}, "split": {"expert_concurrency": "parallel"}})


def test_compile_with_threads_is_refused():
    """torch.compile and CUDA-graph trees are per process, not made for two threads at once."""
    with pytest.raises(LtexpError, match="--compile reduce-overhead needs --expert-concurrency sequential, not threads"):
        resolve_config({"method": {"method": "split"}, "optim": {"compile": "reduce-overhead"},
                        "split": {"expert_concurrency": "threads"}})
    with pytest.raises(LtexpError, match="unknown --compile 'fast': allowed are none, default, reduce-overhead"):
        resolve_config({"optim": {"compile": "fast"}})


def _steps(seconds: float, record: list | None = None):
    """A task that takes `seconds` in steps of 10 ms (sleep releases the GIL, like torch's ops),
    calling `between_steps` as the engine does, and returns the threads it had at each step.
    `record`, when given, is the list those thread counts go to as they happen (so a task that
    was stopped still shows how far it got)."""
    def task():
        seen = [] if record is None else record
        for _ in range(int(seconds / 0.01)):
            between_steps()
            seen.append(torch.get_num_threads())
            time.sleep(0.01)
        return seen
    return task


def test_tasks_run_at_once_in_order_and_share_the_threads_then_give_them_back():
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        short, long = run_at_once([_steps(0.3), _steps(0.9)], CPU, ["tail", "head"])
        assert set(short) == {2}             # 4 threads shared by 2 experts: both ran at once
        assert long[0] == 2 and long[-1] == 4  # the head expert takes every thread once the tail ends
        assert torch.get_num_threads() == 4   # given back
    finally:
        torch.set_num_threads(threads)


def test_a_failing_expert_stops_the_others_and_its_error_is_raised():
    def fails():
        time.sleep(0.05)
        raise ValueError("loss is nan")

    head_steps = []
    with pytest.raises(ValueError, match="loss is nan"):
        run_at_once([_steps(30.0, head_steps), fails], CPU, ["head", "tail"])
    assert len(head_steps) < 3000  # the head expert stopped long before its 3,000 steps
    assert concurrency._stop is None and concurrency._share == 0


@pytest.fixture
def python_ctrl_c():
    """Python's own Ctrl-C handler, whatever this process inherited: a test run started in the
    background by a shell without job control inherits SIGINT ignored, and `_thread.interrupt_main`
    then does nothing (seen: "DID NOT RAISE KeyboardInterrupt" in such a run)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_an_interruption_of_the_main_thread_reaches_every_expert(python_ctrl_c):
    stopped = []

    def interrupts_main():
        time.sleep(0.1)
        _thread.interrupt_main()  # what Ctrl-C does: KeyboardInterrupt in the main thread
        return _steps(30.0)()

    def watched(task):
        def run():
            try:
                return task()
            except KeyboardInterrupt:
                stopped.append(threading.current_thread().name)
                raise
        return run

    head_steps = []
    with pytest.raises(KeyboardInterrupt):
        run_at_once([watched(_steps(30.0, head_steps)), watched(interrupts_main)], CPU, ["head", "tail"])
    assert len(head_steps) < 3000  # stopped, not run to its end
    assert sorted(stopped) == ["ltexp-expert-head", "ltexp-expert-tail"]


def _children(parent_id):
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


def test_split_experts_train_at_once_reproducibly(mlflow_store):
    cfg = resolve_config({"optim": {"epochs": 40}, "method": {"method": "split", "lws_epochs": 2},
                          "split": {"expert_concurrency": "threads"}})
    first, again = run_experiment(cfg), run_experiment(cfg)
    sequential = run_experiment(resolve_config({"optim": {"epochs": 40}, "method": {"method": "split", "lws_epochs": 2},
                                                "split": {"expert_concurrency": "sequential"}}))
    runs = {r.info.run_id: r for r in mlflow.search_runs(search_all_experiments=True, output_format="list")}
    assert runs[first.run_id].data.tags["ltexp.expert_concurrency"] == "threads"
    assert runs[first.run_id].data.params["expert_concurrency"] == "threads"
    assert runs[sequential.run_id].data.tags["ltexp.expert_concurrency"] == "sequential"
    head, tail = sorted(_children(first.run_id), key=lambda r: r.data.tags["ltexp.expert"])
    assert head.info.status == tail.info.status == "FINISHED"
    # At once: the experts' runs overlap in time; one after the other, they do not.
    assert head.info.start_time < tail.info.end_time and tail.info.start_time < head.info.end_time
    a, b = sorted(_children(sequential.run_id), key=lambda r: r.info.start_time)
    assert a.info.end_time <= b.info.start_time
    # Every epoch of both experts reached its run (logged from two threads at once).
    for child in (head, tail):
        steps = [m.step for m in mlflow.tracking.MlflowClient().get_metric_history(child.info.run_id, "val_acc")]
        assert sorted(steps) == list(range(1, 43))
    # The same images, order and initial weights either way: the metrics agree up to rounding (the
    # head expert takes the tail's thread at a step that depends on timing).
    tests = {k: v for k, v in first.metrics.items() if k.startswith("test_") and k != "test_time_s" and v == v}
    assert len(tests) >= 12
    assert {k: again.metrics[k] for k in tests} == pytest.approx(tests, abs=2e-3)
    assert {k: sequential.metrics[k] for k in tests} == pytest.approx(tests, abs=2e-2)


def test_sigterm_ends_every_expert_training_at_once(subprocess_env, tmp_path):
    cmd = [sys.executable, "-m", "ltexp", "train", "--method", "split", "--epochs", "300", "--expert-concurrency",
           "threads", "--checkpoint-every", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env={**subprocess_env, "LTEXP_CACHE": str(tmp_path / "cache")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    mlflow.set_tracking_uri(subprocess_env["MLFLOW_TRACKING_URI"])
    deadline, training = time.time() + 300, []
    checkpoints = tmp_path / "cache" / "checkpoints"
    while time.time() < deadline and proc.poll() is None and (len(training) < 2 or len(list(checkpoints.glob("*.pt"))) < 2):
        time.sleep(0.5)
        try:
            training = [r for r in mlflow.search_runs(search_all_experiments=True, output_format="list",
                                                      filter_string="tags.`ltexp.role` = 'expert'")
                        if r.data.metrics.get("val_acc") is not None]
        except Exception:  # the store's tables are not made yet
            continue
    assert len(training) == 2, proc.stderr.read()[-3000:] if proc.poll() is not None else training
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = proc.stderr.read()
    assert "Traceback" not in err and "terminated by signal SIGTERM" in err, err[-3000:]
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert runs and {r.info.status for r in runs} == {"KILLED"}  # the experiment run and both experts
    assert all(r.data.tags["ltexp.error"].startswith("terminated by signal SIGTERM") for r in runs)
    # Both experts keep their checkpoints: the same command continues them.
    assert len(list(checkpoints.glob("*.pt"))) == 2
    # ... and the same command continues both, at once, to the end.
    again = subprocess.run(cmd, cwd=tmp_path, env={**subprocess_env, "LTEXP_CACHE": str(tmp_path / "cache")},
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("resuming from epoch") == 2, again.stdout[-2000:]
    last = mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string="attributes.status = 'FINISHED'")
    assert len(last) == 3 and {r.data.tags.get("ltexp.expert_concurrency") for r in last} >= {"threads"}
