"""What reaches the MLflow store: metrics and tables hold the measured values, without float32 noise."""

import io

import mlflow
import pytest
import numpy as np
import pandas as pd
import torch
from mlflow.tracking import MlflowClient

from ltexp import tracking
from ltexp.tracking import as_logged, registry


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
    assert registry._alias_holder(client, name, "champion") is None
    assert client.get_model_version(name, "2").tags["ltexp.compared_to_version"] == "1"

    # Better than every version on the same data: crowned, with the figures it was judged on.
    version, promoted, decision = tracking.register_and_promote(run_id, name, "val_acc", by_hand + 0.05, data_key)
    assert (version, promoted) == (3, True)
    assert decision == f"v3 is now @champion (val_acc {by_hand + 0.05:.6g}; no champion before)"  # v2 set @candidate
    version, promoted, decision = tracking.register_and_promote(run_id, name, "val_acc", by_hand + 0.1, data_key)
    assert (version, promoted) == (4, True)
    assert decision == (f"v4 is now @champion (val_acc {by_hand + 0.1:.6g}; previous champion v3, "
                        f"{by_hand + 0.05:.6g})")
    assert int(registry._alias_holder(client, name, "previous").version) == 3



def _data_key(run) -> str:
    settings = {**run.data.params, **{k.removeprefix("ltexp."): v for k, v in run.data.tags.items()}}
    return "|".join(settings[f] for f in tracking.DATA_KEY_FIELDS)


def test_two_workers_registering_the_same_best_trial_at_once_crown_exactly_one(trained_run, monkeypatch):
    """Two workers of one study finish together and both register the study's best trial: each
    sees the other's version before either crowns one (the order a loaded CI machine produced,
    which left the team without a champion). The earlier version wins the tie."""
    client = MlflowClient()
    name, run_id, data_key = "ltexp-digits", trained_run.info.run_id, _data_key(trained_run)
    value = trained_run.data.metrics["val_acc"]  # the figure each reads from the other's run, too
    real_holder = registry._alias_holder
    second: list = []

    def holder_after_the_other_worker_registered(client, model, alias):
        if alias == "champion" and not second:   # worker A is deciding: worker B runs its whole way now
            second.append(None)
            second[0] = tracking.register_and_promote(run_id, name, "val_acc", value, data_key)
        return real_holder(client, model, alias)

    monkeypatch.setattr(registry, "_alias_holder", holder_after_the_other_worker_registered)
    first = tracking.register_and_promote(run_id, name, "val_acc", value, data_key)
    assert second[0][:2] == (2, False) and first[:2] == (1, True)
    assert second[0][2] == f"not made @champion: v1 has val_acc {value:.6g} >= {value:.6g} on the same data"
    assert int(real_holder(client, name, "champion").version) == 1


def test_a_worker_that_crowned_on_a_stale_view_hands_the_champion_to_the_better_version(trained_run, monkeypatch):
    """Worker X decides before worker Y's better version exists, and X's alias write reaches the
    server after Y's whole registration: X sees Y's crowned figure after writing and moves
    `champion` to Y; X's version says so."""
    client = MlflowClient()
    name, run_id, data_key = "ltexp-digits", trained_run.info.run_id, _data_key(trained_run)
    worse, better = (trained_run.data.metrics["val_acc"] + d for d in (0.05, 0.1))
    real_set = MlflowClient.set_registered_model_alias
    other: list = []

    def set_after_the_other_worker(self, model, alias, version):
        if alias == "champion" and not other:   # X's write is late: Y registers, crowns and settles first
            other.append(None)
            other[0] = tracking.register_and_promote(run_id, name, "val_acc", better, data_key)
        return real_set(self, model, alias, version)

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", set_after_the_other_worker)
    version, promoted, decision = tracking.register_and_promote(run_id, name, "val_acc", worse, data_key)
    assert other[0][:2] == (2, True)                       # Y saw X's figure and beat it
    assert (version, promoted) == (1, False)
    assert decision == (f"v1 is now @champion (val_acc {worse:.6g}; no champion before); then v2, crowned beside "
                        f"it with val_acc {better:.6g}, ranks above it and holds @champion")
    assert int(registry._alias_holder(client, name, "champion").version) == 2
    assert client.get_model_version(name, "1").tags["ltexp.promotion"] == decision


