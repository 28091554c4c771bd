"""How many CPU threads torch may use: the CPUs this process really has, or fewer when asked.

torch's default intra-op thread count is the machine's core count, which oversubscribes a
process limited to fewer cores (a container's `--cpus` quota) or sharing the machine with other
jobs, whose threads then wait on each other's cores (`python bench/threads.py` measures the
default against fixed counts, idle and beside a busy process: bench/results/2026-12-02-cpu-threads).

Order of precedence (first that is set wins):

1. an explicit count (`ltexp train|tune --threads N`);
2. `LTEXP_THREADS` in the environment (what a launcher of several workers exports per worker);
3. `OMP_NUM_THREADS` (the OpenMP convention torch itself follows);
4. the CPUs available to this process (its affinity mask, `os.sched_getaffinity`, capped by a
   cgroup v2 CPU quota, `/sys/fs/cgroup/cpu.max`, when the process runs under one), less the
   CPUs other jobs keep busy right now (Linux's count of runnable tasks, `procs_running` in
   `/proc/stat`, the smallest of a few samples less this process), at least 1. torch's threads
   wait for each other at every parallel region: one thread that shares its core with another
   job makes every step wait for it (ResNet-32 at batch 128 beside one busy process on 2 cores:
   93.5 img/s with 2 threads, 143.2 with 1; `python bench/threads.py`), while a thread fewer
   costs little.

Several workers on one machine split the cores by each getting `--threads` (or `LTEXP_THREADS`)
= cores / workers, or by being pinned with `taskset -c` (then rule 4 follows the pinning).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from ltexp import LtexpError

ENV_VAR = "LTEXP_THREADS"
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
PROC_STAT = Path("/proc/stat")
# Runnable-task samples taken at start-up, INTERVAL_S apart: a short-lived process (a shell, a
# compiler) seen in one sample is not a job; the smallest count is what stays busy.
LOAD_SAMPLES, LOAD_INTERVAL_S = 5, 0.02


def cgroup_cpu_limit(path: Path | None = None) -> int | None:
    """CPUs granted by a cgroup v2 quota (`<quota> <period>` in microseconds, default file
    `CGROUP_CPU_MAX`), rounded up; None without a quota (`max`) or without cgroup v2."""
    try:
        quota, period = (path or CGROUP_CPU_MAX).read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: affinity mask, capped by a cgroup quota; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS / Windows have no affinity call
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cpus, limit) if limit else cpus)


def runnable_tasks(path: Path | None = None) -> int | None:
    """Tasks running or ready to run on the machine now (`procs_running` of `/proc/stat`, this
    process included); None where the file is missing (not Linux) or has no such line."""
    try:
        for line in (path or PROC_STAT).read_text().splitlines():
            if line.startswith("procs_running "):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def busy_cpus(samples: int = LOAD_SAMPLES, interval_s: float = LOAD_INTERVAL_S,
              path: Path | None = None) -> int:
    """CPUs that other jobs keep busy: the fewest runnable tasks over `samples` readings less this
    process; 0 where the count cannot be read."""
    counts = []
    for index in range(samples):
        if index:
            time.sleep(interval_s)
        count = runnable_tasks(path)
        if count is None:
            return 0
        counts.append(count)
    return max(0, min(counts) - 1)


def _positive(text: str, source: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise LtexpError(f"{source} {text!r} is not a positive integer: give the number of CPU threads, e.g. 1")
    return value


def resolve_threads(threads: int | None = None) -> tuple[int, str]:
    """The thread count to use and where it came from (`--threads`, `LTEXP_THREADS`,
    `OMP_NUM_THREADS`, or `available CPUs` / `available CPUs less N busy`)."""
    if threads is not None:
        return _positive(str(threads), "--threads"), "--threads"
    if os.environ.get(ENV_VAR, "").strip():
        return _positive(os.environ[ENV_VAR].strip(), ENV_VAR), ENV_VAR
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp:
        # OpenMP allows a list ("4,2") for nested levels; the first level is torch's.
        return _positive(omp.split(",")[0], "OMP_NUM_THREADS"), "OMP_NUM_THREADS"
    cpus = available_cpus()
    busy = min(busy_cpus(), cpus - 1)
    return (cpus - busy, f"available CPUs less {busy} busy") if busy else (cpus, "available CPUs")


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op thread count by the rules above and return it.

    Call once at start-up, before training. Inter-op threads are left alone: torch allows
    setting them only before any parallel work has run, and ltexp runs no inter-op work.
    """
    import torch

    count, _ = resolve_threads(threads)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)
    return count


def job_threads(threads: int, jobs: int) -> int:
    """Torch threads for each of `jobs` processes sharing `threads` (`ltexp tune --jobs`,
    `ltexp grid --jobs`): an equal share, at least 1."""
    return max(1, threads // jobs)
