"""Torch's thread count follows the CPUs the process really has, and can be split between workers."""

import os
import subprocess
import sys

import pytest
import torch

from ltexp import LtexpError, cli, threads


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("LTEXP_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_precedence_flag_env_omp_cpus(clean_env):
    clean_env.setattr(threads, "available_cpus", lambda: 6)
    clean_env.setattr(threads, "busy_cpus", lambda: 0)
    assert threads.resolve_threads() == (6, "available CPUs")
    clean_env.setenv("OMP_NUM_THREADS", "3,2")  # nested OpenMP levels: the first is torch's
    assert threads.resolve_threads() == (3, "OMP_NUM_THREADS")
    clean_env.setenv("LTEXP_THREADS", "2")
    assert threads.resolve_threads() == (2, "LTEXP_THREADS")
    assert threads.resolve_threads(1) == (1, "--threads")


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_bad_counts_are_one_line_errors(clean_env, value):
    clean_env.setenv("LTEXP_THREADS", value)
    with pytest.raises(LtexpError, match=f"LTEXP_THREADS '{value}' is not a positive integer"):
        threads.resolve_threads()


def test_affinity_and_cgroup_quota(clean_env, tmp_path):
    clean_env.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    quota = tmp_path / "cpu.max"
    clean_env.setattr(threads, "CGROUP_CPU_MAX", quota)
    assert threads.available_cpus() == 4                     # no cgroup file: the affinity mask
    quota.write_text("max 100000\n")
    assert threads.available_cpus() == 4                     # no quota
    quota.write_text("150000 100000\n")                      # 1.5 CPUs -> 2 threads
    assert threads.cgroup_cpu_limit(quota) == 2
    assert threads.available_cpus() == 2
    quota.write_text("800000 100000\n")                      # quota above the mask: the mask wins
    assert threads.available_cpus() == 4
    quota.write_text("garbage")
    assert threads.cgroup_cpu_limit(quota) is None


def test_configure_sets_torch(clean_env):
    assert threads.configure_threads(1) == 1 and torch.get_num_threads() == 1
    clean_env.setattr(threads, "available_cpus", lambda: 2)
    clean_env.setattr(threads, "busy_cpus", lambda: 0)   # whatever else runs beside the test
    assert threads.configure_threads() == 2 and torch.get_num_threads() == 2


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux CPU affinity")
def test_pinned_process_uses_its_cpus_only():
    """A worker pinned to one CPU (as `taskset -c 0` does) gets one thread, on any machine size."""
    cpu = min(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k not in ("LTEXP_THREADS", "OMP_NUM_THREADS")}
    code = ("from ltexp.threads import configure_threads; import torch; configure_threads(); "
            "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    assert out.stdout.strip() == "1"


def test_cli_flag_reaches_torch(clean_env):
    """`--threads` is applied once the command's settings have passed, before it trains (training
    sees torch's count)."""
    from ltexp import experiment

    class Trained(Exception):
        """Raised where training would start."""

    def train(cfg, progress=True):
        raise Trained(torch.get_num_threads())

    clean_env.setattr(cli, "preflight", lambda cfg: None)
    clean_env.setattr(experiment, "run_experiment", train)
    torch.set_num_threads(2)
    with pytest.raises(Trained) as trained:
        cli.main(["train", "--threads", "1", "--no-progress"])
    assert trained.value.args == (1,)


def test_cli_rejects_zero_threads(clean_env, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--threads", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == ("ltexp: error: --threads '0' is not a positive integer: "
                                               "give the number of CPU threads, e.g. 1")


def test_runnable_tasks_are_read_from_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  1 2 3 4\nctxt 99\nprocs_running 3\nprocs_blocked 0\n")
    assert threads.runnable_tasks(stat) == 3
    assert threads.busy_cpus(samples=2, interval_s=0, path=stat) == 2   # this process not counted
    stat.write_text("cpu  1 2 3 4\n")
    assert threads.runnable_tasks(stat) is None and threads.busy_cpus(path=stat) == 0
    assert threads.busy_cpus(path=tmp_path / "missing") == 0             # not Linux: nothing known


@pytest.mark.skipif(threads.runnable_tasks() is None, reason="needs Linux's /proc/stat")
def test_a_competing_process_takes_a_thread_away_and_never_the_last(clean_env):
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 120\nwhile time.time() < end: pass"])
    try:
        # The competitor is runnable in every sample (it never sleeps), so at least one CPU is busy.
        assert threads.busy_cpus() >= 1
        clean_env.setattr(threads, "available_cpus", lambda: 2)
        assert threads.resolve_threads() == (1, "available CPUs less 1 busy")
        clean_env.setattr(threads, "available_cpus", lambda: 1)
        assert threads.resolve_threads() == (1, "available CPUs")          # never fewer than one
        clean_env.setenv("LTEXP_THREADS", "2")
        assert threads.resolve_threads() == (2, "LTEXP_THREADS")            # an explicit count wins
    finally:
        busy.kill()
        busy.wait()
