"""Every name an ltexp run carries in MLflow, and what Optuna studies carry: the tracking schema.

One declaration per name (or per family of names, with `<placeholders>`): its kind (tag, param,
metric, artifact, version tag, study attr, trial attr), the runs that carry it and what it means.
The code writes tags through the constants below, and `tests/test_schema.py` walks real runs of
every role and fails on any key they carry that is not declared here; `docs/schema.md` is this
module printed (`python -m ltexp.schema > docs/schema.md`, checked by the same test).

Torch-free and mlflow-free, so anything may import it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from ltexp.choices import FUSIONS, STUDENT

KINDS = ("tag", "param", "metric", "artifact", "version tag", "study attr", "trial attr")


@dataclass(frozen=True)
class Name:
    """One key (or family of keys) a run carries: `key` may hold `<placeholders>` (PLACEHOLDERS)."""

    key: str
    kind: str
    runs: str       # which runs (or model versions, studies, trials) carry it
    meaning: str

    @functools.cached_property
    def pattern(self) -> re.Pattern:
        parts = re.split(r"(<[a-z]+>)", self.key)
        return re.compile("".join(f"(?:{placeholder(p[1:-1])})" if p.startswith("<") else re.escape(p)
                                  for p in parts) + r"\Z")


NAMES: list[Name] = []


def declare(key: str, kind: str, runs: str, meaning: str) -> str:
    """Declare one name (once) and return its key, for the code that writes it."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")  # a programming error
    if any(n.key == key and n.kind == kind for n in NAMES):
        raise ValueError(f"{kind} {key!r} is declared twice")
    NAMES.append(Name(key, kind, runs, meaning))
    return key


def _declare_each(kind: str, runs: str, meanings: dict[str, str]) -> None:
    """Declare several names of one kind carried by the same runs: {key: meaning}."""
    for key, meaning in meanings.items():
        declare(key, kind, runs, meaning)


def _tag(key: str, runs: str, meaning: str) -> str:
    return declare(key, "tag", runs, meaning)


# The figures every evaluation reports (ltexp.metrics), as `val_<figure>` and `test_<figure>`.
FIGURES = ("acc", "head_acc", "tail_acc", "many_acc", "medium_acc", "few_acc", "macro_acc", "ece", "nll",
           "routing_acc", "router_acc", "oracle_acc", "oracle_head_acc", "oracle_tail_acc")


@functools.cache
def setting_names() -> frozenset[str]:
    """Every setting `ltexp train` and `ltexp tune` declare (ltexp/config.py): the params' names."""
    import dataclasses

    from ltexp import config

    run = config.flatten(config.resolve_config({}))
    return frozenset(run) | {f.name for f in dataclasses.fields(config.TuneConfig)}


def placeholder(name: str) -> str:
    """The regular expression a `<name>` in a declared key stands for."""
    if name == "figure":
        return "|".join(FIGURES)
    if name == "rule":
        return "|".join((*FUSIONS, STUDENT))
    if name == "setting":
        return "|".join(sorted(setting_names(), key=len, reverse=True))
    if name == "curve":  # a per-epoch metric
        return "|".join(("train_loss", "train_acc", "lr", "epoch_time_s", "epoch_images_per_s",
                         *(f"val_{f}" for f in FIGURES)))
    if name == "tag":    # a run tag's name after `ltexp.`
        return "|".join(n.pattern.pattern.removesuffix(r"\Z").removeprefix(r"ltexp\.")
                        for n in NAMES if n.kind == "tag")
    return {"expert": r"[a-z][a-z0-9_]*",      # an expert's name: head, tail, g0, router, student, ...
            # a dimension of the search space (ltexp/tune/space.py, SearchSpace.suggest)
            "dimension": r"num_groups|split_at(?:_\d+)?|clip|clip_norm|lr|weight_decay|expert_mode|other_size|lws"
                         r"|fusion(?:_own|_other)?",
            "file": r"[A-Za-z0-9_./-]+",       # a file's path in a run's artifact folder
            }[name]


def find(kind: str, key: str) -> Name | None:
    """The declaration `key` of `kind` belongs to, or None when the schema does not declare it."""
    return next((n for n in NAMES if n.kind == kind and n.pattern.match(key)), None)


