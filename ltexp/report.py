"""Tables and plots from the runs in the tracking store (`ltexp report`).

Runs are read with `mlflow.search_runs` (through `tracking.search_runs`) into pandas: every
FINISHED experiment run (role `experiment`) of one MLflow experiment, narrowed by a filter.
Runs are grouped by data set, imbalance profile, factor, preset and method (plus any other
setting that differs between them, shown as `variant`, so runs of different settings are never
averaged together), and each group gives mean ± sample std over its runs (seeds) with n.

Expert methods (split) are shown twice: **honest** (the fused prediction, which does not know a
test image's group: what a deployed model achieves) and **oracle** (each image routed to the
expert of its true group: an upper bound, the way the paper measured). The paper's published
figures come from `paper_results.csv` in this package, in their own labelled columns.

Files written to the output folder: `report.html` (one self-contained page, images embedded),
`report.md`, one CSV per table, `runs.csv` (every run read) and the PNG plots; the same files
are artifacts of a run with role `report`.
"""

from __future__ import annotations

import base64
import html
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePath

import numpy as np
import pandas as pd

from ltexp import LtexpError, schema
from ltexp.data.sources import parse_dataset

PAPER_RESULTS = Path(__file__).resolve().parent / "paper_results.csv"   # the paper's (`--preset paper`)
FIELD_RESULTS = Path(__file__).resolve().parent / "field_results.csv"   # the field's (`--preset field`)
PUBLISHED = (PAPER_RESULTS, FIELD_RESULTS)
# (metric key, column title) of the paper's tables; `oracle_` variants for expert methods.
MAIN = (("acc", "Accuracy"), ("head_acc", "Head"), ("tail_acc", "Tail"))
SHOTS = ("many", "medium", "few")
KEYS = ("dataset", "imb_type", "imb_factor", "preset", "method", "variant")
# Params that are not a variant of a method: the table's own keys, the seed (what is averaged),
# where the data is read from, and the config's bookkeeping fields (`BOOKKEEPING_FIELDS`: they
# never change what a run computes, so e.g. a compiled run sits on the same row as an eager one).
NOT_VARIANT = {"seed", "data_dir", "dataset", "imb_type", "imb_factor", "method", "preset"}
HONEST = "honest"
ORACLE = "oracle (true group: upper bound)"
# A single model's last epoch, beside the validation-selected model every other row reports
# (the anchors pick the best test epoch instead; ltexp never looks at the test set to choose).
LAST = "last epoch (no selection)"
LAST_SUFFIX = "__last_epoch"


def _quote_keys(text: str) -> str:
    """`tags.ltexp.dataset` -> tags.`ltexp.dataset` (MLflow reads both; quoting keeps it unambiguous)."""
    return re.sub(r"\b(tags|params|metrics)\.(?!`)([A-Za-z_][\w.\-]*)", r"\1.`\2`", text)


def load_runs(experiment: str, filter_string: str = "") -> pd.DataFrame:
    """FINISHED experiment runs of `experiment` matching `filter_string`, one row each, with
    columns run_id, run_name, KEYS, seed and the test metrics (NaN where a run has none)."""
    from ltexp import tracking

    base = "tags.`ltexp.role` = 'experiment' and attributes.status = 'FINISHED'"
    combined = f"{base} and {_quote_keys(filter_string.strip())}" if filter_string.strip() else base
    raw = tracking.search_runs([experiment], combined)
    return tidy(raw)


def _setting_fields() -> list[str]:
    from ltexp.config import BOOKKEEPING_FIELDS, RunConfig, flatten

    return [k for k in flatten(RunConfig()) if k not in NOT_VARIANT and k not in BOOKKEEPING_FIELDS]


