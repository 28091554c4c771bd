"""`ltexp grid` on digits: cells as nested runs, resume by configuration, a killed worker's cell
re-run, two workers sharing one PostgreSQL storage, presets and bad input."""

import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ltexp import LtexpError
from ltexp.cli import main
from ltexp.grid import GridConfig, build_cells, config_hash

MATRIX = ["--methods", "baseline,resample", "--imb-types", "exp,step", "--imb-factors", "0.1", "--seeds", "0,1",
          "--epochs", "2"]


def _runs(filter_string: str) -> list:
    return mlflow.search_runs(search_all_experiments=True, output_format="list", filter_string=filter_string)


def test_grid_end_to_end_then_the_same_command_launches_nothing(mlflow_store, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    assert main(["grid", *MATRIX, "--storage", storage, "--no-progress"]) == 0
    (parent,) = _runs("tags.`ltexp.role` = 'grid'")
    name = parent.data.tags["ltexp.grid"]
    cells = _runs(f"tags.`ltexp.role` = 'experiment' and tags.`ltexp.grid` = '{name}'")
    assert len(cells) == 8 and all(c.info.status == "FINISHED" for c in cells)
    assert {c.data.tags["mlflow.parentRunId"] for c in cells} == {parent.info.run_id}
    assert sorted(c.info.run_name for c in cells) == sorted(
        f"{m}·digits·{t}0.1·e2·s{s}" for m in ("baseline", "resample") for t in ("exp", "step") for s in (0, 1))
    for cell in cells:  # ordinary experiment runs: params, metrics, artifacts, model
        assert cell.data.params["epochs"] == "2" and cell.data.params["preset"] == "ltexp"
        assert cell.data.params["method"] == cell.data.tags["ltexp.method"]
        assert "test_acc" in cell.data.metrics and len(cell.data.tags["ltexp.config_hash"]) == 16
    assert len({c.data.tags["ltexp.config_hash"] for c in cells}) == 8
    assert parent.data.tags["ltexp.cells_done"] == "8" and not {"cells_done", "cells_total"} & set(parent.data.metrics)
    assert parent.data.params["preset"] == "ltexp"
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="grid/cells.csv",
                                                            dst_path=str(tmp_path / "dl")))
    assert list(table["state"]) == ["COMPLETE"] * 8 and set(table["run_id"]) == {c.info.run_id for c in cells}
    study = optuna.load_study(study_name=name, storage=storage)
    assert sorted(t.params["cell"] for t in study.get_trials()) == list(range(8))
    assert {t.state.name for t in study.get_trials()} == {"COMPLETE"}
    assert "8/8 cells done (8 run by this worker" in capsys.readouterr().out

    # The same command again, bookkeeping settings changed: no new run at all, the parent is the same.
    assert main(["grid", *MATRIX, "--storage", storage, "--no-progress", "--checkpoint-every", "1",
                 "--expert-concurrency", "sequential", "--resume", "false"]) == 0
    assert len(_runs("tags.`ltexp.role` = 'experiment'")) == 8
    assert len(_runs("tags.`ltexp.role` = 'grid'")) == 1
    assert "8/8 cells done (0 run by this worker, 0 reused" in capsys.readouterr().out

    # A new grid (other Optuna storage) overlapping this one reuses the FINISHED runs of equal configs.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["grid", "--methods", "baseline", *MATRIX[2:6], "--seeds", "1,2", "--epochs", "2", "--storage", other,
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "4/4 cells done (2 run by this worker, 2 reused FINISHED runs)" in out
    assert len(_runs("tags.`ltexp.role` = 'experiment'")) == 10


def test_failed_cells_fail_the_grid_and_a_rerun_retries_only_them(mlflow_store, tmp_path, capsys):
    missing = tmp_path / "missing"
    argv = ["grid", "--datasets", f"digits,folder:{missing}", "--methods", "baseline", "--imb-types", "exp",
            "--imb-factors", "0.1", "--seeds", "0", "--epochs", "1", "--storage", f"sqlite:///{tmp_path / 'o.db'}",
            "--no-progress"]
    for attempt in (1, 2):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert exc.value.code == 2 and err.startswith("ltexp: error: grid grid-") and "1 of 2 cells failed" in err
        failed = _runs("tags.`ltexp.role` = 'experiment' and attributes.status = 'FAILED'")
        assert len(failed) == attempt and "missing does not exist" in failed[0].data.tags["ltexp.error"]
        done = _runs("tags.`ltexp.role` = 'experiment' and attributes.status = 'FINISHED'")
        assert [r.info.run_name for r in done] == ["baseline·digits·exp0.1·e1·s0"]  # run once, then skipped
    (parent,) = _runs("tags.`ltexp.role` = 'grid'")
    assert parent.info.status == "FAILED" and "1 of 2 cells failed" in parent.data.tags["ltexp.error"]


