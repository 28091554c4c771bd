"""Packed data sets: one file holding long-tailed data sets exactly as runs use them.

`ltexp data --pack FILE` writes the training (long-tailed), validation and test images of one
`--dataset` / `--imb-type` / `--imb-factor` / `--val-source` / `--val-per-class` / `--data-seed`
as encoded images (a folder's own files byte for byte; arrays as lossless PNG), with their
labels, their indices in the source, the class names and counts and a SHA-256 of the contents.
Packing another setting of the same source into the same FILE adds it, storing each image once
(CIFAR-10's eight long-tailed sets share most of their images). `--dataset pack:FILE` trains on
the set whose settings match the run's, with no source at hand, e.g. on a GPU machine whose
upload per call is limited (bench/results holds the measured sizes).

The file is a zip (stored, not compressed: the images are compressed already) of `meta.json`
and `.npy` arrays, read with `numpy.load(allow_pickle=False)`, so opening a pack runs no code.
A run whose data settings match none of the pack's sets is refused in one line listing them,
so what a run logs is what it trained on.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path

from ltexp import LtexpError

PREFIX = "pack:"
FORMAT = "ltexp-pack/1"
SPLITS = ("train", "val", "test")
POOLS = ("train", "test")  # images are stored once per source split, keyed by their source index
# The data settings that make one long-tailed set of a source (DataConfig fields).
HELD = ("imb_type", "imb_factor", "val_source", "val_per_class", "data_seed")


def pack_path(dataset: str) -> Path | None:
    """The file of a `pack:<file>` data set name, None for any other name."""
    return Path(dataset[len(PREFIX):]).expanduser() if dataset.startswith(PREFIX) else None


@functools.lru_cache(maxsize=8)
def _meta(path: str, mtime_ns: int) -> dict:
    try:
        with zipfile.ZipFile(path) as archive:
            meta = json.loads(archive.read("meta.json"))
    except (OSError, zipfile.BadZipFile, KeyError, ValueError) as exc:
        raise LtexpError(f"--dataset pack:{path} is not an ltexp pack ({type(exc).__name__}: {exc}): "
                         f"make one with `ltexp data --pack {path} --dataset ...`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise LtexpError(f"--dataset pack:{path} has format {found!r}, this ltexp reads {FORMAT!r}: pack it again")
    return meta


def pack_meta(path: str | Path) -> dict:
    """The metadata of the pack at `path` (format, name, family, class names, image shape, its
    sets' settings and counts, content hash), read without the images; one `LtexpError` naming
    the file when it is missing or is no pack."""
    path = Path(path)
    if not path.is_file():
        raise LtexpError(f"--dataset pack:{path}: no such file (make one with `ltexp data --pack {path} --dataset ...`)")
    return _meta(str(path), path.stat().st_mtime_ns)


def _same(a, b) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, (int, float)) and abs(a - b) <= 1e-12 * abs(a))


def _describe(settings: dict) -> str:
    return " ".join(f"--{k.replace('_', '-')} {settings[k]}" for k in HELD)


def _matching(meta: dict, data_cfg, names=HELD) -> list[int]:
    return [i for i, s in enumerate(meta["sets"]) if all(_same(s["settings"][k], getattr(data_cfg, k)) for k in names)]


def default_val_per_class(meta: dict, data_cfg) -> int | None:
    """`--val-per-class auto` on a pack: the value of its set with the run's other settings
    (None when no set has them: `find_set` then says which sets there are)."""
    sets = _matching(meta, data_cfg, [k for k in HELD if k != "val_per_class"])
    values = sorted({meta["sets"][i]["settings"]["val_per_class"] for i in sets})
    if len(values) > 1:
        raise LtexpError(f"the pack holds this setting with --val-per-class {' and '.join(map(str, values))}: "
                         f"give one of them")
    return values[0] if values else None


def find_set(meta: dict, data_cfg, path: Path) -> int:
    """The index of the pack's set made with `data_cfg`'s settings, or one `LtexpError` listing the sets."""
    found = _matching(meta, data_cfg)
    if found:
        return found[0]
    have = "; ".join(_describe(s["settings"]) for s in meta["sets"])
    raise LtexpError(f"the pack {path} holds no set made with {_describe(data_cfg.__dict__)}: it holds {have}; "
                     f"give one of those settings, or add yours with `ltexp data --pack {path} --dataset "
                     f"{meta['source']} ...`")


def _encode(image) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    return buffer.getvalue()


def _content_hash(arrays: dict, sets: list) -> str:
    digest = hashlib.sha256(json.dumps(sets, sort_keys=True).encode())
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(arrays[key].tobytes())
    return digest.hexdigest()


def _load_arrays(path: Path, meta: dict) -> dict:
    import numpy as np

    names = [f"{pool}_{part}" for pool in POOLS for part in ("bytes", "offsets", "labels", "index")]
    names += [f"set{i}_{split}_index" for i in range(len(meta["sets"])) for split in SPLITS]
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in names}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise LtexpError(f"pack {path} is damaged ({type(exc).__name__}: {exc}): pack it again") from None
    digest = _content_hash(arrays, meta["sets"])
    if digest != meta["sha256"]:
        raise LtexpError(f"pack {path} is damaged: its contents hash to {digest[:12]}…, its record says "
                         f"{meta['sha256'][:12]}…: pack it again")
    return arrays


def write_pack(data_cfg, path: str | Path) -> dict:
    """Build the long-tailed data set of `data_cfg` (a resolved `DataConfig`) and write it to
    `path` atomically, beside the sets already packed there from the same source; returns the
    pack's metadata."""
    import numpy as np

    from ltexp.data.longtail import build_long_tail
    from ltexp.data.sources import load_source

    path = Path(path)
    if pack_path(data_cfg.dataset) is not None:
        raise LtexpError(f"--dataset {data_cfg.dataset} is a pack already: pack its source data set")
    source = load_source(data_cfg.dataset, data_cfg.data_dir, data_cfg.image_size, data_cfg.download)
    data = build_long_tail(source, data_cfg.imb_type, data_cfg.imb_factor, data_cfg.val_source,
                           data_cfg.val_per_class, data_cfg.data_seed)
    family = "cifar" if data_cfg.dataset.startswith("cifar") else "folder" if data_cfg.family == "folder" else "digits"
    head = {"format": FORMAT, "name": data_cfg.short_name, "source": source.name, "family": family,
            "class_names": list(source.class_names), "image_shape": list(data.image_shape)}

    # What is packed already: each pool as {source index: (label, encoded bytes)}, and the sets.
    pools: dict[str, dict[int, tuple[int, bytes]]] = {pool: {} for pool in POOLS}
    sets, set_arrays = [], []
    if path.exists():
        meta = pack_meta(path)
        if any(meta[k] != v for k, v in head.items() if k != "name"):
            raise LtexpError(f"the pack {path} holds {meta['source']} ({meta['image_shape']}), not {source.name} "
                             f"({head['image_shape']}): a pack holds sets of one source; choose another file")
        arrays = _load_arrays(path, meta)
        for pool in POOLS:
            raw, offsets = arrays[f"{pool}_bytes"], arrays[f"{pool}_offsets"]
            pools[pool] = {int(i): (int(label), raw[offsets[n]:offsets[n + 1]].tobytes())
                           for n, (i, label) in enumerate(zip(arrays[f"{pool}_index"], arrays[f"{pool}_labels"]))}
        for i, record in enumerate(meta["sets"]):
            if not all(_same(record["settings"][k], getattr(data_cfg, k)) for k in HELD):  # a repacked set is replaced
                sets.append(record)
                set_arrays.append({split: arrays[f"set{i}_{split}_index"] for split in SPLITS})
        head["name"] = meta["name"]

    # Add this set's images: a folder's own files (no second lossy encoding), else PNGs of the arrays.
    files = {"train": source.train_files, "test": source.test_files}
    images = {"train": (source.train_images, source.train_labels), "test": (source.test_images, source.test_labels)}
    val_pool = "test" if data.val_from_test else "train"
    for pool, index in (("train", data.train_index), (val_pool, data.val_index), ("test", data.test_index)):
        for i in map(int, index):
            if i not in pools[pool]:
                body = Path(files[pool][i]).read_bytes() if files[pool] is not None else _encode(images[pool][0][i])
                pools[pool][i] = (int(images[pool][1][i]), body)
    sets.append({"settings": {k: getattr(data_cfg, k) for k in HELD}, "train_counts": data.info.train_counts.tolist(),
                 "val_pool": val_pool})
    set_arrays.append({"train": data.train_index, "val": data.val_index, "test": data.test_index})

    arrays = {}
    for pool in POOLS:
        keys = sorted(pools[pool])
        arrays[f"{pool}_index"] = np.asarray(keys, dtype=np.int64)
        arrays[f"{pool}_labels"] = np.asarray([pools[pool][k][0] for k in keys], dtype=np.int64)
        arrays[f"{pool}_offsets"] = np.cumsum([0, *(len(pools[pool][k][1]) for k in keys)]).astype(np.int64)
        arrays[f"{pool}_bytes"] = np.frombuffer(b"".join(pools[pool][k][1] for k in keys), dtype=np.uint8)
    for i, split_index in enumerate(set_arrays):
        for split in SPLITS:
            arrays[f"set{i}_{split}_index"] = np.asarray(split_index[split], dtype=np.int64)
    meta = {**head, "sets": sets, "sha256": _content_hash(arrays, sets)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
            archive.writestr("meta.json", json.dumps(meta, indent=1))
            for key, array in arrays.items():
                with archive.open(f"{key}.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, array, allow_pickle=False)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        from ltexp import write_error

        raise write_error("the pack", path, exc) from exc
    return meta


def read_pack(data_cfg):
    """The `LongTailData` of `--dataset pack:<file>`: its set with `data_cfg`'s settings, after
    checking the content hash and every image; one `LtexpError` naming the file otherwise."""
    import numpy as np

    from ltexp.data.longtail import ClassInfo, LongTailData
    from ltexp.images import decode_image

    path = pack_path(data_cfg.dataset)
    meta = pack_meta(path)
    chosen = find_set(meta, data_cfg, path)
    record = meta["sets"][chosen]
    arrays = _load_arrays(path, meta)
    height, width, channels = meta["image_shape"]
    k = len(meta["class_names"])
    out = {}
    for split, pool in (("train", "train"), ("val", record["val_pool"]), ("test", "test")):
        wanted = arrays[f"set{chosen}_{split}_index"]
        keys, labels_of = arrays[f"{pool}_index"], arrays[f"{pool}_labels"]
        where = np.searchsorted(keys, wanted)
        if len(wanted) and (where.max() >= len(keys) or not np.array_equal(keys[where], wanted)):
            raise LtexpError(f"pack {path}: its {split} set names images it does not hold: pack it again")
        labels = labels_of[where]
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise LtexpError(f"pack {path}: a {split} label lies outside 0..{k - 1}: pack it again")
        raw, offsets = arrays[f"{pool}_bytes"], arrays[f"{pool}_offsets"]
        images = [decode_image(raw[offsets[n]:offsets[n + 1]].tobytes(), f"{pool} image {wanted[j]} of pack {path}",
                               "L" if channels == 1 else "RGB", (width, height)) for j, n in enumerate(where)]
        out[split] = (np.stack(images).reshape(-1, height, width, channels) if images
                      else np.empty((0, height, width, channels), np.uint8), labels, wanted)
    counts = np.asarray(record["train_counts"], dtype=np.int64)
    if not np.array_equal(np.bincount(out["train"][1], minlength=k), counts):
        raise LtexpError(f"pack {path}: its training labels do not give the class counts it records: pack it again")
    return LongTailData(
        train_images=out["train"][0], train_labels=out["train"][1], val_images=out["val"][0],
        val_labels=out["val"][1], test_images=out["test"][0], test_labels=out["test"][1],
        info=ClassInfo(tuple(meta["class_names"]), counts), train_index=out["train"][2],
        val_index=out["val"][2], test_index=out["test"][2], val_from_test=record["val_pool"] == "test")