# --- Tags --------------------------------------------------------------------------------------
EVERY = "every run"
ROLE = _tag("ltexp.role", EVERY, "what the run is: experiment, expert, trial, tune, grid or report")
VERSION = _tag("ltexp.version", EVERY, "the ltexp version that wrote the run")
GIT_COMMIT = _tag("ltexp.git_commit", EVERY, "the checkout's commit, when ltexp runs from a git work tree")
ERROR = _tag("ltexp.error", "a run that did not finish", "the one line saying why (FAILED or KILLED)")
TRAINING = "experiment, expert and trial runs, and tune runs"
METHOD = _tag("ltexp.method", TRAINING, "the method (ltexp/methods.py)")
DATASET = _tag("ltexp.dataset", TRAINING, "--dataset as given")
DATA_NAME = _tag("ltexp.data_name", TRAINING, "the images' name (cifar10, folder:<name>, a pack's source): "
                 "what the report groups by and the published figures are keyed by")
IMB_TYPE = _tag("ltexp.imb_type", TRAINING, "exp or step")
IMB_FACTOR = _tag("ltexp.imb_factor", TRAINING, "the imbalance factor (rarest / most frequent class)")
SEED = _tag("ltexp.seed", TRAINING, "the training seed")
PACK_SHA256 = _tag("ltexp.pack_sha256", "runs on --dataset pack:FILE", "the pack's SHA-256")
PACK_SOURCE = _tag("ltexp.pack_source", "runs on --dataset pack:FILE", "what the pack was made from")
PROCESS = "every run a process has open"
HOST = _tag("ltexp.host", PROCESS, "the machine of the process writing the run (`ltexp runs sweep`)")
PID = _tag("ltexp.pid", PROCESS, "its process id")
PID_START = _tag("ltexp.pid_start", PROCESS, "its start time (unix s), so a reused pid is not taken for it")
HEARTBEAT = _tag("ltexp.heartbeat", PROCESS, "unix seconds of its last sign of life (at most every 10 s)")
RESUMED_BY = _tag("ltexp.resumed_by", "a run continued by another", "the run that continued it")
RESUMED_FROM = _tag("ltexp.resumed_from", "a resumed run", "the run it continues")
MODEL_URI = _tag("ltexp.model_uri", "experiment runs that finished", "the URI of the run's pyfunc model")
DEVICE = _tag("ltexp.device", "experiment and tune runs", "the device that trained (cpu, cuda, ...)")
FUSION = _tag("ltexp.fusion", "split runs", "the fusion rule chosen on validation")
EXPERT_CONCURRENCY = _tag("ltexp.expert_concurrency", "split runs", "whether the experts trained at once or in turn")
EXPERT = _tag("ltexp.expert", "expert runs", "the expert's name (head, tail, g<i>, router, student)")
EXPERTS = _tag("ltexp.experts", "tune runs", "the best configuration's experts (a param on experiment runs)")
SPLIT_RANKS = _tag("ltexp.split_ranks", "tune runs", "the best configuration's split ranks (a param on experiment runs)")
STUDY_NAME = _tag("ltexp.study_name", "tune runs", "the Optuna study")
JOBS = _tag("ltexp.jobs", "tune runs", "processes the study runs in (--jobs)")
TORCH_THREADS = _tag("ltexp.torch_threads", "tune and trial runs", "torch threads of the process")
BEST = _tag("ltexp.best.<dimension>", "tune runs", "the best trial's value of one search dimension")
BEST_TRIAL = _tag("ltexp.best.trial_number", "tune runs", "the best trial")
BEST_SPLIT_AT = _tag("ltexp.best.split_at", "tune runs", "the best trial's split point")
BEST_FUSION = _tag("ltexp.best.fusion", "tune runs", "the best trial's fusion rule")
BEST_CLIP_NORM = _tag("ltexp.best.clip_norm", "tune runs", "the best trial's gradient clip norm")
TRIAL_NUMBER = _tag("ltexp.trial_number", "trial runs and grid cells", "the Optuna trial the run is")
TRIAL_STATE = _tag("ltexp.trial_state", "trial runs", "COMPLETE or PRUNED")
GRID = _tag("ltexp.grid", "grid runs and their cells", "the grid's name")
PRESET = _tag("ltexp.preset", "grid runs and their cells", "the grid's --preset (none, field, paper)")
CELL = _tag("ltexp.cell", "grid cells", "the cell's index in the grid")
CONFIG_HASH = _tag("ltexp.config_hash", "grid cells", "the hash of the cell's resolved settings (bookkeeping left out)")
CELLS_TOTAL = _tag("ltexp.cells_total", "grid runs", "cells in the grid")
CELLS_DONE = _tag("ltexp.cells_done", "grid runs", "cells finished (trained or reused)")
CELLS_FAILED = _tag("ltexp.cells_failed", "grid runs", "cells that failed")
REPORT_FILTER = _tag("ltexp.report_filter", "report runs", "the --filter the report read runs with")

