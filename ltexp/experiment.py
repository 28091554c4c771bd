"""One experiment end to end: data -> experts (method stages, one engine) -> fusion -> test -> MLflow.

Every method is a list of experts: single-model methods have one expert that owns every class,
`split` one per class group. `run_experiment` is what `ltexp train` and every MLproject entry
point call.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ltexp import plots, tracking
from ltexp.config import RunConfig
from ltexp.data import ClassInfo, LongTailData, build_dataset
from ltexp.data.device import DeviceImages, build_augment
from ltexp.engine import FitResult, fit, resolve_device
from ltexp.fusion import ExpertLayout, applicable_rules, fit_rule, fuse, oracle_predict, routing_accuracy
from ltexp.methods import ExpertSpec, build_method
from ltexp.metrics import accuracy_metrics, classification_metrics, confusion_matrix, per_class_accuracy
from ltexp.models import build_model, channel_stats
from ltexp.predictor import FusedPredictor


@dataclass
class ExperimentResult:
    run_id: str
    metrics: dict[str, float]
    fusion_table: pd.DataFrame | None = None
    model_uri: str = ""
    registered_version: int | None = None
    fusion: str = "none"
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
    (the same device tensor, no copy), the rest labelled `len(spec.classes)`.
    """
    local = torch.full((num_classes,), len(spec.classes), dtype=torch.long, device=images.labels.device)
    local[list(spec.classes)] = torch.arange(len(spec.classes), device=images.labels.device)
    labels = local[images.labels]
    if spec.other:
        return DeviceImages(images.images, labels)
    keep = labels < len(spec.classes)
    return DeviceImages(images.images[keep], labels[keep])


def expert_info(info: ClassInfo, spec: ExpertSpec, other_count: int) -> ClassInfo:
    names = tuple(info.class_names[c] for c in spec.classes) + (("other",) if spec.other else ())
    counts = info.train_counts[list(spec.classes)].tolist() + ([other_count] if spec.other else [])
    return ClassInfo(names, np.asarray(counts, dtype=np.int64))


def train_expert(cfg: RunConfig, method, spec: ExpertSpec, index: int, data: LongTailData, splits: DeviceSplits,
                 on_epoch, progress: bool) -> tuple[torch.nn.Module, FitResult]:
    """Train one expert with the one engine; returns the model at its best validation epoch."""
    k = data.info.num_classes
    train, val = expert_view(splits.train, spec, k), expert_view(splits.val, spec, k)
    other_count = int((train.labels == len(spec.classes)).sum()) if spec.other else 0
    info = expert_info(data.info, spec, other_count)
    torch.manual_seed(cfg.seed * 1000 + index)  # each expert its own, repeatable initialisation
    mean, std = channel_stats(data.train_images)
    model = build_model(cfg.model.model, data.image_shape, spec.num_outputs, mean, std).to(splits.train.images.device)
    result = fit(model, train, val, method.stages(cfg.optim, spec), info, batch_size=cfg.optim.batch_size,
                 clip_norm=cfg.optim.clip_norm, augment=build_augment(cfg.data.augment, data.image_shape[0]),
                 seed=cfg.seed * 1000 + index, on_epoch=on_epoch, progress=progress,
                 select_metric="macro_acc" if spec.other else "acc")
    return model, result


