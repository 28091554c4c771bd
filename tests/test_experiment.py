"""The split's extra models (the group router's view of the data, the student's teachers) and the
expert cache that `ltexp tune --jobs N` shares between its processes; checkpoints that cannot be
resumed (damaged, of another model) or written (a full disk), with real `ltexp train` processes."""

import numpy as np
import pytest
import torch

from ltexp.config import resolve_config
from ltexp.data import build_long_tail
from ltexp.data.device import DeviceImages
from ltexp.data.sources import load_digits_source
from ltexp.engine import FitResult, predict_logits
from ltexp.training import ExpertCache, build_experts, expert_info, expert_view, teacher_targets
from ltexp.losses import BalancedSoftmax, Distilled
from ltexp.methods import ROUTER, STUDENT


def _split(**split):
    info = build_long_tail(load_digits_source(), "exp", 0.01, "holdout", 20, seed=0).info
    cfg = resolve_config({"method": {"method": "split"}, "loss": {"loss": "balanced_softmax"}, "split": split})
    method, specs, layout = build_experts(cfg, info)
    return info, method, specs, layout


def test_the_router_learns_groups_with_a_balanced_softmax_on_group_counts():
    info, method, specs, layout = _split(router=True)
    assert layout.router
    router = method.router(specs)
    assert router.role == ROUTER and router.num_outputs == 2 and router.route_names == ("head", "tail")
    own = expert_info(info, router)
    assert own.class_names == ("head", "tail")
    assert own.train_counts.tolist() == [int(info.train_counts[list(s.classes)].sum()) for s in specs]
    (stage,) = method.stages(own, router)
    assert stage.name == ROUTER and stage.sampler == "instance"
    assert type(stage.loss) is BalancedSoftmax and stage.loss.counts == own.train_counts.tolist()
    labels = torch.arange(10)
    view = expert_view(DeviceImages(torch.zeros(10, 1, 8, 8, dtype=torch.uint8), labels), router, 10)
    head = set(specs[0].classes)
    assert view.labels.tolist() == [0 if c in head else 1 for c in range(10)]  # every image, by group


def test_the_student_trains_on_every_class_with_the_loss_plus_distillation():
    info, method, specs, layout = _split(distill=True, distill_temperature=3.0, distill_weight=0.25,
                                         student_sampling="balanced")
    assert method.router(specs) is None and not layout.router
    student = method.student(info)
    assert student.role == STUDENT and student.classes == tuple(range(10))
    (stage,) = method.stages(expert_info(info, student), student)
    assert stage.sampler == "balanced" and isinstance(stage.loss, Distilled)
    assert (stage.loss.temperature, stage.loss.weight_kd) == (3.0, 0.25)
    assert isinstance(stage.loss.base, BalancedSoftmax) and stage.loss.base.counts == info.train_counts.tolist()
    assert method.fusion_rules(layout)  # fusion rules still compete with the student


class _Constant(torch.nn.Module):
    """A stand-in expert: the same logits for every image."""

    def __init__(self, row):
        super().__init__()
        self.row = torch.tensor(row)

    def forward(self, images):
        return self.row.expand(images.shape[0], -1)


