"""`ltexp report` on runs with hand-set metrics: mean ± std by hand, honest and oracle rows,
variants kept apart, filters, the paper's column, plots, one self-contained HTML page, the report run."""

import time

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from ltexp.cli import main
from ltexp.report import build_report, load_paper, markdown_table

CLASSES = 10


def _per_class(head_acc: float, tail_acc: float) -> str:
    train = [int(500 * 0.01 ** (k / (CLASSES - 1))) for k in range(CLASSES)]
    return pd.DataFrame({
        "label": range(CLASSES), "class": [f"c{k}" for k in range(CLASSES)], "rank": range(CLASSES), "train": train,
        "val": 10, "test": 100, "group": ["head"] * 5 + ["tail"] * 5,
        "shot": ["many" if n > 100 else "medium" if n >= 20 else "few" for n in train],
        "test_acc": [head_acc] * 5 + [tail_acc] * 5,
    }).to_csv(index=False)


def _run(client, experiment_id, method, dataset, imb_type, imb_factor, seed, metrics, params=None,
         role="experiment", status="FINISHED"):
    tags = {"ltexp.role": role, "ltexp.method": method, "ltexp.dataset": dataset, "ltexp.imb_type": imb_type,
            "ltexp.imb_factor": str(imb_factor), "ltexp.seed": str(seed)}
    run = client.create_run(experiment_id, tags=tags, run_name=f"{method}·{dataset}·{imb_type}{imb_factor:g}·s{seed}")
    now = int(time.time() * 1000)
    client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     params=[Param(k, str(v)) for k, v in (params or {}).items()])
    client.log_text(run.info.run_id, _per_class(metrics["test_head_acc"], metrics["test_tail_acc"]),
                    "eval/per_class_accuracy.csv")
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def hand_runs(mlflow_store):
    """cifar10 exp 0.01: baseline x3 seeds (epochs 200), baseline x1 (epochs 5), split x2 with oracle;
    cifar100 step 0.1: baseline x1; plus runs the report must ignore (FAILED, a trial)."""
    client = MlflowClient()
    exp = client.create_experiment("hand")
    for seed, (acc, head, tail) in enumerate([(0.5, 0.8, 0.2), (0.6, 0.9, 0.3), (0.7, 1.0, 0.4)]):
        _run(client, exp, "baseline", "cifar10", "exp", 0.01, seed,
             {"test_acc": acc, "test_head_acc": head, "test_tail_acc": tail, "test_many_acc": head,
              "test_medium_acc": (head + tail) / 2, "test_few_acc": tail}, {"epochs": 200, "preset": "ltexp"})
    _run(client, exp, "baseline", "cifar10", "exp", 0.01, 0,
         {"test_acc": 0.1, "test_head_acc": 0.2, "test_tail_acc": 0.0}, {"epochs": 5, "preset": "ltexp"})
    for seed, (acc, oracle) in enumerate([(0.40, 0.70), (0.44, 0.74)]):
        _run(client, exp, "split", "cifar10", "exp", 0.01, seed,
             {"test_acc": acc, "test_head_acc": acc + 0.1, "test_tail_acc": acc - 0.1, "test_oracle_acc": oracle,
              "test_oracle_head_acc": oracle + 0.1, "test_oracle_tail_acc": oracle - 0.1})
    _run(client, exp, "baseline", "cifar100", "step", 0.1, 0, {"test_acc": 0.3, "test_head_acc": 0.5, "test_tail_acc": 0.1})
    _run(client, exp, "baseline", "cifar10", "exp", 0.01, 7, {"test_acc": 0.99, "test_head_acc": 1, "test_tail_acc": 1},
         {"epochs": 200}, status="FAILED")
    _run(client, exp, "split", "cifar10", "exp", 0.01, 0, {"test_acc": 0.99, "test_head_acc": 1, "test_tail_acc": 1},
         role="trial")
    return client


