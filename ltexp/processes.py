"""Processes: signals, the launcher a process follows, and which process runs a run.

Torch-free, so the CLI installs its handlers before anything heavy is imported:

- SIGTERM (docker stop, Kubernetes, Slurm) is turned into `Terminated`, a `KeyboardInterrupt`, so
  it ends the run and its children KILLED like Ctrl-C does; the CLI exits 143. Under `mlflow run`
  or as a helper of `ltexp grid --jobs N`, a SIGTERM that ends the launcher reaches ltexp too
  (`follow_launcher`).
- Every run carries `ltexp.host`, `ltexp.pid` and a per-epoch `ltexp.heartbeat` (`process_tags`);
  `stale_reason` says why a RUNNING run's process is gone, for the sweep in `tracking/history.py`.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

from ltexp import LtexpError, schema


# ---------------------------------------------------------------------------------------------
# Signals


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so runs end KILLED exactly as on Ctrl-C."""

    exit_code = 143  # 128 + SIGTERM, what shells and schedulers expect


def _raise_terminated(signum, frame):
    # A second SIGTERM while the first is being handled must not interrupt the cleanup.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    why = ""
    if _launcher_pid is not None and _launcher_ended(_launcher_pid):  # sent by the kernel: see follow_launcher
        why = f": the {_launcher_name} process {_launcher_pid} that started it has ended"
    raise Terminated(f"terminated by signal {signal.Signals(signum).name} (pid {os.getpid()}){why}")


def install_signal_handlers() -> None:
    """SIGTERM behaves like Ctrl-C: the active runs end KILLED with the reason in `ltexp.error`."""
    signal.signal(signal.SIGTERM, _raise_terminated)


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_launcher_pid: int | None = None  # the process this one follows (follow_launcher) and what it is
_launcher_name = "`mlflow run`"
# Set by a command that starts ltexp workers of its own (`ltexp grid --jobs N`) to its pid: a
# worker whose parent has this pid follows it as it follows `mlflow run`.
PARENT_ENV = "LTEXP_PARENT_PID"


