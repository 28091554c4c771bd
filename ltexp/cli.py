"""Command line: `ltexp train` and `ltexp data`. Parses arguments into configs; no logic.

Flags are generated from the config dataclasses, so `--imb-factor` is always the field
`imb_factor`, the MLproject parameter `imb_factor` and the MLflow param `imb_factor`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from ltexp import LtexpError, __version__, redact
from ltexp.config import (AUTO, DataConfig, LossConfig, MethodConfig, ModelConfig, OptimConfig, SplitConfig,
                          TrackingConfig, TuneConfig, resolve_config)
from ltexp.presets import RUN_PRESETS

SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "method": MethodConfig,
            "loss": LossConfig, "split": SplitConfig, "tracking": TrackingConfig, "tune": TuneConfig}
TRAIN_SECTIONS = ("data", "model", "optim", "method", "loss", "split", "tracking")
# What `ltexp tune` does not offer: it always trains split experts and searches these itself
# (clip_norm, split_at, fusion), registers under --model-name, never re-samples or runs cRT, and
# its trials train experts only (no router, no distilled student: `ltexp train --method split`).
NOT_TUNED = {"method", "sampling", "crt_epochs", "crt_lr", "clip_norm", "split_at", "fusion", "register_as", "alias",
             "router", "distill", "distill_temperature", "distill_weight", "student_sampling"}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and fail the `mlflow run` run, if any)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        _fail(message)


def _fail(message: str, code: int = 2):
    message = redact(message)  # argparse and library messages too, not only LtexpError's
    print(f"ltexp: error: {message}", file=sys.stderr)
    import os

    if os.environ.get("MLFLOW_RUN_ID"):
        from ltexp import tracking

        tracking.fail_existing_run(message)
    raise SystemExit(code)


def _typed(kind: str, name: str, auto: bool):
    flag = "--" + name.replace("_", "-")

    def parse(text: str):
        if auto and text == AUTO:
            return AUTO
        try:
            if kind == "int":
                number = float(text)  # MLproject "float" parameters may arrive as "3.0"
                if not number.is_integer():
                    raise ValueError
                return int(number)
            if kind == "float":
                return float(text)
            if kind == "bool":
                if text.lower() in ("true", "1", "yes", "on"):
                    return True
                if text.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
        except ValueError:
            allowed = {"int": "an integer", "float": "a number", "bool": "true or false"}[kind]
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not {allowed}{' or auto' if auto else ''}") from None
        return text

    return parse


def _add_section(parser: argparse.ArgumentParser, section: str, skip: set[str] = frozenset()) -> None:
    """One flag per config field, help text and choices from the field's `setting(...)`.

    Each flag also answers to its underscore spelling (`--imb_factor`), which is how `mlflow run`
    passes parameters an entry point does not declare, so the MLproject stays thin.
    """
    group = parser.add_argument_group(section)
    for f in fields(SECTIONS[section]):
        if f.name in skip:
            continue
        auto = bool(f.metadata.get("auto"))
        default = AUTO if auto else (f.default if f.default is not MISSING else None)
        names = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])
        kind = str(f.type)
        group.add_argument(*names, dest=f"{section}.{f.name}", default=default, type=_typed(kind, f.name, auto),
                           metavar=kind.upper(), help=f"{f.metadata.get('help', '')} (default: {default})")


def _sections(args: argparse.Namespace) -> dict[str, dict]:
    out: dict[str, dict] = {name: {} for name in SECTIONS}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            out[section][name] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ltexp", description="Long-tailed image classification experiments, tracked in MLflow.")
    parser.add_argument("--version", action="version", version=f"ltexp {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train and evaluate one method, logged as one MLflow run")
    tune = commands.add_parser("tune", help="Optuna study over split experts; registers and guards the champion")
    for sub, sections, skip in ((train, TRAIN_SECTIONS, frozenset()), (tune, (*TRAIN_SECTIONS, "tune"), NOT_TUNED)):
        for section in sections:
            _add_section(sub, section, skip)
        sub.add_argument("--seed", type=_typed("int", "seed", False), default=0, help="training seed (default: 0)")
        sub.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    train.add_argument("--no-progress", action="store_true",
                       help="no progress output (default: bars on a terminal, a line per epoch or 5 s elsewhere)")
    tune.add_argument("--no-progress", action="store_true",
                      help="no progress output (default: trials done with an ETA, a bar on a terminal, else a "
                           "line per trial)")
    for sub in (train, tune):
        sub.add_argument("--no-resume", dest="tracking.resume", action="store_const", const=False,
                         help="start afresh, ignoring any checkpoint (same as --resume false)")
    train.add_argument("--preset", default="ltexp", choices=list(RUN_PRESETS),
                       help="protocol: ltexp (data-set defaults), paper (the paper's Table 1), field (Cao et "
                            "al.'s CIFAR-LT: ResNet-32, 200 epochs, warm-up 5, x0.01 at 160 and 180, DRW 161), "
                            "or imagenet_lt / places_lt / inat18 (Kang et al. 2020's large benchmarks, 224 px; "
                            "docs/large-benchmarks.md); a setting given on the command line wins (default: ltexp)")
    for action in train._actions:
        if "." in action.dest:
            action.default = argparse.SUPPRESS  # so a preset fills only what the user did not set

    runs = commands.add_parser("runs", help="housekeeping of MLflow runs")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, parser_class=_Parser)
    sweep = runs_commands.add_parser("sweep", help="close RUNNING runs whose process died (KILLED, reason in ltexp.error)")
    sweep.add_argument("--older-than", default="15m",
                       help="runs of other hosts are dead when their heartbeat is older than this (default: 15m); "
                            "runs of this host are dead when their process is gone")
    sweep.add_argument("--experiment", action="append", default=None,
                       help="experiment name to sweep (repeatable; default: every experiment)")

    register = commands.add_parser("register", help="register a run's model as a new version, with an alias")
    register.add_argument("--run-id", required=True, help="the MLflow run whose model is registered")
    register.add_argument("--name", required=True, help="registered model name, e.g. ltexp-digits")
    register.add_argument("--alias", default="candidate", help="alias set on the new version (default: candidate)")

    data = commands.add_parser("data", help="show the long-tail profile of a data set (no training)")
    _add_section(data, "data")
    data.add_argument("--json", action="store_true", help="print JSON instead of a table")
    data.add_argument("--output-dir", default=".", help="where class_counts.png is saved (default: .)")
    data.add_argument("--pack", default="", metavar="FILE",
                      help="also write the long-tailed data set (train, validation, test) to FILE, which "
                           "--dataset pack:FILE trains on without the source (default: no pack)")

    grid = commands.add_parser("grid", help="the study matrix (data sets x imbalance x methods x seeds), one tracked "
                                            "run per cell; resumable; many workers share it through --storage")
    from ltexp.grid import MATRIX_FIELDS, GridConfig

    for f in fields(GridConfig):
        kind = "int" if f.type in ("int", int) else "str"
        names = ["--" + f.name.replace("_", "-")] + (["--" + f.name] if "_" in f.name else [])  # -P name=value
        grid.add_argument(*names, dest="grid_" + f.name, default=f.default,
                          type=_typed(kind, f.name, False), metavar=kind.upper(),
                          help=f"{f.metadata['help']} (default: {f.default})")
    for section in TRAIN_SECTIONS:  # every train setting, fixed for all cells; unset ones stay unset
        _add_section(grid, section, MATRIX_FIELDS)
    for action in grid._actions:
        if "." in action.dest:
            action.default = argparse.SUPPRESS  # so a preset fills what the user did not set
    grid.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    grid.add_argument("--no-progress", action="store_true", help="no progress bar or per-cell lines")
    for sub in (train, tune, grid):
        sub.add_argument("--threads", type=_typed("int", "threads", False), default=None,
                         help="torch CPU threads (default: LTEXP_THREADS, else OMP_NUM_THREADS, else the CPUs this "
                              "process may use less those other jobs keep busy at start-up); give each of several "
                              "workers on one machine its share")

    dashboard = commands.add_parser("dashboard", help="Optuna's dashboard on the studies of ltexp tune and grid")
    dashboard.add_argument("--storage", default="", help="Optuna storage (default: $LTEXP_STORAGE, which keeps a "
                                                         "password off the command line, else ltexp tune's default)")
    dashboard.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; the "
                                                               "dashboard has no login)")
    dashboard.add_argument("--port", type=_typed("int", "port", False), default=8080, help="port (default: 8080)")

    report = commands.add_parser("report", help="tables and plots from an experiment's runs (the paper's Table 2 "
                                                "and eight-data-set table), also logged as a `report` run")
    report.add_argument("--experiment", default="ltexp", help="MLflow experiment to read (default: ltexp)")
    report.add_argument("--filter", default="", help="MLflow search filter on top, e.g. "
                                                     "\"tags.ltexp.dataset = 'cifar10'\" (default: none)")
    report.add_argument("--output-dir", "--output_dir", default="report",
                        help="where the files are written (default: report)")
    report.add_argument("--no-run", "--no_run", action="store_true", help="write the files only, log no `report` run")
    return parser


def preflight(cfg) -> None:
    """What can fail without training fails now, in one line: device, registry name, store; then
    the experiment's runs left RUNNING by dead processes are closed."""
    from ltexp import tracking
    from ltexp.engine import resolve_device

    resolve_device(cfg.device)
    if cfg.tracking.register_as:
        tracking.validate_registered_name(cfg.tracking.register_as, cfg.tracking.alias)
    tracking.check_store()
    _report_sweep(tracking.sweep(tracking.own_experiment_ids(cfg)))


