"""Image sources: every source returns the same `ImageSource` of uint8 NHWC arrays.

- `digits`: scikit-learn's 1,797 real 8x8 handwritten digits, the embedded default.
- `cifar10` / `cifar100`: the official python archives (torchvision's layout), downloaded with
  torchvision's utilities when absent and online.
- `folder:<path>`: `<path>/train/<class>/*.png|jpg` and `<path>/test/<class>/*`.
- `list:<root>:<train.txt>,<test.txt>`: images under `root` named by split files of
  `relative/path label` lines (the published ImageNet-LT / Places-LT / iNaturalist 2018 format).

A packed data set (`pack:<file>`, ltexp.data.pack) is already long-tailed: it is no source.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np

from ltexp import LtexpError


@dataclass(frozen=True)
class ImageSource:
    """Raw images before any long-tail subsampling.

    Images are uint8 arrays of shape (N, H, W, C); labels int64 in [0, K). `balanced` says the
    training pool has the same number of images in every class (CIFAR, the digits pool), which
    is what the long-tail formula assumes; a folder keeps whatever counts it has.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: tuple[str, ...]
    balanced: bool
    # The file each image was decoded from (a folder data set), so a pack can keep its bytes.
    train_files: tuple[str, ...] | None = None
    test_files: tuple[str, ...] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# Digits: a balanced test set and a balanced training pool are carved from the 1,797 images
# (every class has at least 174). The rest (~1 per cent) is left unused so both stay balanced.
DIGITS_TEST_PER_CLASS = 50
DIGITS_POOL_PER_CLASS = 120


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: (1797, 8, 8) pixel values 0..16 and (1797,) labels, as `load_digits`
    gives them.

    Read straight from the CSV that scikit-learn ships (`sklearn/datasets/data/digits.csv.gz`,
    the file `load_digits` parses), found without importing scikit-learn: importing it costs ~1 s
    of CPU per process, more than training digits for a few epochs. `load_digits` itself is the
    fallback should the file ever move."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            import gzip

            with gzip.open(path, "rt", encoding="utf-8") as fh:
                data = np.loadtxt(fh, delimiter=",")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target


def load_digits_source(seed: int = 0) -> ImageSource:
    """scikit-learn's digits as 8x8x1 uint8 images: 50 test and 120 pool images per class.

    Pixel values 0..16 are scaled to 0..255. The carve uses its own fixed seed (`seed`, default
    0), independent of the experiment seed, so the test set is the same for every run.
    """
    pixels, target = _digits_arrays()
    images = np.rint(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:DIGITS_TEST_PER_CLASS])
        train_idx.append(idx[DIGITS_TEST_PER_CLASS:DIGITS_TEST_PER_CLASS + DIGITS_POOL_PER_CLASS])
    train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
    return ImageSource("digits", images[train_idx], labels[train_idx], images[test_idx],
                       labels[test_idx], tuple(str(c) for c in range(10)), balanced=True)


@dataclass(frozen=True)
class CifarLayout:
    """Where torchvision puts one CIFAR archive and what is inside (the official python version)."""

    folder: str
    url: str
    archive: str
    md5: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    names_key: str
    labels_key: str
    file_md5: dict  # MD5 of every file in the folder, as torchvision publishes them


CIFAR = {
    "cifar10": CifarLayout(
        "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta",
        "label_names", "labels",
        {"data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e",
         "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"}),
    "cifar100": CifarLayout(
        "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        ("train",), "test", "meta", "fine_label_names", "fine_labels",
        {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
         "meta": "7973b15100ade9c7d40fb424638fde48"}),
}


# Set to 1 to read CIFAR-format files that are not the published ones (your own data in that
# format, or test fixtures); they are still read with `_ArraysOnly`, which cannot run code.
UNVERIFIED_ENV = "LTEXP_UNVERIFIED_CIFAR"


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds dicts, lists, strings and numpy arrays and nothing else: a pickle
    asking for any other callable (how a tampered file runs code) is refused."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _md5(path: Path) -> str:
    import hashlib

    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verify(folder: Path, layout: "CifarLayout") -> None:
    """Every file's MD5 against torchvision's published value, before anything is unpickled."""
    import os

    if os.environ.get(UNVERIFIED_ENV) == "1":
        return
    for name, expected in layout.file_md5.items():
        actual = _md5(folder / name)
        if actual != expected:
            raise LtexpError(f"{folder / name} is not the published CIFAR file (MD5 {actual}, expected {expected}); "
                             f"it was not loaded: delete {folder} to download it again, or set {UNVERIFIED_ENV}=1 "
                             f"for your own data in CIFAR format")


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as fh:
        return _ArraysOnly(fh, encoding="latin1").load()


