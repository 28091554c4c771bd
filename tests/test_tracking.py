"""What reaches the MLflow store: metrics and tables hold the measured values, without float32 noise."""

import io

import mlflow
import pytest
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


@pytest.fixture
def trained_run(mlflow_store):
    """A finished digits baseline run with its model (2 epochs), trained in this process."""
    from ltexp.cli import main

    threads = torch.get_num_threads()
    try:
        assert main(["train", "--epochs", "2", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                filter_string="tags.`ltexp.role` = 'experiment'")
    return run


def test_tuning_never_crowns_a_version_worse_than_one_registered_by_hand_and_says_what_it_moved(trained_run):
    client = MlflowClient()
    name, run_id = "ltexp-digits", trained_run.info.run_id
    by_hand = trained_run.data.metrics["val_acc"]
    settings = {**trained_run.data.params, **{k.removeprefix("ltexp."): v for k, v in trained_run.data.tags.items()}}
    data_key = "|".join(settings[f] for f in tracking.DATA_KEY_FIELDS)
    assert tracking.register_model(run_id, name) == 1                     # `ltexp register`: v1 @candidate

    version, promoted, decision = tracking.register_and_promote(run_id, name, "val_acc", by_hand - 0.1, data_key)
    assert (version, promoted) == (2, False)
    assert decision == (f"not made @champion: v1 has val_acc {by_hand:.6g} >= {by_hand - 0.1:.6g} on the same data; "
                        "@candidate moved from v1, which ltexp tune had not set")
    assert tracking._alias_holder(client, name, "champion") is None
    assert client.get_model_version(name, "2").tags["ltexp.compared_to_version"] == "1"

    # Better than every version on the same data: crowned, with the figures it was judged on.
    version, promoted, decision = tracking.register_and_promote(run_id, name, "val_acc", by_hand + 0.05, data_key)
    assert (version, promoted) == (3, True)
    assert decision == f"v3 is now @champion (val_acc {by_hand + 0.05:.6g}; no champion before)"  # v2 set @candidate
    version, promoted, decision = tracking.register_and_promote(run_id, name, "val_acc", by_hand + 0.1, data_key)
    assert (version, promoted) == (4, True)
    assert decision == (f"v4 is now @champion (val_acc {by_hand + 0.1:.6g}; previous champion v3, "
                        f"{by_hand + 0.05:.6g})")
    assert int(tracking._alias_holder(client, name, "previous").version) == 3
