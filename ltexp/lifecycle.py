"""Run lifecycle: checkpoints and resume, signals, heartbeats, and the sweep of dead runs.

A killed run must cost neither its training nor the truth of its record:

- `Checkpointer` is the hook `engine.fit` calls: it saves weights, optimiser, scheduler,
  sampler/augment generator and torch RNG state, epoch, stage and best-so-far state every
  `--checkpoint-every` (epochs, or minutes of wall time) into a local cache keyed by the expert's
  resolved configuration (`experiment.expert_key`), and hands it back when the identical command
  runs again. Restoring every RNG makes the resumed run end bit-identical on CPU.
- SIGTERM (docker stop, Kubernetes, Slurm) is turned into `Terminated`, a `KeyboardInterrupt`, so
  it ends the run and its children KILLED like Ctrl-C does; the CLI exits 143. Under `mlflow run`,
  a SIGTERM that ends the `mlflow run` process reaches ltexp too (`follow_launcher`).
- Every run carries `ltexp.host`, `ltexp.pid` and a per-epoch `ltexp.heartbeat`; `sweep` closes
  RUNNING runs whose process is gone (same host) or whose heartbeat is older than a limit.

The MLflow calls live in `tracking.py`; this module holds the policy.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

import ltexp
from ltexp import LtexpError
from ltexp.concurrency import GLOBAL_RNG
from ltexp.durations import Every

CHECKPOINT_VERSION = 1  # bump when the checkpoint layout changes; older files are ignored


def cache_dir() -> Path:
    """ltexp's local cache: `$LTEXP_CACHE`, else `$XDG_CACHE_HOME/ltexp`, else `~/.cache/ltexp`."""
    if os.environ.get("LTEXP_CACHE"):
        return Path(os.environ["LTEXP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "ltexp"


def writable_cache_dir(*parts: str) -> Path:
    """`cache_dir() / parts`, made if absent; one `LtexpError` naming `LTEXP_CACHE` and the path
    when it cannot be made or written (e.g. LTEXP_CACHE under a regular file, or read-only)."""
    path = cache_dir().joinpath(*parts)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        where = (f"LTEXP_CACHE={os.environ['LTEXP_CACHE']}" if os.environ.get("LTEXP_CACHE")
                 else f"ltexp's cache {cache_dir()} (LTEXP_CACHE unset)")
        raise LtexpError(f"{where} is not a writable directory: cannot write {path} "
                         f"({exc.strerror or type(exc).__name__}); point LTEXP_CACHE at one") from None
    return path


def checkpoint_dir() -> Path:
    return cache_dir() / "checkpoints"


class Cadence:
    """Decides which epochs end with a checkpoint. One cadence can be shared by experts trained in
    lockstep, so they all checkpoint at the same epoch and resume together."""

    def __init__(self, every: Every):
        self.every = every
        self.last = time.monotonic()
        self.decided: dict[int, bool] = {}

    def due(self, epoch: int) -> bool:
        if epoch not in self.decided:
            now = time.monotonic()
            if self.every.epochs:
                self.decided[epoch] = epoch % self.every.epochs == 0
            else:
                self.decided[epoch] = bool(self.every.seconds) and now - self.last >= self.every.seconds
            if self.decided[epoch]:
                self.last = now
        return self.decided[epoch]


def _rng_states() -> dict[str, Any]:
    with GLOBAL_RNG:
        states = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    with GLOBAL_RNG:
        torch.set_rng_state(states["torch"])
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["cuda"])


@dataclass
class Checkpointer:
    """The checkpoint of one expert's training, keyed by its resolved configuration.

    `engine.fit` calls `restore` once before training (the saved state, or None), `save` after
    each epoch (it writes only when the cadence says so) and `finish` with the trained model, so a
    run killed while training a later expert does not train this one again. `run_id` is the run
    this expert's epochs are logged to, `root_run_id` the experiment run; both are stored so that
    the run that resumes can close and name the run it continues.
    """

    key: str
    every: Every = field(default_factory=lambda: Every(epochs=0))
    resume: bool = True
    run_id: str = ""
    root_run_id: str = ""
    label: str = ""                      # e.g. "expert tail", for the terminal message
    cadence: Cadence | None = None
    on_resume: Callable[[dict], None] | None = None
    resumed_epoch: int = 0               # epochs taken from the checkpoint (0 = fresh start)

    def __post_init__(self) -> None:
        if self.cadence is None:
            self.cadence = Cadence(self.every)
        if self.every.enabled:
            writable_cache_dir("checkpoints")  # refused before training, not when the first save fails

    @property
    def path(self) -> Path:
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:32]
        return checkpoint_dir() / f"{digest}.pt"

    def load(self) -> dict | None:
        """The saved state, when resuming is on and a readable checkpoint of this key exists; an
        unreadable file (truncated, torn, not a checkpoint) is discarded (`discard`)."""
        if not self.resume or not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a torn or foreign file is not worth a crash: train afresh
            first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0]  # torch adds advice at length
            return self.discard(f"is unreadable ({type(exc).__name__}{': ' + first if first else ''})")
        if not isinstance(state, dict):
            return self.discard(f"is unreadable (it holds a {type(state).__name__}, not a checkpoint)")
        if state.get("format") != CHECKPOINT_VERSION or state.get("key") != self.key:
            return None
        return state

    def restore(self, model: torch.nn.Module, generator: torch.Generator) -> dict | None:
        """Load the checkpoint into `model`, the sampling `generator` and torch's RNG; return the
        loop state (epoch, stage, best so far, history), or None to start afresh."""
        state = self.load()
        if state is None:
            return None
        misfit = _misfit(model.state_dict(), state.get("model"))
        if misfit is not None:  # checked before anything is loaded: the fresh model stays as it is
            return self.discard(f"does not fit this model ({misfit})")
        device = next(model.parameters()).device
        model.load_state_dict(state["model"])
        generator.set_state(state["generator"])  # a CPU byte tensor, for CPU and CUDA generators alike
        _set_rng_states(state["rng"])
        if state.get("stage_best_state") is not None:
            state["stage_best_state"] = {k: v.to(device) for k, v in state["stage_best_state"].items()}
        self.resumed_epoch = int(state["global_epoch"])
        _held(self, self.resumed_epoch)
        if self.on_resume is not None:
            self.on_resume(state)
        return state

    def save(self, model: torch.nn.Module, generator: torch.Generator, optimizer, scheduler, loop: dict,
             force: bool = False) -> bool:
        """Write the state after an epoch when the cadence says so (or `force`); returns whether written."""
        if not force and not (self.every.enabled and self.cadence.due(int(loop["global_epoch"]))):
            return False
        state = {"format": CHECKPOINT_VERSION, "key": self.key, "ltexp_version": ltexp.__version__,
                 "run_id": self.run_id, "root_run_id": self.root_run_id, "saved_at": time.time(),
                 "torch_threads": torch.get_num_threads(),
                 "model": model.state_dict(), "generator": generator.get_state().cpu(), "rng": _rng_states(),
                 "optimizer": optimizer.state_dict() if optimizer is not None else None,
                 "scheduler": scheduler.state_dict() if scheduler is not None else None, **loop}
        save_whole(state, self.path)  # a kill during the write leaves the previous checkpoint
        _held(self, int(loop["global_epoch"]))
        return True

    def finish(self, model: torch.nn.Module, generator: torch.Generator, loop: dict) -> None:
        """Keep the trained expert (its final weights and history) until the run ends."""
        if self.every.enabled:
            self.save(model, generator, None, None, loop, force=True)

    def discard(self, why: str) -> None:
        """Remove a checkpoint that cannot be resumed, saying `why` in one line on stderr; the
        expert trains afresh. Returns None, what `load` and `restore` then return."""
        print(f"ltexp: checkpoint {self.path} {why}: discarded, training from epoch 0", file=sys.stderr, flush=True)
        try:
            self.clear()
        except OSError:
            pass  # e.g. a read-only cache: the next save replaces it, or says why it cannot
        return None

    def clear(self) -> None:
        """Remove the checkpoint (the run it belongs to has ended)."""
        self.path.unlink(missing_ok=True)