# --- Registered model versions (`ltexp register`, `ltexp tune --register-as`) -----------------
VERSION_RUNS = "registered model versions"
declare("ltexp.<tag>", "version tag", VERSION_RUNS, "the run's tags (method, dataset, ...), copied")
for _key in ("test_<figure>", "test_time_s", "test_<figure>__last_epoch", "test_acc__fusion_<rule>"):
    declare(f"ltexp.{_key}", "version tag", VERSION_RUNS, f"the run's metric {_key}, to 6 significant digits")
RUN_ID = declare("ltexp.run_id", "version tag", VERSION_RUNS, "the run the model comes from")
VAL_METRIC = declare("ltexp.val_metric", "version tag", VERSION_RUNS, "the validation metric it was chosen on")
VAL_METRIC_VALUE = declare("ltexp.val_metric_value", "version tag", VERSION_RUNS, "its value (repr of a float)")
DATA_CONFIG = declare("ltexp.data_config", "version tag", VERSION_RUNS,
                      "the data settings that make two figures comparable, joined by |")
COMPARED_TO = declare("ltexp.compared_to_version", "version tag", VERSION_RUNS, "the version it was judged against")
PROMOTION = declare("ltexp.promotion", "version tag", VERSION_RUNS, "the decision, in one line (champion or not, why)")

# --- Params ------------------------------------------------------------------------------------
declare("<setting>", "param", "experiment, expert, trial and tune runs",
        "every setting the method uses, with the value used (ltexp/config.py declares each with its role)")
declare("<setting>.resolved", "param", "runs started by `mlflow run`",
        "the value used, beside a param `mlflow run` logged as given (e.g. auto)")
_declare_each("param", "experiment and tune runs", {
    "num_classes": "classes", "train_images": "training images", "val_images": "validation images",
    "test_images": "test images"})
declare("experts", "param", "split runs", "the experts' names, in class-rank order")
declare("split_ranks", "param", "split runs", "the class ranks where a new group starts")
_declare_each("param", "expert runs", {
    "expert": "the expert's name", "classes": "the classes it owns", "other": "whether it has an 'other' label",
    "other_per_epoch": "'other' images per epoch"})
declare("<dimension>", "param", "trial runs", "the trial's value of one search dimension")
declare("trial_number", "param", "trial runs", "the Optuna trial")
for _key in ("study_name", "storage", "search_space"):
    declare(_key, "param", "tune runs", "the study's " + _key.replace("_", " ") + " (passwords redacted)")
for _key in ("grid_name", "cells", "datasets", "imb_types", "imb_factors", "methods", "seeds"):
    declare(_key, "param", "grid runs", "the grid's " + _key.replace("_", " "))
declare("fixed.<setting>", "param", "grid runs", "a setting every cell shares")
for _key in ("filter", "runs", "groups"):
    declare(_key, "param", "report runs", f"the report's {_key}")

# --- Metrics -----------------------------------------------------------------------------------
PER_EPOCH = "experiment, expert and trial runs, per epoch (step = epoch)"
_declare_each("metric", PER_EPOCH, {
    "train_loss": "mean training loss", "train_acc": "training accuracy", "lr": "learning rate",
    "epoch_time_s": "seconds the epoch took", "epoch_images_per_s": "training images per second"})
declare("val_<figure>", "metric", PER_EPOCH, "a validation figure; the point after the last epoch is the shipped model's")
declare("objective", "metric", "trial runs, per epoch", "the fused validation objective the pruner sees")
SUMMARY = "experiment runs (step 0)"
declare("test_<figure>", "metric", SUMMARY, "a test figure of the shipped model (oracle_*: routed by the true group, "
                                            "an upper bound, never the result)")
_declare_each("metric", "experiment and expert runs (step 0)", {
    "best_val_acc": "the selected model's validation accuracy", "best_epoch": "the selected epoch",
    "epochs_run": "epochs trained", "train_time_s": "seconds of training", "test_time_s": "seconds of the test evaluation",
    "train_images_per_s": "training images per second over the run",
    "posthoc_tau": "the post-hoc step's tau, chosen on validation",
    "posthoc_val_acc": "validation accuracy after the post-hoc step"})
declare("test_<figure>__last_epoch", "metric", "single-model experiment runs (step 0)",
        "the last epoch's model's test figures, beside the validation-selected model's")
declare("val_<figure>__last_epoch", "metric", "single-model experiment runs (step 0)",
        "the last epoch's model's validation figures")
