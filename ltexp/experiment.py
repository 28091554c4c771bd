"""One experiment end to end: data -> experts (method stages, one engine) -> fusion -> test -> MLflow.

Every method is a list of experts: single-model methods have one expert that owns every class,
`split` one per class group. `run_experiment` is what `ltexp train` and every MLproject entry
point call.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ltexp import choices, concurrency, lifecycle, plots, schema, tracking, write_error
from ltexp.config import RunConfig, used_settings
from ltexp.data import ClassInfo, LongTailData, build_dataset
from ltexp.data.device import DeviceImages, build_augment
from ltexp.engine import FitResult, fit, fit_epochs, predict_logits, resolve_device
from ltexp.fusion import ExpertLayout, fit_rule, fuse, oracle_predict, route_accuracy, routing_accuracy
from ltexp.methods import EXPERT, ROUTER, STUDENT, ExpertSpec, build_method
from ltexp.metrics import accuracy_metrics, classification_metrics, confusion_matrix, per_class_accuracy
from ltexp.models import build_model, channel_stats
from ltexp.predictor import FusedPredictor
from ltexp.progress import Progress


@dataclass
class ExperimentResult:
    run_id: str
    metrics: dict[str, float]
    fusion_table: pd.DataFrame | None = None
    model_uri: str = ""
    registered_version: int | None = None
    fusion: str = "concat"
    expert_run_ids: list[str] = field(default_factory=list)


@dataclass
class DeviceSplits:
    train: DeviceImages
    val: DeviceImages
    test: DeviceImages


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


def expert_view(images: DeviceImages, spec: ExpertSpec, num_classes: int) -> DeviceImages:
    """The images an expert sees, labelled in its own output space.

    Without "other": only its classes' images (a copy of that subset). With "other": every image
    (the same device tensor, no copy), the rest labelled `len(spec.classes)`. A router sees every
    image labelled by its group.
    """
    device = images.labels.device
    if spec.role == ROUTER:  # every image, labelled by its group
        groups = ExpertLayout(spec.routes, (False,) * len(spec.routes), num_classes).group_of().to(device)
        return DeviceImages(images.images, groups[images.labels])
    local = torch.full((num_classes,), len(spec.classes), dtype=torch.long, device=device)
    local[list(spec.classes)] = torch.arange(len(spec.classes), device=device)
    labels = local[images.labels]
    if spec.other:
        return DeviceImages(images.images, labels)
    keep = labels < len(spec.classes)
    return DeviceImages(images.images[keep], labels[keep])


def expert_info(info: ClassInfo, spec: ExpertSpec) -> ClassInfo:
    """Class names and training counts of an expert's outputs; its "other" label counts the
    images it draws per epoch (what its loss and sampler see). A router's outputs are the groups,
    each counting its classes' images."""
    if spec.role == ROUTER:
        counts = [int(info.train_counts[list(classes)].sum()) for classes in spec.routes]
        return ClassInfo(spec.route_names, np.asarray(counts, dtype=np.int64))
    names = tuple(info.class_names[c] for c in spec.classes) + (("other",) if spec.other else ())
    counts = info.train_counts[list(spec.classes)].tolist() + ([spec.other_per_epoch] if spec.other else [])
    return ClassInfo(names, np.asarray(counts, dtype=np.int64))


def expert_seed(cfg: RunConfig, spec: ExpertSpec) -> int:
    """Seed of an expert's initialisation and sampling: the run seed and the classes it owns, so
    the same expert gets the same seed whatever its position among the groups (and can be reused)."""
    identity = (spec.classes, spec.other, spec.other_per_epoch) + ((spec.role, spec.routes) if spec.role != EXPERT else ())
    return cfg.seed * 1_000_003 + zlib.crc32(repr(identity).encode()) % 1_000_003


def expert_key(cfg: RunConfig, spec: ExpertSpec) -> str:
    """Everything that changes how an expert trains; equal keys give bit-identical experts on CPU."""
    if spec.role == EXPERT:
        settings = {k: v for k, v in used_settings(cfg).items() if k not in UNUSED_BY_EXPERT_TRAINING}
        identity = {}
    else:  # a router depends on the groups, a student on every expert that teaches it
        settings = {k: v for k, v in used_settings(cfg).items() if k not in ("fusion", "device")}
        identity = {"role": spec.role, "routes": spec.routes}
    return json.dumps({"settings": settings, "classes": spec.classes, "other": spec.other,
                       "other_per_epoch": spec.other_per_epoch, **identity}, sort_keys=True, default=str)


