"""Benchmark: ltexp's on-device uint8 data pipeline versus a torchvision DataLoader + PIL pipeline.

Both pipelines serve the same synthetic training set: random uint8 images in CIFAR format
(32x32x3, 10 classes) with the per-class counts of long-tailed CIFAR-10 at exp imbalance 0.1
(`long_tail_counts(5000, 10, "exp", 0.1)`, 20,431 images; real CIFAR is not needed), the same
augmentation (RandomCrop(32, padding=4) + RandomHorizontalFlip) and the same model.

- ltexp: the uint8 set lives on the training device (`DeviceImages`); one epoch is an index
  tensor from `build_sampler("instance")`, then per batch a gather and `CropFlip`, all on the
  device. Normalisation happens inside the model (`Classifier`).
- torchvision: a `Dataset` over the same uint8 numpy array returning PIL images through
  `Compose([RandomCrop(32, padding=4), RandomHorizontalFlip(), PILToTensor()])`, iterated by
  `DataLoader(shuffle=True, batch_size, num_workers)`, each batch moved to the device
  (pinned memory + non_blocking copies on CUDA).

What it prints:

1. Pipeline only (no model): images/s of producing augmented uint8 batches on the device for one
   epoch; after one untimed warm-up epoch, `--repeats` epochs are timed and the median is shown.
   The DataLoader's first batch (worker start-up) is timed separately and left out of its
   steady-state rate; ltexp's rate includes drawing the epoch's sampler indices. Target: ratio
   ltexp / torchvision >= 5.
2. End to end: images/s of SGD training steps (forward, cross-entropy, backward, step) with the
   same model and initial weights, for the same number of steps, after a few warm-up steps.
   Both take `ltexp.engine.train_step` (on CUDA: bf16 autocast, channels_last; fused SGD, cudnn.benchmark);
   CPU runs fp32. Images/s is over all timed steps; on CPU the min / median / max step time is
   shown too, to spot a noisy neighbour. Target: ratio >= 1.0.
3. Memory: device bytes of the uint8 training set (`DeviceImages.nbytes`) versus its uint8 numpy
   size (target: no more), peak RSS (`resource.getrusage`) of each pipeline's process, the
   private memory of the DataLoader workers (Linux; their RSS would count pages shared with the
   parent), and `torch.cuda.max_memory_allocated` on CUDA.

Each pipeline runs in its own fresh Python process (this script re-invoking itself), so a peak
RSS or peak CUDA allocation belongs to that pipeline alone.

Run from the repository root:

    python bench/pipeline.py                              # defaults: all 20,431 images, resnet18
    python bench/pipeline.py --device cuda --steps 50     # on a GPU, longer timing
    python bench/pipeline.py --arch resnet32 --images 5000 --json

Numbers on a shared or small CPU are noisy; compare runs on the same machine only. On CPU the
ltexp pipeline runs in torch's intra-op threads: if another process keeps a core busy, fewer
threads (`--threads 1`) can be much faster than the default of one per core.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.data
import torchvision
from PIL import Image
from torchvision import transforms

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python bench/pipeline.py` puts bench/, not the root, on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from ltexp import LtexpError, engine  # noqa: E402
from ltexp.data.device import DeviceImages, build_augment  # noqa: E402
from ltexp.data.longtail import long_tail_counts  # noqa: E402
from ltexp.data.sampling import build_sampler  # noqa: E402
from ltexp.engine import resolve_device  # noqa: E402
from ltexp.models import build_model, channel_stats  # noqa: E402

# The data set's shape: long-tailed CIFAR-10, exp profile, imbalance factor 0.1.
NUM_CLASSES = 10
IMAGES_PER_CLASS_MAX = 5000
IMB_TYPE, IMB_FACTOR = "exp", 0.1
IMAGE_SHAPE_HWC = (32, 32, 3)
DATA_SEED = 0
MODEL_SEED = 0
# Mean / std are computed on this many images: float64 stats over the whole set would add a
# ~500 MB transient to the peak RSS this script reports (and the data are uniform noise anyway).
STATS_SAMPLE = 2048
# SGD settings of the CIFAR recipe (the speed does not depend on them).
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 2e-4

TARGET_PIPELINE_RATIO = 5.0   # ltexp images/s / torchvision images/s, pipeline only
TARGET_TRAINING_RATIO = 1.0   # same, end-to-end training
RESULT_PREFIX = "BENCH_RESULT "
MIB = 2 ** 20


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ltexp on-device uint8 pipeline vs torchvision DataLoader + PIL.")
    parser.add_argument("--images", type=int, default=None,
                        help="cap on the number of training images (default: all 20,431)")
    parser.add_argument("--arch", default="resnet18", choices=["resnet18", "resnet32", "smallcnn"],
                        help="model (default: resnet18)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps per pipeline (default: 10 on CPU, 50 on a GPU)")
    parser.add_argument("--warmup-steps", type=int, default=None,
                        help="untimed training steps first (default: 2 on CPU, 5 on a GPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                        help="training device (default: auto = CUDA if present, else MPS, else CPU)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (default: 2)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in both pipeline processes (default: torch's own, "
                             "usually the core count)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed pipeline-only epochs per pipeline; the median is reported (default: 3)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line with every number")
    # Internal: run one pipeline in this process and print its numbers as one JSON line.
    parser.add_argument("--pipeline", choices=["ltexp", "torchvision"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    too_small = (args.batch_size < 1 or args.repeats < 1 or args.workers < 0
                 or (args.threads is not None and args.threads < 1)
                 or (args.steps is not None and args.steps < 1)
                 or (args.warmup_steps is not None and args.warmup_steps < 0))
    if too_small:
        parser.error("--batch-size, --repeats, --threads and --steps must be >= 1, "
                     "--workers and --warmup-steps >= 0")
    return args


# --------------------------------------------------------------------------------------------
# Helpers shared by both pipelines (run inside a pipeline's own process)
# --------------------------------------------------------------------------------------------

def synchronize(device) -> None:
    """Wait for queued device work, so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def median_epoch(epochs: list[dict]) -> dict:
    """The epoch with the median images/s (robust to a noisy neighbour), plus every epoch's rate."""
    ranked = sorted(epochs, key=lambda epoch: epoch["pipeline_images_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["pipeline_images_per_s_all"] = [epoch["pipeline_images_per_s"] for epoch in epochs]
    return chosen


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (getrusage RUSAGE_SELF)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def make_synthetic_data(max_images):
    """Random uint8 NHWC images with long-tailed CIFAR-10 exp 0.1 labels (seeded, identical in
    both pipeline processes). A cap keeps a seeded random subset, so the long tail survives."""
    counts = long_tail_counts(IMAGES_PER_CLASS_MAX, NUM_CLASSES, IMB_TYPE, IMB_FACTOR)
    labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int64), counts)
    rng = np.random.default_rng(DATA_SEED)
    if max_images is not None and max_images < len(labels):
        labels = np.sort(rng.permutation(labels)[:max_images])
    images = rng.integers(0, 256, size=(len(labels), *IMAGE_SHAPE_HWC), dtype=np.uint8)
    return images, labels, counts