def _misfit(current: dict, saved) -> str | None:
    """Why `saved` weights cannot be loaded into a model whose state dict is `current` (e.g. a
    checkpoint of an older model definition), in the words of torch's own error; None if they fit."""
    if not isinstance(saved, dict):
        return "it holds no model weights"
    missing, unexpected = [k for k in current if k not in saved], [k for k in saved if k not in current]
    if missing or unexpected:
        return "; ".join(f"{what} key(s) {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                         for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys)
    for key, value in current.items():
        if not isinstance(saved[key], torch.Tensor) or saved[key].shape != value.shape:
            shape = tuple(saved[key].shape) if isinstance(saved[key], torch.Tensor) else type(saved[key]).__name__
            return f"size mismatch for {key}: {shape} in the checkpoint, {tuple(value.shape)} in this model"
    return None


_HELD: dict[str, int] = {}  # run id -> latest epoch of a checkpoint this process wrote or resumed for it


def _held(checkpoint: Checkpointer, epoch: int) -> None:
    for run_id in {checkpoint.run_id, checkpoint.root_run_id} - {""}:  # the expert's run and its experiment's
        _HELD[run_id] = max(epoch, _HELD.get(run_id, 0))


def held_checkpoint(run_id: str) -> int | None:
    """The latest epoch of which a checkpoint of run `run_id` (or of a run nested in it) is on
    disk, written or resumed by this process; None when there is none (e.g. the first
    `--checkpoint-every` has not come yet). A failed run keeps its checkpoints."""
    return _HELD.get(run_id)


def save_whole(obj, path: Path, what: str = "checkpoint") -> None:
    """`torch.save` to `path` atomically: written beside it, then renamed over it, so neither a
    kill during the write nor a reader in another process ever sees part of a file.

    A write that fails (a full disk, a file-size limit) removes its partial file and raises
    `LtexpError` naming `what`, `path` and the operating system's reason (`ltexp.write_error`)."""
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Into a Python file, so that a failed write raises the OSError that names its cause:
        # torch's own file writer reports only "[enforce fail at inline_container.cc...]".
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise ltexp.write_error(what, path, exc) from exc


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


def _launcher_ended(pid: int, wait_s: float = 1.0) -> bool:
    """Whether the launcher `pid` has ended or is ending, waiting up to `wait_s` for it to show.

    The kernel sends the parent-death signal when the launcher's thread that started this process
    ends; while its other threads (MLflow's background workers) are still exiting, this process
    keeps it as parent and its main thread shows as a zombie ('Z' in /proc/<pid>/stat)."""
    deadline = time.monotonic() + wait_s
    while True:
        if os.getppid() != pid:
            return True
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                    return True
        except (OSError, IndexError):
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
    if os.environ.get(PARENT_ENV) == str(parent):
        name = "`ltexp grid --jobs`"
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
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
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
    tags = {"ltexp.host": host(), "ltexp.pid": str(pid), "ltexp.heartbeat": f"{time.time():.0f}"}
    started = process_start_time(pid)
    if started is not None:
        tags["ltexp.pid_start"] = f"{started:.0f}"
    return tags


def stale_reason(tags: dict[str, str], start_time_s: float, older_than_s: float, now: float | None = None) -> str | None:
    """Why a RUNNING run is dead, or None if it may still be alive (or is not ltexp's to judge).

    Same host: its pid is gone (or reused). Another host: its heartbeat (else its start) is older
    than `older_than_s`. A run `mlflow run` opened for an entry point that never reached ltexp
    (no `ltexp.pid`): its start is older than `older_than_s`.
    """
    now = time.time() if now is None else now
    if "ltexp.pid" not in tags or "ltexp.host" not in tags:
        entry_point = tags.get("mlflow.project.entryPoint")
        if entry_point and now - start_time_s > older_than_s:
            # `mlflow run` made the run, then its environment set-up failed (e.g. no conda
            # without --env-manager local) or hangs: ltexp never started to tag or end it.
            return (f"`mlflow run` of entry point {entry_point!r} never started ltexp in "
                    f"{_ago(now - start_time_s)} (its environment set-up failed or hangs)")
        return None
    beat = float(tags.get("ltexp.heartbeat") or start_time_s)
    if tags["ltexp.host"] == host():
        pid = int(tags["ltexp.pid"])
        if pid == os.getpid():
            return None
        recorded = float(tags["ltexp.pid_start"]) if tags.get("ltexp.pid_start") else None
        if not pid_alive(pid, recorded):
            return f"process {pid} on {tags['ltexp.host']} is gone (last heartbeat {_ago(now - beat)} ago)"
        return None
    if now - beat > older_than_s:
        return f"no heartbeat from {tags['ltexp.host']} (pid {tags['ltexp.pid']}) for {_ago(now - beat)}"
    return None


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