def _timed(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - started


def fusion_table(predictor: FusedPredictor, val_outputs, test_outputs, splits: DeviceSplits, info: ClassInfo) -> pd.DataFrame:
    """Every applicable fusion rule on the trained experts: fitted on validation, scored on both."""
    rows = []
    for rule in applicable_rules(predictor.layout):
        params = fit_rule(rule, val_outputs, predictor.layout, splits.val.labels)
        row = {"fusion": rule, "params": params}
        for split, outputs, labels in (("val", val_outputs, splits.val.labels), ("test", test_outputs, splits.test.labels)):
            log_probs = fuse(rule, outputs, predictor.layout, params)
            metrics = classification_metrics(log_probs, labels, info)
            metrics["routing_acc"] = routing_accuracy(log_probs.argmax(1), labels, predictor.layout)
            row.update({f"{split}_{k}": v for k, v in metrics.items()})
        rows.append(row)
    return pd.DataFrame(rows)


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
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        device = resolve_device(cfg.device)
        run.set_tags({"ltexp.device": str(device)})
        data = build_dataset(cfg.data)
        log_data_profile(run, data)
        method = build_method(cfg.method, cfg.split)
        specs = method.experts(data.info)
        layout = ExpertLayout(tuple(s.classes for s in specs), tuple(s.other for s in specs), data.info.num_classes)
        splits = DeviceSplits(*(DeviceImages.from_numpy(x, y, device) for x, y in (
            (data.train_images, data.train_labels), (data.val_images, data.val_labels),
            (data.test_images, data.test_labels))))
        if len(specs) > 1:
            starts = np.cumsum([len(s.classes) for s in specs])[:-1]
            run.log_params({"split_ranks": ",".join(map(str, starts)), "experts": ",".join(s.name for s in specs)})

        experts, expert_runs, train_time, images_seen = [], [], 0.0, 0
        for index, spec in enumerate(specs):
            if len(specs) == 1:
                model, result = train_expert(cfg, method, spec, index, data, splits, run.log_epoch, progress)
            else:
                tags = {**tracking.run_tags(cfg, "expert"), "ltexp.expert": spec.name}
                with run.child(f"expert-{spec.name}", tags) as child:
                    child.log_params({"expert": spec.name, "classes": ",".join(data.info.class_names[c] for c in spec.classes),
                                      "other": spec.other, "other_per_epoch": spec.other_per_epoch})
                    model, result = train_expert(cfg, method, spec, index, data, splits, child.log_epoch, progress)
                    child.log_metrics({"train_time_s": result.train_time_s, "best_val_acc": result.best_val_acc,
                                       "best_epoch": result.best_epoch})
                    expert_runs.append(child.run_id)
            experts.append(model)
            train_time += result.train_time_s
            images_seen += result.images_seen

        predictor = FusedPredictor(experts, layout, "none" if len(specs) == 1 else cfg.split.fusion,
                                   data.info.class_names, data.image_shape)
        metrics = {"train_time_s": train_time, "train_images_per_s": images_seen / train_time if train_time else 0.0}
        table = None
        if len(specs) == 1:
            log_probs, test_time = _timed(device, lambda: predictor.log_probs(splits.test.images))
            test_metrics = classification_metrics(log_probs, splits.test.labels, data.info)
            metrics["best_val_acc"] = result.best_val_acc
            metrics["best_epoch"] = result.best_epoch
        else:
            val_outputs = predictor.expert_outputs(splits.val.images)
            test_outputs, test_time = _timed(device, lambda: predictor.expert_outputs(splits.test.images))
            table = fusion_table(predictor, val_outputs, test_outputs, splits, data.info)
            chosen = cfg.split.fusion
            if chosen == "auto":  # the choice sees validation only
                chosen = table.sort_values(["val_acc", "val_nll"], ascending=[False, True]).iloc[0]["fusion"]
            row = table.set_index("fusion").loc[chosen]
            predictor.fusion, predictor.fusion_params = chosen, row["params"]
            log_probs, fuse_time = _timed(device, lambda: fuse(chosen, test_outputs, layout, predictor.fusion_params))
            test_time += fuse_time
            test_metrics = classification_metrics(log_probs, splits.test.labels, data.info)
            test_metrics["routing_acc"] = routing_accuracy(log_probs.argmax(1), splits.test.labels, layout)
            oracle = accuracy_metrics(oracle_predict(test_outputs, layout, splits.test.labels), splits.test.labels, data.info)
            test_metrics.update({"oracle_acc": oracle["acc"], "oracle_head_acc": oracle["head_acc"],
                                 "oracle_tail_acc": oracle["tail_acc"]})
            val_chosen = {k[4:]: row[k] for k in table.columns if k.startswith("val_")}
            metrics.update({f"val_{k}": v for k, v in val_chosen.items()})
            for _, r in table.iterrows():
                for key in ("acc", "head_acc", "tail_acc", "routing_acc"):
                    metrics[f"val_{key}__fusion_{r['fusion']}"] = r[f"val_{key}"]
                    metrics[f"test_{key}__fusion_{r['fusion']}"] = r[f"test_{key}"]
            run.log_table(table.drop(columns=["params"]).assign(params=[str(p) for p in table["params"]]),
                          "eval/fusion_rules.csv")
            run.log_params({"fusion.resolved": chosen} if cfg.split.fusion == "auto" else {})
            run.set_tags({"ltexp.fusion": chosen})
        metrics.update({f"test_{k}": v for k, v in test_metrics.items()})
        metrics["test_time_s"] = test_time
        run.log_metrics(metrics)
        log_test_artifacts(run, log_probs.argmax(1), splits.test.labels, data)

        with tempfile.TemporaryDirectory() as tmp:
            predictor.save(tmp)
            model_uri = run.log_model(tmp, input_example=data.test_images[:2])
        version = None
        if cfg.tracking.register_as:
            tracking.flush()
            version = tracking.register_model(run.run_id, cfg.tracking.register_as, cfg.tracking.alias)
        return ExperimentResult(run.run_id, metrics, table, model_uri, version, predictor.fusion, expert_runs)
