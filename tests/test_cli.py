"""End to end: `mlflow run . -e <method>`, `ltexp train`, `ltexp data`, and every bad input."""

import io
import json
import logging
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import KNOWN_NOISE, REPO, bomb_png, write_cifar_archive

pytestmark = pytest.mark.e2e

EPOCH_KEYS = {"train_loss", "train_acc", "lr", "epoch_time_s", "val_acc", "val_head_acc", "val_tail_acc",
              "val_macro_acc", "val_ece", "val_nll"}
TEST_KEYS = {"test_acc", "test_head_acc", "test_tail_acc", "test_medium_acc", "test_few_acc", "test_macro_acc",
             "test_ece", "test_nll", "train_time_s", "test_time_s", "train_images_per_s", "best_val_acc"}
# What every top-level experiment run logs, whatever its method (the MLflow compare view shows no gaps).
HEADLINE_KEYS = {"best_val_acc", "best_epoch", "epochs_run", "lr", "train_loss", "train_acc", "epoch_time_s",
                 "train_time_s", "train_images_per_s", "test_time_s", "val_acc", "test_acc", "test_head_acc",
                 "test_tail_acc"}
ARTIFACTS = {"config.json", "data/class_counts.csv", "data/class_counts.png", "eval/per_class_accuracy.csv",
             "eval/accuracy_vs_count.png", "eval/confusion_matrix.csv", "eval/confusion_matrix.png"}
TAGS = {"ltexp.method", "ltexp.dataset", "ltexp.imb_type", "ltexp.imb_factor", "ltexp.seed", "ltexp.version",
        "ltexp.role"}


def _all_runs():
    return mlflow.search_runs(search_all_experiments=True, output_format="list")


def _artifacts(run_id, path=None):
    out = []
    for item in MlflowClient().list_artifacts(run_id, path):
        out += _artifacts(run_id, item.path) if item.is_dir else [item.path]
    return set(out)