declare("<curve>__expert_<expert>", "metric", "split runs", "one expert's per-epoch curve, on its parent run")
declare("val_acc__fusion_<rule>", "metric", "split runs", "validation accuracy of one fusion rule")
declare("test_acc__fusion_<rule>", "metric", "split runs", "test accuracy of one fusion rule (chosen on validation)")
_declare_each("metric", "trial runs (step 0)", {
    "trial_time_s": "seconds the trial took",
    "overhead_s": "seconds of the trial spent outside training and validation scoring"})
for _key in ("best_value", "trials_complete", "trials_pruned", "trials_failed", "study_wall_s", "trials_run_here",
             "overhead_s_per_trial", "overhead_fraction", "experts_trained", "experts_reused"):
    declare(_key, "metric", "tune runs", "the study's " + _key.replace("_", " "))
for _key in ("worker_wall_s", "worker_cells_run", "worker_cells_reused"):
    declare(_key, "metric", "grid runs", "one worker's " + _key.removeprefix("worker_").replace("_", " "))

# --- Artifacts ---------------------------------------------------------------------------------
_declare_each("artifact", "experiment and tune runs", {
    "config.json": "every resolved setting",
    "data/class_counts.csv": "training images per class", "data/class_counts.png": "the same, drawn",
    "eval/per_class_accuracy.csv": "test accuracy per class, with its training count",
    "eval/accuracy_vs_count.png": "the same, drawn",
    "eval/confusion_matrix.csv": "the test confusion matrix", "eval/confusion_matrix.png": "the same, drawn"})
declare("eval/fusion_rules.csv", "artifact", "split runs", "every fusion rule's figures, and the oracle row")
declare("model/<file>", "artifact", "experiment and tune runs", "the pyfunc model (MLflow's logged-model files)")
declare("optuna/<file>", "artifact", "tune runs", "Optuna's plots of the study (HTML and PNG)")
declare("grid/cells.csv", "artifact", "grid runs", "every cell: settings, state, run")
declare("report/<file>", "artifact", "report runs", "the report's tables and plots")

# --- Optuna (study and trial user attributes; not MLflow) --------------------------------------
MLFLOW_RUN_ID = declare("ltexp.mlflow_run_id", "study attr", "tune and grid studies", "the study's parent MLflow run")
SEARCH_SPACE = declare("ltexp.search_space", "study attr", "tune studies", "the search space the study was made with")
GRID_SETTINGS = declare("ltexp.grid", "study attr", "grid studies", "the grid's settings, so a re-run with others is refused")
CELLS_READY = declare("ltexp.cells", "study attr", "grid studies", "set once every cell is enqueued")
CELL_RUN_ID = declare("ltexp.run_id", "trial attr", "grid cells", "the cell's MLflow run")
CELL_RUN_NAME = declare("ltexp.run_name", "trial attr", "grid cells", "the cell's run name")
CELL_HEARTBEAT = declare("ltexp.heartbeat", "trial attr", "grid cells on journal storages", "unix seconds of the "
                         "worker's last sign of life (RDB storages have Optuna's heartbeat table)")
CELL_REUSED = declare("ltexp.reused", "trial attr", "grid cells", "the cell's FINISHED run existed already")
CELL_ERROR = declare("ltexp.error", "trial attr", "grid cells", "why the cell failed")
RETRY_HISTORY = declare("ltexp.retry_history", "trial attr", "grid cells", "the trials this one retries")
DUPLICATE_OF = declare("ltexp.duplicate_of", "trial attr", "grid cells", "the trial that holds the same cell")
RETRY_OF = declare("ltexp.retry_of", "trial attr", "tune trials", "the failed trial this one retries")


def markdown() -> str:
    """The schema as a Markdown page (docs/schema.md)."""
    lines = ["# The tracking schema", "",
             "Every name an ltexp run carries in MLflow, and what its Optuna studies carry. Generated from",
             "`ltexp/schema.py` (`python -m ltexp.schema > docs/schema.md`); `tests/test_schema.py` checks real",
             "runs of every role against it. `<figure>` is one of " + ", ".join(f"`{f}`" for f in FIGURES) + ";",
             "`<rule>` a fusion rule; `<setting>` a setting's name (`ltexp train --help`); `<curve>` a per-epoch",
             "metric; `<tag>` a run tag; `<expert>` an expert's name; `<dimension>` a search dimension; `<file>`",
             "a file name.", ""]
    for kind in KINDS:
        lines += [f"## {kind[0].upper() + kind[1:]}s", "", "| key | carried by | meaning |", "|---|---|---|"]
        lines += [f"| `{n.key}` | {n.runs} | {n.meaning} |" for n in NAMES if n.kind == kind]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(), end="")
