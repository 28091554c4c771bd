"""One experiment end to end: data -> experts (method stages, one engine) -> fusion -> test -> MLflow.

Every method is a list of experts: single-model methods have one expert that owns every class,
`split` one per class group. `run_experiment` is what `ltexp train` and every MLproject entry
point call.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ltexp import choices, concurrency, plots, schema, tracking, write_error
from ltexp.config import RunConfig
from ltexp.data import ClassInfo, LongTailData
from ltexp.engine import FitResult, predict_logits, resolve_device
from ltexp.fusion import ExpertLayout, fit_rule, fuse, oracle_predict, route_accuracy, routing_accuracy
from ltexp.methods import EXPERT, ROUTER, STUDENT, ExpertSpec
from ltexp.metrics import accuracy_metrics, classification_metrics, confusion_matrix, per_class_accuracy
from ltexp.predictor import FusedPredictor
from ltexp.training import (ExpertCache, Prepared, build_experts, checkpointer, expert_info, expert_view,
                            new_expert_model, prepare, teacher_targets, train_expert)


@dataclass
class ExperimentResult:
    run_id: str
    metrics: dict[str, float]
    fusion_table: pd.DataFrame | None = None
    model_uri: str = ""
    registered_version: int | None = None
    fusion: str = "concat"
    expert_run_ids: list[str] = field(default_factory=list)


def log_data_profile(run: tracking.Run, data: LongTailData) -> pd.DataFrame:
    """Class counts (CSV + bar chart) of the long-tailed set, as artifacts."""
    table = data.counts_table()
    run.log_table(table, "data/class_counts.csv")
    fig = plots.class_count_chart(table)
    run.log_figure(fig, "data/class_counts.png")
    plots.close(fig)
    run.log_params({"num_classes": data.info.num_classes, "train_images": len(data.train_labels),
                    "val_images": len(data.val_labels), "test_images": len(data.test_labels)})
    return table


def _timed(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def fusion_table(layout: ExpertLayout, val: tuple, info: ClassInfo, rules: list[str],
                 test: tuple | None = None) -> pd.DataFrame:
    """Fusion rules on trained experts' outputs: fitted on validation, scored on validation and,
    when `test` = (outputs, labels) is given, on test. `val` is (outputs, labels) too."""
    rows = []
    for rule in rules:
        params = fit_rule(rule, val[0], layout, val[1])
        row = {"fusion": rule, "params": params}
        for split, (outputs, labels) in (("val", val), ("test", test)) if test is not None else (("val", val),):
            row.update(_scores(split, fuse(rule, outputs, layout, params), labels, info, layout))
        rows.append(row)
    return pd.DataFrame(rows)


def _scores(split: str, log_probs: torch.Tensor, labels: torch.Tensor, info: ClassInfo,
            layout: ExpertLayout) -> dict[str, float]:
    """One candidate's metrics on one split, keys prefixed by the split, routing accuracy included."""
    metrics = classification_metrics(log_probs, labels, info)
    metrics["routing_acc"] = routing_accuracy(log_probs.argmax(1), labels, layout)
    return {f"{split}_{k}": v for k, v in metrics.items()}


def student_row(layout: ExpertLayout, val: tuple, test: tuple, info: ClassInfo) -> pd.DataFrame:
    """The distilled student as one more row of the fusion table (`fusion` = "student"): its own
    logits scored like a rule's fused output, with the routing accuracy of its predictions."""
    row = {"fusion": STUDENT, "params": {}}
    for split, (logits, labels) in (("val", val), ("test", test)):
        row.update(_scores(split, torch.log_softmax(logits.float(), dim=1), labels, info, layout))
    return pd.DataFrame([row])


def log_test_artifacts(run: tracking.Run, predicted: torch.Tensor, labels: torch.Tensor, data: LongTailData) -> None:
    """Per-class accuracy (CSV + accuracy-vs-count plot) and the confusion matrix (CSV + image)."""
    info = data.info
    predicted, labels = predicted.cpu(), labels.cpu()
    per_class = data.counts_table()
    acc = per_class_accuracy(predicted, labels, info.num_classes)
    per_class["test_acc"] = acc[per_class["label"].to_numpy()]
    run.log_table(per_class, "eval/per_class_accuracy.csv")
    fig = plots.accuracy_vs_count(per_class)
    run.log_figure(fig, "eval/accuracy_vs_count.png")
    plots.close(fig)
    matrix = confusion_matrix(predicted, labels, info.num_classes)
    names = list(info.class_names)
    run.log_table(pd.DataFrame(matrix, index=names, columns=names).reset_index(names="true"), "eval/confusion_matrix.csv")
    fig = plots.confusion_matrix_figure(matrix, info.class_names)
    run.log_figure(fig, "eval/confusion_matrix.png")
    plots.close(fig)