# What reading one member of a CIFAR folder can raise: a refused or broken pickle, a truncated
# file, or contents that are not the dict of arrays and lists the layout promises.
_MEMBER_ERRORS = (OSError, EOFError, pickle.UnpicklingError, KeyError, IndexError, TypeError, ValueError,
                  AttributeError)


def _read_member(name: str, layout: CifarLayout, folder: Path, member: str, read):
    """`read(entry)` of the unpickled `folder/member`; any failure is one `LtexpError` naming the
    member file, its folder and the archive it comes from."""
    try:
        return read(_unpickle(folder / member))
    except _MEMBER_ERRORS as exc:
        raise LtexpError(f"unreadable {name} file {member} in {folder} (from {layout.archive}): "
                         f"{type(exc).__name__}: {exc}") from None


def _read_cifar_batches(name: str, layout: CifarLayout, folder: Path, files: tuple[str, ...]
                        ) -> tuple[np.ndarray, np.ndarray]:
    def read(entry):
        # Rows are 3072 bytes: 1024 red, 1024 green, 1024 blue, each row-major 32x32.
        images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(entry[layout.labels_key], dtype=np.int64)
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        return images, labels

    batches = [_read_member(name, layout, folder, member, read) for member in files]
    return (np.concatenate([b[0] for b in batches]).transpose(0, 2, 3, 1).copy(),
            np.concatenate([b[1] for b in batches]))


def load_cifar_source(name: str, data_dir: str | Path, download: bool = True) -> ImageSource:
    """CIFAR-10/100 from `data_dir/<torchvision folder>`, downloading the archive when absent.

    The download uses torchvision's `download_and_extract_archive` (with the official MD5).
    When the archive is missing and cannot be fetched, raises one `LtexpError` saying where to
    put it.
    """
    layout = CIFAR[name]
    root = Path(data_dir).expanduser()
    folder = root / layout.folder
    needed = [*layout.train_files, layout.test_file, layout.meta_file]
    if not all((folder / f).is_file() for f in needed):
        if not download:
            raise LtexpError(_missing_cifar_message(name, layout, folder, "downloads are off (--download false)"))
        try:
            from torchvision.datasets.utils import download_and_extract_archive

            download_and_extract_archive(layout.url, str(root), filename=layout.archive, md5=layout.md5)
        except Exception as exc:  # offline, proxy, disk: all end in the same advice
            reason = f"download failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            raise LtexpError(_missing_cifar_message(name, layout, folder, reason)) from None
    _verify(folder, layout)
    train_images, train_labels = _read_cifar_batches(name, layout, folder, layout.train_files)
    test_images, test_labels = _read_cifar_batches(name, layout, folder, (layout.test_file,))
    class_names = _read_member(name, layout, folder, layout.meta_file,
                               lambda entry: tuple(str(c) for c in entry[layout.names_key]))
    counts = np.bincount(train_labels, minlength=len(class_names))
    return ImageSource(name, train_images, train_labels, test_images, test_labels, class_names,
                       balanced=bool((counts == counts[0]).all()))


def _missing_cifar_message(name: str, layout: CifarLayout, folder: Path, reason: str) -> str:
    return (f"{name} not found in {folder} and {reason}: download {layout.url} and extract it into "
            f"{folder.parent} (giving {layout.folder}/), or pass --data-dir where it already is")


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