def test_a_killed_grid_restarted_runs_only_the_missing_cells(subprocess_env, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "ltexp", "grid", "--methods", "baseline", "--imb-types", "exp", "--imb-factors",
           "0.1,0.01", "--seeds", "0,1", "--epochs", "12", "--storage", storage, "--heartbeat-s", "1",
           "--grid-name", "killed", "--no-progress"]
    mlflow.set_tracking_uri(subprocess_env["MLFLOW_TRACKING_URI"])
    worker = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    finished = []
    while time.monotonic() < deadline and worker.poll() is None:
        finished = _runs("tags.`ltexp.grid` = 'killed' and attributes.status = 'FINISHED' "
                         "and tags.`ltexp.role` = 'experiment'")
        running = _runs("tags.`ltexp.grid` = 'killed' and attributes.status = 'RUNNING' "
                        "and tags.`ltexp.role` = 'experiment'")
        if len(finished) >= 2 and running:
            break
        time.sleep(0.1)
    assert worker.poll() is None, "the grid ended before it could be killed mid-cell"
    worker.send_signal(signal.SIGKILL)  # no handler runs: the cell's run and trial stay RUNNING
    worker.wait(timeout=30)
    before = {r.info.run_id for r in finished}
    (victim,) = running
    assert 2 <= len(before) < 4

    again = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"4/4 cells done ({4 - len(before)} run by this worker, 0 reused" in again.stdout
    runs = _runs("tags.`ltexp.grid` = 'killed' and tags.`ltexp.role` = 'experiment'")
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert len(done) == 4 and len({r.data.tags["ltexp.cell"] for r in done}) == 4  # every cell exactly once
    assert before <= {r.info.run_id for r in done}  # the cells finished before the kill were not re-run
    killed = MlflowClient().get_run(victim.info.run_id)
    assert killed.info.status == "KILLED" and "stopped (no heartbeat)" in killed.data.tags["ltexp.error"]
    assert len(runs) == 5  # four cells plus the one attempt that was killed
    trials = optuna.load_study(study_name="killed", storage=storage).get_trials()
    assert sorted(t.params["cell"] for t in trials if t.state.name == "COMPLETE") == list(range(4))
    assert [t.state.name for t in trials].count("FAIL") == 1  # the killed attempt, failed by its heartbeat


def _pids_of_children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as fh:
        return {int(p) for p in fh.read().split()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_grid_jobs_runs_helper_workers_that_share_the_cells(subprocess_env, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "ltexp", "grid", "--methods", "baseline,resample", "--imb-types", "exp",
           "--imb-factors", "0.1,0.01", "--seeds", "0", "--epochs", "6", "--storage", storage, "--grid-name", "jobs",
           "--jobs", "2", "--threads", "2", "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [line for line in proc.stdout.splitlines() if line.startswith("grid jobs: 4/4 cells done")]
    assert len(summaries) == 2, proc.stdout  # the command's worker and its helper each finished
    ran = [int(line.split("(")[1].split()[0]) for line in summaries]
    assert sum(ran) == 4  # every cell run once, by one of the two
    mlflow.set_tracking_uri(subprocess_env["MLFLOW_TRACKING_URI"])
    runs = _runs("tags.`ltexp.grid` = 'jobs' and tags.`ltexp.role` = 'experiment'")
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["ltexp.cell"] for r in runs}) == 4
    (parent,) = _runs("tags.`ltexp.grid` = 'jobs' and tags.`ltexp.role` = 'grid'")
    assert parent.info.status == "FINISHED"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel's parent-death signal is Linux's")