def device_description(device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    if device.type == "mps":
        return "mps (Apple GPU)"
    cpu_name = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu_name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({cpu_name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def train_step(model, optimizer, images, labels, device):
    """One SGD step with cross-entropy: `ltexp.engine.train_step` (channels_last + bf16 autocast
    on CUDA, fp32 elsewhere). `device` is the images' own; kept for the callers' signature."""
    return engine.train_step(model, optimizer, images, labels, F.cross_entropy)[0]


def time_training(model, optimizer, batch_stream, device, warmup_steps: int, steps: int) -> dict:
    """Run `warmup_steps` untimed then `steps` timed training steps fed by `batch_stream`."""
    images_seen = 0
    loss = None
    for _ in range(warmup_steps):
        images, labels = next(batch_stream)
        loss = train_step(model, optimizer, images, labels, device)
    synchronize(device)
    started = time.perf_counter()
    step_ends = []  # perf_counter seconds after each step; per-step times mean something on CPU only
    for _ in range(steps):
        images, labels = next(batch_stream)
        loss = train_step(model, optimizer, images, labels, device)
        images_seen += labels.shape[0]
        step_ends.append(time.perf_counter())
    final_loss = float(loss)  # reads the last loss: one host sync
    synchronize(device)
    seconds = time.perf_counter() - started
    result = {"train_steps": steps, "train_images": images_seen, "train_seconds": seconds,
              "train_images_per_s": images_seen / seconds, "train_ms_per_step": 1000 * seconds / steps,
              "train_final_loss": final_loss}
    if device.type == "cpu":  # CPU steps are synchronous, so each one's wall time is real
        step_ms = sorted(1000 * (end - begin) for begin, end in zip([started, *step_ends], step_ends))
        result["train_step_ms_median"] = step_ms[(len(step_ms) - 1) // 2]
        result["train_step_ms_min"], result["train_step_ms_max"] = step_ms[0], step_ms[-1]
    return result


def build_model_and_optimizer(arch: str, images_nhwc, device):
    """The same model, initial weights and optimizer in both processes (seeded)."""
    mean, std = channel_stats(images_nhwc[:STATS_SAMPLE])
    torch.manual_seed(MODEL_SEED)
    model = build_model(arch, IMAGE_SHAPE_HWC, NUM_CLASSES, mean, std).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM,
                                weight_decay=WEIGHT_DECAY, fused=device.type == "cuda" or None)
    return model, optimizer


def check_batch(images, labels, batch_size: int, device) -> None:
    """Both pipelines must hand the model the same thing: uint8 (B, 3, 32, 32) + int64 labels on the device."""
    height, width, channels = IMAGE_SHAPE_HWC
    assert images.dtype == torch.uint8 and tuple(images.shape[1:]) == (channels, height, width), images.shape
    assert images.shape[0] <= batch_size and labels.dtype == torch.int64 and labels.shape[0] == images.shape[0]
    assert images.device.type == device.type and labels.device.type == device.type


# --------------------------------------------------------------------------------------------
# ltexp: uint8 on the device, sampler indices + gather + CropFlip per batch
# --------------------------------------------------------------------------------------------

def ltexp_epoch(train, sampler, augment, generator, batch_size: int, drop_last: bool):
    """Yield one epoch of (augmented uint8 images, labels) batches, all made on the device."""
    order = sampler(train.labels, NUM_CLASSES, generator)                # (N,) int64 indices
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        yield augment(train.images[index], generator), train.labels[index]


def ltexp_forever(train, sampler, augment, generator, batch_size: int):
    while True:  # a new sampler draw per epoch, like the engine
        yield from ltexp_epoch(train, sampler, augment, generator, batch_size, drop_last=True)


def time_ltexp_epoch(train, sampler, augment, generator, batch_size: int, device) -> dict:
    """Make one epoch of augmented batches on the device, consuming nothing; seconds and images/s."""
    images_made = 0
    synchronize(device)
    started = time.perf_counter()
    for _, batch_labels in ltexp_epoch(train, sampler, augment, generator, batch_size, drop_last=False):
        images_made += batch_labels.shape[0]
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"pipeline_images": images_made, "pipeline_epoch_seconds": seconds, "pipeline_steady_seconds": seconds,
            "pipeline_first_batch_seconds": 0.0, "pipeline_images_per_s": images_made / seconds}


def run_ltexp(args, device) -> dict:
    result: dict = {}
    images_nhwc, labels, _ = make_synthetic_data(args.images)
    numpy_bytes = images_nhwc.nbytes + labels.nbytes  # uint8 images + int64 labels, as DeviceImages.nbytes counts
    model, optimizer = build_model_and_optimizer(args.arch, images_nhwc, device)

    allocated_before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    train = DeviceImages.from_numpy(images_nhwc, labels, device)
    synchronize(device)
    if device.type == "cuda":
        result["cuda_train_set_allocated_bytes"] = torch.cuda.memory_allocated(device) - allocated_before
    del images_nhwc  # the host copy is no longer needed: training reads the device copy only
    result.update({"num_images": len(labels), "train_set_device_bytes": train.nbytes,
                   "train_set_numpy_bytes": numpy_bytes,
                   "train_set_image_device_bytes": train.images.numel() * train.images.element_size()})

    sampler = build_sampler("instance")
    augment = build_augment("crop_flip", IMAGE_SHAPE_HWC[0])
    generator = torch.Generator(device=device)
    generator.manual_seed(DATA_SEED)

    # 1. Pipeline only: an untimed warm-up epoch (kernels, allocator), then `--repeats` timed epochs.
    first_images, first_labels = next(ltexp_epoch(train, sampler, augment, generator, args.batch_size, False))
    check_batch(first_images, first_labels, args.batch_size, device)
    del first_images, first_labels
    time_ltexp_epoch(train, sampler, augment, generator, args.batch_size, device)
    result.update(median_epoch([time_ltexp_epoch(train, sampler, augment, generator, args.batch_size, device)
                                for _ in range(args.repeats)]))

    # 2. End to end training.
    stream = ltexp_forever(train, sampler, augment, generator, args.batch_size)
    result.update(time_training(model, optimizer, stream, device, args.warmup_steps, args.steps))
    stream.close()
    return result


# --------------------------------------------------------------------------------------------
# torchvision: numpy uint8 -> PIL -> transforms in DataLoader workers -> batch copied to device
# --------------------------------------------------------------------------------------------

class PilCifarDataset(torch.utils.data.Dataset):
    """A map-style `torch.utils.data.Dataset` over uint8 NHWC numpy images: PIL image -> transform."""

    def __init__(self, images_nhwc, labels, transform):
        self.images_nhwc = images_nhwc
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images_nhwc[index])), int(self.labels[index])


