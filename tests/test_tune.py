"""Optuna tuning end to end on digits: nested runs, plots, registry promotion, resume, pruning, bad input."""

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from ltexp import LtexpError
from ltexp.config import TuneConfig, resolve_config
from ltexp.tune import parse_objective, run_study

pytestmark = pytest.mark.e2e

FAST = {"optim": {"epochs": 3}, "method": {"lws_epochs": 1}}


def _cfg(**optim):
    return resolve_config({"optim": {**FAST["optim"], **optim}, "method": {**FAST["method"], "method": "split"}})


def _runs(role):
    return mlflow.search_runs(search_all_experiments=True, output_format="list",
                              filter_string=f"tags.`ltexp.role` = '{role}'")


def test_objective_parsing():
    assert parse_objective("val_acc") == [(1.0, "acc")]
    assert parse_objective("0.5*val_acc+0.5*val_tail_acc") == [(0.5, "acc"), (0.5, "tail_acc")]
    assert parse_objective("val_acc-0.2*val_ece") == [(1.0, "acc"), (-0.2, "ece")]
    with pytest.raises(LtexpError, match="each term must be"):
        parse_objective("test_acc")


def test_study_end_to_end_with_guarded_promotion(mlflow_store, tmp_path, capfd):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = run_study(_cfg(), TuneConfig(n_trials=3, storage=storage, study_name="good", pruner="none"))
    # Not a terminal: a line per trial with trials done and the ETA, instead of Optuna's INFO lines.
    lines = [line for line in capfd.readouterr().err.splitlines() if line.startswith("tune ")]
    assert [line.split(",")[0] for line in lines] == [f"tune {n}/3 trials done" for n in (1, 2, 3)]
    assert "ETA 0:00: trial 2 COMPLETE val_acc" in lines[-1] and "(best " in lines[-1]
    assert "finished with value" not in capfd.readouterr().err
    (parent,) = _runs("tune")
    trials = _runs("trial")
    assert len(trials) == 3
    assert {t.data.tags["mlflow.parentRunId"] for t in trials} == {parent.info.run_id}
    assert sorted(t.data.tags["ltexp.trial_number"] for t in trials) == ["0", "1", "2"]
    for trial in trials:
        assert trial.info.status == "FINISHED" and trial.data.tags["ltexp.trial_state"] == "COMPLETE"
        assert {"split_at", "clip", "fusion"} <= set(trial.data.params)
        curve = MlflowClient().get_metric_history(trial.info.run_id, "val_acc__expert_head")
        assert [m.step for m in curve][:3] == [1, 2, 3]  # the per-epoch validation curve
        assert "objective" in trial.data.metrics and trial.data.metrics["overhead_s"] >= 0
    best = max(trials, key=lambda t: t.data.metrics["objective"])
    assert parent.data.metrics["best_value"] == pytest.approx(best.data.metrics["objective"], abs=1e-6)
    assert parent.data.tags["ltexp.best.trial_number"] == best.data.tags["ltexp.trial_number"]
    # The test set was used once, for the best trial only: no trial run holds a test metric.
    assert not any(k.startswith("test_") for t in trials for k in t.data.metrics)
    assert {"test_acc", "test_head_acc", "test_tail_acc", "test_oracle_acc"} <= set(parent.data.metrics)
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "optuna")}
    assert {"optuna/optimization_history.html", "optuna/optimization_history.png", "optuna/slice.html",
            "optuna/slice.png"} <= artifacts
    assert first.version == 1 and first.promoted
    client = MlflowClient()
    assert int(client.get_model_version_by_alias("ltexp-digits", "champion").version) == 1
    assert int(client.get_model_version_by_alias("ltexp-digits", "candidate").version) == 1

    # A deliberately worse study (1 epoch at a tiny learning rate) must not take the champion.
    capfd.readouterr()
    worse = run_study(_cfg(epochs=1, lr=1e-4), TuneConfig(n_trials=3, storage=storage, study_name="worse",
                                                           pruner="none"), progress=False)
    assert not [line for line in capfd.readouterr().err.splitlines() if line.startswith("tune ")]  # --no-progress
    assert worse.version == 2 and not worse.promoted and worse.best_value < first.best_value
    assert int(client.get_model_version_by_alias("ltexp-digits", "champion").version) == 1
    assert int(client.get_model_version_by_alias("ltexp-digits", "candidate").version) == 2
    v2 = client.get_model_version("ltexp-digits", "2")
    assert v2.tags["ltexp.promotion"].startswith("kept champion v1: val_acc")
    assert v2.tags["ltexp.compared_to_version"] == "1"