def tidy(raw: pd.DataFrame) -> pd.DataFrame:
    """`search_runs` output -> one row per run with plain column names and a `variant` label."""
    if raw.empty:
        return pd.DataFrame(columns=["run_id", "run_name", *KEYS, "seed"])

    def col(name: str, default=np.nan):
        return raw[name] if name in raw else pd.Series(default, index=raw.index)

    def param(name: str, default=np.nan):
        # Under `mlflow run`, a value resolved from "auto" sits beside the logged one as `<name>.resolved`.
        resolved = col(f"params.{name}.resolved")
        return resolved.where(resolved.notna(), col(f"params.{name}", default))

    runs = pd.DataFrame({
        "run_id": raw["run_id"], "run_name": col("tags.mlflow.runName", ""),
        # The images' name (a pack's source, a folder's name), so runs on a pack and on its
        # folder are one data set here; runs of older versions carry only ltexp.dataset.
        "dataset": col("tags.ltexp.data_name", None).astype(object).fillna(col("tags.ltexp.dataset")),
        "imb_type": col("tags.ltexp.imb_type"),
        "imb_factor": pd.to_numeric(col("tags.ltexp.imb_factor"), errors="coerce"),
        "preset": param("preset", "ltexp").fillna("ltexp"), "method": col("tags.ltexp.method"),
        "seed": pd.to_numeric(col("tags.ltexp.seed"), errors="coerce"),
        "grid": col("tags.ltexp.grid", ""),
    })
    for metric in [m for m in raw.columns if m.startswith("metrics.test_") and ("__" not in m or m.endswith(LAST_SUFFIX))]:
        runs[metric[len("metrics."):]] = pd.to_numeric(raw[metric], errors="coerce")
    for metric in ("metrics.train_time_s",):
        if metric in raw:
            runs[metric[len("metrics."):]] = raw[metric]
    settings = pd.DataFrame({name: param(name).astype(str) for name in _setting_fields()}, index=raw.index)
    runs["variant"] = ""
    group_cols = ["dataset", "imb_type", "imb_factor", "preset", "method"]
    for _, index in runs.groupby(group_cols, dropna=False).groups.items():
        part = settings.loc[index]
        differing = [c for c in part.columns if part[c].nunique(dropna=False) > 1]
        if differing:
            runs.loc[index, "variant"] = part[differing].apply(
                lambda row: ", ".join(f"{c}={row[c]}" for c in differing), axis=1)
    return runs.reset_index(drop=True)


def setting_label(dataset: str, imb_type: str, imb_factor: float) -> str:
    """`cifar10 exp 0.01`: the column title of one data set in the eight-data-set table."""
    return f"{dataset} {imb_type} {imb_factor:g}"


def _mean_std(values: pd.Series) -> tuple[float, float, int]:
    values = values.dropna()
    n = len(values)
    return (float(values.mean()) if n else np.nan, float(values.std(ddof=1)) if n > 1 else np.nan, n)


def fmt(mean: float, std: float, n: int | None = None, scale: float = 100.0) -> str:
    """`81.23 ± 1.05` (percent); `81.23` when n = 1; `–` when there is nothing."""
    if mean != mean:
        return "–"
    text = f"{mean * scale:.2f}" + (f" ± {std * scale:.2f}" if std == std else "")
    return text + (f" (n={n})" if n is not None else "")


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (setting, method, variant, evaluation) with mean/std/n of acc,
    head_acc, tail_acc and many/medium/few_acc over the group's runs. Methods with an oracle
    metric get a second row, evaluation = oracle, from test_oracle_*; single models that logged
    their last epoch's figures one more, evaluation = last epoch, from test_*__last_epoch."""
    rows = []
    for key, group in runs.groupby(list(KEYS), dropna=False, sort=True):
        base = dict(zip(KEYS, key))
        evaluations = [(HONEST, "test_", "")]
        if "test_oracle_acc" in group and group["test_oracle_acc"].notna().any():
            evaluations.append((ORACLE, "test_oracle_", ""))
        if f"test_acc{LAST_SUFFIX}" in group and group[f"test_acc{LAST_SUFFIX}"].notna().any():
            evaluations.append((LAST, "test_", LAST_SUFFIX))
        for evaluation, prefix, suffix in evaluations:
            row = {**base, "evaluation": evaluation, "n": 0, "seeds": ",".join(str(int(s)) for s in
                                                                               sorted(group["seed"].dropna()))}
            for metric in ("acc", "head_acc", "tail_acc", *(f"{s}_acc" for s in SHOTS)):
                column = prefix + metric + suffix  # no oracle or last-epoch many/medium/few: NaN there
                mean, std, n = _mean_std(group[column]) if column in group else (np.nan, np.nan, 0)
                row.update({f"{metric}_mean": mean, f"{metric}_std": std, f"{metric}_n": n})
                row["n"] = max(row["n"], n)
            rows.append(row)
    return pd.DataFrame(rows)