def run_experiment(cfg: RunConfig, progress: bool = False) -> ExperimentResult:
    """Train and evaluate one method, recording everything in one MLflow run (plus one nested
    run per expert when there are several), and log the fused pyfunc model."""
    with tracking.start_run(cfg, role="experiment") as run:
        run.log_config(cfg)
        return execute(cfg, run, progress=progress)


def execute(cfg: RunConfig, run: tracking.Run, prep: Prepared | None = None, *, progress: bool = False,
            cache: ExpertCache | None = None, expert_runs: bool = True, shared_run: bool = False) -> ExperimentResult:
    """The experiment inside an open run, in four phases: train the models, choose the fusion on
    validation, evaluate once on test and log, ship the model (and register it when asked for).

    One path for every method: a single-model method is one expert that owns every class, fused
    by `concat` (the identity). With several experts, each trains in a nested run of its own
    (unless `expert_runs` is false, as inside a tuning study); a single model logs its epochs
    into `run` itself. `shared_run`: `run` is written by several sessions or workers (a study's
    parent), so facts that differ between them are tags, not (immutable) params.
    """
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    if prep is None:
        run.set_tags({schema.DEVICE: str(resolve_device(cfg.device))})
        prep = prepare(cfg)
    log_data_profile(run, prep.data)
    method, specs, layout = build_experts(cfg, prep.data.info)
    starts = np.cumsum([len(s.classes) for s in specs])[:-1]
    layout_facts = {"experts": ",".join(s.name for s in specs),
                    **({"split_ranks": ",".join(map(str, starts))} if len(starts) else {})}
    if shared_run:  # a study's parent run: the best experts change between its sessions and workers
        run.set_tags({f"ltexp.{k}": v for k, v in layout_facts.items()})
    else:
        run.log_params(layout_facts)
    trained = train_models(cfg, run, prep, method, specs, layout, progress=progress, cache=cache,
                           expert_runs=expert_runs, shared_run=shared_run)
    choice = choose_fusion(trained, layout, prep, method)
    metrics = evaluate_and_log(cfg, run, prep, method, specs, layout, trained, choice,
                               expert_runs=expert_runs, shared_run=shared_run)
    model_uri, version = ship_model(cfg, run, choice.predictor, prep.data)
    for checkpoint in filter(None, trained.checkpoints):
        checkpoint.clear()  # the run is complete: the identical command starts afresh next time
    return ExperimentResult(run.run_id, metrics, choice.table, model_uri, version, choice.fusion, trained.child_ids)


@dataclass
class Trained:
    """The models a run trained, in the experts' order, with what each left behind."""

    experts: list[torch.nn.Module]
    router: torch.nn.Module | None
    student: torch.nn.Module | None
    results: list[FitResult]  # one per trained model: experts, then router, then student
    child_ids: list[str]  # their nested runs, when they have them
    checkpoints: list  # their `lifecycle.Checkpointer`s (None where none was kept)
    in_parent: bool  # one model, whose epochs are the run's own curves

    @property
    def scorers(self) -> list[torch.nn.Module]:
        """The models whose outputs the fusion rules read: the experts and the router."""
        return self.experts + ([self.router] if self.router is not None else [])


