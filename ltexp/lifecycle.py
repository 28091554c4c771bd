"""Run lifecycle: the local cache, checkpoints and resume.

A killed run must cost neither its training nor the truth of its record:

- `Checkpointer` is the hook `engine.fit` calls: it saves weights, optimiser, scheduler,
  sampler/augment generator and torch RNG state, epoch, stage and best-so-far state every
  `--checkpoint-every` (epochs, or minutes of wall time) into a local cache keyed by the expert's
  resolved configuration (`training.expert_key`), and hands it back when the identical command
  runs again. Restoring every RNG makes the resumed run end bit-identical on CPU.

Signals, launchers and which process runs a run live in the torch-free `processes.py`; the
sweep of dead runs in `tracking/history.py`.
"""

from __future__ import annotations

import errno
import hashlib
import os
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
