"""What reaches the MLflow store: metrics and tables hold the measured values, without float32 noise."""

import io

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from ltexp import tracking
from ltexp.tracking import as_logged


def test_a_float32_value_is_stored_as_its_shortest_decimal_and_float64_passes_unchanged():
    noisy = float(torch.tensor(0.745))            # 0.7450000047683716, as `.item()` gives it
    assert noisy != 0.745 and as_logged(noisy) == 0.745
    assert as_logged(1 / 3) == 1 / 3               # a float64 result keeps all its digits
    assert as_logged(0.5) == 0.5 and as_logged(7) == 7 and as_logged("x") == "x"
    assert np.float32(as_logged(noisy)) == np.float32(noisy)  # the same float32, only spelled shorter


def test_metrics_and_tables_read_back_from_the_store_without_float32_noise(mlflow_store):
    noisy = float(torch.tensor(0.756))
    with mlflow.start_run() as active:
        run = tracking.Run(active)
        run.synchronous = True
        run.log_epoch({"epoch": 1, "stage": "main", "val_acc": noisy})
        run.log_batch(metrics={"test_acc": noisy})
        run.log_metrics({"test_head_acc": float(torch.tensor(0.1))})
        run.log_table(pd.DataFrame({"rule": ["concat"], "val_acc": [noisy], "n": [3]}), "eval/table.csv")
    client = MlflowClient()
    metrics = client.get_run(active.info.run_id).data.metrics
    assert metrics["test_acc"] == 0.756 and metrics["test_head_acc"] == 0.1
    assert [m.value for m in client.get_metric_history(active.info.run_id, "val_acc")] == [0.756]
    text = mlflow.artifacts.load_text(f"runs:/{active.info.run_id}/eval/table.csv")
    assert pd.read_csv(io.StringIO(text)).to_dict("records") == [{"rule": "concat", "val_acc": 0.756, "n": 3}]
    assert "0.75599" not in text
