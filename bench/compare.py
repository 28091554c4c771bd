"""Compare methods over seeds: mean ± std of test accuracy (overall / head / tail), per fusion rule.

Every run is a normal ltexp MLflow run (experiment `--experiment`, default `compare`), so the
numbers can be inspected in `mlflow ui` afterwards. Examples:

    python bench/compare.py                                   # digits exp 0.01, seeds 0,1,2, all methods
    python bench/compare.py --imb-type step --imb-factor 0.1
    python bench/compare.py --methods baseline,split:other --seeds 0 --epochs 20
    python bench/compare.py --timing                          # split vs baseline training time, equal epochs

A method is any `ltexp train --method` name (ltexp/methods.py: baseline, resample, lws,
balanced_softmax, logit_adjust, ldam_drw, ...), `resample:<sampling>`, or
`split:<expert_mode>[:<lws_mode>]`. For split runs every fusion rule is reported (fitted and
chosen on validation; `auto` is the rule the run chose) next to the oracle, which routes each
test image by its true group and is an upper bound only. `--set name=value` (repeatable) sets
any other `ltexp train` setting for every run, e.g. the compact CPU setting for real photographs:

    python bench/compare.py --dataset folder:data/cifar10-dev --set image_size=16 --set model=smallcnn \
        --epochs 30 --methods baseline,resample:balanced,balanced_softmax --seeds 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ltexp.cli import SECTIONS  # noqa: E402
from ltexp.config import resolve_config  # noqa: E402
from ltexp.experiment import run_experiment  # noqa: E402


def method_sections(spec: str) -> tuple[str, dict]:
    parts = spec.split(":")
    if parts[0] == "resample" and len(parts) > 1:
        return spec, {"method": {"method": "resample", "sampling": parts[1]}}
    if parts[0] != "split":
        return spec, {"method": {"method": parts[0]}}
    sections = {"method": {"method": "split"}, "split": {"expert_mode": parts[1] if len(parts) > 1 else "own"}}
    if len(parts) > 2:
        sections["method"]["lws_mode"] = parts[2]
    return spec, sections


def extra_sections(pairs: list[str]) -> dict[str, dict]:
    """`["image_size=16", "model=smallcnn"]` -> {"data": {"image_size": "16"}, "model": {...}}, typed
    by the config field's type."""
    out: dict[str, dict] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        section = next((sec for sec, cls in SECTIONS.items() if name in cls.__dataclass_fields__), None)
        if section is None:
            raise SystemExit(f"--set {pair}: {name!r} is not an ltexp train setting")
        kind = str(SECTIONS[section].__dataclass_fields__[name].type)
        out.setdefault(section, {})[name] = {"int": int, "float": float, "bool": lambda v: v.lower() == "true"}.get(
            kind, str)(value)
    return out


def run_matrix(args) -> pd.DataFrame:
    rows = []
    extra = extra_sections(args.set)
    for spec in args.methods.split(","):
        name, sections = method_sections(spec)
        for seed in [int(s) for s in args.seeds.split(",")]:
            data = {"dataset": args.dataset, "imb_type": args.imb_type, "imb_factor": args.imb_factor,
                    **extra.get("data", {})}
            optim = {**({"epochs": args.epochs} if args.epochs else {}), **extra.get("optim", {})}
            merged = {sec: {**extra.get(sec, {}), **sections.get(sec, {})} for sec in set(extra) | set(sections)}
            cfg = resolve_config({**merged, "data": data, "optim": optim,
                                  "tracking": {"experiment": args.experiment}}, seed=seed)
            result = run_experiment(cfg)
            m = result.metrics
            base = {"method": name, "seed": seed, "train_time_s": m["train_time_s"]}
            if "test_oracle_acc" not in m:
                rows.append({**base, "fusion": "-", "acc": m["test_acc"], "head": m["test_head_acc"],
                             "tail": m["test_tail_acc"], "val_acc": m["val_acc"]})
                print(f"done {name} seed {seed}: test_acc {m['test_acc']:.4f}", file=sys.stderr)
                _save(args, rows)
                continue
            for _, r in result.fusion_table.iterrows():
                rows.append({**base, "fusion": r["fusion"], "acc": r["test_acc"], "head": r["test_head_acc"],
                             "tail": r["test_tail_acc"], "val_acc": r["val_acc"], "routing": r["test_routing_acc"]})
            rows.append({**base, "fusion": f"auto={result.fusion}", "acc": m["test_acc"], "head": m["test_head_acc"],
                         "tail": m["test_tail_acc"], "val_acc": m["val_acc"], "routing": m["test_routing_acc"]})
            rows.append({**base, "fusion": "ORACLE (true group)", "acc": m["test_oracle_acc"],
                         "head": m["test_oracle_head_acc"], "tail": m["test_oracle_tail_acc"]})
            print(f"done {name} seed {seed}: test_acc {m['test_acc']:.4f}", file=sys.stderr)
            _save(args, rows)
    return pd.DataFrame(rows)


def _save(args, rows) -> None:
    """Per-seed rows so far (a long comparison that is stopped keeps what it measured)."""
    if args.csv:
        pd.DataFrame(rows).to_csv(args.csv, index=False)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["fusion"] = frame["fusion"].str.replace(r"^auto=.*", "auto (chosen on val)", regex=True)
    cols = [c for c in ("acc", "head", "tail", "routing", "val_acc", "train_time_s") if c in frame]
    grouped = frame.groupby(["method", "fusion"], sort=False)[cols]
    mean, std = grouped.mean(), grouped.std(ddof=1)
    out = pd.DataFrame(index=mean.index)
    for c in cols:
        out[c] = [f"{m:.4f} ± {s:.4f}" if pd.notna(s) else (f"{m:.4f}" if pd.notna(m) else "-")
                  for m, s in zip(mean[c], std[c])]
    out["n"] = grouped.size()
    return out.reset_index()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--imb-type", default="exp")
    parser.add_argument("--imb-factor", type=float, default=0.01)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default="baseline,resample,lws,split:own,split:other")
    parser.add_argument("--epochs", type=int, default=0, help="0 = the data set's default")
    parser.add_argument("--experiment", default="compare")
    parser.add_argument("--timing", action="store_true",
                        help="train-time ratio of split (joint LWS, no extra stage) to baseline at equal epochs")
    parser.add_argument("--csv", default="", help="also write the per-seed rows here (after every run)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="any other ltexp train setting for every run (repeatable)")
    args = parser.parse_args()
    if args.timing:
        args.methods = "baseline,split:own:joint"
    frame = run_matrix(args)
    print(f"\n{args.dataset} {args.imb_type} {args.imb_factor}, seeds {args.seeds} (test set; mean ± sample std)")
    print(summarise(frame).to_string(index=False))
    if args.timing:
        per = frame.drop_duplicates(["method", "seed"]).groupby("method")["train_time_s"].mean()
        print(f"\ntraining time split / baseline at equal epochs: {per['split:own:joint'] / per['baseline']:.2f}x "
              f"(baseline {per['baseline']:.2f} s, split {per['split:own:joint']:.2f} s; the paper: 1.61x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