def load_paper(path: Path | tuple[Path, ...] = PUBLISHED) -> pd.DataFrame:
    """Published figures: dataset, imb_type, imb_factor, protocol, method, metric, value (percent),
    source. `protocol` is the preset whose runs they sit beside (`paper`, `field`); a file without
    that column holds the paper's."""
    frames = []
    for one in (path,) if isinstance(path, (str, Path)) else path:
        frame = pd.read_csv(one, comment="#")
        if "protocol" not in frame:
            frame["protocol"] = "paper"
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    frame["imb_factor"] = pd.to_numeric(frame["imb_factor"])
    return frame


def _published(paper: pd.DataFrame, dataset, imb_type, imb_factor, preset) -> pd.DataFrame:
    """The published figures for one setting, measured the way runs of `preset` are (the paper's
    figures beside `--preset paper` runs, the field's beside `--preset field`); the default
    preset `ltexp` is compared with the paper's."""
    protocol = "paper" if preset == "ltexp" else preset
    # A folder of a published data set's images (e.g. ../shared/data's JPEG copy of CIFAR-10,
    # `folder:cifar10`) is compared with that data set's figures (docs/grid-report.md).
    dataset = _published_dataset(dataset)
    return paper[(paper["dataset"] == dataset) & (paper["imb_type"] == imb_type)
                 & np.isclose(paper["imb_factor"], imb_factor) & (paper["protocol"] == protocol)]


def _published_dataset(dataset) -> str:
    """The published data set a run's `ltexp.data_name` names: a folder's own name (`folder:cifar10`
    -> `cifar10`), a named data set itself; anything else (a list or pack) as it is."""
    try:
        spec = parse_dataset(dataset)
    except (LtexpError, TypeError, AttributeError):
        return dataset
    return PurePath(spec.location).name if spec.kind == "folder" else dataset


def _has_paper(paper: pd.DataFrame, dataset, imb_type, imb_factor, preset="ltexp") -> bool:
    return not _published(paper, dataset, imb_type, imb_factor, preset).empty


def _paper_value(paper: pd.DataFrame, dataset, imb_type, imb_factor, method, metric, preset="ltexp") -> str:
    part = _published(paper, dataset, imb_type, imb_factor, preset)
    hit = part[(part["method"] == method) & (part["metric"] == metric)]
    return f"{float(hit['value'].iloc[0]):.2f}" if len(hit) else "–"


def _published_name(preset: str) -> str:
    return "field" if preset == "field" else "paper"


def method_label(row, has_oracle: bool) -> str:
    """`split [epochs=5] — oracle (...)`: the method, its variant, and for expert methods (those
    with an oracle row) which of the two evaluations the row is."""
    label = str(row["method"])
    if row.get("variant"):
        label += f" [{row['variant']}]"
    if row["evaluation"] != HONEST:
        label += f" — {row['evaluation']}"
    elif has_oracle:
        label += " — honest (fused)"
    return label


def _has_oracle(summary: pd.DataFrame, method: str) -> bool:
    return bool(((summary["method"] == method) & (summary["evaluation"] == ORACLE)).any())


def _shows_paper(summary: pd.DataFrame, method: str, evaluation: str) -> bool:
    """The paper's figure sits on the row measured the way the paper measured it: the oracle row
    of an expert method, the only row of any other method."""
    if evaluation == LAST:
        return False
    return evaluation == ORACLE if _has_oracle(summary, method) else True


