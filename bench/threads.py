"""CPU training speed by torch thread count, alone and beside competing CPU-bound processes.

Why: torch starts one intra-op thread per core; when another job keeps a core busy, the threads
wait for each other at every parallel region, and a step can get many times slower than with
fewer threads (`ltexp.threads` chooses the count; `--threads` / `LTEXP_THREADS` split cores
between workers).

For each number of competing processes (`--compete`, each a pure-Python busy loop) and each
thread count (`--threads`), it times `--steps` training steps (after `--warmup`) of the same model
on ltexp's device pipeline (bench/pipeline.py's synthetic CIFAR-shaped set, `ltexp_forever`,
`time_training`) and prints images/s and the median step time; `--json` adds one JSON line.

    python bench/threads.py                            # resnet32, batch 128, threads 1,2, compete 0,1
    python bench/threads.py --arch resnet18 --threads 1,2,4 --compete 0,1,2

Numbers depend on what else runs on the machine: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

import torch

BENCH_DIR = Path(__file__).resolve().parent
for path in (BENCH_DIR.parent, BENCH_DIR):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pipeline  # noqa: E402
from ltexp.data.device import DeviceImages, build_augment  # noqa: E402
from ltexp.data.sampling import build_sampler  # noqa: E402


def busy_loop() -> None:
    """A competing CPU-bound job: one core's worth of pure-Python work until terminated."""
    x = 0
    while True:
        x = (x + 1) % 1_000_003


def measure(arch: str, batch: int, threads: int, warmup: int, steps: int, images) -> dict:
    torch.set_num_threads(threads)
    images_nhwc, labels = images
    model, optimizer = pipeline.build_model_and_optimizer(arch, images_nhwc, torch.device("cpu"))
    train = DeviceImages.from_numpy(images_nhwc, labels, "cpu")
    generator = torch.Generator()
    generator.manual_seed(0)
    stream = pipeline.ltexp_forever(train, build_sampler("instance"), build_augment("crop_flip", 32), generator, batch)
    result = pipeline.time_training(model, optimizer, stream, torch.device("cpu"), warmup, steps)
    stream.close()
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="CPU img/s by torch thread count, with competing processes.")
    parser.add_argument("--arch", default="resnet32", choices=["resnet18", "resnet32", "smallcnn"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts (default: 1,2)")
    parser.add_argument("--compete", default="0,1", help="comma-separated numbers of busy processes (default: 0,1)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    images_nhwc, labels, _ = pipeline.make_synthetic_data(max(2048, 4 * args.batch_size))
    rows = []
    print(f"{args.arch}, batch {args.batch_size}, {args.steps} timed steps; CPUs available: "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'competing':>10} {'threads':>8} {'images/s':>10} {'median step ms':>15} {'max step ms':>12}")
    for compete in [int(c) for c in args.compete.split(",")]:
        rivals = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(compete)]
        for rival in rivals:
            rival.start()
        time.sleep(0.5 if rivals else 0)  # let the rivals get going
        try:
            for threads in [int(t) for t in args.threads.split(",")]:
                r = measure(args.arch, args.batch_size, threads, args.warmup, args.steps, (images_nhwc, labels))
                row = {"competing": compete, "threads": threads, "images_per_s": r["train_images_per_s"],
                       "step_ms_median": r["train_step_ms_median"], "step_ms_max": r["train_step_ms_max"]}
                rows.append(row)
                print(f"{compete:>10} {threads:>8} {row['images_per_s']:>10.1f} {row['step_ms_median']:>15.0f} "
                      f"{row['step_ms_max']:>12.0f}", flush=True)
        finally:
            for rival in rivals:
                rival.terminate()
                rival.join()
    if args.json:
        print(json.dumps({"arch": args.arch, "batch": args.batch_size, "rows": rows}))
    return rows


if __name__ == "__main__":
    main()