def train_models(cfg: RunConfig, run: tracking.Run, prep: Prepared, method, specs: list[ExpertSpec],
                 layout: ExpertLayout, *, progress: bool = False, cache: ExpertCache | None = None,
                 expert_runs: bool = True, shared_run: bool = False) -> Trained:
    """Phase 1: the experts (one after the other, or at once with --expert-concurrency), then the
    method's router and distilled student if it has them; a study's final evaluation (no runs
    of their own) takes its experts from the study's `cache`."""
    data = prep.data
    in_parent = len(specs) == 1
    trained = Trained([], None, None, [], [], [], in_parent)

    def train_alone(spec: ExpertSpec, teacher: torch.Tensor | None = None):
        """One model trained: (model, its FitResult, its nested run's id or None, its checkpoint)."""
        # Routers and students are not cached: they depend on the groups / on every teacher.
        reusable = cache if spec.role == EXPERT else None
        if in_parent or not expert_runs:
            ckpt = checkpointer(cfg, spec, run.run_id, run.run_id) if expert_runs else None
            model, result, _ = train_expert(cfg, method, spec, prep, run.log_epoch if in_parent else None,
                                            progress, reusable, ckpt, teacher)
            return model, result, None, ckpt
        tags = {**tracking.run_tags(cfg, "expert"), schema.EXPERT: spec.name}
        owned = spec.route_names if spec.role == ROUTER else [data.info.class_names[c] for c in spec.classes]
        with run.child(f"{'expert-' if spec.role == EXPERT else ''}{spec.name}", tags) as child:
            child.log_params({"expert": spec.name, "classes": ",".join(owned), "other": spec.other,
                              **({"other_per_epoch": spec.other_per_epoch} if spec.other else {})})
            ckpt = checkpointer(cfg, spec, child.run_id, run.run_id, f"{spec.role} {spec.name}")
            model, result, _ = train_expert(cfg, method, spec, prep, child.log_epoch, progress, reusable, ckpt,
                                            teacher)
            child.log_metrics({"train_time_s": result.train_time_s, "best_val_acc": result.best_val_acc,
                               "best_epoch": result.best_epoch, **result.posthoc})
            return model, result, child.run_id, ckpt

    def kept(done) -> torch.nn.Module:
        """Record a trained model's result, run and checkpoint, in the order of the models."""
        model, result, child_id, ckpt = done
        trained.results.append(result)
        trained.checkpoints.append(ckpt)
        if child_id is not None:
            trained.child_ids.append(child_id)
        return model

    way = concurrency.resolve(cfg.split.expert_concurrency, len(specs)) if expert_runs else choices.SEQUENTIAL
    if len(specs) > 1 and not shared_run:
        run.set_tags({schema.EXPERT_CONCURRENCY: way})
    if way == choices.THREADS:
        done = concurrency.run_at_once([lambda spec=spec: train_alone(spec) for spec in specs], prep.device,
                                       [spec.name for spec in specs])
        trained.experts = [kept(d) for d in done]
    else:
        trained.experts = [kept(train_alone(spec)) for spec in specs]
    router_spec, student_spec = method.router(specs), method.student(data.info)
    if router_spec is not None:
        trained.router = kept(train_alone(router_spec))
    if student_spec is not None:
        trained.student = kept(train_alone(student_spec, teacher_targets(trained.experts, layout, prep.splits.train)))
    return trained


@dataclass
class FusionChoice:
    """The fusion chosen on validation, and everything the evaluation reads of it."""

    table: pd.DataFrame  # one row per rule (and the student), validation and test figures
    fusion: str  # the chosen row
    predictor: FusedPredictor  # what ships
    log_probs: torch.Tensor  # its test prediction
    val_outputs: list[torch.Tensor]
    test_outputs: list[torch.Tensor]
    test_time_s: float


