"""Command line: `ltexp train` and `ltexp data`. Parses arguments into configs; no logic.

Flags are generated from the config dataclasses, so `--imb-factor` is always the field
`imb_factor`, the MLproject parameter `imb_factor` and the MLflow param `imb_factor`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from ltexp import LtexpError, __version__
from ltexp.config import (AUTO, DataConfig, MethodConfig, ModelConfig, OptimConfig, SplitConfig, TrackingConfig,
                          TuneConfig, resolve_config)

SECTIONS = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig, "method": MethodConfig,
            "split": SplitConfig, "tracking": TrackingConfig, "tune": TuneConfig}
TRAIN_SECTIONS = ("data", "model", "optim", "method", "split", "tracking")
# Fields whose default depends on the data set or method (config.PRESETS); "auto" on the command line.
AUTO_FIELDS = {"model", "epochs", "batch_size", "lr", "weight_decay", "lr_step", "augment", "val_per_class",
               "clip_norm"}

HELP = {
    "dataset": "digits (embedded default), cifar10, cifar100 or folder:<path>",
    "data_dir": "folder holding (or receiving) the CIFAR archives",
    "imb_type": "long-tail profile: exp or step",
    "imb_factor": "smallest / largest class count, in (0, 1]; 1 keeps the counts",
    "val_source": "holdout (balanced, from unused training images) or paper (9:1 split of the test set)",
    "val_per_class": "holdout validation images per class (auto: digits 20, CIFAR-10 100, CIFAR-100 20)",
    "image_size": "side in pixels that folder images are resized to",
    "augment": "crop_flip, crop or none (auto: crop_flip for 32 px, crop for digits)",
    "download": "download missing CIFAR archives (true/false)",
    "data_seed": "seed of the long-tail subsample and validation carve",
    "model": "smallcnn, resnet18 (the paper) or resnet32 (auto: by image size)",
    "epochs": "epochs of the main stage (auto: CIFAR 200, digits 100)",
    "batch_size": "images per step (auto: CIFAR 128, digits 64)",
    "lr": "initial SGD learning rate (auto: CIFAR 0.1, digits 0.05)",
    "momentum": "SGD momentum",
    "weight_decay": "L2 weight decay (auto: CIFAR 2e-4)",
    "lr_step": "epochs between learning-rate decays (auto: CIFAR 150)",
    "lr_gamma": "learning-rate decay factor",
    "clip_norm": "clip the gradient's global L2 norm to this, 0 = off (auto: 5 for split, as the paper; else 0)",
    "method": "baseline, resample, lws or split (class-group experts)",
    "sampling": "resample: over (the paper's ROS), under or balanced",
    "lws_mode": "lws: joint (the paper) or decoupled (Kang et al. 2019)",
    "lws_epochs": "lws decoupled: epochs of scale-only training",
    "lws_lr": "lws decoupled: learning rate of the scales",
    "num_groups": "split: number of class groups / experts (2 = head, tail)",
    "split_at": "split: class ranks where groups 2.. start, e.g. 5 or 3,6 (empty: equal numbers of classes)",
    "expert_mode": "split: own (each expert sees only its classes) or other (plus an \"other\" label)",
    "other_size": "split, expert_mode other: \"other\" images per epoch = mean, min or max own-class count",
    "fusion": "split: auto (best on validation), concat, absnorm, softmax, calibrated, other or calibrated_other",
    "lws": "split: LWS in every expert (true/false)",
    "register_as": "register the run's model under this name when the run ends (empty: don't)",
    "alias": "alias given to that registered version",
    "n_trials": "tune: trials to finish (COMPLETE or PRUNED); rerunning continues the study up to this",
    "study_name": "tune: Optuna study name (empty: ltexp-<dataset>-<imb_type>-<imb_factor>-<metric>)",
    "storage": "tune: Optuna storage, RDB URL (sqlite:///..., postgresql://...) or journal file (*.log); "
               "empty: sqlite optuna.db beside the MLflow sqlite store",
    "metric": "tune: validation objective, e.g. val_acc, val_tail_acc, 0.5*val_acc+0.5*val_tail_acc",
    "search": "tune: extra dimensions, comma-separated: lr, weight_decay, expert_mode, other_size, lws, num_groups",
    "split_min": "tune: smallest class rank a group may start at",
    "split_max": "tune: largest class rank a group may start at (0: K-1)",
    "max_groups": "tune: most groups when num_groups is searched",
    "fusions": "tune: fusion rules searched, comma-separated (empty: all that apply)",
    "clip_min": "tune: clip_norm search range, lower end (log scale; \"off\" is always a choice)",
    "clip_max": "tune: clip_norm search range, upper end",
    "pruner": "tune: median, hyperband or none",
    "sampler": "tune: tpe or random (seeded with --seed)",
    "heartbeat_s": "tune: RDB heartbeat interval; a trial silent for twice this is failed and retried",
    "model_name": "tune: registered model name (empty: ltexp-<dataset>)",
    "experiment": "MLflow experiment name (ignored under `mlflow run`, which chooses it)",
    "run_name": "MLflow run name (empty: MLflow picks one)",
}


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (and fail the `mlflow run` run, if any)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        _fail(f"{self.prog}: {message}")


def _fail(message: str, code: int = 2):
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


def _add_section(parser: argparse.ArgumentParser, section: str, only: set[str] | None = None) -> None:
    group = parser.add_argument_group(section)
    for f in fields(SECTIONS[section]):
        if only is not None and f.name not in only:
            continue
        auto = f.name in AUTO_FIELDS
        default = AUTO if auto else (f.default if f.default is not MISSING else None)
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"{section}.{f.name}", default=default,
                           type=_typed(str(f.type), f.name, auto), metavar=str(f.type).upper(),
                           help=f"{HELP.get(f.name, '')} (default: {default})")


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
    for sub, sections in ((train, TRAIN_SECTIONS), (tune, (*TRAIN_SECTIONS, "tune"))):
        for section in sections:
            _add_section(sub, section)
        sub.add_argument("--seed", type=_typed("int", "seed", False), default=0, help="training seed (default: 0)")
        sub.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
        sub.add_argument("--threads", type=_typed("int", "threads", False), default=None,
                         help="torch CPU threads (default: LTEXP_THREADS, else OMP_NUM_THREADS, else the CPUs "
                              "this process may use); give each of several workers on one machine its share")
    train.add_argument("--no-progress", action="store_true", help="no progress bars")

    register = commands.add_parser("register", help="register a run's model as a new version, with an alias")
    register.add_argument("--run-id", required=True, help="the MLflow run whose model is registered")
    register.add_argument("--name", required=True, help="registered model name, e.g. ltexp-digits")
    register.add_argument("--alias", default="candidate", help="alias set on the new version (default: candidate)")

    data = commands.add_parser("data", help="show the long-tail profile of a data set (no training)")
    _add_section(data, "data")
    data.add_argument("--json", action="store_true", help="print JSON instead of a table")
    data.add_argument("--output-dir", default=".", help="where class_counts.png is saved (default: .)")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from ltexp.experiment import run_experiment

    sections = _sections(args)
    cfg = resolve_config(sections, seed=args.seed, device=args.device)
    result = run_experiment(cfg, progress=not args.no_progress)
    keys = ["test_acc", "test_head_acc", "test_tail_acc", "test_many_acc", "test_medium_acc", "test_few_acc",
            "test_macro_acc", "test_ece", "test_oracle_acc", "test_oracle_head_acc", "test_oracle_tail_acc",
            "test_routing_acc", "val_acc", "best_val_acc", "train_time_s", "test_time_s"]
    rows = [(k, f"{result.metrics[k]:.4f}") for k in keys if k in result.metrics and result.metrics[k] == result.metrics[k]]
    width = max(len(k) for k, _ in rows)
    print(f"\n{cfg.method.method} on {cfg.data.dataset} ({cfg.data.imb_type}, {cfg.data.imb_factor}), seed {cfg.seed}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if result.fusion_table is not None:
        cols = ["fusion", "val_acc", "test_acc", "test_head_acc", "test_tail_acc", "test_routing_acc"]
        print("\nfusion rules (chosen on validation: {}; oracle test_acc {:.4f} uses true groups):".format(
            result.fusion, result.metrics["test_oracle_acc"]))
        print(result.fusion_table[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"MLflow run {result.run_id}: see it with `mlflow ui`")
    if result.registered_version is not None:
        print(f"registered {cfg.tracking.register_as} version {result.registered_version} as @{cfg.tracking.alias}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from ltexp.tune import run_study

    sections = _sections(args)
    tune_cfg = TuneConfig(**{k: v for k, v in sections.pop("tune").items()})
    sections["method"]["method"] = "split"
    cfg = resolve_config(sections, seed=args.seed, device=args.device)
    result = run_study(cfg, tune_cfg)
    print(f"\nstudy {result.study_name}: {result.trials_run} trials run now; best {tune_cfg.metric} = {result.best_value:.4f}")
    print("best params: " + ", ".join(f"{k}={v}" for k, v in result.best_params.items()))
    for key in ("test_acc", "test_head_acc", "test_tail_acc", "test_oracle_acc", "test_routing_acc"):
        if key in result.test_metrics:
            print(f"  {key:<18} {result.test_metrics[key]:.4f}")
    print(f"experts trained {result.experts_trained}, reused {result.experts_reused}")
    print(f"registered version {result.version} as @candidate; {result.decision}")
    print(f"MLflow run {result.run_id}: see it with `mlflow ui`")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from ltexp import tracking

    version = tracking.register_model(args.run_id, args.name, args.alias)
    print(f"registered {args.name} version {version}" + (f" as @{args.alias}" if args.alias else "")
          + f": serve it with `mlflow models serve -m models:/{args.name}@{args.alias or version} --env-manager local`")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from ltexp import plots
    from ltexp.data import build_dataset

    cfg = resolve_config(_sections(args)).data
    data = build_dataset(cfg)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `ltexp` console script."""
    args = build_parser().parse_args(argv)
    try:
        from ltexp.threads import configure_threads

        configure_threads(getattr(args, "threads", None))
        return {"train": cmd_train, "tune": cmd_tune, "data": cmd_data, "register": cmd_register}[args.command](args)
    except LtexpError as exc:
        _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except KeyboardInterrupt:
        print("ltexp: interrupted", file=sys.stderr)
        return 130
