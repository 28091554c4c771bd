"""The study matrix (`ltexp grid`): data sets x imbalance profiles x factors x seeds x methods.

Each cell is an ordinary experiment run (`experiment.execute` on a resolved `RunConfig`), nested
under one parent run with role `grid`, named like `split:own·cifar100·exp0.01·e200·s0` and tagged with
`ltexp.grid`, `ltexp.cell` and `ltexp.config_hash` (a hash of the resolved configuration).

Resume: a cell whose configuration already has a FINISHED run in the experiment is not run
again (its run is reused); failed and killed cells are run again.

Many workers: the cells are trials of one Optuna study in the same storage `ltexp tune` uses
(`ltexp.coord.cells.CellQueue`): every process started with the same command and `--storage` takes the
next free cell, so N workers on N machines run every cell once; a worker killed mid-cell stops
beating its heartbeat and another worker re-runs that cell.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ltexp import LtexpError, redact, schema
from ltexp.choices import METHODS
from ltexp.processes import PARENT_ENV
from ltexp.config import BOOKKEEPING_FIELDS, RunConfig, flatten, resolve_config
from ltexp.presets import RUN_PRESETS
from ltexp.progress import CountProgress

# Settings that never change what a cell computes (the config's bookkeeping fields): left out
# of its configuration hash, so rerunning a grid with e.g. another --checkpoint-every or
# --compile reuses its FINISHED cells.
NOT_HASHED = set(BOOKKEEPING_FIELDS)
# The matrix's own fields: set per cell, so they are not accepted as fixed settings.
MATRIX_FIELDS = {"dataset", "imb_type", "imb_factor", "method", "seed", "run_name"}


@dataclass(frozen=True)
class GridConfig:
    """The matrix and how its cells are shared out. Lists are comma-separated."""

    datasets: str = field(default="digits", metadata={"help": "data sets, e.g. cifar10,cifar100 (or folder:<path>)"})
    imb_types: str = field(default="exp,step", metadata={"help": "long-tail profiles: exp, step"})
    imb_factors: str = field(default="0.1,0.01", metadata={"help": "imbalance factors in (0, 1]"})
    methods: str = field(default="", metadata={"help": "methods (empty: every method ltexp has)"})
    seeds: str = field(default="0,1,2", metadata={"help": "training seeds"})
    preset: str = field(default="ltexp", metadata={
        "help": "protocol: ltexp (data-set defaults, balanced holdout validation) or paper (the paper's "
                "Table 1: ResNet-18, SGD 0.9 / lr 0.1 / wd 2e-4, batch 128, StepLR 150 / 0.1, 100 epochs, "
                "clip 5 for split, joint LWS, validation from the test set)"})
    grid_name: str = field(default="", metadata={
        "help": "the grid's Optuna study name (empty: grid-<hash of its cells>, so the same command "
                "joins the same grid)"})
    storage: str = field(default="", metadata={
        "help": "Optuna storage the workers share: sqlite:///..., postgresql://... or a journal file (*.log); "
                "empty: $LTEXP_STORAGE (keeps a password off the command line), else sqlite optuna.db beside "
                "the MLflow sqlite store"})
    heartbeat_s: int = field(default=60, metadata={
        "help": "seconds between a worker's heartbeats; a cell silent for twice this is re-run by another worker"})
    jobs: int = field(default=1, metadata={
        "help": "worker processes this command runs, each claiming cells: N cells at once on this machine "
                "(e.g. on one GPU), each with an equal share of the CPU threads"})

    def __post_init__(self) -> None:
        if self.preset not in RUN_PRESETS:
            raise LtexpError(f"unknown --preset {self.preset!r}: allowed are {', '.join(RUN_PRESETS)}")
        if self.heartbeat_s < 1:
            raise LtexpError(f"--heartbeat-s {self.heartbeat_s} must be >= 1")
        if self.jobs < 1:
            raise LtexpError(f"--jobs {self.jobs} must be >= 1 (worker processes of this command)")
        for name in ("datasets", "imb_types", "imb_factors", "seeds"):
            if not split_list(getattr(self, name)):
                raise LtexpError(f"--{name.replace('_', '-')} is empty: give at least one value")


def split_list(text: str) -> list[str]:
    """`"a, b,a"` -> `["a", "b"]` (order kept, duplicates dropped)."""
    out: list[str] = []
    for item in str(text).split(","):
        item = item.strip()
        if item and item not in out:
            out.append(item)
    return out


def method_names(text: str) -> list[str]:
    """The grid's methods: those named, or every method (`ltexp.choices.METHODS`)."""
    names = split_list(text) or list(METHODS)
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise LtexpError(f"unknown method {unknown[0]!r} in --methods: allowed are {', '.join(METHODS)}")
    return names


