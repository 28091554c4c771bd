"""bench/field.py: the stretched field schedule, the published figures it compares with, and the
summary's per-method check read from real MLflow runs."""

import importlib.util

import pytest
from mlflow import MlflowClient

from conftest import REPO
from ltexp.config import resolve_config

_spec = importlib.util.spec_from_file_location("bench_field", REPO / "bench" / "field.py")
field = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(field)


@pytest.mark.parametrize("epochs", [2, 3, 10, 100])
def test_the_stretched_schedule_is_one_ltexp_accepts(epochs):
    flags = field.field_schedule(epochs)
    values = dict(zip(flags[::2], flags[1::2]))
    cfg = resolve_config({"optim": {"epochs": epochs, "lr_milestones": values["--lr-milestones"],
                                    "warmup_epochs": int(values["--warmup-epochs"])},
                          "loss": {"drw_epoch": int(values["--drw-epoch"])}, "method": {"method": "ldam_drw"}},
                         preset="field")
    first, second = map(int, cfg.optim.lr_milestones.split(","))
    assert 1 <= first < second <= epochs and cfg.loss.drw_epoch <= epochs
    assert field.field_schedule(200) == []  # the preset's own


def test_published_field_figures_are_the_first_source_per_method():
    published = field.published_field()
    assert published["baseline"] == 70.36 and published["ldam_drw"] == 77.03 and published["balanced_softmax"] == 77.54


def test_field_check_compares_finished_runs_with_the_published_figures_and_gains(mlflow_store):
    client = MlflowClient()
    exp = client.create_experiment("field")
    for method, acc, status in (("baseline", 0.70, "FINISHED"), ("baseline", 0.72, "FINISHED"),
                                ("balanced_softmax", 0.78, "FINISHED"), ("ldam_drw", 0.99, "FAILED"),
                                ("split", 0.75, "FINISHED")):
        run = client.create_run(exp, tags={"ltexp.role": "experiment", "ltexp.method": method})
        client.log_metric(run.info.run_id, "test_acc", acc)
        if method == "baseline":
            client.log_metric(run.info.run_id, "test_acc__last_epoch", acc - 0.02)
        if method == "split":
            client.log_metric(run.info.run_id, "test_oracle_acc", 0.90)
        client.set_terminated(run.info.run_id, status)
    check = field.field_check("field")
    assert check["methods"]["baseline"]["n"] == 2 and check["methods"]["baseline"]["test_acc"] == pytest.approx(71.0)
    assert check["methods"]["baseline"]["minus_published"] == pytest.approx(0.64)
    assert check["methods"]["baseline"]["last_epoch_acc"] == pytest.approx(69.0)
    assert "ldam_drw" not in check["methods"]  # FAILED runs do not count
    assert check["methods"]["split_student"]["oracle_acc"] == pytest.approx(90.0)
    gain = check["gains"]["balanced_softmax"]
    assert gain["gain_over_ce"] == pytest.approx(7.0) and gain["published_gain"] == pytest.approx(7.18)
