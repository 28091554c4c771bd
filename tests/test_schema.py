"""The tracking schema (ltexp/schema.py) against real runs of every role: each key they carry is declared."""

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from ltexp import schema
from ltexp.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, item.path) if item.is_dir else [item.path]
    return out


def _undeclared(client: MlflowClient, run) -> list[str]:
    """`kind key` for each ltexp tag, param, metric and artifact of `run` the schema does not declare."""
    keys = [("tag", k) for k in run.data.tags if k.startswith("ltexp.")]
    keys += [("param", k) for k in run.data.params] + [("metric", k) for k in run.data.metrics]
    keys += [("artifact", p) for p in _artifacts(client, run.info.run_id)]
    return [f"{kind} {key} ({run.data.tags.get('ltexp.role')} run)" for kind, key in keys if schema.find(kind, key) is None]


@pytest.mark.e2e
def test_every_key_that_runs_of_every_role_carry_is_declared(mlflow_store, tmp_path):
    tune_db, grid_db = f"sqlite:///{tmp_path / 'tune.db'}", f"sqlite:///{tmp_path / 'grid.db'}"
    assert main(["train", "--epochs", "2"]) == 0
    assert main(["train", "--method", "split", "--expert-mode", "other", "--epochs", "2", "--lws-epochs", "1"]) == 0
    assert main(["tune", "--n-trials", "2", "--epochs", "2", "--lws-epochs", "1", "--storage", tune_db,
                 "--study-name", "s", "--model-name", "m"]) == 0
    assert main(["grid", "--methods", "baseline", "--imb-types", "exp", "--imb-factors", "0.1", "--seeds", "0",
                 "--epochs", "1", "--storage", grid_db, "--no-progress"]) == 0
    assert main(["report", "--output-dir", str(tmp_path / "report")]) == 0

    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    assert {r.data.tags["ltexp.role"] for r in runs} == {"experiment", "expert", "trial", "tune", "grid", "report"}
    undeclared = [line for run in runs for line in _undeclared(client, run)]
    versions = client.search_model_versions("name = 'm'")
    assert versions, "the tuned model was registered"
    undeclared += [f"version tag {k}" for v in versions for k in v.tags if schema.find("version tag", k) is None]
    for storage in (tune_db, grid_db):
        for study in optuna.get_all_study_summaries(storage):
            loaded = optuna.load_study(study_name=study.study_name, storage=storage)
            undeclared += [f"study attr {k}" for k in loaded.user_attrs if schema.find("study attr", k) is None]
            undeclared += [f"trial attr {k}" for t in loaded.get_trials() for k in t.user_attrs
                           if schema.find("trial attr", k) is None]
    assert undeclared == []
    # The walk sees what it should: the schema's families match real keys, not only literal ones.
    split = next(r for r in runs if r.data.tags["ltexp.role"] == "experiment" and r.data.tags["ltexp.method"] == "split"
                 and "ltexp.grid" not in r.data.tags)
    assert schema.find("metric", "val_acc__expert_head").key == "<curve>__expert_<expert>"
    assert "val_acc__expert_head" in split.data.metrics and "test_oracle_acc" in split.data.metrics


def test_an_undeclared_key_is_found_as_none_and_a_key_is_declared_once():
    assert schema.find("metric", "test_acc").key == "test_<figure>"
    assert schema.find("metric", "test_accuracy") is None           # a figure not declared
    assert schema.find("tag", "ltexp.role").key == schema.ROLE
    assert schema.find("tag", "ltexp.nothing") is None
    assert schema.find("param", "lr.resolved").key == "<setting>.resolved"
    assert schema.find("param", "no_such_setting") is None
    with pytest.raises(ValueError, match="declared twice"):
        schema.declare(schema.ROLE, "tag", "every run", "again")
    with pytest.raises(ValueError, match="kind 'label'"):
        schema.declare("x", "label", "", "")


def test_the_docs_page_is_the_schema_printed():
    """docs/schema.md is `python -m ltexp.schema`: regenerate it when the schema changes."""
    assert (ROOT / "docs" / "schema.md").read_text() == schema.markdown()