def test_tables_match_hand_computed_mean_and_std(hand_runs, tmp_path):
    paper = tmp_path / "paper.csv"
    paper.write_text("# test figures\ndataset,imb_type,imb_factor,method,metric,value,source\n"
                     "cifar10,exp,0.01,split,acc,12.34,test\ncifar10,exp,0.01,baseline,tail_acc,5.67,test\n")
    report = build_report("hand", output_dir=tmp_path / "out", paper_path=paper)
    assert len(report.runs) == 7  # the FAILED run and the trial are not read
    (t2,) = [frame for title, frame in report.tables.items() if "cifar10 exp 0.01" in title and "Table 2" in title]
    rows = t2.set_index("Method")
    # baseline, epochs 200: acc 0.5/0.6/0.7 -> mean 60.00, sample std 10.00; n = 3
    assert rows.loc["baseline [epochs=200]", ["n", "Accuracy", "Head", "Tail"]].tolist() == [
        3, "60.00 ± 10.00", "90.00 ± 10.00", "30.00 ± 10.00"]
    assert rows.loc["baseline [epochs=5]", ["n", "Accuracy"]].tolist() == [1, "10.00"]  # never averaged in
    # split: honest 0.40/0.44 -> 42.00 ± 2.83; oracle 0.70/0.74 -> 72.00 ± 2.83 (std = 0.04/sqrt(2))
    honest = rows.loc["split — honest (fused)"]
    oracle = rows.loc["split — oracle (true group: upper bound)"]
    assert (honest["Accuracy"], oracle["Accuracy"]) == ("42.00 ± 2.83", "72.00 ± 2.83")
    assert (honest["Head"], oracle["Tail"]) == ("52.00 ± 2.83", "62.00 ± 2.83")
    # the paper's (oracle) split figure sits on the oracle row only; baseline's on its rows
    assert (oracle["paper Accuracy (published)"], honest["paper Accuracy (published)"]) == ("12.34", "–")
    assert rows.loc["baseline [epochs=200]", "paper Tail (published)"] == "5.67"
    (t2_c100,) = [frame for title, frame in report.tables.items() if "cifar100" in title]
    assert not [c for c in t2_c100.columns if "paper" in c]  # the paper's file has nothing for it

    wide = report.tables["Eight-data-set table (Total / Head / Tail per method, a column per data set)"]
    cell = wide[(wide["Method"] == "baseline [epochs=200]") & (wide[""] == "Total")]["cifar10 exp 0.01"].item()
    assert cell == "60.00 ± 10.00 (n=3)"
    assert wide[(wide["Method"] == "baseline [epochs=5]") & (wide[""] == "Total")]["cifar100 step 0.1"].item() == "–"
    assert "cifar10 exp 0.01 · paper (published)" in wide and "cifar100 step 0.1 · paper (published)" not in wide
    # a run with a single different setting in its own group (cifar100 has one baseline run: no variant)
    assert wide[(wide["Method"] == "baseline") & (wide[""] == "Total")]["cifar100 step 0.1"].item() == "30.00 (n=1)"

    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    row = summary[(summary["method"] == "baseline") & (summary["variant"] == "epochs=200")].iloc[0]
    assert row["acc_mean"] == pytest.approx(0.6) and row["acc_std"] == pytest.approx(0.1) and row["acc_n"] == 3
    assert row["few_acc_mean"] == pytest.approx(0.3) and row["many_acc_mean"] == pytest.approx(0.9)