def table2(summary: pd.DataFrame, paper: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """The paper's Table 2 shape for each setting: Accuracy / Head / Tail per method (percent,
    mean ± std over seeds), n, and the paper's published figures in their own columns."""
    out = {}
    for (dataset, imb_type, imb_factor, preset), part in summary.groupby(["dataset", "imb_type", "imb_factor", "preset"],
                                                                         sort=True):
        rows = []
        for _, row in part.iterrows():
            record = {"Method": method_label(row, _has_oracle(part, row["method"])), "n": int(row["n"])}
            for key, title in MAIN:
                record[title] = fmt(row[f"{key}_mean"], row[f"{key}_std"])
            show = _shows_paper(part, row["method"], row["evaluation"])
            for key, title in MAIN if _has_paper(paper, dataset, imb_type, imb_factor, preset) else ():
                record[f"{_published_name(preset)} {title} (published)"] = (
                    _paper_value(paper, dataset, imb_type, imb_factor, row["method"], key, preset) if show else "–")
            rows.append(record)
        out[f"{setting_label(dataset, imb_type, imb_factor)} (preset {preset})"] = pd.DataFrame(rows)
    return out


def eight_datasets(summary: pd.DataFrame, paper: pd.DataFrame) -> pd.DataFrame:
    """The paper's eight-data-set table: Total / Head / Tail rows per method, a column per data set
    (mean ± std (n), percent); a `<data set> · paper` column beside each data set the paper's
    file has figures for."""
    summary = summary.assign(setting=[setting_label(d, t, f) + (f" [{p}]" if p != "ltexp" else "")
                                      for d, t, f, p in zip(summary["dataset"], summary["imb_type"],
                                                            summary["imb_factor"], summary["preset"])])
    settings = list(dict.fromkeys(summary.sort_values(["dataset", "imb_type", "imb_factor", "preset"])["setting"]))
    first = {s: summary[summary["setting"] == s].iloc[0] for s in settings}
    with_paper = [s for s in settings if _has_paper(paper, first[s]["dataset"], first[s]["imb_type"],
                                                    first[s]["imb_factor"], first[s]["preset"])]
    rows = []
    for (method, variant, evaluation), part in summary.groupby(["method", "variant", "evaluation"], sort=True):
        label = method_label({"method": method, "variant": variant, "evaluation": evaluation},
                             _has_oracle(summary, method))
        show = _shows_paper(summary, method, evaluation)
        for key, title in (("acc", "Total"), ("head_acc", "Head"), ("tail_acc", "Tail")):
            record = {"Method": label, "": title}
            for setting in settings:
                hit = part[part["setting"] == setting]
                record[setting] = fmt(hit[f"{key}_mean"].iloc[0], hit[f"{key}_std"].iloc[0],
                                      int(hit[f"{key}_n"].iloc[0])) if len(hit) else "–"
                if setting in with_paper:
                    f = first[setting]
                    record[f"{setting} · {_published_name(f['preset'])} (published)"] = (
                        _paper_value(paper, f["dataset"], f["imb_type"], f["imb_factor"], method, key, f["preset"])
                        if show else "–")
            rows.append(record)
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


# --- plots ---------------------------------------------------------------------------------------

def _per_class(runs: pd.DataFrame, tmp: Path) -> pd.DataFrame:
    """Every run's eval/per_class_accuracy.csv (artifact), stacked, with the run's keys."""
    from ltexp import tracking

    frames = []
    for _, run in runs.iterrows():
        path = tracking.download_artifact(run["run_id"], "eval/per_class_accuracy.csv", tmp / run["run_id"])
        if path is None:
            continue
        frame = pd.read_csv(path)
        for key in (*KEYS, "seed", "run_id"):
            frame[key] = run[key]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def _series_label(method: str, variant: str) -> str:
    return method + (f" [{variant}]" if variant else "")


def head_vs_tail_figure(runs: pd.DataFrame):
    """Every run's head vs tail test accuracy: colour = method (and variant), marker = data set,
    hollow = the same run with oracle routing; one legend entry per method, data set and oracle."""
    from ltexp import plots

    plt = plots.plt
    fig, ax = plt.subplots(figsize=(6.5, 6))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "osD^vP*X<>"
    setting_keys = list(dict.fromkeys(zip(runs["dataset"], runs["imb_type"], runs["imb_factor"])))
    methods, any_oracle = [], False
    for i, ((method, variant), g) in enumerate(runs.groupby(["method", "variant"], sort=True)):
        colour = colours[i % len(colours)]
        for j, key in enumerate(setting_keys):
            h = g[(g["dataset"] == key[0]) & (g["imb_type"] == key[1]) & np.isclose(g["imb_factor"], key[2])]
            if h.empty:
                continue
            marker = markers[j % len(markers)]
            ax.scatter(h["test_head_acc"], h["test_tail_acc"], color=colour, marker=marker, s=36)
            if "test_oracle_head_acc" in h and h["test_oracle_head_acc"].notna().any():
                any_oracle = True
                ax.scatter(h["test_oracle_head_acc"], h["test_oracle_tail_acc"], facecolors="none",
                           edgecolors=colour, marker=marker, s=36)
        methods.append((colour, _series_label(method, variant)))
    # One legend entry per method (colour), per data set (marker) and for the oracle (hollow),
    # not one per combination: 4 methods on 8 data sets make 13 entries, not up to 64.
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", ls="", label=label) for c, label in methods]
    handles += [Line2D([], [], color="dimgrey", marker=markers[j % len(markers)], ls="", label=setting_label(*key))
                for j, key in enumerate(setting_keys)]
    if any_oracle:
        handles.append(Line2D([], [], color="dimgrey", marker="o", mfc="none", ls="",
                              label="hollow: oracle routing (upper bound)"))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("head-class test accuracy")
    ax.set_ylabel("tail-class test accuracy")
    ax.set_title("Head vs tail accuracy, every run (hollow: oracle routing)")
    # Outside the axes, and no tight_layout (it would shrink them).
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_all(runs: pd.DataFrame, summary: pd.DataFrame, out_dir: Path) -> list[tuple[str, Path]]:
    """Per-class accuracy vs training count (log x), many/medium/few bars and the class-count chart
    for each setting, and one head-vs-tail scatter of every run. Returns (title, png) pairs."""
    from ltexp import plots
    plt = plots.plt

    figures: list[tuple[str, Path]] = []

    def save(fig, name: str, title: str) -> None:
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")  # keeps a legend placed outside the axes
        plots.close(fig)
        figures.append((title, path))

    with tempfile.TemporaryDirectory() as tmp:
        per_class = _per_class(runs, Path(tmp))
    settings = runs[["dataset", "imb_type", "imb_factor", "preset"]].drop_duplicates().sort_values(
        ["dataset", "imb_type", "imb_factor", "preset"])
    for _, s in settings.iterrows():
        label = setting_label(s["dataset"], s["imb_type"], s["imb_factor"]) + \
            (f" [{s['preset']}]" if s["preset"] != "ltexp" else "")
        slug = _slug(label)
        mask = lambda f: ((f["dataset"] == s["dataset"]) & (f["imb_type"] == s["imb_type"]) &  # noqa: E731
                          np.isclose(f["imb_factor"].astype(float), s["imb_factor"]) & (f["preset"] == s["preset"]))
        if not per_class.empty and mask(per_class).any():
            part = per_class[mask(per_class)]
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for (method, variant), g in part.groupby(["method", "variant"], sort=True):
                mean = g.groupby("label").agg(train=("train", "first"), acc=("test_acc", "mean")).sort_values("train")
                # A dot per class; the line joins the means over classes of equal count.
                dots = ax.plot(mean["train"], mean["acc"], marker="o", ms=4, ls="none", alpha=0.7,
                               label=_series_label(method, variant))
                by_count = mean.groupby("train")["acc"].mean()
                # A step profile has two counts with nothing between them: a line from one to the
                # other would invent the classes in between, so each count's mean is a bar of its own.
                style = dict(marker="_", ms=18, mew=2, ls="none") if s["imb_type"] == "step" else dict(lw=1.2)
                ax.plot(by_count.index, by_count.to_numpy(), color=dots[0].get_color(), **style)
            ax.set_xscale("log")
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("training images of the class (log scale)")
            ax.set_ylabel("test accuracy (mean over seeds)")
            ax.set_title(f"{label}: per-class accuracy vs training count (honest predictions)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            save(fig, f"per_class_{slug}", f"Per-class accuracy vs training count — {label}")

            counts = part.drop_duplicates("label").sort_values("rank")
            fig = plots.class_count_chart(counts, f"{label}: training images per class")
            save(fig, f"class_counts_{slug}", f"Training images per class — {label}")

        rows = summary[(summary["dataset"] == s["dataset"]) & (summary["imb_type"] == s["imb_type"]) &
                       np.isclose(summary["imb_factor"], s["imb_factor"]) & (summary["preset"] == s["preset"]) &
                       (summary["evaluation"] == HONEST)]
        shots = [sh for sh in SHOTS if rows[f"{sh}_acc_mean"].notna().any()]
        if len(rows) and shots:
            fig, ax = plt.subplots(figsize=(7, 4))
            width = 0.8 / len(rows)
            for i, (_, row) in enumerate(rows.iterrows()):
                means = [row[f"{sh}_acc_mean"] for sh in shots]
                stds = [0 if row[f"{sh}_acc_std"] != row[f"{sh}_acc_std"] else row[f"{sh}_acc_std"] for sh in shots]
                ax.bar(np.arange(len(shots)) + i * width - 0.4 + width / 2, means, width, yerr=stds, capsize=3,
                       label=_series_label(row["method"], row["variant"]))
            ax.set_xticks(np.arange(len(shots)), [f"{sh}-shot" for sh in shots])
            ax.set_ylim(0, 1.05)
            ax.set_ylabel("test accuracy (mean ± std over seeds)")
            ax.set_title(f"{label}: many (>100) / medium (20-100) / few (<20) training images")
            ax.legend(fontsize=8)
            fig.tight_layout()
            save(fig, f"shots_{slug}", f"Many / medium / few-shot accuracy — {label}")

    if "test_head_acc" in runs and runs["test_head_acc"].notna().any():
        save(head_vs_tail_figure(runs), "head_vs_tail", "Head vs tail accuracy of every run")
    return figures


# --- the report ----------------------------------------------------------------------------------

@dataclass
class Report:
    runs: pd.DataFrame
    summary: pd.DataFrame
    tables: dict[str, pd.DataFrame]
    html: Path
    markdown: Path
    terminal: str
    files: list[Path] = field(default_factory=list)
    run_id: str | None = None


NOTES = (
    "Values are test accuracies in percent, mean ± sample standard deviation over the runs of a group (seeds); "
    "n = runs. Runs of different settings are never averaged: a setting that differs inside a group is shown as "
    "[variant].",
    "Split is shown twice. 'honest (fused)': the fused prediction, made without knowing a test image's group "
    "(what a deployed model does). 'oracle (true group: upper bound)': each test image routed to the expert of its "
    "true group, as the paper measured; it is not achievable at test time.",
    "Paper columns: the paper's published figures (its split figures are oracle figures), from "
    "ltexp/paper_results.csv, beside runs of --preset paper (and of the default preset, whose protocol differs).",
    "Field columns: the field's published figures (ResNet-32, 200 epochs, CIFAR-10-LT imbalance 100), each with its "
    "source in ltexp/field_results.csv, beside runs of --preset field. The anchors' scripts report the best test "
    "epoch; ltexp reports the model of the epoch chosen on validation drawn from training images, and for a "
    "single model also its last epoch's ('last epoch (no selection)' rows); neither looks at the test set.",
)


def build_report(experiment: str, filter_string: str = "", output_dir: str | Path = "report",
                 log_run: bool = True, paper_path: Path | tuple[Path, ...] = PUBLISHED) -> Report:
    """Read the runs, write every table (Markdown + CSV), the plots (PNG) and one self-contained
    HTML page to `output_dir`, print-ready terminal text, and log it all as a `report` run."""
    from ltexp import tracking

    runs = load_runs(experiment, filter_string)
    if runs.empty:
        raise LtexpError(f"no FINISHED experiment runs in experiment {experiment!r}"
                         + (f" matching --filter {filter_string!r}" if filter_string else "")
                         + ": run `ltexp grid` or `ltexp train` first, or check the name with `mlflow experiments search`")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paper = load_paper(paper_path)
    summary = summarise(runs)
    tables = {f"Table 2 shape — {name}": frame for name, frame in table2(summary, paper).items()}
    tables["Eight-data-set table (Total / Head / Tail per method, a column per data set)"] = eight_datasets(summary, paper)

    files: list[Path] = []
    runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    files += [out / "runs.csv", out / "summary.csv"]
    md = [f"# ltexp report: experiment `{experiment}`", ""]
    if filter_string:
        md += [f"Filter: `{filter_string}`", ""]
    md += [f"{len(runs)} FINISHED runs read.", "", *[f"- {note}" for note in NOTES]]
    if paper.empty:
        md += ["- The paper's figures file holds no values yet (see ltexp/paper_results.csv), so no paper column is "
               "filled."]
    terminal = []
    for title, frame in tables.items():
        path = out / f"{_slug(title.split(' (')[0]).lower()}.csv"
        frame.to_csv(path, index=False)
        files.append(path)
        md += ["", f"## {title}", "", markdown_table(frame)]
        terminal += ["", title, frame.to_string(index=False)]
    figures = plot_all(runs, summary, out)
    files += [p for _, p in figures]
    md += ["", "## Plots", ""] + [f"![{t}]({p.name})" for t, p in figures]
    markdown = out / "report.md"
    markdown.write_text("\n".join(md) + "\n")
    page = out / "report.html"
    page.write_text(_html(experiment, filter_string, len(runs), tables, figures, paper.empty))
    files += [markdown, page]

    run_id = None
    if log_run:
        with tracking.start_role_run(experiment, "report", "report", {schema.REPORT_FILTER: filter_string[:5000]}) as run:
            run.log_params({"experiment": experiment, "filter": filter_string or "(none)", "runs": len(runs),
                            "groups": len(summary)})
            tracking.log_artifacts(out, "report")
            run_id = run.run_id
    return Report(runs, summary, tables, page, markdown, "\n".join(terminal), files, run_id)


def _html(experiment: str, filter_string: str, n_runs: int, tables: dict[str, pd.DataFrame],
          figures: list[tuple[str, Path]], paper_empty: bool) -> str:
    """One page, no external file: tables as HTML, PNGs embedded as base64 data URIs."""
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>ltexp report: {esc(experiment)}</title>",
             "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;"
             "margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
             "td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:1em 0}"
             ".note{color:#444;font-size:13px}</style></head><body>",
             f"<h1>ltexp report: experiment <code>{esc(experiment)}</code></h1>",
             f"<p>{n_runs} FINISHED runs" + (f", filter <code>{esc(filter_string)}</code>" if filter_string else "")
             + ".</p>"]
    parts += [f"<p class='note'>{esc(note)}</p>" for note in NOTES]
    if paper_empty:
        parts.append("<p class='note'>The paper's figures file holds no values yet (ltexp/paper_results.csv).</p>")
    for title, frame in tables.items():
        parts += [f"<h2>{esc(title)}</h2>", frame.to_html(index=False, escape=True, border=0)]
    parts.append("<h2>Plots</h2>")
    for title, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        parts += [f"<h3>{esc(title)}</h3>", f"<img alt='{esc(title)}' src='data:image/png;base64,{data}'>"]
    parts.append("</body></html>")
    return "\n".join(parts)