def torchvision_loader(dataset, args, device, drop_last: bool):
    pin = device.type == "cuda"  # the usual recipe: pinned host batches, asynchronous copies
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.workers,
                      pin_memory=pin, drop_last=drop_last)


def to_device(batch, device):
    images, labels = batch
    non_blocking = device.type == "cuda"
    return images.to(device, non_blocking=non_blocking), labels.to(device, non_blocking=non_blocking)


def torchvision_forever(loader, device):
    while True:  # a fresh epoch (and fresh workers, the DataLoader default) when one runs out
        for batch in loader:
            yield to_device(batch, device)


def private_bytes(pid: int) -> int | None:
    """Memory only this process holds (USS: private clean + dirty pages), Linux only.

    A forked DataLoader worker shares the parent's pages, so its RSS (and getrusage's
    RUSAGE_CHILDREN, which also inherits the parent's high-water mark at fork) says little
    about what the worker itself costs; its private pages do."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            fields = dict(line.split(":", 1) for line in rollup if line.startswith("Private_"))
    except OSError:
        return None
    return sum(int(value.split()[0]) for value in fields.values()) * 1024  # kB -> bytes


def time_torchvision_epoch(loader, device, batch_size: int) -> dict:
    """Iterate one epoch of the DataLoader, moving every batch to the device; seconds and images/s."""
    started = time.perf_counter()
    batches = iter(loader)  # starts the workers
    first_images, first_labels = to_device(next(batches), device)
    synchronize(device)
    first_batch_done = time.perf_counter()
    check_batch(first_images, first_labels, batch_size, device)
    images_after_first = 0
    for _ in range(len(loader) - 1):  # not `for batch in batches`: StopIteration would stop the workers
        batch_images, batch_labels = to_device(next(batches), device)
        images_after_first += batch_labels.shape[0]
    synchronize(device)
    finished = time.perf_counter()
    # The workers are still alive (the iterator has not hit StopIteration): measure them now.
    worker_private = [private_bytes(worker.pid) for worker in getattr(batches, "_workers", [])]
    del batches  # shuts the workers down
    steady_seconds = finished - first_batch_done
    return {"pipeline_images": first_labels.shape[0] + images_after_first,
            "pipeline_epoch_seconds": finished - started, "pipeline_steady_seconds": steady_seconds,
            "pipeline_first_batch_seconds": first_batch_done - started,
            "pipeline_images_per_s": images_after_first / steady_seconds if images_after_first else float("nan"),
            "worker_private_bytes": worker_private}


def run_torchvision(args, device) -> dict:
    result: dict = {}
    images_nhwc, labels, _ = make_synthetic_data(args.images)
    model, optimizer = build_model_and_optimizer(args.arch, images_nhwc, device)
    transform = transforms.Compose([transforms.RandomCrop(IMAGE_SHAPE_HWC[0], padding=4),
                                    transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    dataset = PilCifarDataset(images_nhwc, labels, transform)
    torch.manual_seed(DATA_SEED)  # DataLoader shuffle and the transforms' randomness
    result.update({"num_images": len(labels), "train_set_device_bytes": 0,
                   "train_set_numpy_bytes": images_nhwc.nbytes + labels.nbytes})

    # 1. Pipeline only: an untimed warm-up epoch, then `--repeats` timed epochs. Each epoch starts fresh
    # workers (the DataLoader default); the first batch, which pays for that, is timed separately
    # and left out of the steady-state rate.
    loader = torchvision_loader(dataset, args, device, drop_last=False)
    time_torchvision_epoch(loader, device, args.batch_size)
    result.update(median_epoch([time_torchvision_epoch(loader, device, args.batch_size)
                                for _ in range(args.repeats)]))

    # 2. End to end training (warm-up steps also start the workers).
    stream = torchvision_forever(torchvision_loader(dataset, args, device, drop_last=True), device)
    result.update(time_training(model, optimizer, stream, device, args.warmup_steps, args.steps))
    stream.close()  # ends the loader iteration: workers are shut down and joined
    return result


# --------------------------------------------------------------------------------------------
# One pipeline in this process
# --------------------------------------------------------------------------------------------

def run_one_pipeline(args) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)  # DataLoader workers still use 1 thread each (torch's default)
    device = resolve_device(args.device)
    on_gpu = device.type != "cpu"
    args.steps = args.steps if args.steps is not None else (50 if on_gpu else 10)
    args.warmup_steps = args.warmup_steps if args.warmup_steps is not None else (5 if on_gpu else 2)
    if args.images is not None and args.images < args.batch_size:
        raise SystemExit(f"--images {args.images} is smaller than --batch-size {args.batch_size}: "
                         "training needs at least one full batch")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss_after_imports = peak_rss_bytes()

    run = run_ltexp if args.pipeline == "ltexp" else run_torchvision
    result = run(args, device)
    gc.collect()

    result.update({
        "pipeline": args.pipeline,
        "device": device.type,
        "device_name": device_description(device),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "dataloader_start_method": torch.multiprocessing.get_start_method(),
        "arch": args.arch, "batch_size": args.batch_size, "workers": args.workers, "repeats": args.repeats,
        "warmup_steps": args.warmup_steps,
        "peak_rss_bytes": peak_rss_bytes(),
        "rss_after_imports_bytes": rss_after_imports,
    })
    if device.type == "cuda":
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return result


def run_in_subprocess(pipeline: str, argv: list[str]) -> dict:
    """Re-run this script for one pipeline in a fresh process, so its peak memory is its own."""
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--pipeline", pipeline]
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        sys.stdout.write(completed.stdout)
        raise SystemExit(f"the {pipeline} pipeline process failed (exit code {completed.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def print_report(ltexp: dict, tv: dict, wall_seconds: float) -> dict:
    pipeline_ratio = ltexp["pipeline_images_per_s"] / tv["pipeline_images_per_s"]
    training_ratio = ltexp["train_images_per_s"] / tv["train_images_per_s"]
    memory_ratio = ltexp["train_set_device_bytes"] / ltexp["train_set_numpy_bytes"]

    worker_private = [b for b in tv.get("worker_private_bytes", []) if b is not None]
    workers_private = f"{sum(worker_private) / MIB:,.1f}" if worker_private else "-"

    def step_spread(result):
        return "/".join(f"{result[key]:.0f}" for key in ("train_step_ms_min", "train_step_ms_median",
                                                           "train_step_ms_max"))

    def mib(value):
        return "-" if value is None else f"{value / MIB:,.1f}"

    rows = [
        # (label, ltexp, torchvision, ratio, target)
        (f"1. pipeline only, images/s (median of {ltexp['repeats']})", f"{ltexp['pipeline_images_per_s']:,.0f}",
         f"{tv['pipeline_images_per_s']:,.0f}", f"{pipeline_ratio:,.1f}x",
         f">= {TARGET_PIPELINE_RATIO:g}x  {verdict(pipeline_ratio >= TARGET_PIPELINE_RATIO)}"),
        ("   that epoch incl. start-up, s", f"{ltexp['pipeline_epoch_seconds']:.2f}",
         f"{tv['pipeline_epoch_seconds']:.2f}", "", ""),
        ("   first batch (worker start-up), s", "-", f"{tv['pipeline_first_batch_seconds']:.2f}", "", ""),
        (f"2. end to end, images/s ({ltexp['train_steps']} steps)", f"{ltexp['train_images_per_s']:,.1f}",
         f"{tv['train_images_per_s']:,.1f}", f"{training_ratio:.2f}x",
         f">= {TARGET_TRAINING_RATIO:g}x  {verdict(training_ratio >= TARGET_TRAINING_RATIO)}"),
        ("   time per training step (mean), ms", f"{ltexp['train_ms_per_step']:,.0f}",
         f"{tv['train_ms_per_step']:,.0f}", "", ""),
    ]
    if "train_step_ms_median" in ltexp:
        median_ratio = tv["train_step_ms_median"] / ltexp["train_step_ms_median"]  # = images/s ratio of medians
        rows.append(("   step min / median / max, ms", step_spread(ltexp), step_spread(tv),
                     f"{median_ratio:.2f}x", "(ratio of medians)"))
    rows += [
        ("3. training set on the device, MiB", mib(ltexp["train_set_device_bytes"]), "0 (host)",
         f"{memory_ratio:.2f}x", f"<= 1x uint8  {verdict(memory_ratio <= 1.0)}"),
        ("   same set as uint8 numpy (+labels), MiB", mib(ltexp["train_set_numpy_bytes"]),
         mib(tv["train_set_numpy_bytes"]), "", ""),
    ]
    if "cuda_train_set_allocated_bytes" in ltexp:
        rows.append(("   CUDA allocated by the set, MiB", mib(ltexp["cuda_train_set_allocated_bytes"]), "-", "", ""))
    rows += [
        ("   peak RSS, main process, MiB", mib(ltexp["peak_rss_bytes"]), mib(tv["peak_rss_bytes"]), "", ""),
        ("   (RSS after imports, MiB)", mib(ltexp["rss_after_imports_bytes"]),
         mib(tv["rss_after_imports_bytes"]), "", ""),
        ("   DataLoader workers, private MiB", "-", workers_private, "", ""),
    ]
    if "cuda_max_allocated_bytes" in ltexp:
        rows.append(("   CUDA max allocated, MiB", mib(ltexp["cuda_max_allocated_bytes"]),
                     mib(tv["cuda_max_allocated_bytes"]), "", ""))

    print("ltexp on-device uint8 pipeline vs torchvision DataLoader + PIL transforms")
    print(f"device: {ltexp['device_name']}")
    print(f"torch {ltexp['torch_version']} | torchvision {ltexp['torchvision_version']} | "
          f"numpy {ltexp['numpy_version']} | python {ltexp['python_version']}")
    print(f"data: {ltexp['num_images']:,} synthetic uint8 images 32x32x3, {NUM_CLASSES} classes "
          f"(long-tailed CIFAR-10 {IMB_TYPE} {IMB_FACTOR} counts) | augment RandomCrop(32, padding=4) + flip")
    print(f"model: {ltexp['arch']} | batch {ltexp['batch_size']} | {ltexp['warmup_steps']} warm-up + "
          f"{ltexp['train_steps']} timed steps | DataLoader workers {tv['workers']} "
          f"({tv['dataloader_start_method']}), shuffle=True"
          + (", pin_memory" if ltexp["device"] == "cuda" else ""))
    print()
    widths = (42, 14, 16, 8, 20)
    header = ("", "ltexp", "torchvision", "ratio", "target")
    print(f"{header[0]:<{widths[0]}}{header[1]:>{widths[1]}}{header[2]:>{widths[2]}}"
          f"{header[3]:>{widths[3]}}  {header[4]}")
    for label, a, b, ratio, target in rows:
        print(f"{label:<{widths[0]}}{a:>{widths[1]}}{b:>{widths[2]}}{ratio:>{widths[3]}}  {target}")
    print()
    print("ratios are ltexp / torchvision (memory: device bytes / uint8 numpy bytes); each pipeline ran in its "
          f"own process; total wall time {wall_seconds:.0f} s")
    return {"pipeline_ratio": pipeline_ratio, "training_ratio": training_ratio, "memory_ratio": memory_ratio,
            "training_ratio_of_median_steps": (tv["train_step_ms_median"] / ltexp["train_step_ms_median"]
                                               if "train_step_ms_median" in ltexp else None),
            "targets": {"pipeline_ratio_min": TARGET_PIPELINE_RATIO, "training_ratio_min": TARGET_TRAINING_RATIO,
                        "memory_ratio_max": 1.0},
            "pass": {"pipeline": pipeline_ratio >= TARGET_PIPELINE_RATIO,
                     "training": training_ratio >= TARGET_TRAINING_RATIO, "memory": memory_ratio <= 1.0}}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.pipeline is not None:  # internal: one pipeline, numbers as one JSON line
        try:
            print(RESULT_PREFIX + json.dumps(run_one_pipeline(args)), flush=True)
        except LtexpError as error:  # e.g. --device cuda without CUDA: one line, no traceback
            raise SystemExit(f"pipeline.py: error: {error}") from None
        return
    started = time.perf_counter()
    results = {name: run_in_subprocess(name, argv) for name in ("ltexp", "torchvision")}
    summary = print_report(results["ltexp"], results["torchvision"], time.perf_counter() - started)
    if args.json:
        print(json.dumps({**results, **summary, "wall_seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main()