# Config fields that never reach an expert's training (they pick groups or fusion; the groups
# themselves are part of the key through the expert's classes). Bookkeeping fields are not in
# `used_settings` at all.
UNUSED_BY_EXPERT_TRAINING = {"fusion", "num_groups", "split_at", "expert_mode", "other_size", "device", "router",
                             "distill", "distill_temperature", "distill_weight", "student_sampling"}


@dataclass
class ExpertCache:
    """Trained experts by `expert_key`, so a tuning study never trains the same expert twice.

    `directory`: also kept there, for the processes of one `ltexp tune --jobs N` (one machine), so
    that an expert one job trained is reused by the others and by the command's final test
    evaluation. One file per expert (`<hash>.pt`: its CPU weights and its `FitResult` as a dict,
    written whole by `lifecycle.save_whole`); the command removes the folder when the study ends."""

    entries: dict = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    directory: Path | None = None

    def _path(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def _load(self, key: str) -> bool:
        """Read an expert another process put into `directory`."""
        if self.directory is None or not self._path(key).exists():
            return False
        saved = torch.load(self._path(key), map_location="cpu", weights_only=True)
        self.entries[key] = (saved["state"], FitResult(**saved["result"]))
        return True

    def has(self, key: str) -> bool:
        return key in self.entries or self._load(key)

    def get(self, key: str):
        if self.has(key):
            self.hits += 1
            return self.entries[key]
        self.misses += 1
        return None

    def put(self, key: str, model: torch.nn.Module, result: FitResult) -> None:
        result = dataclasses.replace(result, last_state=None)  # the selected weights are what is shared
        self.entries[key] = (copy.deepcopy(model.state_dict()), result)
        if self.directory is not None:
            lifecycle.save_whole({"state": {k: v.detach().cpu() for k, v in self.entries[key][0].items()},
                                  "result": dataclasses.asdict(result)}, self._path(key), "trained expert")


def train_expert(cfg: RunConfig, method, spec: ExpertSpec, prep: "Prepared", on_epoch, progress: bool,
                 cache: ExpertCache | None = None, checkpoint: lifecycle.Checkpointer | None = None,
                 teacher: torch.Tensor | None = None) -> tuple[torch.nn.Module, FitResult, bool]:
    """Train one expert with the one engine, resuming from `checkpoint`, then apply the method's
    post-hoc step (or take the finished expert from `cache`).

    Returns the model (best validation epoch, post-hoc step applied), its `FitResult`, and
    whether it was reused.
    """
    key = expert_key(cfg, spec)
    model = new_expert_model(cfg, method, spec, prep)
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        model.load_state_dict(cached[0])
        return model.eval(), cached[1], True
    inputs = fit_inputs(cfg, method, spec, prep, teacher)
    result = fit(model, **inputs, on_epoch=on_epoch, progress=Progress(spec.name) if progress else None,
                 checkpoint=checkpoint)
    val = inputs["val"]
    result.posthoc = method.posthoc(model, predict_logits(model, val.images), val.labels, inputs["info"])
    if cache is not None:
        cache.put(key, model, result)
    return model, result, False


def new_expert_model(cfg: RunConfig, method, spec: ExpertSpec, prep: "Prepared") -> torch.nn.Module:
    """An expert's freshly initialised model (seeded by `expert_seed`), on the training device."""
    mean, std = channel_stats(prep.data.train_images)
    with concurrency.GLOBAL_RNG:  # seeding and drawing the weights, as one step for each thread
        torch.manual_seed(expert_seed(cfg, spec))
        model = build_model(cfg.model.model, prep.data.image_shape, spec.num_outputs, mean, std, head=method.head)
    return model.to(prep.device)


def fit_inputs(cfg: RunConfig, method, spec: ExpertSpec, prep: "Prepared", teacher: torch.Tensor | None = None) -> dict:
    """The engine's arguments for one expert: its view of the data, stages, classes and seed
    (and, for a student, the teacher logits of every training image as soft targets)."""
    data, splits = prep.data, prep.splits
    k = data.info.num_classes
    train, val = expert_view(splits.train, spec, k), expert_view(splits.val, spec, k)
    if teacher is not None:
        train = DeviceImages(train.images, train.labels, teacher)
    info = expert_info(data.info, spec)
    return dict(train=train, val=val, stages=method.stages(info, spec), info=info, batch_size=cfg.optim.batch_size,
                clip_norm=cfg.optim.clip_norm, augment=build_augment(cfg.data.augment, data.image_shape[0]),
                seed=expert_seed(cfg, spec), select_metric="macro_acc" if spec.other else "acc",
                compile_mode=cfg.optim.compile)


def expert_steps(cfg: RunConfig, method, spec: ExpertSpec, prep: "Prepared",
                 checkpoint: lifecycle.Checkpointer | None = None):
    """A fresh expert model and its training as a generator of epoch records (`engine.fit_epochs`),
    for training several experts in lockstep; the generator returns the `FitResult`. (Tuning uses
    it for split experts, whose method has no post-hoc step.)"""
    model = new_expert_model(cfg, method, spec, prep)
    return model, fit_epochs(model, **fit_inputs(cfg, method, spec, prep), checkpoint=checkpoint)


def checkpoint_key(cfg: RunConfig, spec: ExpertSpec) -> str:
    """The expert's key plus what its checkpoint belongs to: the tracking store its runs live in
    (hashed, since a URI can carry a password; the store is where the resumed run is linked) and
    the torch build and device type that compute its numbers. Another store or build trains afresh."""
    store = hashlib.sha256(tracking.store_identity().encode()).hexdigest()[:16]
    return json.dumps({"expert": expert_key(cfg, spec), "store": store, "torch": torch.__version__,
                       "device": resolve_device(cfg.device).type}, sort_keys=True)


def checkpointer(cfg: RunConfig, spec: ExpertSpec, run_id: str, root_run_id: str, label: str = "",
                 cadence: lifecycle.Cadence | None = None) -> lifecycle.Checkpointer:
    """The checkpoint of one expert of the run `root_run_id` (epochs logged to `run_id`).

    When it resumes it says so on the terminal, and the interrupted runs are closed KILLED and
    linked to the runs that continue them (`ltexp.resumed_by` / `ltexp.resumed_from`).
    """
    def announce(state: dict) -> None:
        old_root, old_run = state.get("root_run_id", ""), state.get("run_id", "")
        done = bool(state.get("finished"))  # training had ended; only the evaluation was lost
        detail = f" ({label}{', finished' if done else ''}, run {old_run})" if label and old_run != old_root else \
            (" (finished)" if done else "")
        written_with, now = state.get("torch_threads"), torch.get_num_threads()
        if written_with and written_with != now:
            # Not a key part: the default thread count follows the machine's load, and a kill
            # should not cost the epochs done. Float sums taken in another order may differ in
            # their last digits, so the run says it.
            detail += (f"; written with {written_with} torch threads, now {now}: the last digits may differ "
                       "from an uninterrupted run")
        tracking.link_resumed(old_run, run_id)
        if old_root != old_run:
            tracking.link_resumed(old_root, root_run_id)
        print(f"resuming from epoch {state['global_epoch']} of run {old_root or '(unknown)'}{detail}", flush=True)

    return lifecycle.Checkpointer(checkpoint_key(cfg, spec), lifecycle.Every.parse(cfg.tracking.checkpoint_every),
                                  cfg.tracking.resume, run_id, root_run_id, label, cadence, announce)


@dataclass
class Prepared:
    """A data set loaded once and placed on the device (a tuning study reuses it for every trial)."""

    data: LongTailData
    splits: DeviceSplits
    device: torch.device


def prepare(cfg: RunConfig) -> Prepared:
    """Load and long-tail the configured data and put its three splits on the training device."""
    device = resolve_device(cfg.device)
    data = build_dataset(cfg.data)
    splits = DeviceSplits(*(DeviceImages.from_numpy(x, y, device) for x, y in (
        (data.train_images, data.train_labels), (data.val_images, data.val_labels),
        (data.test_images, data.test_labels))))
    return Prepared(data, splits, device)


def build_experts(cfg: RunConfig, info: ClassInfo):
    """The method object, its expert specs, and their layout (validates `split_at`)."""
    method = build_method(cfg)
    specs = method.experts(info)
    layout = ExpertLayout(tuple(s.classes for s in specs), tuple(s.other for s in specs), info.num_classes,
                          router=method.router(specs) is not None)
    return method, specs, layout


def teacher_targets(experts: list[torch.nn.Module], layout: ExpertLayout, images: DeviceImages) -> torch.Tensor:
    """(N, K) teacher logits for a student: each image gets its *own* group's expert's logits on
    that expert's classes (training labels are known, so this routing is legitimate), -inf on
    every other class."""
    k = layout.num_classes
    labels = images.labels
    group = layout.group_of().to(labels.device)[labels]
    targets = torch.full((len(labels), k), float("-inf"), device=labels.device)
    for e, (model, classes) in enumerate(zip(experts, layout.owners)):
        rows = (group == e).nonzero().squeeze(1)
        if len(rows):
            logits = predict_logits(model, images.images[rows])[:, :len(classes)]
            targets[rows[:, None], torch.as_tensor(classes, device=labels.device)[None, :]] = logits
    return targets


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
    """The experiment inside an open run: data, experts, fusion chosen on validation, one test
    evaluation, artifacts, the model, and registration when asked for.

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
    data, splits, device = prep.data, prep.splits, prep.device
    log_data_profile(run, data)
    method, specs, layout = build_experts(cfg, data.info)
    starts = np.cumsum([len(s.classes) for s in specs])[:-1]
    layout_facts = {"experts": ",".join(s.name for s in specs),
                    **({"split_ranks": ",".join(map(str, starts))} if len(starts) else {})}
    if shared_run:  # a study's parent run: the best experts change between its sessions and workers
        run.set_tags({f"ltexp.{k}": v for k, v in layout_facts.items()})
    else:
        run.log_params(layout_facts)
    in_parent = len(specs) == 1  # one model: its epochs are the run's own curves

    results: list[FitResult] = []
    child_ids: list[str] = []
    checkpoints: list[lifecycle.Checkpointer | None] = []

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

    def kept(trained) -> torch.nn.Module:
        """Record a trained model's result, run and checkpoint, in the order of the experts."""
        model, result, child_id, ckpt = trained
        results.append(result)
        checkpoints.append(ckpt)
        if child_id is not None:
            child_ids.append(child_id)
        return model

    def train_one(spec: ExpertSpec, teacher: torch.Tensor | None = None) -> torch.nn.Module:
        return kept(train_alone(spec, teacher))

    # The group experts one after the other, or at once (--expert-concurrency); a study's final
    # evaluation (no runs of their own) takes its experts from the study's cache.
    way = concurrency.resolve(cfg.split.expert_concurrency, len(specs)) if expert_runs else choices.SEQUENTIAL
    if len(specs) > 1 and not shared_run:
        run.set_tags({schema.EXPERT_CONCURRENCY: way})
    if way == choices.THREADS:
        trained = concurrency.run_at_once([lambda spec=spec: train_alone(spec) for spec in specs], device,
                                          [spec.name for spec in specs])
        experts = [kept(t) for t in trained]
    else:
        experts = [train_one(spec) for spec in specs]
    router_spec, student_spec = method.router(specs), method.student(data.info)
    scorers = experts + ([train_one(router_spec)] if router_spec is not None else [])  # what fusion rules read
    student = None
    if student_spec is not None:
        student = train_one(student_spec, teacher_targets(experts, layout, splits.train))

    # Fusion rules are fitted and chosen on validation; the test set is scored once per rule.
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
    test_metrics = classification_metrics(log_probs, splits.test.labels, data.info)
    val_metrics = {k[4:]: row[k] for k in table.columns if k.startswith("val_")}
    if router_spec is not None:  # the router's own accuracy at predicting the true group
        val_metrics["router_acc"] = route_accuracy(val_outputs, layout, splits.val.labels)
        test_metrics["router_acc"] = route_accuracy(test_outputs, layout, splits.test.labels)

    metrics = headline_metrics(results)
    if len(scorers) == 1 and student is None:  # one model: its last epoch beside the selected one
        metrics.update(last_epoch_metrics(cfg, method, specs[0], prep, results[0], test_metrics, val_metrics["acc"]))
    if len(specs) > 1:
        test_metrics["routing_acc"] = routing_accuracy(log_probs.argmax(1), splits.test.labels, layout)
        oracle = accuracy_metrics(oracle_predict(test_outputs, layout, splits.test.labels), splits.test.labels, data.info)
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
        run.set_tags({schema.FUSION: chosen})
    metrics.update({f"test_{k}": v for k, v in test_metrics.items()})
    metrics["test_time_s"] = test_time
    # A summary whose key has no per-epoch curve on this run is one value at step 0, which MLflow's
    # chart view draws as a bar per run (a value at a later step reads as a one-point curve); a
    # single model's curves already end with its last epoch's loss, lr and times, so those keys
    # get no summary point at all (no curve holds its final value twice or starts with it).
    last_epoch = max(r.epochs_run for r in results)
    curves = set(results[0].history[-1]) if in_parent and results[0].history else set()
    run.log_metrics({k: v for k, v in metrics.items() if k not in curves}, step=0)
    if not in_parent and expert_runs and not shared_run:  # each expert's curves on the parent too
        for spec, result in zip(specs, results):
            run.log_history(result.history, f"__expert_{spec.name}")
    # The shipped model's validation metrics, as the last point of the val_* curves.
    run.log_metrics({f"val_{k}": v for k, v in val_metrics.items()}, step=last_epoch + 1)
    log_test_artifacts(run, log_probs.argmax(1), splits.test.labels, data)

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
    for checkpoint in filter(None, checkpoints):
        checkpoint.clear()  # the run is complete: the identical command starts afresh next time
    return ExperimentResult(run.run_id, {**metrics, **{f"val_{k}": v for k, v in val_metrics.items()}}, table,
                            model_uri, version, chosen, child_ids)


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