def _read_folder_split(split_dir: Path, image_size: int, class_names: tuple[str, ...] | None):
    from ltexp.images import decode_image

    if not split_dir.is_dir():
        raise LtexpError(f"folder data set needs {split_dir} with one sub-folder per class")
    names = tuple(sorted(d.name for d in split_dir.iterdir() if d.is_dir()))
    if not names:
        raise LtexpError(f"{split_dir} has no class sub-folders: expected {split_dir}/<class>/*.png|jpg")
    if class_names is not None:
        extra = sorted(set(names) - set(class_names))
        if extra:
            raise LtexpError(f"{split_dir} has classes missing from train/: {', '.join(extra)}")
    class_names = class_names or names
    images, labels, paths = [], [], []
    for label, cname in enumerate(class_names):
        cdir = split_dir / cname
        files = sorted(p for p in cdir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if cdir.is_dir() else []
        for path in files:
            images.append(decode_image(path, f"image {path}", "RGB", (image_size, image_size)))
            labels.append(label)
            paths.append(str(path))
    if not images:
        raise LtexpError(f"{split_dir} holds no images (allowed: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return np.stack(images), np.asarray(labels, dtype=np.int64), class_names, tuple(paths)


def load_folder_source(path: str | Path, image_size: int) -> ImageSource:
    """A user's images, `train/<class>/*` and `test/<class>/*`, resized to `image_size` squared RGB."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise LtexpError(f"folder data set {root} does not exist")
    train_images, train_labels, names, train_files = _read_folder_split(root / "train", image_size, None)
    # Accuracy over one class measures nothing, and a class the test split lacks cannot be scored
    # (its accuracy, its group's and the macro average would be undefined): refuse both up front.
    if len(names) < 2:
        raise LtexpError(f"folder data set {root} has only one class ({names[0]!r} in {root / 'train'}): "
                         f"a classifier needs at least 2 classes, one sub-folder each")
    test_images, test_labels, _, test_files = _read_folder_split(root / "test", image_size, names)
    untested = [name for name, n in zip(names, np.bincount(test_labels, minlength=len(names))) if n == 0]
    if untested:
        raise LtexpError(f"folder data set {root}: class {untested[0]!r} has training images but none in "
                         f"{root / 'test' / untested[0]}; every class needs test images to be evaluated"
                         + (f" ({len(untested)} classes lack them: {', '.join(map(repr, untested))})"
                            if len(untested) > 1 else ""))
    return ImageSource(f"folder:{root}", train_images, train_labels, test_images, test_labels, names,
                       balanced=False, train_files=train_files, test_files=test_files)


def _read_list_file(root: Path, listing: Path, image_size: int):
    """Images and labels of one split file (`relative/path label` per line, the format of the
    published ImageNet-LT, Places-LT and iNaturalist 2018 splits), checked line by line."""
    from ltexp.images import decode_image

    if not listing.is_file():
        raise LtexpError(f"split file {listing} does not exist")
    images, labels, paths = [], [], []
    with open(listing, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise LtexpError(f"{listing} line {number}: expected '<relative path> <label>', got {line.strip()!r}")
            label = int(parts[1])
            if label < 0:
                raise LtexpError(f"{listing} line {number}: label {label} is negative; labels are 0, 1, 2, ...")
            path = root / parts[0]
            if not path.is_file():
                raise LtexpError(f"{listing} line {number}: image {path} does not exist")
            images.append(decode_image(path, f"image {path} ({listing} line {number})", "RGB", (image_size, image_size)))
            labels.append(label)
            paths.append(str(path))
    if not images:
        raise LtexpError(f"split file {listing} lists no images")
    return np.stack(images), np.asarray(labels, dtype=np.int64), tuple(paths)


def load_list_source(spec: str, image_size: int) -> ImageSource:
    """`<root>:<train.txt>,<test.txt>`: images under `root` listed by split files (paths relative
    to `root`, or absolute), labels 0..K-1; class k is named `k`."""
    root_text, _, files = spec.rpartition(":")
    names = [f for f in files.split(",") if f]
    if not root_text or len(names) != 2:
        raise LtexpError(f"--dataset list:{spec}: give list:<root>:<train.txt>,<test.txt> (split files as "
                         f"'<relative path> <label>' lines)")
    root = Path(root_text).expanduser()
    if not root.is_dir():
        raise LtexpError(f"--dataset list:{spec}: image root {root} does not exist")
    train_list, test_list = (root / n if not Path(n).is_absolute() else Path(n) for n in names)
    train_images, train_labels, train_files = _read_list_file(root, train_list, image_size)
    test_images, test_labels, test_files = _read_list_file(root, test_list, image_size)
    k = int(train_labels.max()) + 1
    if test_labels.max() >= k:
        line = int(np.argmax(test_labels >= k))
        raise LtexpError(f"{test_list}: label {int(test_labels[line])} (image {test_files[line]}) is not a label of "
                         f"{train_list}, whose labels are 0..{k - 1}")
    counts = np.bincount(train_labels, minlength=k)
    if (counts == 0).any():
        empty = np.flatnonzero(counts == 0)
        raise LtexpError(f"{train_list}: class {int(empty[0])} has no training images (labels must be 0..{k - 1} "
                         f"without gaps; {len(empty)} are empty)")
    if k < 2:
        raise LtexpError(f"{train_list} has only one class: a classifier needs at least 2")
    untested = np.flatnonzero(np.bincount(test_labels, minlength=k) == 0)
    if len(untested):
        raise LtexpError(f"{test_list}: class {int(untested[0])} has no test images; every class needs test images "
                         f"to be evaluated ({len(untested)} lack them)")
    return ImageSource(f"list:{root}", train_images, train_labels, test_images, test_labels,
                       tuple(str(c) for c in range(k)), balanced=False, train_files=train_files, test_files=test_files)


# Named data sets; any other --dataset is a kind and its argument (`folder:<path>`, …).
DATASETS = ("digits", *CIFAR)
# Each kind's form and an example, for --help and for the line that refuses a --dataset.
KINDS = {"folder": ("folder:<path>", "folder:/data/my_images"),
         "list": ("list:<root>:<train.txt>,<test.txt>", "list:/data/ImageNet_LT:ImageNet_LT_train.txt,ImageNet_LT_test.txt"),
         "pack": ("pack:<file>", "pack:cifar10-lt.ltpack")}


@dataclass(frozen=True)
class DatasetSpec:
    """A parsed --dataset: `kind` is a named data set (`digits`, `cifar10`, `cifar100`) or
    `folder` / `list` / `pack`, `argument` what follows the colon ('' for a named one)."""

    kind: str
    argument: str = ""

    @property
    def location(self) -> str:
        """The folder or file the data set is named by: a folder's or a pack's path, a list data
        set's image root ('' for a named data set)."""
        return self.argument.rpartition(":")[0] if self.kind == "list" else self.argument

    @property
    def short_name(self) -> str:
        """The data set in a few characters, for run and model names: `cifar10`, `folder:<folder
        name>` (not its whole path), `list:<root's name>`, `pack:<file name without suffix>`."""
        if self.kind not in KINDS:
            return self.kind
        path = PurePath(self.location)
        return f"{self.kind}:" + ((path.stem if self.kind == "pack" else path.name) or str(path))


def parse_dataset(dataset: str) -> DatasetSpec:
    """`--dataset` parsed once for every user (the config, loading, run and model names); one
    `LtexpError` naming the value and what is allowed otherwise."""
    if dataset in DATASETS:
        return DatasetSpec(dataset)
    kind, colon, argument = dataset.partition(":")
    if not colon or kind not in KINDS:
        raise LtexpError(f"unknown --dataset {dataset!r}: allowed are {', '.join(DATASETS)}, "
                         + ", ".join(form for form, _ in list(KINDS.values())[:-1]) + f" or {KINDS['pack'][0]}")
    if not argument:
        raise LtexpError(f"--dataset {kind}: needs a path, e.g. {KINDS[kind][1]}")
    return DatasetSpec(kind, argument)


# How each kind of data set is read (a pack is read whole, long tail included: ltexp.data.build_dataset).
LOADERS = {
    "digits": lambda spec, data_dir, image_size, download: load_digits_source(),
    "cifar10": lambda spec, data_dir, image_size, download: load_cifar_source("cifar10", data_dir, download),
    "cifar100": lambda spec, data_dir, image_size, download: load_cifar_source("cifar100", data_dir, download),
    "folder": lambda spec, data_dir, image_size, download: load_folder_source(spec.argument, image_size),
    "list": lambda spec, data_dir, image_size, download: load_list_source(spec.argument, image_size),
}


def load_source(dataset: str, data_dir: str = "data", image_size: int = 32, download: bool = True) -> ImageSource:
    """The source a --dataset names (`digits`, `cifar10`, `cifar100`, `folder:<path>`, `list:…`)."""
    spec = parse_dataset(dataset)
    if spec.kind not in LOADERS:
        raise LtexpError(f"--dataset {dataset}: a pack is read whole, with its long tail (ltexp.data.build_dataset)")
    return LOADERS[spec.kind](spec, data_dir, image_size, download)