def config_hash(cfg: RunConfig) -> str:
    """16 hex digits naming everything that changes what a run computes (its resolved config)."""
    values = {k: v for k, v in flatten(cfg).items() if k not in NOT_HASHED}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_name(cfg: RunConfig) -> str:
    """`split:own·cifar100·exp0.01·e200·s0`: every experiment run's default name."""
    from ltexp import tracking  # late, as in run_grid: `ltexp --help` / `ltexp data` need no mlflow

    return tracking.default_run_name(cfg)


@dataclass(frozen=True)
class Cell:
    index: int
    name: str
    cfg: RunConfig
    config_hash: str


def build_cells(grid: GridConfig, fixed: dict[str, dict[str, Any]], device: str = "auto") -> list[Cell]:
    """Every cell's resolved configuration, validated before anything is run or stored.

    Order: data set, imbalance profile, factor, seed, then method, so a grid stopped early holds
    every method of the settings it reached. `fixed` holds settings shared by all cells
    (config sections, e.g. {"optim": {"epochs": 3}}).
    """
    clash = sorted(MATRIX_FIELDS & {k for section in fixed.values() for k in section})
    if clash:
        raise LtexpError(f"--{clash[0].replace('_', '-')} is a grid dimension: use the list flags "
                         f"--datasets, --imb-types, --imb-factors, --methods, --seeds")
    factors = []
    for text in split_list(grid.imb_factors):
        try:
            factors.append(float(text))
        except ValueError:
            raise LtexpError(f"--imb-factors {text!r} is not a number: use e.g. 0.1,0.01") from None
    seeds = []
    for text in split_list(grid.seeds):
        if not text.lstrip("-").isdigit():
            raise LtexpError(f"--seeds {text!r} is not an integer: use e.g. 0,1,2")
        seeds.append(int(text))
    methods = method_names(grid.methods)
    cells = []
    for dataset in split_list(grid.datasets):
        for imb_type in split_list(grid.imb_types):
            for factor in factors:
                for seed in seeds:
                    for method in methods:
                        sections = {name: dict(values) for name, values in fixed.items()}
                        sections.setdefault("data", {}).update(dataset=dataset, imb_type=imb_type, imb_factor=factor)
                        sections.setdefault("method", {})["method"] = method
                        cfg = resolve_config(sections, seed=seed, device=device, preset=grid.preset)
                        name = cell_name(cfg)
                        cfg = resolve_config({**sections, "tracking": {**sections.get("tracking", {}), "run_name": name}},
                                             seed=seed, device=device, preset=grid.preset)
                        cells.append(Cell(len(cells), name, cfg, config_hash(cfg)))
    return cells


def grid_name(grid: GridConfig, cells: list[Cell]) -> str:
    """The study name: `--grid-name`, or `grid-` + a hash of the cells' configurations."""
    if grid.grid_name:
        return grid.grid_name
    digest = hashlib.sha256("|".join(c.config_hash for c in cells).encode()).hexdigest()[:10]
    return f"grid-{digest}"


@dataclass
class GridResult:
    run_id: str
    grid_name: str
    cells: int
    ran: list[str]          # cell names run by this worker now
    reused: list[str]       # cells whose configuration already had a FINISHED run
    failed: list[str]       # cells that failed in this worker
    counts: dict[str, int]  # over all workers: done / running / waiting / failed
    wall_s: float