def test_a_champion_moved_back_by_hand_stays_when_a_later_tune_settles(trained_run, monkeypatch):
    """Settling looks only at versions crowned beside this one (SETTLE_WINDOW_S): a better version
    crowned long ago, from which a person moved `champion` back, is not crowned again."""
    client = MlflowClient()
    name, run_id, data_key = "ltexp-digits", trained_run.info.run_id, _data_key(trained_run)
    base = trained_run.data.metrics["val_acc"]
    assert tracking.register_and_promote(run_id, name, "val_acc", base + 0.05, data_key)[:2] == (1, True)
    assert tracking.register_and_promote(run_id, name, "val_acc", base + 0.2, data_key)[:2] == (2, True)
    client.set_registered_model_alias(name, "champion", "1")   # v2 misbehaved in production: rolled back
    monkeypatch.setattr(registry, "SETTLE_WINDOW_S", -1)       # as if v2 had been crowned long before
    version, promoted, decision = tracking.register_and_promote(run_id, name, "val_acc", base + 0.1, data_key)
    assert (version, promoted) == (3, True) and "ranks above" not in decision
    assert int(registry._alias_holder(client, name, "champion").version) == 3


# A run whose store stops growing in the middle (a disk filling up under it, lowered here as the
# process's file-size limit), then takes writes again: `sys.argv[1]` = "queued" (an epoch's
# queued metrics are refused) or "artifact" (a 2 MB artifact is refused).
FILLS_UP = """
import os, resource, signal, sys
import mlflow
from ltexp import LtexpError, tracking
from ltexp.config import resolve_config

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
wal = mlflow.get_tracking_uri()[len("sqlite:///"):] + "-wal"
try:
    with tracking.start_run(resolve_config({})) as run:
        if sys.argv[1] == "queued":
            resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(wal), hard))
            run.log_epoch({"epoch": 1, "stage": "main", **{f"val_m{i}": i / 7 for i in range(300)}})
            tracking.flush()
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space freed: later writes succeed
            run.log_metrics({"test_acc": 0.5})
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
            run.log_text("x" * (2 << 20), "eval/big.txt")
except LtexpError as exc:
    print(f"ltexp: error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("what", ["queued", "artifact"])
def test_a_write_the_store_refuses_fails_the_run_even_when_later_writes_succeed(subprocess_env, tmp_path, what):
    import re
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", FILLS_UP, what], env=subprocess_env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-3000:]
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    line = proc.stderr.strip().splitlines()[-1]
    if what == "queued":  # MLflow's queue only logged the failure: the run ended FINISHED, exit 0
        expected = (rf"could not write the metrics of epoch 1 of run {run.info.run_id} to "
                    rf"sqlite:///{re.escape(str(tmp_path))}/mlflow\.db: .*(disk I/O error|database or disk is full)")
    else:
        expected = (rf"could not write artifact eval/big\.txt of run {run.info.run_id} to "
                    rf"\S*{re.escape(str(tmp_path))}/mlruns/\S+/artifacts: File too large")
    assert re.fullmatch(f"ltexp: error: {expected}", line), line
    assert run.info.status == "FAILED" and run.data.tags["ltexp.error"] == line[len("ltexp: error: "):]


def test_a_tracking_store_that_cannot_grow_fails_the_command_in_one_line(subprocess_env, tmp_path):
    import re
    import subprocess
    import sys

    from conftest import file_size_limit

    # No file may pass 450 kB: the model (~390 kB) fits, while the store's write-ahead log, which
    # grows with every epoch's metrics, reaches it within these 60 epochs.
    proc = subprocess.run([sys.executable, "-m", "ltexp", "train", "--epochs", "60", "--checkpoint-every", "0",
                           "--no-progress"], env=subprocess_env, capture_output=True, text=True, timeout=600,
                          preexec_fn=file_size_limit(450_000))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"ltexp: error: could not write .+ of run [0-9a-f]{{32}} to sqlite:///"
                        rf"{re.escape(str(tmp_path))}/mlflow\.db: (disk I/O error|database or disk is full)", line), \
        proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "MLflow run" not in proc.stdout
    (run,) = mlflow.search_runs(search_all_experiments=True, output_format="list")
    assert run.info.status != "FINISHED"  # FAILED, or RUNNING where the store refused that too


def test_a_default_run_name_tells_method_design_data_epochs_and_seed_apart():
    """The runs table shows names: a split run with "other" experts, the same with own-class
    experts, a 10-epoch cell and a 100-epoch run of one setting, or two seeds, never share one."""
    from ltexp.config import resolve_config

    def name(role="experiment", seed=0, **sections):
        return tracking.default_run_name(resolve_config(sections, seed=seed), role)

    assert name() == "baseline·digits·exp0.01·e100·s0"
    assert name(method={"method": "split"}) == "split:own·digits·exp0.01·e100·s0"
    assert name(method={"method": "split"}, split={"expert_mode": "other"}) == "split:other·digits·exp0.01·e100·s0"
    assert name(method={"method": "lws"}, optim={"epochs": 10}, seed=3) == "lws·digits·exp0.01·e10·s3"
    assert name("tune", method={"method": "split"}) == "tune·digits·exp0.01·e100"