def _launched_by_mlflow_run(pid: int) -> bool:
    """Whether process `pid` is the `mlflow run` command (`mlflow run ...` or `python -m mlflow run ...`)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
    except OSError:
        return False
    # The console script runs as [mlflow, run, ...] or, through its #! line, [python, .../mlflow, run, ...].
    for i, arg in enumerate(argv[:3]):
        if os.path.basename(arg) == "mlflow" and (i <= 1 or argv[i - 1] == "-m"):
            return argv[i + 1:i + 2] == ["run"]
    return False


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first, so field 3 of stat(5)
    is index 0), or None when the process is gone or this is no Linux. The name is cut at the
    last ')' because it may itself hold spaces and parentheses."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split() or None
    except (OSError, IndexError):
        return None


def _launcher_ended(pid: int, wait_s: float = 1.0) -> bool:
    """Whether the launcher `pid` has ended or is ending, waiting up to `wait_s` for it to show.

    The kernel sends the parent-death signal when the launcher's thread that started this process
    ends; while its other threads (MLflow's background workers) are still exiting, this process
    keeps it as parent and its main thread shows as a zombie ('Z' in /proc/<pid>/stat)."""
    deadline = time.monotonic() + wait_s
    while True:
        if os.getppid() != pid:
            return True
        stat = _proc_stat(pid)
        if stat is None or stat[0] in ("Z", "X"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def follow_launcher() -> None:
    """Under `mlflow run` (or as a helper worker of `ltexp grid --jobs N`), get SIGTERM when the
    process that started this one dies.

    `mlflow run` starts the entry point as its child (`bash -c <command>`, which bash replaces by
    the command) and waits for it, but has no SIGTERM handler: a SIGTERM sent to it alone
    (Kubernetes, Slurm, `kill <pid>`) ends it at once and left this process training on, its run
    RUNNING. Linux's PR_SET_PDEATHSIG makes the kernel send SIGTERM to this process when its
    parent ends, which `install_signal_handlers` turns into a KILLED run. Only when the parent is
    `mlflow run` (MLFLOW_RUN_ID set) or the ltexp command named by `PARENT_ENV`: a shell or
    scheduler that started ltexp is left alone.
    """
    global _launcher_pid, _launcher_name
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    # Read once and kept from what this process starts: only the command's own helpers follow it.
    expected = os.environ.pop(PARENT_ENV, None)
    if expected is not None:
        name = "`ltexp grid --jobs`"
        if not expected.isdigit():
            raise LtexpError(f"{PARENT_ENV}={expected!r} is not a process id: `ltexp grid --jobs` sets it for its "
                             f"helper workers; unset it to run ltexp on its own")
        if expected != str(parent):
            # The command died while this helper was still starting (before the kernel could be
            # asked to tell it), so the helper was handed to init: it ends before claiming a cell.
            _launcher_pid, _launcher_name = int(expected), name
            os.kill(os.getpid(), signal.SIGTERM)
            return
    elif os.environ.get("MLFLOW_RUN_ID") and _launched_by_mlflow_run(parent):
        name = "`mlflow run`"
    else:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        return  # e.g. a seccomp profile that forbids prctl: the behaviour before this call
    _launcher_pid, _launcher_name = parent, name
    if os.getppid() != parent:  # the launcher ended before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def interrupt_reason(exc: BaseException) -> str:
    """The one line stored in `ltexp.error` for an interrupted run."""
    if isinstance(exc, Terminated) and str(exc):
        return str(exc)
    return f"interrupted by SIGINT (Ctrl-C) (pid {os.getpid()})"


# ---------------------------------------------------------------------------------------------
# Host, pid, heartbeat and the sweep


def host() -> str:
    return socket.gethostname()


def process_start_time(pid: int) -> float | None:
    """Unix time a process started (Linux /proc), None when unknown; tells a reused pid apart."""
    fields = _proc_stat(pid)
    if fields is None:
        return None
    try:
        ticks = int(fields[19])  # field 22 of stat: start time in clock ticks after boot
        with open("/proc/stat") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def pid_alive(pid: int, started_at: float | None = None) -> bool:
    """Whether `pid` is a live process and, when `started_at` (its recorded start time) is known,
    the same process rather than a later one that reused the pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if started_at is not None:
        started = process_start_time(pid)
        if started is not None and abs(started - started_at) > 2:  # /proc gives clock ticks: 2 s slack
            return False
    return True


def process_tags(pid: int | None = None) -> dict[str, str]:
    """The tags by which a sweep recognises this process's runs."""
    pid = os.getpid() if pid is None else pid
    tags = {schema.HOST: host(), schema.PID: str(pid), schema.HEARTBEAT: f"{time.time():.0f}"}
    started = process_start_time(pid)
    if started is not None:
        tags[schema.PID_START] = f"{started:.0f}"
    return tags


def stale_reason(tags: dict[str, str], start_time_s: float, older_than_s: float, now: float | None = None) -> str | None:
    """Why a RUNNING run is dead, or None if it may still be alive (or is not ltexp's to judge).

    Same host: its pid is gone (or reused). Another host: its heartbeat (else its start) is older
    than `older_than_s`. A run `mlflow run` opened for an entry point that never reached ltexp
    (no `ltexp.pid`): its start is older than `older_than_s`.
    """
    now = time.time() if now is None else now
    if schema.PID not in tags or schema.HOST not in tags:
        entry_point = tags.get("mlflow.project.entryPoint")
        if entry_point and now - start_time_s > older_than_s:
            # `mlflow run` made the run, then its environment set-up failed (e.g. no conda
            # without --env-manager local) or hangs: ltexp never started to tag or end it.
            return (f"`mlflow run` of entry point {entry_point!r} never started ltexp in "
                    f"{_ago(now - start_time_s)} (its environment set-up failed or hangs)")
        return None
    beat = float(tags.get(schema.HEARTBEAT) or start_time_s)
    if tags[schema.HOST] == host():
        pid = int(tags[schema.PID])
        if pid == os.getpid():
            return None
        recorded = float(tags[schema.PID_START]) if tags.get(schema.PID_START) else None
        if not pid_alive(pid, recorded):
            return f"process {pid} on {tags[schema.HOST]} is gone (last heartbeat {_ago(now - beat)} ago)"
        return None
    if now - beat > older_than_s:
        return f"no heartbeat from {tags[schema.HOST]} (pid {tags[schema.PID]}) for {_ago(now - beat)}"
    return None


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