def _report_sweep(closed: list[dict]) -> None:
    for run in closed:
        print(f"ltexp: closed stale run {run['run_id']} ({run['run_name']}) as KILLED: {run['reason']}", file=sys.stderr)


def _start_torch(args: argparse.Namespace) -> None:
    """Import torch and set its threads (`--threads`, LTEXP_THREADS, …: ltexp/threads.py), once a
    command's settings have passed their checks: a bad flag answers without loading torch."""
    from ltexp.threads import configure_threads

    configure_threads(getattr(args, "threads", None))


def cmd_train(args: argparse.Namespace) -> int:
    sections = _sections(args)
    cfg = resolve_config(sections, seed=args.seed, device=args.device, preset=args.preset)
    preflight(cfg)
    _start_torch(args)
    from ltexp.experiment import run_experiment  # after the checks: a bad setting fails without it

    result = run_experiment(cfg, progress=not args.no_progress)
    keys = ["test_acc", "test_head_acc", "test_tail_acc", "test_many_acc", "test_medium_acc", "test_few_acc",
            "test_macro_acc", "test_ece", "test_oracle_acc", "test_oracle_head_acc", "test_oracle_tail_acc",
            "test_routing_acc", "val_acc", "best_val_acc", "train_time_s", "test_time_s"]
    rows = [(k, f"{result.metrics[k]:.4f}") for k in keys if k in result.metrics and result.metrics[k] == result.metrics[k]]
    width = max(len(k) for k, _ in rows)
    print(f"\n{cfg.method.method} on {cfg.data.dataset} ({cfg.data.imb_type}, {cfg.data.imb_factor}), seed {cfg.seed}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if "test_oracle_acc" in result.metrics:  # several experts: every fusion rule beside the oracle
        cols = ["fusion", "val_acc", "test_acc", "test_head_acc", "test_tail_acc", "test_routing_acc"]
        print("\nfusion rules (chosen on validation: {}; oracle test_acc {:.4f} uses true groups):".format(
            result.fusion, result.metrics["test_oracle_acc"]))
        print(result.fusion_table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"MLflow run {result.run_id}: see it with `mlflow ui`")
    if result.registered_version is not None:
        print(f"registered {cfg.tracking.register_as} version {result.registered_version} as @{cfg.tracking.alias}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    sections = _sections(args)
    tune_cfg = TuneConfig(**{k: v for k, v in sections.pop("tune").items()})
    sections["method"]["method"] = "split"
    cfg = resolve_config(sections, seed=args.seed, device=args.device)
    if tune_cfg.model_name:
        from ltexp import tracking

        tracking.validate_registered_name(tune_cfg.model_name, flag="--model-name")
    preflight(cfg)
    _start_torch(args)
    from ltexp.tune import run_study  # after the checks, as in cmd_train

    result = run_study(cfg, tune_cfg, progress=not args.no_progress)
    ran = (f"{result.trials_finished} trials finished by {tune_cfg.jobs} jobs ({result.trials_run} in this process)"
           if tune_cfg.jobs > 1 else f"{result.trials_run} trials run now")
    print(f"\nstudy {result.study_name}: {ran}; best {tune_cfg.metric} = {result.best_value:.4f}")
    print("best params: " + ", ".join(f"{k}={v}" for k, v in result.best_params.items()))
    for key in ("test_acc", "test_head_acc", "test_tail_acc", "test_oracle_acc", "test_routing_acc"):
        if key in result.test_metrics:
            print(f"  {key:<18} {result.test_metrics[key]:.4f}")
    print(f"experts trained {result.experts_trained}, reused {result.experts_reused}")
    print(f"registered v{result.version} as @candidate; {result.decision}")
    print(f"MLflow run {result.run_id}: see it with `mlflow ui`")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from ltexp import tracking
    from ltexp.durations import parse_duration

    older_than = parse_duration(args.older_than)
    uri = tracking.check_store()
    ids = tracking.experiment_ids(args.experiment)
    if args.experiment and not ids:
        raise LtexpError(f"no experiment named {', '.join(args.experiment)} in {uri}")
    closed = tracking.sweep(ids, older_than)
    for run in closed:
        print(f"closed {run['run_id']} ({run['run_name']}, experiment {run['experiment_id']}): {run['reason']}")
    print(f"swept {len(ids)} experiment(s) in {redact(uri)}: {len(closed)} stale run(s) closed as KILLED")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from ltexp.coord.storage import default_storage, serve_dashboard

    serve_dashboard(args.storage or default_storage(), args.host, args.port)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from ltexp import tracking

    tracking.validate_registered_name(args.name, args.alias, flag="--name")
    version = tracking.register_model(args.run_id, args.name, args.alias)
    print(f"registered {args.name} version {version}" + (f" as @{args.alias}" if args.alias else "")
          + f": serve it with `mlflow models serve -m models:/{args.name}@{args.alias or version} --env-manager local`")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from ltexp.data import build_dataset

    cfg = resolve_config(_sections(args)).data
    _start_torch(args)  # folder and list images decode with torchvision
    if args.pack:
        from dataclasses import replace

        from ltexp.data.pack import write_pack

        meta = write_pack(cfg, args.pack)
        size = Path(args.pack).stat().st_size
        print(f"packed {meta['name']} ({cfg.imb_type} {cfg.imb_factor:g}, data seed {cfg.data_seed}) into {args.pack}: "
              f"{size / 2**20:.1f} MiB, sha256 {meta['sha256'][:16]}; train on it with --dataset pack:{args.pack}")
        cfg = replace(cfg, dataset=f"pack:{args.pack}")  # the profile below is read back from the pack
    data = build_dataset(cfg)
    from ltexp import plots  # matplotlib: once the data set has loaded
    table = data.counts_table()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chart = out_dir / "class_counts.png"
    fig = plots.class_count_chart(table, f"{cfg.dataset} {cfg.imb_type} {cfg.imb_factor}: training images per class")
    fig.savefig(chart, dpi=100)
    plots.close(fig)
    summary = {
        "dataset": cfg.dataset, "imb_type": cfg.imb_type, "imb_factor": cfg.imb_factor,
        "val_source": cfg.val_source,
        "totals": {"train": int(table["train"].sum()), "val": int(table["val"].sum()), "test": int(table["test"].sum())},
        "groups": {g: table.loc[table["group"] == g, "class"].tolist() for g in ("head", "tail")},
        "shots": {s: table.loc[table["shot"] == s, "class"].tolist() for s in ("many", "medium", "few")},
        "classes": table.to_dict(orient="records"),
        "chart": str(chart),
    }
    if args.json:
        print(json.dumps(summary, indent=2, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
        return 0
    print(f"{cfg.dataset}: {cfg.imb_type} imbalance, factor {cfg.imb_factor}, validation from {cfg.val_source}")
    print(table.to_string(index=False))
    totals = summary["totals"]
    print(f"\ntotal: {totals['train']} train, {totals['val']} val, {totals['test']} test; "
          f"imbalance ratio {table['train'].max() / table['train'].min():.1f}")
    print(f"head: {len(summary['groups']['head'])} classes, tail: {len(summary['groups']['tail'])} classes; "
          + ", ".join(f"{s}-shot: {len(v)}" for s, v in summary["shots"].items()))
    print(f"class-count chart: {chart}")
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from ltexp.grid import GridConfig, run_grid

    grid_cfg = GridConfig(**{f.name: getattr(args, "grid_" + f.name) for f in fields(GridConfig)})
    fixed = {name: values for name, values in _sections(args).items() if values and name in TRAIN_SECTIONS}
    _start_torch(args)
    helpers = None
    if grid_cfg.jobs > 1:  # this process is the first worker; the others share its threads
        import torch

        from ltexp.grid import GridHelpers
        from ltexp.threads import job_threads

        threads = job_threads(torch.get_num_threads(), grid_cfg.jobs)
        torch.set_num_threads(threads)
        helpers = GridHelpers(args.argv, grid_cfg.jobs, threads)
    try:
        result = run_grid(grid_cfg, fixed, device=args.device, progress=not args.no_progress,
                          on_ready=helpers.start if helpers else None)
    except BaseException:
        if helpers is not None:
            helpers.stop()
        raise
    codes = helpers.wait() if helpers is not None else []
    if any(codes):
        raise LtexpError(f"grid {result.grid_name}: {sum(1 for c in codes if c)} of {len(codes)} helper workers of "
                         f"--jobs {grid_cfg.jobs} failed (exit codes {codes}); their lines above say why")
    counts = result.counts
    print(f"grid {result.grid_name}: {counts['done']}/{result.cells} cells done "
          f"({len(result.ran)} run by this worker, {len(result.reused)} reused FINISHED runs) in {result.wall_s:.1f} s")
    print(f"MLflow run {result.run_id} (role grid); tables and plots: `ltexp report --filter "
          f"\"tags.ltexp.grid = '{result.grid_name}'\"`")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ltexp.report import build_report

    result = build_report(args.experiment, args.filter, args.output_dir, log_run=not args.no_run)
    print(result.terminal)
    print(f"\nreport: {result.html} ({len(result.files)} files in {args.output_dir})"
          + (f"; MLflow run {result.run_id} (role report)" if result.run_id else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ltexp` console script."""
    from ltexp import processes

    processes.install_signal_handlers()  # SIGTERM ends runs KILLED, like Ctrl-C
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `ltexp grid --jobs N` starts workers with it
    try:
        processes.follow_launcher()  # a SIGTERM that ends `mlflow run` ends this process's runs too
        return {"train": cmd_train, "tune": cmd_tune, "data": cmd_data, "register": cmd_register,
                "runs": cmd_runs, "grid": cmd_grid, "report": cmd_report, "dashboard": cmd_dashboard}[args.command](args)
    except LtexpError as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except BrokenPipeError:  # `ltexp data | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 141  # 128 + SIGPIPE, what a shell reports for a command its pipe's reader left
    except Exception as exc:
        # A tracking server's 401/403 can come from any MLflow call, mid-run too: one line, like
        # an LtexpError (the open run was marked FAILED where the server let it be).
        tracking = sys.modules.get("ltexp.tracking")  # loaded by any command that met a server
        line = tracking.refusal(exc) if tracking is not None else None
        if line is None:
            raise
        _fail(line)
    except KeyboardInterrupt as exc:
        print(f"ltexp: {processes.interrupt_reason(exc)}", file=sys.stderr)
        return getattr(exc, "exit_code", 130)
