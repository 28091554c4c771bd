"""What a packed data set costs and saves: size on disk and time to load, beside its folder.

Builds the long-tailed data set of a `folder:` data set (reading every image, as `ltexp train`
does), packs it (`ltexp.data.pack.write_pack`), reads the pack back (`--dataset pack:`) and
checks that every array is identical. Prints one JSON object: the folder's image count and bytes,
the pack's bytes, the three wall times (s) and their ratio.

    tar -xf ../shared/data/cifar10.tar -C /tmp/c10
    python bench/pack.py --folder /tmp/c10/cifar10 --imb-factor 0.01 --val-per-class 100 --out /tmp/c10-lt.ltpack

Times depend on the machine and on what else runs on it: compare the figures of one run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="a folder data set: <folder>/{train,test}/<class>/*")
    parser.add_argument("--imb-type", default="exp")
    parser.add_argument("--imb-factor", type=float, default=0.01)
    parser.add_argument("--val-per-class", type=int, default=0, help="0: the folder default")
    parser.add_argument("--out", required=True, help="where the pack is written")
    args = parser.parse_args()

    from ltexp.config import resolve_config
    from ltexp.data import build_dataset
    from ltexp.data.pack import write_pack

    values = {"dataset": f"folder:{args.folder}", "imb_type": args.imb_type, "imb_factor": args.imb_factor}
    if args.val_per_class:
        values["val_per_class"] = args.val_per_class
    folder_cfg = resolve_config({"data": values}).data
    files = [p for p in Path(args.folder).rglob("*") if p.is_file()]

    start = time.perf_counter()
    direct = build_dataset(folder_cfg)
    folder_s = time.perf_counter() - start
    start = time.perf_counter()
    meta = write_pack(folder_cfg, args.out)
    write_s = time.perf_counter() - start
    pack_cfg = resolve_config({"data": {**values, "dataset": f"pack:{args.out}"}}).data
    start = time.perf_counter()
    packed = build_dataset(pack_cfg)
    read_s = time.perf_counter() - start

    splits = ("train", "val", "test")
    identical = all(np.array_equal(getattr(direct, f"{s}_{part}"), getattr(packed, f"{s}_{part}"))
                    for s in splits for part in ("images", "labels", "index"))
    print(json.dumps({
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, {__import__('os').cpu_count()} CPUs",
        "folder": args.folder, "folder_files": len(files), "folder_bytes": sum(p.stat().st_size for p in files),
        "pack": args.out, "pack_bytes": Path(args.out).stat().st_size, "sha256": meta["sha256"],
        "images": {s: int(len(getattr(packed, f"{s}_labels"))) for s in splits},
        "train_counts": meta["train_counts"], "identical_arrays": identical,
        "folder_load_s": round(folder_s, 2), "pack_write_s": round(write_s, 2), "pack_load_s": round(read_s, 2),
        "folder_over_pack_load": round(folder_s / read_s, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
