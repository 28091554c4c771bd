"""CPU training speed by torch thread count, alone and beside competing CPU-bound processes.

Why: torch starts one intra-op thread per core; when another job keeps a core busy, the threads
wait for each other at every parallel region, and a step can get many times slower than with
fewer threads (`ltexp.threads` chooses the count; `--threads` / `LTEXP_THREADS` split cores
between workers).

For each number of competing processes (`--compete`, each a pure-Python busy loop) and each
thread count (`--threads`), it times `--steps` training steps (after `--warmup`) of the same model
on ltexp's device pipeline (bench/pipeline.py's synthetic CIFAR-shaped set, `ltexp_forever`,
`time_training`) and prints images/s and the median step time; `--json` adds one JSON line.

    python bench/threads.py                    # resnet32, batch 128, threads 1,2 and ltexp's default, compete 0,1
    python bench/threads.py --arch resnet18 --threads 1,2,4 --compete 0,1,2

`--experts T` instead compares two ways to train the two experts of a split on T threads: one
after the other with T torch threads each (what `ltexp train --method split` does), and both at
once from two Python threads with T/2 torch threads each (`torch.set_num_threads` is per process).
Each expert is its own model with its own batches; `--steps` timed steps each, `--repeat` times,
the two ways taking turns. It prints both walls and their ratio.

    python bench/threads.py --experts 2 --repeat 3     # the CPU side of "experts concurrently?"

Numbers depend on what else runs on the machine: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import threading
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
from ltexp.threads import resolve_threads  # noqa: E402


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


def expert_streams(arch: str, batch: int, images, experts: int = 2):
    """`experts` models (each seeded alike, as bench/pipeline.py builds them) with their own batch
    streams (seeds 0, 1, ...)."""
    images_nhwc, labels = images
    train = DeviceImages.from_numpy(images_nhwc, labels, "cpu")
    out = []
    for seed in range(experts):
        model, optimizer = pipeline.build_model_and_optimizer(arch, images_nhwc, torch.device("cpu"))
        generator = torch.Generator()
        generator.manual_seed(seed)
        out.append((model, optimizer, pipeline.ltexp_forever(train, build_sampler("instance"),
                                                              build_augment("crop_flip", 32), generator, batch)))
    return out


def measure_experts(arch: str, batch: int, threads: int, warmup: int, steps: int, images, concurrent: bool) -> float:
    """Wall seconds for two experts' `steps` steps each (after `warmup` untimed ones each): in turn
    on `threads` threads, or at once from two Python threads on `threads // 2` each (at least 1)."""
    torch.set_num_threads(max(1, threads // 2) if concurrent else threads)
    experts = expert_streams(arch, batch, images)
    device = torch.device("cpu")
    for model, optimizer, stream in experts:
        for _ in range(warmup):
            pipeline.train_step(model, optimizer, *next(stream), device)
    started = time.perf_counter()
    if concurrent:
        workers = [threading.Thread(target=pipeline.time_training, args=(model, optimizer, stream, device, 0, steps))
                   for model, optimizer, stream in experts]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    else:
        for model, optimizer, stream in experts:
            pipeline.time_training(model, optimizer, stream, device, 0, steps)
    seconds = time.perf_counter() - started
    for _, _, stream in experts:
        stream.close()
    return seconds


def main_experts(args, images) -> list[dict]:
    rows = []
    print(f"two experts, {args.arch}, batch {args.batch_size}, {args.steps} steps each, {args.experts} threads; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    for repeat in range(args.repeat):
        row = {"repeat": repeat, "threads": args.experts}
        for concurrent in (False, True):
            row["concurrent_s" if concurrent else "sequential_s"] = measure_experts(
                args.arch, args.batch_size, args.experts, args.warmup, args.steps, images, concurrent)
        row["concurrent_over_sequential"] = row["concurrent_s"] / row["sequential_s"]
        rows.append(row)
        print(f"sequential {row['sequential_s']:.2f} s, concurrent {row['concurrent_s']:.2f} s: "
              f"concurrent/sequential {row['concurrent_over_sequential']:.2f}", flush=True)
    if args.json:
        print(json.dumps({"arch": args.arch, "batch": args.batch_size, "experts": rows}))
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description="CPU img/s by torch thread count, with competing processes.")
    parser.add_argument("--arch", default="resnet32", choices=["resnet18", "resnet32", "smallcnn"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", default="1,2,default",
                        help="comma-separated thread counts; `default` is the count ltexp chooses (default: 1,2,default)")
    parser.add_argument("--compete", default="0,1", help="comma-separated numbers of busy processes (default: 0,1)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--experts", type=int, default=0, metavar="T",
                        help="compare two experts trained in turn vs at once, on T threads (see above)")
    parser.add_argument("--repeat", type=int, default=1, help="--experts: measurements of each way")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    images_nhwc, labels, _ = pipeline.make_synthetic_data(max(2048, 4 * args.batch_size))
    if args.experts:
        return main_experts(args, (images_nhwc, labels))
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
            for choice in args.threads.split(","):
                # `default`: the count ltexp itself would choose now, rivals running.
                policy = "default" if choice == "default" else "fixed"
                threads, source = resolve_threads() if policy == "default" else (int(choice), "fixed")
                r = measure(args.arch, args.batch_size, threads, args.warmup, args.steps, (images_nhwc, labels))
                row = {"competing": compete, "threads": threads, "policy": policy, "source": source,
                       "images_per_s": r["train_images_per_s"],
                       "step_ms_median": r["train_step_ms_median"], "step_ms_max": r["train_step_ms_max"]}
                rows.append(row)
                label = f"{threads} ({source})" if policy == "default" else str(threads)
                print(f"{compete:>10} {label:>8} {row['images_per_s']:>10.1f} {row['step_ms_median']:>15.0f} "
                      f"{row['step_ms_max']:>12.0f}", flush=True)
        finally:
            for rival in rivals:
                rival.terminate()
                rival.join()
    summary = default_against_best(rows)
    for line in summary:
        print(f"competing {line['competing']}: best fixed {line['best_fixed_threads']} threads / ltexp's default "
              f"({line['default_threads']} threads) = {line['best_over_default']:.2f}x")
    if args.json:
        print(json.dumps({"arch": args.arch, "batch": args.batch_size, "rows": rows, "default_against_best": summary}))
    return rows


def default_against_best(rows: list[dict]) -> list[dict]:
    """Per number of competing processes: the best fixed thread count's images/s over the default's
    (1.0 = the default is the best choice; the target is at most 1.3)."""
    out = []
    for compete in sorted({r["competing"] for r in rows}):
        level = [r for r in rows if r["competing"] == compete]
        fixed = [r for r in level if r["policy"] == "fixed"]
        default = [r for r in level if r["policy"] == "default"]
        if fixed and default:
            best = max(fixed, key=lambda r: r["images_per_s"])
            out.append({"competing": compete, "best_fixed_threads": best["threads"],
                        "default_threads": default[0]["threads"],
                        "best_over_default": best["images_per_s"] / default[0]["images_per_s"]})
    return out


if __name__ == "__main__":
    main()
