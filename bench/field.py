"""The field's table and the paper's Table 3 on CIFAR-10-LT, in one call on one GPU (issue 23).

Reads one pack (`ltexp data --pack`) holding CIFAR-10-LT exp 0.01 with a balanced holdout
(100 images per class, for `--preset field`) and the paper's four CIFAR-10 sets (exp/step x
0.1/0.01, validation 9:1 from the test set, for `--preset paper`); see bench/field.sh for the
commands that make it. Then, within `--budget-s`:

1. **Probe.** For each N in `--probe-jobs`, `ltexp grid --jobs N` trains N baseline cells of
   `--probe-epochs` epochs at `--preset field` at once. Runs per hour at N = N x 3600 / (one run's
   projected wall: field epochs x its steady epoch time + its start-up), from the cells' own
   `epoch_time_s` curves and run times. The N with the most runs per hour is used below
   (`--jobs` skips the probe).
2. **Tables.** Three grids at once, each `ltexp grid --jobs k`, sharing N by their work
   (`--shares`): the field's table (`--field-methods` x `--field-seeds`, seed-major, so every
   method's first seed comes first), the best honest split design (split, balanced softmax
   experts, a distilled student with class-balanced sampling) and the paper's Table 3 columns
   (baseline, LWS, split on the four sets at `--preset paper`). At the deadline every grid gets
   SIGTERM: a cell in progress ends KILLED, finished ones stay.
3. **Report.** `ltexp report` per experiment (field, paper) into the output folder, and
   summary.json: the probe, N, per grid the cells done and its wall, the whole call's wall, and
   per field method the mean test accuracy beside the published figure and the gains over CE.

Rehearse on a CPU with tiny settings (bench/field.sh's header gives the command). The figures
depend on the machine: compare the rows of one call only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIELD_METHODS = "baseline,balanced_softmax,logit_adjust,logit_adjust_posthoc,ldam_drw,crt,tau_norm"
PAPER_METHODS = "baseline,lws,split"
STUDENT_FLAGS = ["--methods", "split", "--loss", "balanced_softmax", "--distill", "true",
                 "--student-sampling", "balanced"]


def log(message: str) -> None:
    print(f"[field {time.strftime('%H:%M:%S')}] {message}", flush=True)


def ltexp(*args: str) -> list[str]:
    return [sys.executable, "-m", "ltexp", *args]


def field_schedule(epochs: int) -> list[str]:
    """`--preset field`'s schedule stretched to `epochs` (its own is for 200: warm-up 5, x0.01
    after 160 and x0.0001 after 180, DRW from 161), for the probe's and a rehearsal's short runs."""
    if epochs == 200:
        return []
    first = min(max(1, round(0.8 * epochs)), epochs - 1)  # two increasing milestones in [1, epochs]
    second = min(epochs, max(first + 1, round(0.9 * epochs)))
    return ["--lr-milestones", f"{first},{second}", "--warmup-epochs", str(min(5, first - 1)),
            "--drw-epoch", str(min(epochs, first + 1))]


def grid_command(name: str, experiment: str, jobs: int, storage: str, flags: list[str]) -> list[str]:
    return ltexp("grid", "--grid-name", name, "--experiment", experiment, "--jobs", str(jobs), "--storage", storage,
                 "--heartbeat-s", "30", "--no-progress", *flags)


def run_until(commands: dict[str, list[str]], deadline: float, logs: Path) -> dict[str, dict]:
    """Start every command at once, each in its own process group, logging to logs/<name>.log;
    SIGTERM those still running at `deadline` (monotonic s). Returns name -> rc, wall_s, stopped."""
    started, procs = time.monotonic(), {}
    for name, cmd in commands.items():
        out = open(logs / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO), out)
        log(f"started {name}: {' '.join(cmd[2:])}")
    result = {}
    while procs:
        for name, (proc, out) in list(procs.items()):
            if proc.poll() is not None:
                result[name] = {"rc": proc.returncode, "wall_s": round(time.monotonic() - started, 1), "stopped": False}
                out.close()
                del procs[name]
                log(f"{name} ended rc={proc.returncode} after {result[name]['wall_s']} s")
        if procs and time.monotonic() >= deadline:
            for name, (proc, out) in procs.items():
                log(f"deadline: SIGTERM to {name}")
                proc.send_signal(signal.SIGTERM)  # the grid stops its helpers; their cells end KILLED
            for name, (proc, out) in procs.items():
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                out.close()
                result[name] = {"rc": proc.returncode, "wall_s": round(time.monotonic() - started, 1), "stopped": True}
            procs = {}
        time.sleep(1.0)
    return result


def finished_runs(experiment: str, grid: str | None = None) -> list:
    import mlflow

    query = "tags.`ltexp.role` = 'experiment' and attributes.status = 'FINISHED'"
    if grid:
        query += f" and tags.`ltexp.grid` = '{grid}'"
    try:
        return mlflow.search_runs(experiment_names=[experiment], filter_string=query, output_format="list")
    except Exception:  # the experiment does not exist: nothing finished
        return []


def probe(args, storage: str, logs: Path, deadline: float) -> list[dict]:
    """Runs per hour of `--preset field` baseline cells at each N of `--probe-jobs`."""
    from mlflow import MlflowClient

    rows = []
    for n in [int(x) for x in args.probe_jobs.split(",")]:
        name = f"probe{n}"
        flags = ["--datasets", f"pack:{args.pack}", "--imb-types", "exp", "--imb-factors", "0.01", "--methods",
                 "baseline", "--seeds", ",".join(map(str, range(n))), "--preset", "field", "--epochs",
                 str(args.probe_epochs), *field_schedule(args.probe_epochs), *args.extra]
        # An experiment per N: a grid reuses a FINISHED run of the same configuration in its experiment.
        ran = run_until({name: grid_command(name, name, n, storage, flags)}, deadline, logs)[name]
        runs = finished_runs(name, name)
        epoch_s, startup_s = [], []
        for run in runs:
            history = sorted(MlflowClient().get_metric_history(run.info.run_id, "epoch_time_s"), key=lambda m: m.step)
            steady = [m.value for m in history[1:]] or [m.value for m in history]
            epoch_s.append(statistics.median(steady))
            startup_s.append((run.info.end_time - run.info.start_time) / 1000 - sum(m.value for m in history))
        row = {"jobs": n, "cells": n, "finished": len(runs), "grid_wall_s": ran["wall_s"], "rc": ran["rc"]}
        if epoch_s:
            projected = args.field_epochs * statistics.median(epoch_s) + statistics.median(startup_s)
            row.update(steady_epoch_s=round(statistics.median(epoch_s), 4), startup_s=round(statistics.median(startup_s), 1),
                       projected_run_s=round(projected, 1), runs_per_hour=round(n * 3600 / projected, 1))
        rows.append(row)
        log(f"probe N={n}: {json.dumps(row)}")
        if ran["stopped"]:
            break
    return rows


def published_field() -> dict[str, float]:
    """The first published figure per method for CIFAR-10-LT IF100 (ltexp/field_results.csv)."""
    out: dict[str, float] = {}
    with open(REPO / "ltexp" / "field_results.csv") as fh:
        for row in csv.DictReader(line for line in fh if not line.startswith("#")):
            if row["metric"] == "acc":
                out.setdefault(row["method"], float(row["value"]))
    return out


def field_check(experiment: str) -> dict:
    """Per method: mean test accuracy (percent) of FINISHED runs (validation-selected, and of the
    last epoch), n, published, difference; gains over CE (of the selected models)."""
    by_method: dict[str, list[float]] = {}
    oracle: dict[str, list[float]] = {}
    last: dict[str, list[float]] = {}  # the last epoch's model, beside the validation-selected one
    for run in finished_runs(experiment):
        key = run.data.tags.get("ltexp.method", "?")
        if key == "split":
            key = "split_student"
            if "test_oracle_acc" in run.data.metrics:
                oracle.setdefault(key, []).append(100 * run.data.metrics["test_oracle_acc"])
        if "test_acc" in run.data.metrics:
            by_method.setdefault(key, []).append(100 * run.data.metrics["test_acc"])
        if "test_acc__last_epoch" in run.data.metrics:
            last.setdefault(key, []).append(100 * run.data.metrics["test_acc__last_epoch"])
    published = published_field()
    rows = {}
    for method, values in sorted(by_method.items()):
        mean = statistics.fmean(values)
        rows[method] = {"test_acc": round(mean, 2), "n": len(values),
                        "std": round(statistics.stdev(values), 2) if len(values) > 1 else None,
                        "published": published.get(method),
                        "minus_published": round(mean - published[method], 2) if method in published else None}
        if method in oracle:
            rows[method]["oracle_acc"] = round(statistics.fmean(oracle[method]), 2)
        if method in last:
            rows[method]["last_epoch_acc"] = round(statistics.fmean(last[method]), 2)
    ce = rows.get("baseline", {}).get("test_acc")
    gains = {}
    for method in ("balanced_softmax", "ldam_drw", "logit_adjust"):
        if ce is not None and method in rows and rows[method]["published"] and "baseline" in published:
            ours, theirs = rows[method]["test_acc"] - ce, rows[method]["published"] - published["baseline"]
            gains[method] = {"gain_over_ce": round(ours, 2), "published_gain": round(theirs, 2),
                             "minus_published_gain": round(ours - theirs, 2)}
    return {"methods": rows, "gains": gains}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pack", required=True, help="the pack of the five CIFAR-10 sets (bench/field.sh makes it)")
    parser.add_argument("--out", required=True, help="folder for summary.json, the reports and field.log")
    parser.add_argument("--work", default="/tmp/ltexp-field", help="stores and logs of this call")
    parser.add_argument("--budget-s", type=float, default=480, help="the whole call, reports included")
    parser.add_argument("--report-s", type=float, default=45, help="kept for the reports at the end")
    parser.add_argument("--jobs", type=int, default=0, help="cells at once (0: the probe's best N)")
    parser.add_argument("--probe-jobs", default="1,4,8,16")
    parser.add_argument("--probe-epochs", type=int, default=3)
    parser.add_argument("--field-epochs", type=int, default=200)
    parser.add_argument("--paper-epochs", type=int, default=100)
    parser.add_argument("--field-methods", default=FIELD_METHODS)
    parser.add_argument("--field-seeds", default="0,1,2")
    parser.add_argument("--paper-seeds", default="0")
    parser.add_argument("--shares", default="0.55,0.1,0.35", help="of N: field, student, paper grids")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="flags for every grid (e.g. --compile reduce-overhead, or --device cpu --model smallcnn)")
    args = parser.parse_args()

    started = time.monotonic()
    deadline = started + args.budget_s - args.report_s
    work, out = Path(args.work), Path(args.out)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    storage = f"sqlite:///{work / 'optuna.db'}"
    args.pack = str(Path(args.pack).resolve())
    summary: dict = {"budget_s": args.budget_s, "pack": args.pack, "extra": args.extra}

    probe_rows = [] if args.jobs else probe(args, storage, logs, deadline)
    measured = [r for r in probe_rows if "runs_per_hour" in r]
    jobs = args.jobs or (max(measured, key=lambda r: r["runs_per_hour"])["jobs"] if measured else 1)
    summary.update(probe=probe_rows, jobs=jobs, probe_s=round(time.monotonic() - started, 1))
    log(f"N = {jobs} cells at once")

    shares = [float(x) for x in args.shares.split(",")]
    field_jobs, student_jobs = max(1, round(jobs * shares[0])), max(1, round(jobs * shares[1]))
    paper_jobs = max(1, jobs - field_jobs - student_jobs)
    pack = ["--datasets", f"pack:{args.pack}"]
    field = [*pack, "--imb-types", "exp", "--imb-factors", "0.01", "--preset", "field",
             "--epochs", str(args.field_epochs), *field_schedule(args.field_epochs), *args.extra]
    commands = {
        "field": grid_command("field", "field", field_jobs, storage,
                              [*field, "--methods", args.field_methods, "--seeds", args.field_seeds]),
        "student": grid_command("student", "field", student_jobs, storage,
                                [*field, *STUDENT_FLAGS, "--seeds", args.field_seeds]),
        "paper": grid_command("paper", "paper", paper_jobs, storage,
                              [*pack, "--imb-types", "exp,step", "--imb-factors", "0.1,0.01", "--preset", "paper",
                               "--methods", PAPER_METHODS, "--seeds", args.paper_seeds,
                               "--epochs", str(args.paper_epochs), *args.extra]),
    }
    t0 = time.monotonic()
    ended = run_until(commands, deadline, logs)
    summary["grids"] = {name: {**ended[name], "jobs": cmd[cmd.index("--jobs") + 1],
                               "finished_cells": len(finished_runs(cmd[cmd.index("--experiment") + 1], name))}
                        for name, cmd in commands.items()}
    summary["tables_wall_s"] = round(time.monotonic() - t0, 1)
    if ended["field"]["wall_s"] and summary["grids"]["field"]["finished_cells"]:
        done = sum(g["finished_cells"] for g in summary["grids"].values())
        summary["runs_per_hour_tables"] = round(done * 3600 / summary["tables_wall_s"], 1)

    for experiment in ("field", "paper"):
        if finished_runs(experiment):
            folder = work / f"report-{experiment}"
            rc = subprocess.run(ltexp("report", "--experiment", experiment, "--output-dir", str(folder), "--no-run"),
                                cwd=REPO, stdout=open(logs / f"report-{experiment}.log", "w"),
                                stderr=subprocess.STDOUT).returncode
            for name in ("report.md", "report.html"):
                if (folder / name).is_file():
                    (out / f"{experiment}-{name}").write_bytes((folder / name).read_bytes())
            summary[f"report_{experiment}_rc"] = rc
    summary["field_check"] = field_check("field")
    summary["wall_s"] = round(time.monotonic() - started, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    with open(out / "field.log", "w") as fh:  # every process's output, one after the other
        for path in sorted(logs.glob("*.log")):
            fh.write(f"===== {path.name}\n{path.read_text()[-200_000:]}\n")
    log(f"done in {summary['wall_s']} s: {json.dumps(summary['field_check'])}")
    return 0 if summary["grids"]["field"]["finished_cells"] else 1


if __name__ == "__main__":
    sys.exit(main())