def _cell_value(metrics: dict[str, float]) -> float:
    """The number stored as the cell's Optuna trial value: its validation accuracy (bookkeeping only)."""
    value = metrics.get("val_acc", metrics.get("best_val_acc", float("nan")))
    return float(value) if value == value else 0.0


def run_grid(grid: GridConfig, fixed: dict[str, dict[str, Any]], device: str = "auto", progress: bool = True,
             poll_s: float | None = None, on_ready: Callable[[], None] | None = None) -> GridResult:
    """Run this worker's share of the grid: claim cells until none is free, wait for the cells other
    workers hold (taking over those whose worker died), then summarise on the parent run.

    `on_ready` is called once the grid's study and parent run exist (`ltexp grid --jobs N` starts
    its helper workers there, so they join rather than race to create them)."""
    from ltexp import tracking
    from ltexp.coord.cells import open_cell_queue
    from ltexp.coord.claim import parent_run_id, record_parent_run
    from ltexp.coord.storage import default_storage
    from ltexp.experiment import execute

    started = time.perf_counter()
    cells = build_cells(grid, fixed, device)
    name = grid_name(grid, cells)
    experiment = tracking.experiment_name(cells[0].cfg)
    storage_url = grid.storage or default_storage()
    settings = {"cells": [[c.name, c.config_hash] for c in cells], "preset": grid.preset}
    queue, _ = open_cell_queue(storage_url, name, len(cells), settings, grid.heartbeat_s)
    tags = {schema.GRID: name, schema.PRESET: grid.preset}
    ran, reused, failed = [], [], []
    # One parent run per grid, claimed as a study's is: the first worker opens it, the rest join it.
    with tracking.start_role_run(experiment, name, "grid", tags, parent_run_id(queue.study)) as parent:
        record_parent_run(queue.study, parent.run_id)
        parent.log_params({"grid_name": name, "storage": redact(storage_url), "cells": len(cells),
                           "datasets": grid.datasets, "imb_types": grid.imb_types, "imb_factors": grid.imb_factors,
                           "methods": ",".join(method_names(grid.methods)), "seeds": grid.seeds,
                           "preset": grid.preset, "heartbeat_s": grid.heartbeat_s,
                           **{f"fixed.{k}": v for section in fixed.values() for k, v in section.items()}})
        experiment_id = parent.run.info.experiment_id
        queue.requeue_unfinished()
        if on_ready is not None:
            on_ready()
        bar = CountProgress("grid", "cell", len(cells), queue.counts()["done"], progress)
        poll = poll_s if poll_s is not None else min(5.0, grid.heartbeat_s)
        try:
            while True:
                claim = queue.claim()
                if claim is None:
                    counts = queue.counts()
                    if counts["running"] or counts["waiting"]:
                        time.sleep(poll)  # others' cells: wait, and take over any whose worker dies
                        continue
                    break
                cell = cells[claim.cell]
                for run_id in claim.earlier_run_ids:
                    tracking.mark_killed(run_id, f"the worker running grid cell {cell.name} stopped (no heartbeat); "
                                                 f"the cell was handed to another worker")
                previous = tracking.find_finished_run(experiment_id, schema.CONFIG_HASH, cell.config_hash)
                if previous is not None:
                    queue.finish(claim, 0.0, {schema.CELL_RUN_ID: previous, schema.CELL_REUSED: True})
                    reused.append(cell.name)
                    bar.update(queue.counts()["done"], f"{cell.name} already FINISHED (run {previous[:8]})")
                    continue
                cell_tags = {**tracking.run_tags(cell.cfg, "experiment"), schema.GRID: name,
                             schema.CELL: str(cell.index), schema.CONFIG_HASH: cell.config_hash,
                             schema.PRESET: grid.preset, schema.TRIAL_NUMBER: str(claim.number)}
                t0 = time.perf_counter()
                with queue.heartbeat(claim):
                    try:
                        with parent.child(cell.name, cell_tags) as run:
                            queue.set_attrs(claim, {schema.CELL_RUN_ID: run.run_id, schema.CELL_RUN_NAME: cell.name})
                            run.log_config(cell.cfg)
                            result = execute(cell.cfg, run, progress=False)
                    except Exception as exc:  # the cell's run is FAILED with the reason; go on
                        queue.finish(claim, None, {schema.CELL_ERROR: tracking.error_message(exc)}, ok=False)
                        failed.append(cell.name)
                        bar.update(queue.counts()["done"], f"{cell.name} FAILED: {tracking.error_message(exc)}")
                        continue
                    except BaseException:  # Ctrl-C: the cell goes back to the queue for a later run
                        queue.finish(claim, None, {schema.CELL_ERROR: "interrupted"}, ok=False)
                        raise
                queue.finish(claim, _cell_value(result.metrics), {})
                ran.append(cell.name)
                bar.update(queue.counts()["done"], f"{cell.name} FINISHED in {time.perf_counter() - t0:.1f} s, "
                                                   f"test_acc {result.metrics.get('test_acc', float('nan')):.4f}")
        finally:
            bar.close()
        counts = queue.counts()
        wall = time.perf_counter() - started
        # Each worker adds one value to the worker_* histories (measurements); the cell counts are
        # the grid's state now, tags, so the chart view does not open on bookkeeping.
        parent.set_tags({schema.CELLS_TOTAL: len(cells), schema.CELLS_DONE: counts["done"],
                         schema.CELLS_FAILED: counts["failed"]})
        parent.log_metrics({"worker_wall_s": wall, "worker_cells_run": len(ran), "worker_cells_reused": len(reused)})
        parent.log_table(cell_table(queue, cells), "grid/cells.csv")
        if counts["failed"]:
            raise LtexpError(f"grid {name}: {counts['failed']} of {len(cells)} cells failed "
                             f"({', '.join(failed[:3]) or 'in other workers'}); rerun the same command to retry them")
        return GridResult(parent.run_id, name, len(cells), ran, reused, failed, counts, wall)