def test_each_training_image_is_taught_by_its_own_groups_expert():
    from ltexp.fusion import ExpertLayout

    layout = ExpertLayout(((0, 2), (1, 3)), (False, True), 4)  # the tail expert has an "other" label
    head, tail = _Constant([1.0, 2.0]), _Constant([3.0, 4.0, 9.0])
    images = DeviceImages(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    targets = teacher_targets([head, tail], layout, images)
    inf = float("-inf")
    assert targets.tolist() == [[1.0, inf, 2.0, inf], [inf, 3.0, inf, 4.0], [1.0, inf, 2.0, inf],
                                [inf, 3.0, inf, 4.0]]  # the "other" logit is never a target
    assert np.isfinite(targets.numpy()).sum() == 8


def test_an_expert_cache_folder_shares_experts_between_processes(tmp_path):
    """Two caches on one folder stand for two jobs: what one puts, the other gets, bit for bit."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    model[1].running_mean += 0.5  # a buffer, not only parameters
    result = FitResult(best_val_acc=0.75, best_epoch=3, epochs_run=4, train_time_s=1.5, images_seen=640,
                       history=[{"epoch": 1, "val_acc": 0.5, "train_loss": float("nan")}], seen_per_class=[[3, 1]],
                       posthoc={"posthoc_tau": 0.5})
    writer, reader = ExpertCache(directory=tmp_path / "shared"), ExpertCache(directory=tmp_path / "shared")
    assert not reader.has("k") and reader.get("k") is None and reader.misses == 1
    writer.put("k", model, result)
    assert [p.suffix for p in (tmp_path / "shared").iterdir()] == [".pt"]  # one file, no partial file left
    state, got = reader.get("k")
    assert reader.hits == 1 and set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert got.history[0]["val_acc"] == 0.5 and np.isnan(got.history[0]["train_loss"])
    assert (got.best_val_acc, got.best_epoch, got.seen_per_class, got.posthoc) == (0.75, 3, [[3, 1]], {"posthoc_tau": 0.5})
    assert not ExpertCache().has("k")  # without a folder a cache is this process's alone


def test_a_checkpoint_belongs_to_its_tracking_store(mlflow_store, tmp_path, monkeypatch):
    import mlflow
    from ltexp.training import checkpointer
    from ltexp.methods import ExpertSpec

    monkeypatch.setenv("LTEXP_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config({"tracking": {"checkpoint_every": "1"}})
    spec = ExpertSpec("all", tuple(range(10)))
    model, generator = torch.nn.Linear(2, 2), torch.Generator()
    saved = checkpointer(cfg, spec, "run-a", "run-a")
    assert saved.save(model, generator, None, None, {"global_epoch": 3}, force=True)
    assert checkpointer(cfg, spec, "run-a2", "run-a2").load()["global_epoch"] == 3  # same store: resumes

    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)     # the same relative sqlite:///mlflow.db, in another folder: another store
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    assert checkpointer(cfg, spec, "run-b", "run-b").load() is None
    mlflow.set_tracking_uri(mlflow_store)
    assert checkpointer(cfg, spec, "run-c", "run-c").load()["global_epoch"] == 3


def test_resuming_under_another_thread_count_says_so(mlflow_store, tmp_path, monkeypatch, capsys):
    from ltexp.training import checkpointer
    from ltexp.methods import ExpertSpec

    monkeypatch.setenv("LTEXP_CACHE", str(tmp_path / "cache"))
    cfg = resolve_config({"tracking": {"checkpoint_every": "1"}})
    spec = ExpertSpec("all", tuple(range(10)))
    model, generator = torch.nn.Linear(2, 2), torch.Generator()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        checkpointer(cfg, spec, "run-a", "run-a").save(model, generator, None, None, {"global_epoch": 3}, force=True)
        torch.set_num_threads(1)
        assert checkpointer(cfg, spec, "run-b", "run-b").restore(model, generator)["global_epoch"] == 3
    finally:
        torch.set_num_threads(threads)
    assert ("resuming from epoch 3 of run run-a; written with 2 torch threads, now 1: the last digits may differ "
            "from an uninterrupted run") in capsys.readouterr().out


def test_curves_hold_only_epoch_points_summaries_sit_at_step_0_and_the_split_parent_has_each_experts(mlflow_store):
    """Per-epoch keys hold only epoch points (no summary point starts or repeats a curve); a key with
    no curve is one value at step 0, which MLflow's chart view draws as a bar per run."""
    from mlflow import MlflowClient

    from ltexp.experiment import run_experiment

    client = MlflowClient()
    single = run_experiment(resolve_config({"optim": {"epochs": 3}}))
    steps = {key: [m.step for m in client.get_metric_history(single.run_id, key)]
             for key in ("train_loss", "lr", "epoch_time_s", "epoch_images_per_s", "train_acc")}
    assert steps == {key: [1, 2, 3] for key in steps}  # no run-end summary at step 0 (or anywhere else)
    assert [m.step for m in client.get_metric_history(single.run_id, "val_acc")] == [1, 2, 3, 4]  # 4: shipped model
    for summary in ("test_acc", "best_val_acc", "best_epoch", "train_images_per_s", "train_time_s"):
        assert [m.step for m in client.get_metric_history(single.run_id, summary)] == [0], summary

    split = run_experiment(resolve_config({"optim": {"epochs": 3}, "method": {"method": "split", "lws_epochs": 1}}))
    for expert in ("head", "tail"):
        curve = client.get_metric_history(split.run_id, f"val_acc__expert_{expert}")
        assert [m.step for m in curve] == [1, 2, 3, 4]  # 3 epochs + 1 LWS epoch
    for summary in ("train_loss", "test_acc", "test_oracle_acc"):  # the parent's keys have no curve of their own
        assert [m.step for m in client.get_metric_history(split.run_id, summary)] == [0], summary
    child = next(r for r in client.search_runs([client.get_run(split.run_id).info.experiment_id],
                                                f"tags.mlflow.parentRunId = '{split.run_id}' and tags.ltexp.expert = 'tail'"))
    own = [(m.step, m.value) for m in client.get_metric_history(child.info.run_id, "val_acc")]
    assert own == [(m.step, m.value) for m in client.get_metric_history(split.run_id, "val_acc__expert_tail")]


TRAIN_3 = ["--epochs", "3", "--checkpoint-every", "1", "--no-progress"]


def _train(args, env, **kw):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "ltexp", "train", *args], env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def _leave_first_epoch_checkpoint(args):
    """The real checkpoint `ltexp train args` leaves after epoch 1 when killed in epoch 2 (in this
    process: same configuration, store and cache, so the same key); returns its path."""
    from ltexp.cli import _sections, build_parser
    from ltexp.engine import fit
    from ltexp.training import checkpointer, fit_inputs, new_expert_model, prepare

    parsed = build_parser().parse_args(["train", *args])
    cfg = resolve_config(_sections(parsed), seed=parsed.seed, device=parsed.device)
    prep = prepare(cfg)
    method, specs, _ = build_experts(cfg, prep.data.info)
    ckpt = checkpointer(cfg, specs[0], "killed-run", "killed-run")

    class Killed(Exception):
        pass

    def kill_in_epoch_2(record):
        if record["epoch"] == 2:
            raise Killed

    try:
        fit(new_expert_model(cfg, method, specs[0], prep), **fit_inputs(cfg, method, specs[0], prep),
            on_epoch=kill_in_epoch_2, checkpoint=ckpt)
    except Killed:
        pass
    assert torch.load(ckpt.path, weights_only=True)["global_epoch"] == 1
    return ckpt.path