def choose_fusion(trained: Trained, layout: ExpertLayout, prep: Prepared, method) -> FusionChoice:
    """Phase 2: every fusion rule of the method fitted and chosen on validation (accuracy, then
    NLL); the test set is scored once per rule, never used to choose."""
    data, splits, device = prep.data, prep.splits, prep.device
    scorers, student = trained.scorers, trained.student
    val_outputs = [predict_logits(m, splits.val.images) for m in scorers]
    test_outputs, test_time = _timed(device, lambda: [predict_logits(m, splits.test.images) for m in scorers])
    table = fusion_table(layout, (val_outputs, splits.val.labels), data.info, method.fusion_rules(layout),
                         test=(test_outputs, splits.test.labels))
    if student is not None:
        student_val = predict_logits(student, splits.val.images)
        student_test, student_time = _timed(device, lambda: predict_logits(student, splits.test.images))
        table = pd.concat([table, student_row(layout, (student_val, splits.val.labels),
                                              (student_test, splits.test.labels), data.info)], ignore_index=True)
    chosen = table.sort_values(["val_acc", "val_nll"], ascending=[False, True]).iloc[0]["fusion"]
    row = table.set_index("fusion").loc[chosen]
    if chosen == STUDENT:  # one model over every class: no routing at test time
        one = ExpertLayout((tuple(range(data.info.num_classes)),), (False,), data.info.num_classes)
        predictor = FusedPredictor([student], one, "concat", data.info.class_names, data.image_shape)
        log_probs, fuse_time = _timed(device, lambda: fuse("concat", [student_test], one))
        test_time = student_time + fuse_time
    else:
        predictor = FusedPredictor(scorers, layout, chosen, data.info.class_names, data.image_shape, row["params"])
        log_probs, fuse_time = _timed(device, lambda: fuse(chosen, test_outputs, layout, predictor.fusion_params))
        test_time += fuse_time
    return FusionChoice(table, chosen, predictor, log_probs, val_outputs, test_outputs, test_time)


def evaluate_and_log(cfg: RunConfig, run: tracking.Run, prep: Prepared, method, specs: list[ExpertSpec],
                     layout: ExpertLayout, trained: Trained, choice: FusionChoice, *, expert_runs: bool = True,
                     shared_run: bool = False) -> dict[str, float]:
    """Phase 3: the chosen model's test figures beside its validation ones (and, with several
    experts, the oracle as an upper bound), logged with the per-rule table and the test
    artifacts. Returns the run's metrics (`val_*` included)."""
    data, splits = prep.data, prep.splits
    table, results = choice.table, trained.results
    row = table.set_index("fusion").loc[choice.fusion]
    test_metrics = classification_metrics(choice.log_probs, splits.test.labels, data.info)
    val_metrics = {k[4:]: row[k] for k in table.columns if k.startswith("val_")}
    if trained.router is not None:  # the router's own accuracy at predicting the true group
        val_metrics["router_acc"] = route_accuracy(choice.val_outputs, layout, splits.val.labels)
        test_metrics["router_acc"] = route_accuracy(choice.test_outputs, layout, splits.test.labels)

    metrics = headline_metrics(results)
    if len(trained.scorers) == 1 and trained.student is None:  # one model: its last epoch beside the selected one
        metrics.update(last_epoch_metrics(cfg, method, specs[0], prep, results[0], test_metrics, val_metrics["acc"]))
    if len(specs) > 1:
        test_metrics["routing_acc"] = routing_accuracy(choice.log_probs.argmax(1), splits.test.labels, layout)
        oracle = accuracy_metrics(oracle_predict(choice.test_outputs, layout, splits.test.labels), splits.test.labels,
                                  data.info)
        test_metrics.update({"oracle_acc": oracle["acc"], "oracle_head_acc": oracle["head_acc"],
                             "oracle_tail_acc": oracle["tail_acc"]})
        metrics["best_val_acc"] = val_metrics["acc"]  # the fused model's, as chosen on validation
        if len(table) > 1:  # a compact per-rule view; the full table is eval/fusion_rules.csv
            for _, r in table.iterrows():
                metrics[f"val_acc__fusion_{r['fusion']}"] = r["val_acc"]
                metrics[f"test_acc__fusion_{r['fusion']}"] = r["test_acc"]
        oracle_row = {"fusion": "ORACLE (true group; upper bound, not a result)", "params": {},
                      **{f"test_{k}": v for k, v in oracle.items()}}
        log_table = pd.concat([table, pd.DataFrame([oracle_row])], ignore_index=True)
        run.log_table(log_table.drop(columns=["params"]).assign(params=[json.dumps(p) for p in log_table["params"]]),
                      "eval/fusion_rules.csv")
        run.set_tags({schema.FUSION: choice.fusion})
    metrics.update({f"test_{k}": v for k, v in test_metrics.items()})
    metrics["test_time_s"] = choice.test_time_s
    # A summary whose key has no per-epoch curve on this run is one value at step 0, which MLflow's
    # chart view draws as a bar per run (a value at a later step reads as a one-point curve); a
    # single model's curves already end with its last epoch's loss, lr and times, so those keys
    # get no summary point at all (no curve holds its final value twice or starts with it).
    last_epoch = max(r.epochs_run for r in results)
    curves = set(results[0].history[-1]) if trained.in_parent and results[0].history else set()
    run.log_metrics({k: v for k, v in metrics.items() if k not in curves}, step=0)
    if not trained.in_parent and expert_runs and not shared_run:  # each expert's curves on the parent too
        for spec, result in zip(specs, results):
            run.log_history(result.history, f"__expert_{spec.name}")
    # The shipped model's validation metrics, as the last point of the val_* curves.
    run.log_metrics({f"val_{k}": v for k, v in val_metrics.items()}, step=last_epoch + 1)
    log_test_artifacts(run, choice.log_probs.argmax(1), splits.test.labels, data)
    return {**metrics, **{f"val_{k}": v for k, v in val_metrics.items()}}


