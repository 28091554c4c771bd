"""Shared fixtures: generated CIFAR-format archives and a throw-away MLflow store per test."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
from glob import glob
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# Warnings a user cannot act on, which ltexp must not cause (checked in `mlflow run` output).
KNOWN_NOISE = ("Add type hints to the `predict` method", "unique value length is less than 2",
               "project.license` as a TOML table is deprecated", "Some regimes for parameter",
               "You need to set up the pruning feature")

# The CIFAR archives below are generated, not the published files: let ltexp read them (still with
# its arrays-only unpickler). Checkpoints of test runs go to a throw-away cache, not ~/.cache, and
# each xdist worker to its own folder in it (workers inherit the controller's LTEXP_CACHE).
os.environ["LTEXP_UNVERIFIED_CIFAR"] = "1"
if "LTEXP_CACHE" not in os.environ:
    os.environ["LTEXP_CACHE"] = tempfile.mkdtemp(prefix="ltexp-test-cache-")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["LTEXP_CACHE"] = os.path.join(os.environ["LTEXP_CACHE"], os.environ["PYTEST_XDIST_WORKER"])


def _split_threads_between_workers() -> None:
    """Under pytest-xdist (`-n N`), give each worker and the processes it starts an equal share of
    the CPUs (OMP_NUM_THREADS, which ltexp's thread rule and torch both read), unless the caller set
    a count: N workers each running torch on every core oversubscribe the machine (measured for
    issue 11: one batch 1.50 s with 2 threads vs 0.17 s with 1 while another job runs)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ or "LTEXP_THREADS" in os.environ:
        return
    from ltexp.threads import available_cpus

    share = max(1, available_cpus() // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    import torch

    torch.set_num_threads(share)


_split_threads_between_workers()


def file_size_limit(n: int):
    """A subprocess `preexec_fn`: no file of the process can grow past `n` bytes (RLIMIT_FSIZE),
    a full disk for every write beyond. SIGXFSZ is ignored, so such a write fails with EFBIG
    ("File too large") instead of killing the process."""
    import resource
    import signal

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))

    return limit