def test_files_plots_html_and_the_report_run(hand_runs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", "--experiment", "hand", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "60.00 ± 10.00" in printed and "split — oracle (true group: upper bound)" in printed
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "report.md", "runs.csv", "summary.csv", "eight_data_set_table.csv", "head_vs_tail.png",
            "per_class_cifar10_exp_0.01.png", "shots_cifar10_exp_0.01.png", "class_counts_cifar10_exp_0.01.png",
            "per_class_cifar100_step_0.1.png", "table_2_shape_cifar10_exp_0.01.csv"} <= names
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(list(out.glob("*.png")))
    assert "src='http" not in page and "<script" not in page  # self-contained
    assert "oracle (true group: upper bound)" in page and "60.00 ± 10.00" in page
    md = (out / "report.md").read_text()
    assert "| baseline [epochs=200] | 3 | 60.00 ± 10.00 | 90.00 ± 10.00 | 30.00 ± 10.00 |" in md
    assert pd.read_csv(out / "table_2_shape_cifar10_exp_0.01.csv")["n"].tolist() == [3, 1, 2, 2]

    client = hand_runs
    (run,) = client.search_runs([client.get_experiment_by_name("hand").experiment_id],
                                "tags.`ltexp.role` = 'report'")
    assert run.info.status == "FINISHED" and run.data.params["runs"] == "7"
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/head_vs_tail.png", "report/summary.csv"} <= logged

    # A second report skips the report run itself (role report) and reads the same 7 runs.
    assert build_report("hand", output_dir=tmp_path / "again", log_run=False).runs.shape[0] == 7


def test_filter_narrows_the_runs_and_bad_input_is_one_line(hand_runs, tmp_path, capsys):
    report = build_report("hand", "tags.ltexp.dataset = 'cifar100'", tmp_path / "f", log_run=False)
    assert set(report.runs["dataset"]) == {"cifar100"} and len(report.runs) == 1
    for argv, message in ((["--experiment", "nope"], "no FINISHED experiment runs in experiment 'nope'"),
                          (["--experiment", "hand", "--filter", "tags.ltexp.dataset = 'mnist'"], "matching --filter"),
                          (["--experiment", "hand", "--filter", "metrics.acc >>> 1"], "--filter")):
        with pytest.raises(SystemExit) as exc:
            main(["report", *argv, "--output-dir", str(tmp_path / "bad"), "--no-run"])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 2 and err.startswith("ltexp: error: ") and message in err and "\n" not in err


def test_shipped_published_files_parse_and_markdown_escapes():
    from ltexp.methods import METHODS

    published = load_paper()
    assert list(published.columns) == ["dataset", "imb_type", "imb_factor", "protocol", "method", "metric", "value",
                                       "source"]
    assert set(published["metric"]) <= {"acc", "head_acc", "tail_acc"} and np.all(published["value"].between(0, 100))
    assert set(published["method"]) <= set(METHODS) and published["source"].notna().all()
    paper = published[published["protocol"] == "paper"]
    # The paper's Table 3: eight data sets x baseline, LWS, split + LWS, Total / Head / Tail; plus
    # Table 2's re-sampling row (CIFAR-10 exp 0.1).
    assert len(paper) == 8 * 3 * 3 + 3
    split = paper[(paper["method"] == "split") & (paper["dataset"] == "cifar10") & (paper["imb_type"] == "exp")
                  & np.isclose(paper["imb_factor"], 0.01)]
    assert split.set_index("metric")["value"].to_dict() == {"acc": 61.10, "head_acc": 75.32, "tail_acc": 46.88}
    field = published[published["protocol"] == "field"]
    assert set(field["dataset"] + field["imb_type"] + field["imb_factor"].astype(str)) == {"cifar10exp0.01"}
    assert field[field["method"] == "ldam_drw"]["value"].tolist() == [77.03, 77.73]
    assert markdown_table(pd.DataFrame({"a|b": ["x|y"]})) == "| a\\|b |\n|---|\n| x\\|y |"


