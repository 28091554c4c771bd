"""`ltexp tune --jobs N`: the N-1 helper processes that run a study's trials beside the command."""

from __future__ import annotations

import gc
import multiprocessing
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from ltexp import LtexpError, processes, tracking
from ltexp.config import RunConfig, TuneConfig
from ltexp.coord.budget import TrialBudget
from ltexp.coord.storage import open_storage
from ltexp.training import ExpertCache, prepare
from ltexp.tune.objective import Objective
from ltexp.tune.samplers import build_pruner, set_sampler
from ltexp.tune.space import SearchSpace, parse_objective


# Seeds of the helpers' samplers: apart from the command's (--seed) and from each other's.
JOB_SEED_STRIDE = 7919


@dataclass(frozen=True)
class JobArgs:
    """What a helper process of `ltexp tune --jobs N` needs (pickled to it by `multiprocessing`)."""

    base: RunConfig
    tune: TuneConfig
    study_name: str
    storage_url: str
    parent_run_id: str
    threads: int
    index: int
    expert_dir: Path | None  # the jobs' shared expert cache (`ExpertCache.directory`)


@contextmanager
def removed_at_exit(folder: Path | None):
    try:
        yield folder
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def frozen_heap():
    """Keep the objects alive at entry out of Python's full garbage collections while the block
    runs (`gc.freeze`), and give them back at exit (`gc.unfreeze`).

    For a study's trials: importing torch, MLflow, Optuna and SQLAlchemy leaves hundreds of
    thousands of tracked objects that never die, and every full collection walks them all, several
    times per study at random points of its trials. Inside the block a full collection walks only
    the objects made since (its effect on the bookkeeping per trial: docs/gpu.md, "Tuning bookkeeping").
    The young generations are collected first, so little garbage is frozen; what is, is collected
    after."""
    gc.collect(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def tune_job(args: JobArgs, expert_counts=None) -> None:
    """A helper process of `ltexp tune --jobs N`: run trials of the study, nested in the command's
    parent run, until the study's trial budget is spent. The final test evaluation, the model and
    its registration are the command's, done once. Exit code 2 on an ltexp error, 130 when
    interrupted (SIGTERM, like Ctrl-C, fails the running trial and queues it again).

    `expert_counts`: a shared array (`TuneJobs`) where this job leaves how many experts it
    trained and reused, at slots 2 * (index - 1) and the next, whichever way it ends."""
    processes.install_signal_handlers()
    torch.set_num_threads(args.threads)
    cache = ExpertCache(directory=args.expert_dir)
    try:
        prep = prepare(args.base)
        space = SearchSpace(prep.data.info.num_classes, args.tune, args.base)
        storage = open_storage(args.storage_url, args.tune.heartbeat_s)
        study = optuna.load_study(study_name=args.study_name, storage=storage, pruner=build_pruner(args.tune.pruner))
        set_sampler(study, args.tune.sampler, args.base.seed + JOB_SEED_STRIDE * args.index, args.storage_url)
        objective = Objective(args.base, space, parse_objective(args.tune.metric), prep,
                              tracking.existing_run(args.parent_run_id), cache=cache)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with frozen_heap():
            TrialBudget(study, storage, args.storage_url, args.tune.n_trials).optimize(
                objective, catch=(LtexpError,), gc_after_trial=False)
    except LtexpError as exc:
        print(f"ltexp: tune job {args.index}: {str(exc).splitlines()[0]}", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        print(f"ltexp: tune job {args.index}: {processes.interrupt_reason(exc)}", file=sys.stderr, flush=True)
        sys.exit(130)
    finally:
        if expert_counts is not None:
            expert_counts[2 * (args.index - 1): 2 * args.index] = [cache.misses, cache.hits]


class TuneJobs:
    """The helper processes of `ltexp tune --jobs N` (N-1 of them; the command is the first job).

    Spawned, not forked: a fork would copy this process's CUDA context, MLflow's logging threads
    and open database connections. Each loads the data itself (about as long as importing torch,
    MLflow and Optuna: seconds) and takes the study's trials through the same `TrialBudget` lock,
    so the study stops at exactly --n-trials whichever job runs them."""

    def __init__(self, jobs: list[JobArgs]):
        context = multiprocessing.get_context("spawn")
        # Experts trained and reused by each helper, in pairs, written by the helper as it ends.
        self.expert_counts = context.Array("q", 2 * len(jobs))
        # daemon: a helper never outlives the command (multiprocessing terminates it at exit).
        self.processes = [context.Process(target=tune_job, args=(job, self.expert_counts),
                                          name=f"ltexp-tune-job-{job.index}", daemon=True) for job in jobs]

    def experts(self) -> tuple[int, int]:
        """Experts trained and reused by all helpers together (read once they have ended)."""
        counts = self.expert_counts[:]
        return sum(counts[0::2]), sum(counts[1::2])

    def start(self) -> None:
        for process in self.processes:
            process.start()

    def wait(self, poll=None, every_s: float = 1.0) -> None:
        """Wait for every helper to end (calling `poll` every `every_s` meanwhile); a helper that
        failed gets a warning: its trials are failed and retried by the others, not lost."""
        for process in self.processes:
            while process.is_alive():
                process.join(every_s)
                if poll is not None:
                    poll()
            if process.exitcode != 0:
                print(f"ltexp: warning: {process.name} (pid {process.pid}) ended with exit code {process.exitcode}; "
                      f"its running trial, if any, is retried by the study", file=sys.stderr, flush=True)

    def stop(self, grace_s: float = 10.0, kill_s: float = 30.0) -> None:
        """End the helpers after this process was interrupted or failed: a Ctrl-C from a terminal
        reaches them too, so each gets `grace_s` to end on its own, then SIGTERM (its running
        trial ends KILLED and is queued again), then SIGKILL after `kill_s`."""
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            if process.pid is not None:
                process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        for process in self.processes:
            if process.pid is not None:
                process.join(kill_s)
                if process.is_alive():
                    print(f"ltexp: warning: {process.name} (pid {process.pid}) did not end {kill_s:g} s after "
                          f"SIGTERM: killed; its trial is retried by the study's next session", file=sys.stderr,
                          flush=True)
                    process.kill()
                    process.join()