def test_interrupted_study_resumes_its_trial_count(subprocess_env, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    cmd = [sys.executable, "-m", "ltexp", "tune", "--n-trials", "4", "--epochs", "6", "--lws-epochs", "1",
           "--storage", storage, "--study-name", "resume", "--heartbeat-s", "1", "--pruner", "none"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    study = None
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            study = optuna.load_study(study_name="resume", storage=storage)
        except KeyError:
            continue
        if sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials()) >= 2:
            break
    os.kill(proc.pid, signal.SIGKILL)  # a worker that dies without a word
    proc.wait()
    states = [t.state for t in study.get_trials()]
    finished_before = {t.number: t.params for t in study.get_trials() if t.state == optuna.trial.TrialState.COMPLETE}
    assert len(finished_before) >= 2 and len(finished_before) < 4
    time.sleep(3)  # past the grace period (2 x heartbeat): the running trial is stale
    rerun = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    trials = optuna.load_study(study_name="resume", storage=storage).get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4  # continued to 4, the finished ones were not run again
    assert {t.number: t.params for t in complete if t.number in finished_before} == finished_before
    if optuna.trial.TrialState.RUNNING in states:
        # The trial the dead worker held was failed by its heartbeat and retried with its params.
        failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
        assert len(failed) == 1
        assert any(t.system_attrs.get("failed_trial") == failed[0].number for t in complete)
    # One parent MLflow run for the whole study, resumed by the second session.
    mlflow.set_tracking_uri(subprocess_env["MLFLOW_TRACKING_URI"])
    assert len(_runs("tune")) == 1 and _runs("tune")[0].info.status == "FINISHED"
    # The dead worker's trial run was closed by the sweep the second session ran on start.
    running = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                 filter_string="attributes.status = 'RUNNING'")
    assert running == []
    # (When the kill came before the trial's MLflow run was opened there is nothing to close.)
    killed = [t for t in _runs("trial") if t.info.status == "KILLED"]
    assert all("is gone" in t.data.tags["ltexp.error"] for t in killed)


def test_pruning_stops_a_trial_built_to_be_bad(mlflow_store, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="prune", storage=storage, direction="maximize")
    good = {"split_at": 5, "clip": "off", "fusion": "concat", "lr": 0.05}
    study.enqueue_trial(good)
    study.enqueue_trial({**good, "split_at": 4})
    study.enqueue_trial({**good, "lr": 0.001})  # too small to learn anything in 5 epochs
    result = run_study(_cfg(epochs=5), TuneConfig(n_trials=3, storage=storage, study_name="prune", search="lr",
                                                   pruner="median"))
    trials = optuna.load_study(study_name="prune", storage=storage).get_trials()
    assert [t.state.name for t in trials[:3]] == ["COMPLETE", "COMPLETE", "PRUNED"]
    pruned = next(t for t in _runs("trial") if t.data.tags["ltexp.trial_number"] == "2")
    assert pruned.data.tags["ltexp.trial_state"] == "PRUNED" and pruned.info.status == "KILLED"
    assert result.trials_run >= 3


def test_fusion_choices_never_retrain_experts(mlflow_store, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="cache", storage=storage, direction="maximize")
    for fusion in ("concat", "absnorm", "softmax"):
        study.enqueue_trial({"split_at": 5, "clip": "off", "fusion": fusion})
    result = run_study(_cfg(), TuneConfig(n_trials=3, storage=storage, study_name="cache", pruner="none"))
    assert result.experts_trained == 2 and result.experts_reused == 2 * 2 + 2  # 2 later trials + the final model