def test_grid_jobs_helpers_end_with_their_command(subprocess_env, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "ltexp", "grid", "--methods", "baseline", "--imb-types", "exp,step",
           "--imb-factors", "0.1,0.01", "--seeds", "0", "--epochs", "400", "--storage", storage,
           "--grid-name", "orphans", "--jobs", "2", "--no-progress"]
    command = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    helpers: set[int] = set()
    try:
        while time.monotonic() < deadline and not helpers and command.poll() is None:
            helpers = _pids_of_children(command.pid)
            time.sleep(0.1)
        assert helpers, "no helper worker was started"
        command.send_signal(signal.SIGKILL)  # no handler runs in the command: the kernel tells its helpers
        command.wait(timeout=30)
        while time.monotonic() < deadline and any(_alive(p) for p in helpers):
            time.sleep(0.1)
        assert not any(_alive(p) for p in helpers), "a helper worker outlived its command"
    finally:
        for pid in helpers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_two_workers_share_one_postgres_storage_and_run_every_cell_once(postgres_url, tmp_path):
    base = postgres_url.rstrip("/")
    tracking_uri, storage = (base, base) if base.count("/") > 2 else (f"{base}/mlflow", f"{base}/optuna")
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri,
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    grid = f"pg-{os.getpid()}"
    cmd = [sys.executable, "-m", "ltexp", "grid", *MATRIX, "--storage", storage, "--grid-name", grid,
           "--experiment", grid, "--no-progress"]
    # Both start at once: they race to create the study and then for every cell.
    workers = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for _ in range(2)]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err[-3000:]
        outputs.append(out)
    mlflow.set_tracking_uri(tracking_uri)
    runs = _runs(f"tags.`ltexp.grid` = '{grid}' and tags.`ltexp.role` = 'experiment'")
    assert len(runs) == 8 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["ltexp.config_hash"] for r in runs}) == 8  # every cell exactly once
    (parent,) = _runs(f"tags.`ltexp.grid` = '{grid}' and tags.`ltexp.role` = 'grid'")
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert {r.info.experiment_id for r in runs} == {parent.info.experiment_id}  # not in Default
    assert parent.info.experiment_id == mlflow.get_experiment_by_name(grid).experiment_id
    per_worker = [int(out.split("(")[1].split(" run by")[0]) for out in outputs]
    assert sum(per_worker) == 8 and min(per_worker) >= 1, outputs  # both did a share of the work
    trials = optuna.load_study(study_name=grid, storage=storage).get_trials()
    assert sorted(t.params["cell"] for t in trials) == list(range(8))
    assert {t.state.name for t in trials} == {"COMPLETE"}


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_cell_queue_hands_each_cell_out_once_and_retries_a_dead_workers_cell(tmp_path, kind):
    from ltexp import schema
    from ltexp.coord.cells import open_cell_queue

    url = str(tmp_path / "grid.log") if kind == "journal" else f"sqlite:///{tmp_path / 'grid.db'}"
    a, created_a = open_cell_queue(url, "q", 3, {"cells": [1, 2, 3]}, heartbeat_s=1)
    b, created_b = open_cell_queue(url, "q", 3, {"cells": [1, 2, 3]}, heartbeat_s=1)
    assert created_a and not created_b
    held_by_a, held_by_b = a.claim(), b.claim()
    assert (held_by_a.cell, held_by_b.cell) == (0, 1)  # one cell each, lowest first
    a.set_attrs(held_by_a, {schema.CELL_RUN_ID: "run-of-the-dead-worker"})
    assert b.finish(held_by_b, 0.5, {})
    time.sleep(3.5)  # worker a is dead: no beat for more than 2 x 1 s (sqlite's clock has 1 s steps)
    third = b.claim()  # fails a's stale cell and puts it back behind cell 2
    assert third.cell == 2 and b.counts() == {"done": 1, "running": 1, "waiting": 1, "failed": 0}
    assert b.finish(third, 0.5, {})
    retry = b.claim()
    assert retry.cell == 0 and retry.earlier_run_ids == ["run-of-the-dead-worker"]
    assert b.finish(retry, 0.5, {}) and not a.finish(held_by_a, 0.5, {})  # the dead attempt cannot finish now
    assert b.counts() == {"done": 3, "running": 0, "waiting": 0, "failed": 0} and b.claim() is None
    b._enqueue(1)  # a cell enqueued twice (two workers repairing the queue at once) still runs once
    assert b.claim() is None and b.counts()["done"] == 3
    assert [t.user_attrs.get("ltexp.duplicate_of") for t in b.trials()][-1] is not None
    with pytest.raises(LtexpError, match="exists .* with other cells or settings"):
        open_cell_queue(url, "q", 3, {"cells": [1, 2, 4]}, heartbeat_s=1)


