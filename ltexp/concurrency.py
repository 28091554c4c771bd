"""A split's experts trained at once: one Python thread per expert (`--expert-concurrency threads`).

torch releases the GIL inside its operations, so the experts' steps overlap. On a CPU the threads
share torch's intra-op threads equally, and an expert that ends hands its share to the others
(a tail expert, with few images, ends long before the head expert). On CUDA each thread issues
its work on its own stream, so both experts' kernels can share the GPU.

The default is `sequential`: measured on a 2-core CPU and on one H200 (docs/gpu.md, "Experts at once";
bench/results/2026-11-28-h200-*), a real split's experts at once were not faster than one after
the other. A real split is unequal (the head expert holds most images, so the pair ends when it
does), and on a GPU each step is bound by the host launching kernels, which two threads share.
tests/test_cuda.py runs this path on a GPU.

Each expert draws only from its own seeded generators (sampling, augmentation, a head's
re-initialisation); the seeding and initialisation of a new model from torch's global generator,
and a checkpoint's restore of it, hold `GLOBAL_RNG`. So at once, an expert sees the same images in
the same order with the same initial weights as one after the other, and results agree up to
floating-point rounding: a CPU convolution's sums depend on its thread count, and the step at
which the head expert takes the tail's threads depends on timing. (One after the other, a run
repeats bit for bit.)

Ctrl-C and SIGTERM reach the main thread only. While it waits, it hands the interruption to every
expert, which raises it at its next training step (`between_steps`, called by the engine), so each
expert's run ends KILLED with the same reason and keeps its checkpoint. An expert that fails stops
the others the same way, with an error that names it.
"""

from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

from ltexp import LtexpError
from ltexp.choices import EXPERT_CONCURRENCY, SEQUENTIAL

JOIN_POLL_S = 0.2  # the waiting main thread wakes this often, so a signal is handled promptly

T = TypeVar("T")

# Held while torch's one global generator is seeded and drawn from (a new model's weights) or
# its state is saved or restored (checkpoints): experts may do either in several threads.
GLOBAL_RNG = threading.RLock()

# What every training thread raises at its next step: the main thread's interruption, or an
# error after another expert failed. None whenever no experts train at once.
_stop: BaseException | None = None
# The torch threads each training thread should use now: the process's threads over the experts
# still training (a tail expert, with few images, ends long before the head expert, which then
# gets every thread). Each thread applies it to itself at its next step (`between_steps`): torch
# keeps a thread's count once the thread has run a parallel operation.
_share = 0


class StoppedByAnother(LtexpError):
    """What an expert raises when another expert training beside it failed."""


def resolve(way: str, experts: int) -> str:
    """`sequential` or `threads`: `--expert-concurrency way` for `experts` experts (one is
    always sequential: nothing trains beside it)."""
    if way not in EXPERT_CONCURRENCY:
        raise LtexpError(f"unknown --expert-concurrency {way!r}: allowed are {', '.join(EXPERT_CONCURRENCY)}")
    return way if experts >= 2 else SEQUENTIAL


def between_steps() -> None:
    """Called by the engine before each training step. In a training thread: raise what stops it
    (see `_stop`), and take the current share of torch's threads (`_share`, CPU only)."""
    if threading.current_thread() is threading.main_thread():
        return
    stop = _stop
    if stop is not None:
        raise type(stop)(*stop.args)
    if _share and torch.get_num_threads() != _share:
        torch.set_num_threads(_share)


def run_at_once(tasks: list[Callable[[], T]], device: torch.device, names: list[str]) -> list[T]:
    """Run each of `tasks` in its own thread (named by `names`) and return their results in order.

    CPU: torch's threads are split equally between the tasks while they run, then restored.
    CUDA: each task runs on its own stream, synchronised before its result is handed back.
    The first failure is raised once every task has ended."""
    global _stop, _share
    results: list = [None] * len(tasks)
    errors: list[BaseException | None] = [None] * len(tasks)
    threads = torch.get_num_threads()
    running = [len(tasks)]
    lock = threading.Lock()
    # Waited on instead of Thread.join: a join interrupted by KeyboardInterrupt can leave the
    # thread looking finished while it still runs.
    all_done = threading.Event()

    def work(index: int) -> None:
        global _stop, _share
        try:
            if device.type == "cuda":
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.default_stream(device))  # the data were made there
                with torch.cuda.stream(stream):
                    results[index] = tasks[index]()
                stream.synchronize()
            else:
                results[index] = tasks[index]()
        except BaseException as exc:
            errors[index] = exc
            if _stop is None and not isinstance(exc, KeyboardInterrupt):
                _stop = StoppedByAnother(f"stopped because expert {names[index]} failed"
                                         + (f": {str(exc).splitlines()[0][:300]}" if str(exc) else ""))
        finally:
            with lock:
                running[0] -= 1
                if device.type == "cpu" and running[0]:
                    _share = max(1, threads // running[0])
                if not running[0]:
                    all_done.set()

    workers = [threading.Thread(target=work, args=(i,), name=f"ltexp-expert-{name}", daemon=True)
               for i, name in enumerate(names)]
    if device.type == "cpu":
        _share = max(1, threads // len(tasks))
    try:
        for worker in workers:
            worker.start()
        try:
            while not all_done.wait(JOIN_POLL_S):
                pass
        except BaseException as exc:  # Ctrl-C or SIGTERM in this (the main) thread
            _stop = exc
            all_done.wait()
            raise
    finally:
        _stop, _share = None, 0
        torch.set_num_threads(threads)
    # The expert that failed first, not the ones it stopped.
    failed = [e for e in errors if e is not None]
    if failed:
        raise next((e for e in failed if not isinstance(e, StoppedByAnother)), failed[0])
    return results