def write_image_folder(root: Path, train_per_class: int, test_per_class: int, size: int = 20, seed: int = 0) -> Path:
    """Write a `folder:` data set of three classes a, b, c (`root/{train,test}/<class>/<i>.png`),
    each a mean grey level plus noise, so a model can learn it. Returns `root`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for k, name in enumerate(("a", "b", "c")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(60 + 70 * k, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid black 1-bit PNG of width x height pixels (20000 x 20000: 400 million, over twice
    PIL's default limit), compressed to ~50 KB: a decompression bomb, written directly with zlib
    because PIL itself takes seconds to encode one."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then 8 pixels a byte
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def write_cifar_archive(root: Path, name: str, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """Write a small archive in the official python format (torchvision's folder layout).

    Pixel content encodes the class (a per-class mean colour plus noise) so a model can learn it.
    Returns the folder that was written (`root/cifar-10-batches-py` or `root/cifar-100-python`).
    """
    rng = np.random.default_rng(seed)
    k = 10 if name == "cifar10" else 100

    def make(per_class):
        labels = np.repeat(np.arange(k), per_class)
        rng.shuffle(labels)
        base = rng.integers(0, 256, size=(k, 3, 1, 1))
        # np.clip(base[labels] + rng.normal(0, 20, (n, 3, 32, 32)), 0, 255) as uint8, drawn and
        # clipped a block of images at a time (the same values): a full-size CIFAR-10 set at once
        # is 1.2 GB of float64 temporaries, most of its cost.
        images = np.empty((len(labels), 3, 32, 32), np.uint8)
        for start in range(0, len(labels), 2048):
            block = rng.normal(0, 20, size=(len(labels[start:start + 2048]), 3, 32, 32))
            block += base[labels[start:start + 2048]]
            images[start:start + 2048] = np.clip(block, 0, 255, out=block)
        return images.reshape(len(labels), 3072), labels.tolist()

    def dump(path, obj):
        with open(path, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)

    if name == "cifar10":
        folder = root / "cifar-10-batches-py"
        folder.mkdir(parents=True, exist_ok=True)
        data, labels = make(train_per_class)
        for i, chunk in enumerate(np.array_split(np.arange(len(labels)), 5), start=1):
            dump(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5",
                                             "data": data[chunk], "labels": [labels[j] for j in chunk]})
        data, labels = make(test_per_class)
        dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "data": data, "labels": labels})
        dump(folder / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog",
                                                       "frog", "horse", "ship", "truck"], "num_vis": 3072})
    else:
        folder = root / "cifar-100-python"
        folder.mkdir(parents=True, exist_ok=True)
        for split, per_class in (("train", train_per_class), ("test", test_per_class)):
            data, labels = make(per_class)
            dump(folder / split, {"data": data, "fine_labels": labels, "coarse_labels": [lab // 5 for lab in labels]})
        dump(folder / "meta", {"fine_label_names": [f"class_{i:02d}" for i in range(100)],
                               "coarse_label_names": [f"super_{i:02d}" for i in range(20)]})
    return folder


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store, made once per session by a real MLflow (with ltexp's SQLite
    settings) in its own folder: `mlflow_store` copies it. MLflow makes a new store by running its
    schema migrations, ~0.8 s of CPU in whichever process opens it first, once per test."""
    folder = tmp_path_factory.mktemp("store-template")
    code = ("import sys, ltexp.tracking; from mlflow.tracking import MlflowClient; "
            "MlflowClient(tracking_uri=sys.argv[1]).search_experiments()")
    subprocess.run([sys.executable, "-c", code, f"sqlite:///{folder / 'mlflow.db'}"], cwd=folder, check=True,
                   capture_output=True, timeout=300)
    with contextlib.closing(sqlite3.connect(folder / "mlflow.db")) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file: it is copied alone
    return folder


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, request, store_template):
    """A new sqlite tracking store (a copy of `store_template`); the test runs in tmp_path.

    A test marked `fresh_store` gets no copy: the store is made by whatever opens it first."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    if request.node.get_closest_marker("fresh_store") is None:
        shutil.copyfile(store_template / "mlflow.db", tmp_path / "mlflow.db")
        # The Default experiment's artifact location is absolute, under the folder the store was
        # made in: here, as if made in tmp_path.
        with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as conn, conn:
            conn.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?) "
                         "WHERE experiment_id = 0", (str(store_template), str(tmp_path)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_experiment() exports MLFLOW_EXPERIMENT_ID; an id from another test's store must
    # not leak into this one (or into the subprocesses it starts).
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    import mlflow
    from mlflow.tracking import fluent

    mlflow.set_tracking_uri(uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", None)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def subprocess_env(mlflow_store):
    """Environment for CLI subprocesses: the test's store, this interpreter's bin on PATH."""
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = mlflow_store
    env["PATH"] = f"{Path(os.sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(name, None)
    return env


# A throw-away PostgreSQL cluster on a loopback port (tests/test_postgres.py, tests/test_grid.py).
def _pg_bin() -> Path | None:
    found = sorted(glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    if os.environ.get("LTEXP_TEST_POSTGRES_URL"):
        yield os.environ["LTEXP_TEST_POSTGRES_URL"]
        return
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql; .ci/run does)")
    data = Path(tempfile.mkdtemp(prefix="ltexp-pg-"))
    as_user = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use the packages' postgres user
        shutil.chown(data, "postgres")
        data.chmod(0o700)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    subprocess.run([*as_user, str(pg_bin / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-w", "-l", str(data / "log"),
                    "-o", f"-p {port} -h 127.0.0.1 -k {data}", "start"], check=True, capture_output=True)
    try:
        for db in ("mlflow", "optuna"):
            subprocess.run([str(pg_bin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db],
                           check=True, capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(pg_bin / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(data, ignore_errors=True)


# Fixtures that start real processes, stores or servers: a test that uses one is end to end.
E2E_FIXTURES = {"subprocess_env", "mlflow_store", "stack", "env", "postgres_url"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that uses a store, a server or a subprocess as `e2e`, so
    `pytest -m "not e2e"` runs the quick unit tests alone."""
    for item in items:
        if E2E_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
