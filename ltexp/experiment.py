"""One experiment end to end: data -> model -> method stages -> engine -> test -> MLflow.

`run_experiment` is what `ltexp train` and every MLproject entry point call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ltexp import plots, tracking
from ltexp.config import RunConfig
from ltexp.data import LongTailData, build_dataset
from ltexp.data.device import DeviceImages, build_augment
from ltexp.engine import fit, predict_logits, resolve_device
from ltexp.methods import build_method
from ltexp.metrics import classification_metrics, confusion_matrix, per_class_accuracy
from ltexp.models import build_model, channel_stats


@dataclass
class ExperimentResult:
    run_id: str
    metrics: dict[str, float]


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


def evaluate_and_log(run: tracking.Run, model: torch.nn.Module, test: DeviceImages, data: LongTailData) -> dict[str, float]:
    """Test metrics (`test_*`, `test_time_s`), per-class accuracy, confusion matrix."""
    device = test.images.device
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    logits = predict_logits(model, test.images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    test_time = time.perf_counter() - started
    metrics = {f"test_{k}": v for k, v in classification_metrics(logits, test.labels, data.info).items()}
    metrics["test_time_s"] = test_time
    predicted = logits.argmax(1).cpu()
    labels = test.labels.cpu()
    info = data.info
    per_class = data.counts_table()
    acc = per_class_accuracy(predicted, labels, info.num_classes)
    per_class["test_acc"] = acc[per_class["label"].to_numpy()]
    run.log_table(per_class, "eval/per_class_accuracy.csv")
    fig = plots.accuracy_vs_count(per_class)
    run.log_figure(fig, "eval/accuracy_vs_count.png")
    plots.close(fig)
    matrix = confusion_matrix(predicted, labels, info.num_classes)
    run.log_table(pd.DataFrame(matrix, index=list(info.class_names), columns=list(info.class_names)).reset_index(names="true"),
                  "eval/confusion_matrix.csv")
    fig = plots.confusion_matrix_figure(matrix, info.class_names)
    run.log_figure(fig, "eval/confusion_matrix.png")
    plots.close(fig)
    return metrics


def run_experiment(cfg: RunConfig, progress: bool = False) -> ExperimentResult:
    """Train and evaluate one single-model method, recording everything in one MLflow run."""
    with tracking.start_run(cfg, role="experiment") as run:
        run.log_config(cfg)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        device = resolve_device(cfg.device)
        run.set_tags({"ltexp.device": str(device)})
        data = build_dataset(cfg.data)
        log_data_profile(run, data)

        train = DeviceImages.from_numpy(data.train_images, data.train_labels, device)
        val = DeviceImages.from_numpy(data.val_images, data.val_labels, device)
        test = DeviceImages.from_numpy(data.test_images, data.test_labels, device)
        mean, std = channel_stats(data.train_images)
        model = build_model(cfg.model.model, data.image_shape, data.info.num_classes, mean, std).to(device)
        run.set_tags({"ltexp.arch": model.arch})
        stages = build_method(cfg.method).stages(cfg.optim)
        augment = build_augment(cfg.data.augment, data.image_shape[0])

        result = fit(model, train, val, stages, data.info, batch_size=cfg.optim.batch_size,
                     clip_norm=cfg.optim.clip_norm, augment=augment, seed=cfg.seed,
                     on_epoch=run.log_epoch, progress=progress)
        metrics = {"train_time_s": result.train_time_s, "train_images_per_s": result.train_images_per_s,
                   "best_epoch": result.best_epoch, "best_val_acc": result.best_val_acc}
        metrics.update(evaluate_and_log(run, model, test, data))
        run.log_metrics(metrics)
        run.log_torch({"state_dict": model.state_dict(), "arch": model.arch, "image_shape": data.image_shape,
                       "class_names": list(data.info.class_names), "train_counts": data.info.train_counts.tolist()},
                      "checkpoint/model.pt")
        return ExperimentResult(run.run_id, metrics)