@pytest.mark.parametrize("damage", ["older model", "truncated"])
def test_a_checkpoint_that_does_not_fit_or_is_truncated_is_discarded_and_training_starts_afresh(
        subprocess_env, tmp_path, monkeypatch, damage):
    from mlflow import MlflowClient

    monkeypatch.setenv("LTEXP_CACHE", str(tmp_path / "cache"))
    path = _leave_first_epoch_checkpoint(TRAIN_3)
    if damage == "older model":  # same key, written by a model whose first layer was wider
        state = torch.load(path, weights_only=True)
        key = next(k for k, v in state["model"].items() if v.dim() >= 2)
        old_shape = (*state["model"][key].shape[:-1], state["model"][key].shape[-1] + 2)
        state["model"][key] = torch.zeros(old_shape)
        torch.save(state, path)
        why = f"does not fit this model (size mismatch for {key}: {old_shape} in the checkpoint, "
    else:  # a copy cut short, a full disk under another writer
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        why = "is unreadable (RuntimeError: PytorchStreamReader failed reading zip archive"

    proc = _train(TRAIN_3, {**subprocess_env, "LTEXP_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    said = [line for line in proc.stderr.splitlines() if line.startswith("ltexp:")]
    assert len(said) == 1 and said[0].startswith(f"ltexp: checkpoint {path} {why}"), said
    assert said[0].endswith(": discarded, training from epoch 0")
    assert "Traceback" not in proc.stderr and "resuming" not in proc.stdout
    client = MlflowClient()
    (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    assert run.info.status == "FINISHED" and "ltexp.resumed_from" not in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3]
    assert not path.exists()  # discarded, and the finished run keeps no checkpoint of its own


def test_a_checkpoint_that_cannot_be_written_fails_the_run_in_one_line(subprocess_env, tmp_path):
    import re

    from conftest import file_size_limit
    from mlflow import MlflowClient

    # The store (its file and write-ahead log) fits under the limit; a checkpoint (weights,
    # momentum and the best epoch's weights of the digits CNN: ~1.1 MB) does not.
    limit = (tmp_path / "mlflow.db").stat().st_size + 64 * 1024
    cache = tmp_path / "cache"
    proc = _train(TRAIN_3, {**subprocess_env, "LTEXP_CACHE": str(cache)}, preexec_fn=file_size_limit(limit))
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"ltexp: error: could not write checkpoint to {re.escape(str(cache))}/checkpoints/"
                        r"[0-9a-f]{32}\.pt: File too large", last), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "MLflow run" not in proc.stdout
    assert list((cache / "checkpoints").iterdir()) == []  # no partial file left behind
    client = MlflowClient()
    (run,) = [r for r in client.search_runs([e.experiment_id for e in client.search_experiments()])]
    assert run.info.status == "FAILED" and run.data.tags["ltexp.error"] == last[len("ltexp: error: "):]


def test_a_run_reports_its_last_epochs_model_beside_the_selected_one(mlflow_store):
    """`last_epoch_metrics` scores the last epoch's weights on validation and test, the method's
    post-hoc step chosen for them too; here the "last epoch" is an untrained model, so its
    figures are those of that model, not the trained run's."""
    import dataclasses

    from ltexp.experiment import last_epoch_metrics
    from ltexp.training import new_expert_model, prepare, train_expert
    from ltexp.metrics import classification_metrics

    cfg = resolve_config({"optim": {"epochs": 3}, "method": {"method": "tau_norm"}})
    prep = prepare(cfg)
    method, specs, _ = build_experts(cfg, prep.data.info)
    model, result, _ = train_expert(cfg, method, specs[0], prep, None, False)
    untrained = new_expert_model(cfg, method, specs[0], prep)
    last = dataclasses.replace(result, last_state={k: v.clone() for k, v in untrained.state_dict().items()})
    figures = last_epoch_metrics(cfg, method, specs[0], prep, last, {}, 0.0)

    untrained.eval()
    val = prep.splits.val
    method.posthoc(untrained, predict_logits(untrained, val.images), val.labels, prep.data.info)
    expected = classification_metrics(torch.log_softmax(predict_logits(untrained, prep.splits.test.images), 1),
                                      prep.splits.test.labels, prep.data.info)
    assert figures["test_acc__last_epoch"] == pytest.approx(expected["acc"])
    assert figures["test_tail_acc__last_epoch"] == pytest.approx(expected["tail_acc"])
    # The last epoch was the selected one: the selected model's figures, as given.
    same = dataclasses.replace(result, last_state=None,
                               history=[*result.history[:-1], {**result.history[-1], "epoch": result.best_epoch}])
    assert last_epoch_metrics(cfg, method, specs[0], prep, same, {"acc": 0.5, "head_acc": 0.7, "tail_acc": 0.3},
                              0.6) == {"test_acc__last_epoch": 0.5, "test_head_acc__last_epoch": 0.7,
                                       "test_tail_acc__last_epoch": 0.3, "val_acc__last_epoch": 0.6}