def ship_model(cfg: RunConfig, run: tracking.Run, predictor: FusedPredictor, data: LongTailData):
    """Phase 4: the fused predictor logged as the run's pyfunc model (and registered under
    --register-as); returns its URI and the registered version (None when not registered)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            predictor.save(tmp)
        except OSError as exc:
            raise write_error("the model", tmp, exc) from exc
        model_uri = run.log_model(tmp, input_example=data.test_images[:2])
    version = None
    if cfg.tracking.register_as:
        tracking.flush()
        version = tracking.register_model(run.run_id, cfg.tracking.register_as, cfg.tracking.alias)
    return model_uri, version


def last_epoch_metrics(cfg: RunConfig, method, spec: ExpertSpec, prep: "Prepared", result: FitResult,
                       selected_test: dict[str, float], selected_val_acc: float) -> dict[str, float]:
    """The figures of the last epoch's model beside those of the validation-selected one a run
    reports: `test_acc__last_epoch`, `test_head_acc__last_epoch`, `test_tail_acc__last_epoch`,
    `val_acc__last_epoch`, the method's post-hoc step chosen on validation for it too. When the
    last epoch was the selected one they are the selected model's (`selected_*`); none when they
    are unknown (a run resumed after it had finished keeps only the selected weights)."""
    splits, info = prep.splits, prep.data.info
    keys = ("acc", "head_acc", "tail_acc")
    if result.last_state is None:
        if not result.history or result.best_epoch != result.history[-1]["epoch"]:
            return {}
        test, val_acc = selected_test, selected_val_acc
    else:
        model = new_expert_model(cfg, method, spec, prep)
        model.load_state_dict(result.last_state)
        model.eval()
        val = expert_view(splits.val, spec, info.num_classes)
        method.posthoc(model, predict_logits(model, val.images), val.labels, expert_info(info, spec))

        def scored(images, labels):
            return classification_metrics(torch.log_softmax(predict_logits(model, images).float(), 1), labels, info)

        test, val_acc = scored(splits.test.images, splits.test.labels), scored(splits.val.images, splits.val.labels)["acc"]
    return {**{f"test_{k}__last_epoch": test[k] for k in keys}, "val_acc__last_epoch": val_acc}


def headline_metrics(results: list[FitResult]) -> dict[str, float]:
    """The keys every top-level run logs, whatever its method, so runs compare without gaps.

    Several experts: times add up; the last epoch's loss, accuracy and epoch time are averaged
    over the experts weighted by the images each saw; `lr` is the final learning rate.
    """
    train_time = sum(r.train_time_s for r in results)
    images = sum(r.images_seen for r in results)
    last = [r.history[-1] for r in results]
    weights = np.asarray([r.seen_per_class and sum(r.seen_per_class[-1]) or 1 for r in results], dtype=np.float64)
    metrics = {"train_time_s": train_time, "train_images_per_s": images / train_time if train_time else 0.0,
               "best_epoch": max(r.best_epoch for r in results), "best_val_acc": results[0].best_val_acc,
               "epochs_run": max(r.epochs_run for r in results), "lr": last[-1]["lr"]}
    for key in ("train_loss", "train_acc", "epoch_time_s"):
        metrics[key] = float(np.average([h[key] for h in last], weights=weights))
    for key in sorted({k for r in results for k in r.posthoc}):
        metrics[key] = float(np.mean([r.posthoc[key] for r in results if key in r.posthoc]))
    return metrics