def _ltexp(args, env, cwd=None):
    return subprocess.run([sys.executable, "-m", "ltexp", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _ltexp_here(args, capsys):
    """`ltexp args` run by this process (`ltexp.cli.main` in the test's store and folder), returned
    as a finished process: for checks of what a command prints, logs or refuses, where a fresh
    interpreter would add only its start-up (3-7 s of CPU: torch, MLflow). Real processes stay
    where they are the point: `mlflow run`, argparse errors.

    Its stderr holds what a fresh interpreter would print there and pytest would otherwise take
    aside: Python warnings under Python's default filters, and Optuna's log warnings (Optuna's
    handler holds the stream it found at import), so KNOWN_NOISE checks see them."""
    from ltexp.cli import main

    threads = torch.get_num_threads()  # main() sets torch's thread count for the command
    optuna_log = io.StringIO()
    handler = logging.StreamHandler(optuna_log)
    handler.setLevel(logging.WARNING)
    logging.getLogger("optuna").addHandler(handler)
    capsys.readouterr()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.filterwarnings("ignore", category=category)  # Python's defaults outside __main__
            try:
                code = main(list(args))
            except SystemExit as exc:  # ltexp's one-line errors exit this way
                code = exc.code
    finally:
        torch.set_num_threads(threads)
        logging.getLogger("optuna").removeHandler(handler)
    out = capsys.readouterr()
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return subprocess.CompletedProcess(["ltexp", *args], code, out.out, out.err + shown + optuna_log.getvalue())


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ltexp: error:")]
    assert len(errors) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


@pytest.mark.parametrize("method,params,stages,via", [
    ("baseline", [], 1, "mlflow run"),
    ("resample", ["-P", "sampling=over"], 1, "ltexp train"),
    ("lws", ["-P", "lws_epochs=2"], 2, "mlflow run"),
    ("balanced_softmax", [], 1, "ltexp train"),
    ("logit_adjust", ["-P", "tau=1.5"], 1, "ltexp train"),
    ("logit_adjust_posthoc", [], 1, "mlflow run"),
    ("ldam_drw", ["-P", "drw_epoch=2"], 1, "ltexp train"),
    ("focal", [], 1, "ltexp train"),
    ("tau_norm", [], 1, "ltexp train"),
    ("crt", ["-P", "crt_epochs=2"], 2, "ltexp train"),
])
def test_every_method_logs_a_complete_run(subprocess_env, capsys, method, params, stages, via):
    """Every method logs the same complete run. One of each kind (one stage, two stages, a post-hoc
    step) goes through a real `mlflow run` of its entry point; the others run `ltexp train` in this
    process, the command every entry point is (test_mlproject_is_thin...): a real `mlflow run` per
    method would add ~9 s of interpreter start-up each and test MLflow, not ltexp, again."""
    if via == "mlflow run":
        proc = subprocess.run(["mlflow", "run", str(REPO), "-e", method, "--env-manager", "local",
                               "-P", "epochs=3", *params], env=subprocess_env, capture_output=True, text=True,
                              timeout=600)
    else:
        flags = [part for p in params[1::2] for part in ("--" + p.split("=")[0], p.split("=")[1])]
        proc = _ltexp_here(["train", "--method", method, "--epochs", "3", *flags], capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [w for w in KNOWN_NOISE if w in proc.stderr], proc.stderr[-3000:]
    (run,) = _all_runs()
    assert run.info.status == "FINISHED"
    data = run.data
    assert TEST_KEYS <= set(data.metrics) and HEADLINE_KEYS <= set(data.metrics)
    assert EPOCH_KEYS <= set(data.metrics)
    assert 0.1 < data.metrics["test_acc"] <= 1.0
    history = MlflowClient().get_metric_history(run.info.run_id, "val_acc")
    epochs = 3 + (2 if stages == 2 else 0)
    # One point per epoch, then the shipped model's (best epoch, post-hoc step applied) at the end.
    assert [m.step for m in history] == list(range(1, epochs + 2))
    last_stage = history[-1 - (2 if stages == 2 else 3):-1]  # the model is the last stage's best epoch
    assert history[-1].value == pytest.approx(max(h.value for h in last_stage), abs=1e-6) or method.endswith(
        ("posthoc", "norm"))
    assert TAGS <= set(data.tags) and data.tags["ltexp.method"] == method and data.tags["ltexp.role"] == "experiment"
    if via == "mlflow run":
        assert data.tags["mlflow.project.entryPoint"] == method  # the run `mlflow run` created was used
    # No experiment named: `mlflow run` put it where `ltexp train` would (ltexp/default_experiment.py).
    assert MlflowClient().get_experiment(run.info.experiment_id).name == "ltexp"
    # What was given (logged by mlflow run) and what ltexp resolved, each once, with the value used.
    assert data.params["dataset"] == "digits" and data.params["imb_factor"] == "0.01" and data.params["epochs"] == "3"
    assert data.params["lr"] == "0.05" and data.params["model"] == "smallcnn" and data.params["clip_norm"] == "0.0"
    assert not [k for k in data.params if k.endswith(".resolved")]
    assert data.params["method"] == method and data.params["loss"] in ("ce", method.replace("_drw", ""))
    unused = {"sampling", "fusion", "expert_mode", "register_as"} - ({"sampling"} if method == "resample" else set())
    assert not unused & set(data.params)
    assert run.info.run_name == f"{method}·digits·exp0.01·e3·s0"
    if method.endswith(("posthoc", "norm")):
        assert "posthoc_tau" in data.metrics
    assert ARTIFACTS <= _artifacts(run.info.run_id)
    # The model (MLflow 3 logged model of the run) predicts the test images as the run scored them.
    model = mlflow.pyfunc.load_model(data.tags["ltexp.model_uri"])
    from ltexp.data import build_dataset
    from ltexp.config import resolve_config

    digits = build_dataset(resolve_config({}).data)
    predicted = model.predict(digits.test_images)["label"].to_numpy()
    assert (predicted == digits.test_labels).mean() == pytest.approx(data.metrics["test_acc"], abs=1e-6)  # metrics are stored as float32


def test_ltexp_train_and_result_table(mlflow_store, capsys):
    proc = _ltexp_here(["train", "--method", "lws", "--lws-mode", "joint", "--epochs", "2", "--clip-norm", "5",
                        "--experiment", "cli-test", "--no-progress"], capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test_acc" in proc.stdout and "test_tail_acc" in proc.stdout and "MLflow run" in proc.stdout
    (run,) = _all_runs()
    assert run.data.params["clip_norm"] == "5.0" and run.data.params["lws_mode"] == "joint"
    assert run.data.params["epochs"] == "2" and run.data.params["lr"] == "0.05"
    assert MlflowClient().get_experiment(run.info.experiment_id).name == "cli-test"
    printed = float(next(line.split()[1] for line in proc.stdout.splitlines() if line.strip().startswith("test_acc ")))
    assert printed == pytest.approx(run.data.metrics["test_acc"], abs=1e-4)


def test_ltexp_data_profile_json_and_chart(mlflow_store, tmp_path, capsys):
    write_cifar_archive(tmp_path / "cifar", "cifar10", 200, 10)
    proc = _ltexp_here(["data", "--dataset", "cifar10", "--imb-type", "exp", "--imb-factor", "0.01", "--data-dir",
                        str(tmp_path / "cifar"), "--val-source", "paper", "--json", "--output-dir",
                        str(tmp_path / "out")], capsys)
    assert proc.returncode == 0, proc.stderr
    profile = json.loads(proc.stdout)
    assert [row["train"] for row in profile["classes"]] == [200, 119, 71, 43, 25, 15, 9, 5, 3, 2]
    assert profile["totals"] == {"train": 492, "val": 90, "test": 10}
    assert profile["groups"]["head"] == ["airplane", "automobile", "bird", "cat", "deer"]
    assert profile["shots"]["many"] == ["airplane", "automobile"] and len(profile["shots"]["few"]) == 5
    assert (tmp_path / "out" / "class_counts.png").stat().st_size > 1000
    table = _ltexp_here(["data", "--dataset", "digits", "--imb-type", "step", "--imb-factor", "0.1"], capsys)
    assert table.returncode == 0 and "imbalance ratio 10.0" in table.stdout and "head: 5 classes" in table.stdout


def _failed_run_with(reason_fragment):
    (run,) = _all_runs()
    assert run.info.status == "FAILED"
    assert reason_fragment in run.data.tags["ltexp.error"]
    return run


@pytest.mark.parametrize("params,fragment", [
    (["-P", "dataset=mnist"], "unknown --dataset 'mnist'"),
    (["-P", "imb_factor=1.5"], "--imb-factor 1.5 is outside (0, 1]"),
])
def test_mlflow_run_bad_input_fails_the_run_with_the_reason(subprocess_env, params, fragment):
    proc = subprocess.run(["mlflow", "run", str(REPO), "-e", "baseline", "--env-manager", "local", *params],
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    _assert_one_line_error(proc, fragment)
    _failed_run_with(fragment)


def test_unknown_method_is_one_line(subprocess_env):
    proc = _ltexp(["train", "--method", "mixup"], subprocess_env)
    _assert_one_line_error(proc, "unknown --method 'mixup': allowed are baseline, resample, lws")
    assert _all_runs() == []  # validated before any run was opened
    bad_number = _ltexp(["train", "--epochs", "many"], subprocess_env)
    _assert_one_line_error(bad_number, "--epochs 'many' is not an integer or auto")


def _folder(tmp, name, change=None):
    """A three-class `folder:` data set under tmp/name, changed by `change(root)`: its flags."""
    from conftest import write_image_folder

    root = write_image_folder(tmp / name, 4, 2, size=8)
    if change is not None:
        change(root)
    return ["--dataset", f"folder:{root}", "--imb-factor", "1"]


def _one_class(root):
    for split in ("train", "test"):
        for name in ("b", "c"):
            shutil.rmtree(root / split / name)


@pytest.mark.parametrize("make_args,fragment", [
    (lambda tmp: ["--dataset", f"folder:{tmp / 'empty'}"], "holds no images"),
    (lambda tmp: _folder(tmp, "bomb", lambda root: (root / "train" / "b" / "9.png").write_bytes(bomb_png())),
     "bomb/train/b/9.png has 400000000 pixels, more than the limit 89478485 (PIL's Image.MAX_IMAGE_PIXELS)"),
    (lambda tmp: _folder(tmp, "one", _one_class), "one has only one class ('a' in "),
    (lambda tmp: _folder(tmp, "untested", lambda root: shutil.rmtree(root / "test" / "c")),
     "untested: class 'c' has training images but none in "),
    (lambda tmp: ["--val-per-class", "500"], "--val-per-class 500 is more than digits allows: at most 20,"),
    (lambda tmp: ["--imb-factor", "0.001"], "has 0 training images after --imb-type exp --imb-factor 0.001"),
    (lambda tmp: ["--dataset", "cifar10", "--data-dir", str(tmp / "nowhere"), "--download", "false"],
     "cifar10 not found in"),
    (lambda tmp: ["--lr", "1e30", "--epochs", "2"], "training loss is nan"),
])
def test_bad_input_during_a_run_fails_it_and_keeps_what_was_logged(mlflow_store, tmp_path, capsys, make_args, fragment):
    for split in ("train", "test"):
        (tmp_path / "empty" / split / "cat").mkdir(parents=True, exist_ok=True)
    proc = _ltexp_here(["train", "--no-progress", *make_args(tmp_path)], capsys)
    _assert_one_line_error(proc, fragment)
    run = _failed_run_with(fragment)
    assert "config.json" in _artifacts(run.info.run_id)  # logged before the failure, still there
    assert run.data.params["method"] == "baseline"
    if fragment == "training loss is nan":
        assert "data/class_counts.csv" in _artifacts(run.info.run_id)


def test_ltexp_data_refuses_bad_data_in_one_line(subprocess_env, tmp_path):
    """Real processes: a decompression bomb in a folder, and a CIFAR member the arrays-only
    unpickler refuses, each end in one line naming the file, exit code 2 and no traceback."""
    import pickle

    bomb = _ltexp(["data", *_folder(tmp_path, "bomb", lambda root: (root / "test" / "a" / "x.png").write_bytes(
        bomb_png()))], subprocess_env, tmp_path)
    assert bomb.returncode == 2
    _assert_one_line_error(bomb, f"image {tmp_path / 'bomb' / 'test' / 'a' / 'x.png'} has 400000000 pixels, "
                                 f"more than the limit 89478485 (PIL's Image.MAX_IMAGE_PIXELS)")
    folder = write_cifar_archive(tmp_path / "cifar", "cifar10", 20, 5)
    with open(folder / "data_batch_2", "wb") as fh:
        pickle.dump({"data": _RunsCode(), "labels": []}, fh, protocol=2)
    cifar = _ltexp(["data", "--dataset", "cifar10", "--data-dir", str(tmp_path / "cifar")], subprocess_env, tmp_path)
    assert cifar.returncode == 2
    _assert_one_line_error(cifar, f"unreadable cifar10 file data_batch_2 in {folder} (from cifar-10-python.tar.gz): "
                                  f"UnpicklingError: refusing to load posix.system")
    assert not (tmp_path / "pwned").exists()


class _RunsCode:
    """Pickled, a call of os.system: what a tampered data file carries."""

    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def _children(parent_id):
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.parametrize("groups,mode,via", [(2, "own", "mlflow run"), (3, "other", "ltexp train")])
def test_split_logs_parent_and_one_child_per_expert(subprocess_env, capsys, groups, mode, via):
    """The split entry point through a real `mlflow run`; the three-group variant runs its command,
    `ltexp train --method split`, in this process (as test_every_method_logs_a_complete_run)."""
    settings = {"epochs": 3, "lws_epochs": 1, "num_groups": groups, "expert_mode": mode}
    if via == "mlflow run":
        proc = subprocess.run(["mlflow", "run", str(REPO), "-e", "split", "--env-manager", "local",
                               *[a for k, v in settings.items() for a in ("-P", f"{k}={v}")]],
                              env=subprocess_env, capture_output=True, text=True, timeout=600)
    else:
        proc = _ltexp_here(["train", "--method", "split", *[a for k, v in settings.items() for a in (f"--{k}", str(v))]],
                           capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _all_runs()
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = _children(parent.info.run_id)
    assert len(runs) == groups + 1 and len(children) == groups
    names = {"2": ["head", "tail"], "3": ["head", "medium", "tail"]}[str(groups)]
    assert sorted(c.data.tags["ltexp.expert"] for c in children) == sorted(names)
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["ltexp.role"] == "expert"
        steps = [m.step for m in MlflowClient().get_metric_history(child.info.run_id, "val_acc")]
        assert steps == [1, 2, 3, 4]  # 3 epochs + 1 LWS epoch, its own curve
        assert child.data.params["other"] == str(mode == "other").lower()
    m = parent.data.metrics
    assert {"test_acc", "test_head_acc", "test_tail_acc", "test_ece", "test_oracle_acc", "test_oracle_head_acc",
            "test_oracle_tail_acc", "test_routing_acc", "val_acc", "val_acc__fusion_concat",
            "test_acc__fusion_absnorm", "val_acc__fusion_softmax", "test_acc__fusion_calibrated"} <= set(m)
    assert ("test_acc__fusion_other" in m) == (mode == "other")
    assert parent.data.params["clip_norm"] == "5.0"  # the paper's expert clipping by default
    assert HEADLINE_KEYS <= set(m)
    assert parent.data.params["split_ranks"] == {"2": "5", "3": "3,6"}[str(groups)]
    chosen = parent.data.tags["ltexp.fusion"]
    assert m["val_acc"] == pytest.approx(max(v for k, v in m.items() if k.startswith("val_acc__fusion_")))
    assert m["test_acc"] == pytest.approx(m[f"test_acc__fusion_{chosen}"])
    assert "eval/fusion_rules.csv" in _artifacts(parent.info.run_id)
    # The logged model is the fused one: it reproduces the headline test accuracy.
    from ltexp.config import resolve_config
    from ltexp.data import build_dataset

    digits = build_dataset(resolve_config({}).data)
    model = mlflow.pyfunc.load_model(parent.data.tags["ltexp.model_uri"])
    predicted = model.predict(digits.test_images)["label"].to_numpy()
    assert (predicted == digits.test_labels).mean() == pytest.approx(m["test_acc"], abs=1e-6)


def test_mlflow_run_split_with_router_and_student(subprocess_env, tmp_path, capsys):
    """The honest-split designs end to end: a router and a distilled student train as child runs,
    compete with the fusion rules on validation, and the logged model reproduces the headline."""
    proc = subprocess.run(["mlflow", "run", str(REPO), "-e", "split", "--env-manager", "local", "-P", "epochs=3",
                           "-P", "lws=false", "-P", "loss=balanced_softmax", "-P", "router=true", "-P", "distill=true",
                           "-P", "student_sampling=balanced"],
                          env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (parent,) = [r for r in _all_runs() if "mlflow.parentRunId" not in r.data.tags]
    children = {c.data.tags["ltexp.expert"]: c for c in _children(parent.info.run_id)}
    assert set(children) == {"head", "tail", "router", "student"}
    assert children["router"].data.params["classes"] == "head,tail"
    assert children["student"].data.params["classes"] == ",".join(str(c) for c in range(10))
    m = parent.data.metrics
    assert HEADLINE_KEYS <= set(m)
    assert 0.0 <= m["test_router_acc"] <= 1.0 and "val_router_acc" in m
    assert {"test_acc__fusion_router", "test_acc__fusion_student", "test_acc__fusion_concat"} <= set(m)
    chosen = parent.data.tags["ltexp.fusion"]
    assert m["val_acc"] == pytest.approx(max(v for k, v in m.items() if k.startswith("val_acc__fusion_")))
    assert m["test_acc"] == pytest.approx(m[f"test_acc__fusion_{chosen}"])
    assert parent.data.params["distill_weight"] == "1.0" and parent.data.params["router"] == "true"
    from ltexp.config import resolve_config
    from ltexp.data import build_dataset

    digits = build_dataset(resolve_config({}).data)
    model = mlflow.pyfunc.load_model(parent.data.tags["ltexp.model_uri"])
    predicted = model.predict(digits.test_images)["label"].to_numpy()
    assert (predicted == digits.test_labels).mean() == pytest.approx(m["test_acc"], abs=1e-6)

    # --fusion student serves the student alone: one model over every class, no routing.
    proc = _ltexp_here(["train", "--method", "split", "--epochs", "2", "--lws", "false", "--distill", "true",
                        "--fusion", "student", "--no-progress"], capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    forced = max((r for r in _all_runs() if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert forced.data.tags["ltexp.fusion"] == "student"
    served = mlflow.pyfunc.load_model(forced.data.tags["ltexp.model_uri"])
    predicted = served.predict(digits.test_images)["label"].to_numpy()
    assert (predicted == digits.test_labels).mean() == pytest.approx(forced.data.metrics["test_acc"], abs=1e-6)
    local = Path(mlflow.artifacts.download_artifacts(forced.data.tags["ltexp.model_uri"], dst_path=str(tmp_path / "m")))
    (meta,) = local.rglob("predictor.json")
    assert json.loads(meta.read_text())["owners"] == [list(range(10))]  # the student alone


def test_split_at_forced_fusion_register_and_progress_lines(subprocess_env, tmp_path, capsys):
    proc = _ltexp(["train", "--method", "split", "--split-at", "3", "--fusion", "absnorm", "--epochs", "3",
                   "--lws", "false"], subprocess_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fusion rules (chosen on validation: absnorm" in proc.stdout
    # Output to a pipe (not a terminal): a progress line per epoch instead of bars.
    lines = [line for line in proc.stderr.splitlines() if line.startswith("[")]
    assert any(line.startswith("[head] train 1/3  loss ") for line in lines), proc.stderr
    assert any(line.startswith("[tail] train 3/3  loss ") and "val_acc" in line and "img/s" in line and "ETA" in line
               for line in lines)
    assert not [w for w in KNOWN_NOISE if w in proc.stderr]
    parent = next(r for r in _all_runs() if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["ltexp.fusion"] == "absnorm"
    head = next(c for c in _children(parent.info.run_id) if c.data.tags["ltexp.expert"] == "head")
    assert head.data.params["classes"] == "0,1,2"  # ranks 0..2 of digits' exp profile
    reg = _ltexp_here(["register", "--run-id", parent.info.run_id, "--name", "ltexp-digits", "--alias", "candidate"],
                      capsys)
    assert reg.returncode == 0, reg.stderr
    assert "registered ltexp-digits version 1 as @candidate" in reg.stdout
    version = MlflowClient().get_model_version_by_alias("ltexp-digits", "candidate")
    assert int(version.version) == 1 and version.tags["ltexp.method"] == "split"
    assert float(version.tags["ltexp.test_acc"]) == pytest.approx(parent.data.metrics["test_acc"], abs=1e-5)
    bad = _ltexp_here(["register", "--run-id", "0" * 32, "--name", "x"], capsys)
    _assert_one_line_error(bad, "is not a run in")


@pytest.mark.parametrize("args,fragment", [
    (["--split-at", "0"], "--split-at 0 is out of range: ranks must lie in 1..9"),
    (["--split-at", "6,3", "--num-groups", "3"], "--split-at 6,3 must be strictly increasing"),
    (["--split-at", "3,6"], "gives 3 groups but --num-groups is 2"),
    (["--fusion", "other"], "--fusion other needs --expert-mode other"),
    (["--fusion", "router"], "--fusion router needs --router true"),
    (["--fusion", "student"], "--fusion student needs --distill true"),
    (["--distill-temperature", "0"], "--distill-temperature 0.0 must be > 0"),
])
def test_bad_split_settings_are_one_line(mlflow_store, capsys, args, fragment):
    proc = _ltexp_here(["train", "--method", "split", "--epochs", "1", "--no-progress", *args], capsys)
    _assert_one_line_error(proc, fragment)


def test_mlproject_is_thin_and_every_setting_passes_through():
    """Each entry point is `ltexp train --method <name>` (or `ltexp tune`); `-P name=value` reaches
    the command as `--name value`, so every config field must answer to its underscore spelling."""
    import yaml

    from ltexp.cli import SECTIONS, build_parser
    from ltexp.config import setting_fields
    from ltexp.methods import METHODS

    text = (REPO / "MLproject").read_text()
    assert len(text.splitlines()) < 60
    project = yaml.safe_load(text)
    assert set(METHODS) <= set(project["entry_points"])
    commands = build_parser()._subparsers._group_actions[0].choices
    for name, entry in project["entry_points"].items():
        assert "parameters" not in entry
        if name in METHODS:
            assert entry["command"] == f"python -m ltexp train --method {name}"
    train_flags = {opt for action in commands["train"]._actions for opt in action.option_strings}
    for section in ("data", "model", "optim", "method", "loss", "split", "tracking"):
        for field_name in setting_fields(SECTIONS[section]()):
            assert f"--{field_name}" in train_flags and "--" + field_name.replace("_", "-") in train_flags
    # `ltexp tune --help` lists only what tuning uses: it searches split point, clipping and fusion
    # itself, trains split experts only (no re-sampling, cRT, router or student), registers by --model-name.
    tune_flags = {opt for action in commands["tune"]._actions for opt in action.option_strings}
    for absent in ("--method", "--sampling", "--crt-epochs", "--clip-norm", "--split-at", "--fusion", "--register-as",
                   "--router", "--distill", "--distill-temperature", "--distill-weight", "--student-sampling"):
        assert absent not in tune_flags
    assert {"--n-trials", "--fusions", "--clip-min", "--expert-mode", "--lws", "--no-progress"} <= tune_flags


def test_mlflow_run_and_ltexp_train_share_the_experiment_and_name_runs(subprocess_env, tmp_path, monkeypatch, capsys):
    """Where runs go: with no experiment named, `ltexp train` and a plain `mlflow run .` (through
    ltexp's default-experiment provider) both land in `ltexp`; $MLFLOW_EXPERIMENT_NAME and
    `--experiment-name` win over that default."""
    from importlib.metadata import entry_points

    providers = [ep.value for ep in entry_points(group="mlflow.default_experiment_provider")]
    assert "ltexp.default_experiment:LtexpProjectExperiment" in providers, (
        f"ltexp's entry points are not installed ({providers}): run `pip install -e .` again")
    mlflow_run = ["mlflow", "run", str(REPO), "-e", "baseline", "--env-manager", "local", "-P", "epochs=1"]
    for command, env in ((mlflow_run, {**subprocess_env, "MLFLOW_EXPERIMENT_NAME": "lab-study"}),
                         ([*mlflow_run, "-P", "seed=3"], subprocess_env),
                         ([*mlflow_run, "--experiment-name", "other", "-P", "seed=4"], subprocess_env)):
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "lab-study")
    proc = _ltexp_here(["train", "--epochs", "1", "--seed", "1"], capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME")
    proc = _ltexp_here(["train", "--epochs", "1", "--seed", "2", "--run-name", "mine"], capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient()
    by_name = {r.info.run_name: client.get_experiment(r.info.experiment_id).name for r in _all_runs()}
    assert by_name == {"baseline·digits·exp0.01·e1·s0": "lab-study", "baseline·digits·exp0.01·e1·s1": "lab-study",
                       "mine": "ltexp", "baseline·digits·exp0.01·e1·s3": "ltexp",
                       "baseline·digits·exp0.01·e1·s4": "other"}
    assert {e.name for e in client.search_experiments()} == {"Default", "lab-study", "ltexp", "other"}


def test_a_reader_that_leaves_the_pipe_gets_no_traceback(subprocess_env, tmp_path):
    """`ltexp data | head -1`: the reader closes the pipe before ltexp is done writing."""
    proc = subprocess.Popen([sys.executable, "-m", "ltexp", "data", "--output-dir", str(tmp_path)], env=subprocess_env,
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the first line: every write of ltexp's meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141 and err == "", err


def test_train_preset_fills_what_the_command_line_leaves_unset(mlflow_store, capsys):
    proc = _ltexp_here(["train", "--preset", "field", "--epochs", "2", "--lr-milestones", "1,2", "--warmup-epochs", "0",
                        "--drw-epoch", "2", "--method", "ldam_drw", "--model", "smallcnn", "--no-progress"], capsys)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = _all_runs()
    params = run.data.params
    assert params["preset"] == "field"
    # From the preset: Cao et al.'s optimiser, schedule kind and LDAM margin.
    assert (params["batch_size"], params["weight_decay"], params["lr_schedule"], params["ldam_max_margin"]) == \
        ("128", "0.0002", "multistep", "0.5")
    # From the command line, over the preset: epochs, milestones, warm-up, DRW start, model.
    assert (params["epochs"], params["lr_milestones"], params["warmup_epochs"], params["drw_epoch"], params["model"]) == \
        ("2", "1,2", "0", "2", "smallcnn")


# Which heavy libraries a command line loaded before it answered.
_LOADED = """
import sys
from ltexp.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(sorted(m for m in ("torch", "torchvision", "mlflow", "optuna") if m in sys.modules), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("args, code", [(["--help"], 0), (["train", "--help"], 0), (["tune", "--help"], 0),
                                        (["grid", "--help"], 0), (["train", "--method", "nope"], 2),
                                        (["train", "--lr", "1e308"], 2), (["tune", "--n-trials", "0"], 2)])
def test_help_and_a_bad_flag_answer_without_importing_torch(subprocess_env, tmp_path, args, code):
    """The config is a torch-free leaf (names in ltexp/choices.py): `--help` and a refused setting
    answer in a fraction of a second instead of after torch's import (bench/results/*-cpu-help)."""
    proc = subprocess.run([sys.executable, "-c", _LOADED, *args], env=subprocess_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr[-2000:]
    if code:
        assert proc.stderr.strip().splitlines()[-2].startswith("ltexp: error: --") or "unknown --method 'nope'" in proc.stderr