def cell_table(queue, cells: list[Cell]):
    """One row per cell: name, state over all its attempts, its run, attempts, configuration hash."""
    import pandas as pd


    rows = []
    states = queue.cell_states()
    for cell in cells:
        trials = states.get(cell.index, [])
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        last = complete[0] if complete else (trials[-1] if trials else None)
        rows.append({"cell": cell.index, "name": cell.name, "state": last.state.name if last else "NONE",
                     "run_id": (last.user_attrs.get(schema.CELL_RUN_ID, "") if last else ""),
                     "reused": bool(last.user_attrs.get(schema.CELL_REUSED, False)) if last else False,
                     "attempts": len([t for t in trials if schema.DUPLICATE_OF not in t.user_attrs]),
                     "config_hash": cell.config_hash})
    return pd.DataFrame(rows)


class GridHelpers:
    """The N-1 helper workers of `ltexp grid --jobs N`: the same command line (`argv`) as separate
    processes, one job each with `threads` torch threads, claiming cells from the same study.

    Each asks the kernel for SIGTERM should this process die (`LTEXP_PARENT_PID`, see
    `processes.follow_launcher`); `stop` ends them (their cells go back to the queue, their runs
    end KILLED) and `wait` returns their exit codes."""

    def __init__(self, argv: list[str], jobs: int, threads: int):
        self.argv = [sys.executable, "-m", "ltexp", *argv, "--jobs", "1", "--threads", str(threads), "--no-progress"]
        self.count = jobs - 1
        self.processes: list[subprocess.Popen] = []

    def start(self) -> None:
        env = {**os.environ, PARENT_ENV: str(os.getpid())}
        env.pop("MLFLOW_RUN_ID", None)  # the helpers join the grid's parent run, they are not `mlflow run`'s
        self.processes = [subprocess.Popen(self.argv, env=env) for _ in range(self.count)]

    def stop(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            proc.wait()

    def wait(self) -> list[int]:
        return [proc.wait() for proc in self.processes]