@pytest.mark.parametrize("tune,match", [
    (dict(n_trials=0), "--n-trials 0 must be >= 1"),
    (dict(jobs=0), r"--jobs 0 must be >= 1 \(trials run at once on this machine\)"),
    (dict(split_max=10), r"--split-max 10 is outside 1..9"),
    (dict(split_min=9, split_max=9, search="num_groups"), "cannot hold 2 distinct split points"),
    (dict(search="momentum"), "unknown --search dimension 'momentum'"),
    (dict(fusions="other"), "leaves no rule"),
    (dict(fusions="concat,router"), "--router, --distill and the router rule are for `ltexp train"),
    (dict(storage="postgresql://ltexp:secret@127.0.0.1:1/optuna"), r"cannot open Optuna storage postgresql://ltexp:\*\*\*@127.0.0.1:1/optuna"),
])
def test_bad_input_is_one_clear_error_and_writes_nothing(mlflow_store, tmp_path, tune, match):
    with pytest.raises(LtexpError, match=match):
        run_study(_cfg(), TuneConfig(**{"storage": f"sqlite:///{tmp_path / 'optuna.db'}", **tune}))
    assert _runs("tune") == [] and not (tmp_path / "optuna.db").exists()


def test_expert_concurrency_is_refused_for_a_study(mlflow_store, tmp_path):
    cfg = replace(_cfg(), split=replace(_cfg().split, expert_concurrency="threads"))
    with pytest.raises(LtexpError, match="--expert-concurrency threads is for `ltexp train --method split`: .* --jobs"):
        run_study(cfg, TuneConfig(storage=f"sqlite:///{tmp_path / 'optuna.db'}"))
    assert _runs("tune") == [] and not (tmp_path / "optuna.db").exists()


def test_compile_is_refused_for_a_study(mlflow_store, tmp_path):
    cfg = replace(_cfg(), optim=replace(_cfg().optim, compile="reduce-overhead"))
    with pytest.raises(LtexpError, match="--compile reduce-overhead is for `ltexp train`: .* leave --compile none"):
        run_study(cfg, TuneConfig(storage=f"sqlite:///{tmp_path / 'optuna.db'}"))
    assert _runs("tune") == [] and not (tmp_path / "optuna.db").exists()


def test_existing_study_with_other_direction_or_space_is_refused(mlflow_store, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="minimise", storage=storage, direction="minimize")
    with pytest.raises(LtexpError, match="exists with direction minimize"):
        run_study(_cfg(), TuneConfig(n_trials=1, storage=storage, study_name="minimise"))
    run_study(_cfg(), TuneConfig(n_trials=1, storage=storage, study_name="space", fusions="concat", pruner="none"))
    with pytest.raises(LtexpError, match="exists with another search space"):
        run_study(_cfg(), TuneConfig(n_trials=2, storage=storage, study_name="space", fusions="softmax"))


