"""Packed data sets: one file holding a long-tailed data set exactly as a run uses it.

`ltexp data --pack FILE` writes the training (long-tailed), validation and test images of one
`--dataset` / `--imb-type` / `--imb-factor` / `--val-source` / `--val-per-class` / `--data-seed`
as encoded images (a folder's own files byte for byte; arrays as lossless PNG), their labels,
their indices in the source, the class names and counts and a SHA-256 of the contents.
`--dataset pack:FILE` trains on it with no source at hand, e.g. on a GPU machine whose upload
per call is limited (bench/results holds the measured sizes).

The file is a zip (stored, not compressed: the images are compressed already) of `meta.json`
and `.npy` arrays, read with `numpy.load(allow_pickle=False)`, so opening a pack runs no code.
A pack fixes the settings it was made with: a run that gives another value for one of them is
refused in one line naming the flag, so what the run logs is what it trained on.
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
# The data settings a pack was made with, which a run on it must share (DataConfig fields).
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
    """The metadata of the pack at `path` (format, name, family, class names and counts, image
    shape, the settings in `HELD`, content hash), read without the images; one `LtexpError`
    naming the file when it is missing or is no pack."""
    path = Path(path)
    if not path.is_file():
        raise LtexpError(f"--dataset pack:{path}: no such file (make one with `ltexp data --pack {path} --dataset ...`)")
    return _meta(str(path), path.stat().st_mtime_ns)


def check_settings(data_cfg, meta: dict, path: Path) -> None:
    """Refuse a run whose data settings differ from those the pack was made with."""
    for name in HELD:
        given, packed = getattr(data_cfg, name), meta["settings"][name]
        if given != packed and not (isinstance(packed, float) and abs(given - packed) <= 1e-12 * abs(packed)):
            made = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in meta["settings"].items() if k in HELD)
            raise LtexpError(f"--{name.replace('_', '-')} {given} differs from the pack {path}, made with {made}: "
                             f"give its values, or pack the data set again with yours")


def _encoded(images, files, index) -> list[bytes]:
    """Each image's encoded bytes: a folder's own file when there is one (no second lossy
    encoding of a JPEG), else a lossless PNG of the array."""
    from PIL import Image

    if files is not None:
        return [Path(files[i]).read_bytes() for i in index]
    out = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _content_hash(arrays: dict, class_names) -> str:
    digest = hashlib.sha256(json.dumps(list(class_names)).encode())
    for key in sorted(arrays):
        digest.update(key.encode())
        digest.update(arrays[key].tobytes())
    return digest.hexdigest()


def write_pack(data_cfg, path: str | Path) -> dict:
    """Build the long-tailed data set of `data_cfg` (a resolved `DataConfig`) and write it to
    `path` (atomically); returns its metadata."""
    import numpy as np

    from ltexp.data.longtail import build_long_tail
    from ltexp.data.sources import load_source

    path = Path(path)
    if pack_path(data_cfg.dataset) is not None:
        raise LtexpError(f"--dataset {data_cfg.dataset} is a pack already: pack its source data set")
    source = load_source(data_cfg.dataset, data_cfg.data_dir, data_cfg.image_size, data_cfg.download)
    data = build_long_tail(source, data_cfg.imb_type, data_cfg.imb_factor, data_cfg.val_source,
                           data_cfg.val_per_class, data_cfg.data_seed)
    # Validation comes from the training pool (holdout) or from the test set (the paper's 9:1).
    val_files = source.test_files if data.val_from_test else source.train_files
    parts = {"train": (data.train_images, data.train_labels, data.train_index, source.train_files),
             "val": (data.val_images, data.val_labels, data.val_index, val_files),
             "test": (data.test_images, data.test_labels, data.test_index, source.test_files)}
    arrays = {}
    for split, (images, labels, index, files) in parts.items():
        encoded = _encoded(images, files, index)
        arrays[f"{split}_bytes"] = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0, *map(len, encoded)]).astype(np.int64)
        arrays[f"{split}_labels"] = np.asarray(labels, dtype=np.int64)
        arrays[f"{split}_index"] = np.asarray(index, dtype=np.int64)
    family = "cifar" if data_cfg.dataset.startswith("cifar") else "folder" if data_cfg.family == "folder" else "digits"
    name = source.name if family != "folder" else f"folder:{Path(source.name[len('folder:'):]).name}"
    meta = {"format": FORMAT, "name": name, "source": source.name, "family": family,
            "class_names": list(data.info.class_names), "train_counts": data.info.train_counts.tolist(),
            "image_shape": list(data.image_shape), "val_from_test": bool(data.val_from_test),
            "settings": {k: getattr(data_cfg, k) for k in HELD}, "sha256": _content_hash(arrays, data.info.class_names)}
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
    """The `LongTailData` of `--dataset pack:<file>`, after checking its settings against
    `data_cfg`, its content hash and every image; one `LtexpError` naming the file otherwise."""
    import numpy as np

    from ltexp.data.longtail import ClassInfo, LongTailData
    from ltexp.images import decode_image

    path = pack_path(data_cfg.dataset)
    meta = pack_meta(path)
    check_settings(data_cfg, meta, path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {f"{split}_{part}": archive[f"{split}_{part}"]
                      for split in SPLITS for part in ("bytes", "offsets", "labels", "index")}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise LtexpError(f"pack {path} is damaged ({type(exc).__name__}: {exc}): pack it again") from None
    digest = _content_hash(arrays, meta["class_names"])
    if digest != meta["sha256"]:
        raise LtexpError(f"pack {path} is damaged: its contents hash to {digest[:12]}…, its record says "
                         f"{meta['sha256'][:12]}…: pack it again")
    height, width, channels = meta["image_shape"]
    k = len(meta["class_names"])
    out = {}
    for split in SPLITS:
        raw, offsets, labels = (arrays[f"{split}_{p}"] for p in ("bytes", "offsets", "labels"))
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise LtexpError(f"pack {path}: a {split} label lies outside 0..{k - 1}: pack it again")
        images = [decode_image(raw[offsets[i]:offsets[i + 1]].tobytes(), f"{split} image {i} of pack {path}",
                               "L" if channels == 1 else "RGB", (width, height)) for i in range(len(labels))]
        shape = (0, height, width, channels)
        out[split] = (np.stack(images).reshape(-1, height, width, channels) if images else np.empty(shape, np.uint8),
                      labels)
    counts = np.asarray(meta["train_counts"], dtype=np.int64)
    if not np.array_equal(np.bincount(out["train"][1], minlength=k), counts):
        raise LtexpError(f"pack {path}: its training labels do not give the class counts it records: pack it again")
    return LongTailData(
        train_images=out["train"][0], train_labels=out["train"][1], val_images=out["val"][0],
        val_labels=out["val"][1], test_images=out["test"][0], test_labels=out["test"][1],
        info=ClassInfo(tuple(meta["class_names"]), counts), train_index=arrays["train_index"],
        val_index=arrays["val_index"], test_index=arrays["test_index"], val_from_test=meta["val_from_test"])