CLAIM_ALL = """
import os, pathlib, sys, time
from ltexp.coord.cells import open_cell_queue
queue, _ = open_cell_queue(sys.argv[1], "race", 40, {"n": 40}, heartbeat_s=60)
# Start together (a loaded machine may start one interpreter seconds after the other), then
# claim at a steady pace, so both workers really compete for the cells.
ready = pathlib.Path(sys.argv[2])
(ready / str(os.getpid())).touch()
deadline = time.monotonic() + 120
while len(list(ready.iterdir())) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
got = []
while (claim := queue.claim()) is not None:
    got.append(claim.cell)
    queue.finish(claim, 0.0, {})
    time.sleep(0.02)
print(",".join(map(str, got)))
"""


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_processes_claiming_from_one_queue_never_share_a_cell(tmp_path, kind):
    url = f"sqlite:///{tmp_path / 'race.db'}" if kind == "sqlite" else str(tmp_path / "race.log")
    (tmp_path / "ready").mkdir()
    workers = [subprocess.Popen([sys.executable, "-c", CLAIM_ALL, url, str(tmp_path / "ready")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    claimed = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        claimed.append([int(c) for c in out.strip().split(",") if c])
    assert sorted(claimed[0] + claimed[1]) == list(range(40)), claimed  # each cell exactly once
    assert min(len(c) for c in claimed) > 0


def test_paper_preset_sets_the_papers_protocol_and_explicit_settings_win():
    paper = {c.cfg.method.method: c.cfg for c in build_cells(
        GridConfig(methods="baseline,lws,split", imb_types="exp", imb_factors="0.01", seeds="0", preset="paper"), {})}
    for cfg in paper.values():
        assert cfg.preset == "paper" and cfg.model.model == "resnet18" and cfg.data.val_source == "paper"
        assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.lr, cfg.optim.momentum) == (100, 128, 0.1, 0.9)
        assert (cfg.optim.weight_decay, cfg.optim.lr_step, cfg.optim.lr_gamma) == (2e-4, 150, 0.1)
        assert cfg.method.lws_mode == "joint"
    assert paper["split"].optim.clip_norm == 5.0 and paper["baseline"].optim.clip_norm == 0.0
    ours = build_cells(GridConfig(methods="lws", imb_types="exp", imb_factors="0.01", seeds="0"), {})[0].cfg
    assert (ours.preset, ours.model.model, ours.data.val_source, ours.method.lws_mode) == (
        "ltexp", "smallcnn", "holdout", "decoupled")
    assert config_hash(ours) != config_hash(paper["lws"])
    explicit = build_cells(GridConfig(methods="lws", imb_types="exp", imb_factors="0.01", seeds="0", preset="paper"),
                           {"data": {"val_source": "holdout"}, "optim": {"epochs": 3}})[0].cfg
    assert (explicit.data.val_source, explicit.optim.epochs, explicit.model.model) == ("holdout", 3, "resnet18")


def test_config_hash_ignores_bookkeeping_only():
    (cell,) = build_cells(GridConfig(methods="baseline", imb_types="exp", imb_factors="0.1", seeds="0"), {})
    renamed = build_cells(GridConfig(methods="baseline", imb_types="exp", imb_factors="0.1", seeds="0"),
                          {"tracking": {"experiment": "elsewhere"}}, device="cpu")[0]
    assert renamed.config_hash == cell.config_hash
    other_seed = build_cells(GridConfig(methods="baseline", imb_types="exp", imb_factors="0.1", seeds="1"), {})[0]
    assert other_seed.config_hash != cell.config_hash


@pytest.mark.fresh_store  # the grid must not create the store
@pytest.mark.parametrize("argv, message", [
    (["--methods", "baseline,nope"], "unknown method 'nope' in --methods: allowed are baseline"),
    (["--imb-factors", "0.1,big"], "--imb-factors 'big' is not a number"),
    (["--imb-factors", "2"], "--imb-factor 2.0 is outside (0, 1]"),
    (["--datasets", "mnist"], "unknown --dataset 'mnist'"),
    (["--seeds", ""], "--seeds is empty"),
    (["--preset", "fast"], "unknown --preset 'fast': allowed are ltexp, field, paper"),
])
def test_bad_grid_input_is_one_line_and_stores_nothing(mlflow_store, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["grid", *argv, "--storage", f"sqlite:///{tmp_path / 'optuna.db'}", "--no-progress"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ltexp: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "optuna.db").exists() and not (tmp_path / "mlflow.db").exists()
    with pytest.raises(LtexpError, match="grid dimension"):
        build_cells(GridConfig(), {"method": {"method": "lws"}})