def test_published_figures_sit_beside_runs_of_their_own_protocol(mlflow_store, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("protocols")
    for preset, acc in (("field", 0.70), ("paper", 0.50)):
        _run(client, exp, "baseline", "cifar10", "exp", 0.01, 0,
             {"test_acc": acc, "test_head_acc": acc + 0.1, "test_tail_acc": acc - 0.1}, {"preset": preset})
    report = build_report("protocols", output_dir=tmp_path / "out", log_run=False)
    (field,) = [f for t, f in report.tables.items() if "Table 2" in t and "(preset field)" in t]
    (paper,) = [f for t, f in report.tables.items() if "Table 2" in t and "(preset paper)" in t]
    assert field.set_index("Method").loc["baseline", "field Accuracy (published)"] == "70.36"  # Cao et al. first
    assert paper.set_index("Method").loc["baseline", ["paper Accuracy (published)", "paper Tail (published)"]
                                         ].tolist() == ["51.47", "31.46"]
    assert not [c for c in field.columns if c.startswith("paper")] and not [c for c in paper if c.startswith("field")]


def test_runs_on_a_pack_of_the_cifar10_jpegs_are_one_data_set_beside_cifar10s_figures(mlflow_store, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("jpeg")
    for seed, dataset in enumerate(["pack:/a/c10.ltpack", "folder:/data/cifar10"]):
        run_id = _run(client, exp, "baseline", dataset, "exp", 0.01, seed,
                      {"test_acc": 0.70, "test_head_acc": 0.8, "test_tail_acc": 0.6}, {"preset": "field"})
        client.set_tag(run_id, "ltexp.data_name", "folder:cifar10")  # what tracking.run_tags gives both
    report = build_report("jpeg", output_dir=tmp_path / "out", log_run=False)
    (table,) = [f for t, f in report.tables.items() if "Table 2" in t]
    row = table.set_index("Method").loc["baseline"]
    assert row["field Accuracy (published)"] == "70.36" and row["n"] == 2  # one row: both runs averaged


def test_head_vs_tail_legend_has_one_entry_per_method_data_set_and_the_oracle():
    from ltexp.report import head_vs_tail_figure

    settings = [("cifar10", t, f) for t in ("exp", "step") for f in (0.1, 0.01)]
    rows = [{"method": m, "variant": "", "dataset": d, "imb_type": t, "imb_factor": f, "test_head_acc": 0.8,
             "test_tail_acc": 0.3, **({"test_oracle_head_acc": 0.9, "test_oracle_tail_acc": 0.5} if m == "split" else {})}
            for m in ("baseline", "lws", "resample", "split") for d, t, f in settings]
    fig = head_vs_tail_figure(pd.DataFrame(rows))
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["baseline", "lws", "resample", "split", "cifar10 exp 0.1", "cifar10 exp 0.01",
                      "cifar10 step 0.1", "cifar10 step 0.01", "hollow: oracle routing (upper bound)"]
    assert len(fig.axes[0].collections) == 4 * 4 + 4  # every run drawn, and split's oracle points too


def test_a_single_models_last_epoch_is_its_own_row_without_the_published_figure(mlflow_store, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("last")
    for seed, (selected, last) in enumerate([(0.70, 0.66), (0.72, 0.70)]):
        _run(client, exp, "baseline", "cifar10", "exp", 0.01, seed,
             {"test_acc": selected, "test_head_acc": 0.8, "test_tail_acc": 0.6, "test_acc__last_epoch": last,
              "test_head_acc__last_epoch": 0.9, "test_tail_acc__last_epoch": 0.5}, {"preset": "field"})
    report = build_report("last", output_dir=tmp_path / "out", log_run=False)
    (table,) = [f for t, f in report.tables.items() if "Table 2" in t]
    rows = table.set_index("Method")
    assert rows.loc["baseline", "Accuracy"] == "71.00 ± 1.41"
    assert rows.loc["baseline — last epoch (no selection)", "Accuracy"] == "68.00 ± 2.83"
    assert rows.loc["baseline — last epoch (no selection)", "Tail"] == "50.00 ± 0.00"
    assert rows.loc["baseline", "field Accuracy (published)"] == "70.36"
    assert rows.loc["baseline — last epoch (no selection)", "field Accuracy (published)"] == "–"