def test_mlflow_run_tune_entry_point(subprocess_env, tmp_path):
    from conftest import KNOWN_NOISE, REPO

    proc = subprocess.run(["mlflow", "run", str(REPO), "-e", "tune", "--env-manager", "local", "-P", "n_trials=2",
                           "-P", "epochs=2", "-P", "lws_epochs=1", "-P", f"storage=sqlite:///{tmp_path / 'o.db'}"],
                          cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [w for w in KNOWN_NOISE if w in proc.stderr], proc.stderr[-3000:]
    assert "tune 2/2 trials done, ETA 0:00: trial 1 " in proc.stderr  # progress under `mlflow run` too
    mlflow.set_tracking_uri(subprocess_env["MLFLOW_TRACKING_URI"])
    (parent,) = _runs("tune")
    assert parent.data.tags["mlflow.project.entryPoint"] == "tune" and parent.info.status == "FINISHED"
    assert len(_runs("trial")) == 2 and "test_acc" in parent.data.metrics
    assert MlflowClient().get_model_version_by_alias("ltexp-digits", "champion") is not None


def test_a_trial_is_not_pruned_because_its_first_expert_owns_fewer_classes(mlflow_store, tmp_path):
    """Split at rank 1: the head expert owns one class, so its own accuracy is 1.0 from the first
    epoch. Were that reported, a balanced split (rank 5, an honest 5-class head) would look worse
    at every step and be pruned. The pruner must see the fused validation objective instead."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="fair", storage=storage, direction="maximize")
    one_class_head = {"split_at": 1, "clip": "off", "fusion": "concat"}
    study.enqueue_trial(one_class_head)
    study.enqueue_trial({**one_class_head, "clip": "on", "clip_norm": 5.0})  # trains its own experts
    study.enqueue_trial({**one_class_head, "split_at": 5})
    run_study(_cfg(), TuneConfig(n_trials=3, storage=storage, study_name="fair", pruner="median"))
    trials = optuna.load_study(study_name="fair", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "COMPLETE"]
    steps = {t.number: sorted(t.intermediate_values) for t in trials}
    assert steps[0] == steps[1] == steps[2] == [1, 2, 3, 4]  # every trial reports at the same epochs
    # What was reported is the fused score of all experts, not the 1-class expert's trivial 1.0.
    assert max(trials[0].intermediate_values.values()) < 1.0
    assert trials[2].intermediate_values[4] > trials[0].intermediate_values[4]
    curve = MlflowClient().get_metric_history(next(t for t in _runs("trial")
                                                   if t.data.tags["ltexp.trial_number"] == "2").info.run_id, "objective")
    assert min(m.step for m in curve) == 1  # the final objective is the last epoch's point, not a step 0
    trial_id = next(t for t in _runs("trial") if t.data.tags["ltexp.trial_number"] == "2").info.run_id
    assert [m.step for m in MlflowClient().get_metric_history(trial_id, "trial_time_s")] == [0]  # no curve: a bar
    per_epoch = {m.step: m.value for m in curve}
    assert per_epoch == pytest.approx(trials[2].intermediate_values)


def test_a_resumed_study_does_not_propose_evaluated_parameters_again(mlflow_store, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tune = dict(storage=storage, study_name="again", sampler="random", pruner="none", fusions="concat")
    run_study(_cfg(epochs=1), TuneConfig(n_trials=2, **tune))
    run_study(_cfg(epochs=1), TuneConfig(n_trials=4, **tune))  # a second session continues the study
    trials = optuna.load_study(study_name="again", storage=storage).get_trials()
    assert len(trials) == 4
    first, second = [t.params for t in trials[:2]], [t.params for t in trials[2:]]
    assert not [p for p in second if p in first]


def test_a_terminated_trial_resumes_from_its_checkpoint(subprocess_env, tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**subprocess_env, "LTEXP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "ltexp", "tune", "--n-trials", "2", "--epochs", "20", "--lws-epochs", "1",
           "--storage", storage, "--study-name", "term", "--pruner", "none", "--fusions", "concat",
           "--checkpoint-every", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "cache").rglob("*.pt")):
        time.sleep(0.005)
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)
    code, err = proc.wait(timeout=120), proc.stderr.read()
    assert code == 143, err[-2000:]
    # Optuna's line for the failed trial, without the traceback it would add.
    assert "Trial 0 failed with parameters" in err and "Traceback" not in err, err[-2000:]
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [line for line in rerun.stdout.splitlines() if line.startswith("resuming from epoch")]
    assert resumed and "(trial 1 expert head" in resumed[0], rerun.stdout[-2000:]  # trial 1 retries trial 0
    trials = optuna.load_study(study_name="term", storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["ltexp.retry_of"] == 0
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    runs = {t.data.tags["ltexp.trial_number"]: t for t in _runs("trial")}
    assert runs["0"].info.status == "KILLED" and runs["0"].data.tags["ltexp.resumed_by"] == runs["1"].info.run_id
    assert runs["0"].data.tags["ltexp.error"].startswith("terminated by signal SIGTERM")
    assert not list((tmp_path / "cache").rglob("*.pt"))  # trials that ended leave no checkpoint behind


def test_plots_leave_out_a_parameter_with_one_value_and_warn_nothing(mlflow_store, recwarn):
    """`clip_norm` exists only in trials that clip; when one complete trial clipped, it has one
    value: Optuna would warn "unique value length is less than 2" (and its importance estimate
    about regimes with fewer than 2 trials) for something the user cannot act on."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    from ltexp import tracking
    from ltexp.tune import log_plots

    dists = {"split_at": IntDistribution(1, 9), "clip": CategoricalDistribution(["off", "on"]),
             "clip_norm": FloatDistribution(0.5, 10.0, log=True),
             "fusion": CategoricalDistribution(["concat", "softmax"])}
    study = optuna.create_study(direction="maximize")
    for value, params in ((0.5, {"split_at": 5, "clip": "off", "fusion": "concat"}),
                          (0.6, {"split_at": 3, "clip": "on", "clip_norm": 2.0, "fusion": "concat"}),
                          (0.4, {"split_at": 7, "clip": "off", "fusion": "softmax"}),
                          (0.55, {"split_at": 4, "clip": "off", "fusion": "softmax"})):
        study.add_trial(optuna.trial.create_trial(params=params, distributions={k: dists[k] for k in params},
                                                  value=value))
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    optuna.logging.get_logger("optuna").addHandler(handler)
    try:
        with mlflow.start_run() as active:
            log_plots(tracking.Run(active), study)
    finally:
        optuna.logging.get_logger("optuna").removeHandler(handler)
    assert not [r.getMessage() for r in logged if r.levelno >= logging.WARNING]
    assert not [str(w.message) for w in recwarn.list if not issubclass(w.category, DeprecationWarning)]
    artifacts = {a.path for a in MlflowClient().list_artifacts(active.info.run_id, "optuna")}
    assert {"optuna/slice.png", "optuna/contour.png", "optuna/param_importances.png"} <= artifacts
    text = open(MlflowClient().download_artifacts(active.info.run_id, "optuna/param_importances.html")).read()
    assert "split_at" in text and "clip_norm" not in text  # plotted: the parameters that varied, only
    reason = open(MlflowClient().download_artifacts(active.info.run_id, "optuna/intermediate_values.txt")).read()
    assert "no trial reported a value per epoch" in reason


def test_default_model_name_is_one_mlflow_accepts():
    from ltexp import tracking
    from ltexp.tune import default_model_name

    names = [default_model_name(d) for d in ("digits", "cifar100", "folder:data/cifar10-dev", "folder:/x/my photos:v2/")]
    assert names == ["ltexp-digits", "ltexp-cifar100", "ltexp-folder-cifar10-dev", "ltexp-folder-my-photos-v2"]
    for name in names:
        tracking.validate_registered_name(name)


def test_a_study_on_a_folder_data_set_registers_its_model(mlflow_store, tmp_path):
    """The default name was `ltexp-folder:<path>`, which MLflow refuses: the study ran, then failed."""
    from conftest import write_image_folder

    write_image_folder(tmp_path / "my photos", 40, 8, size=16)
    cfg = resolve_config({"data": {"dataset": f"folder:{tmp_path / 'my photos'}", "image_size": 16, "imb_factor": 0.5,
                                   "val_per_class": 5},
                          "model": {"model": "smallcnn"}, "optim": {"epochs": 1, "batch_size": 16},
                          "method": {"method": "split", "lws_epochs": 1}})
    result = run_study(cfg, TuneConfig(n_trials=1, storage=f"sqlite:///{tmp_path / 'optuna.db'}", pruner="none"),
                       progress=False)
    assert result.version == 1
    assert int(MlflowClient().get_model_version_by_alias("ltexp-folder-my-photos", "candidate").version) == 1
