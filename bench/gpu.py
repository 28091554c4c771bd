"""GPU benchmark: what one CUDA device gives ltexp, in one run that fits a short device window.

Sections (each number is measured in this run; nothing is carried over from elsewhere):

1. `throughput`: training images/s of ResNet-18 and ResNet-32 (`ltexp.models.build_model`) at
   batch 128 (the paper's) and 512, on CIFAR-shaped uint8 images resident on the device, batches
   made by ltexp's own device pipeline (`DeviceImages`, sampler indices, `build_augment`'s
   crop+flip). Modes: `fp32` (torch defaults: cuDNN may use TF32), `bf16_cl` (what
   `ltexp.engine` does on CUDA: bf16 autocast, channels_last, fused SGD, cudnn.benchmark),
   `bf16_cl_compile` (+ `torch.compile`) and `bf16_cl_cudagraphs` (+ `torch.compile(mode=
   "reduce-overhead")`, i.e. CUDA graphs). Compiled modes report their warm-up (compile) time.
2. `epoch`: the paper's CIFAR-10-LT (exp, 0.01) on a generated CIFAR-format archive: the
   baseline, and split with 2 experts in `own` and `other` modes, trained through
   `ltexp.training.train_expert` (the engine every run uses; no MLflow), split as in the
   paper (LWS joint, gradient clipping at 5). Two epochs each:
   the first pays cuDNN autotuning, the second is the steady epoch. `split_*_over_baseline`
   compares walls measured in this run. Each row's `cycle_s` is one whole steady epoch
   (training + validation), measured between its last two epoch records;
   `projected_200_epochs_s` = wall + 198 cycles, the paper's run length.
   Then split own twice more, warm: one expert after the other, and at once (`ltexp.concurrency`,
   what `--expert-concurrency threads` does): `split_at_once_over_sequential_wall`.
   Then the baseline and split own with `--compile reduce-overhead` (CUDA graphs; on CPU only
   the baseline, with `--compile default`): their first epoch includes the compilation.
3. `eval`: 10,000 test images through `ltexp.engine.predict_logits` (batches of 1,024), seconds.
4. `dataloader`: the same training step fed by bench/pipeline.py's torchvision `DataLoader` +
   PIL transforms versus ltexp's device pipeline, images/s and their ratio.
5. `experts`: two split experts trained for the same steps sequentially, then concurrently:
   each on its own CUDA stream from one thread (`streams`) and from two threads (`threads`).
   CPU: sequential only.
6. `peak_memory_bytes`: `torch.cuda.max_memory_allocated` over the whole run (per config too).

Run from the repository root:

    python bench/gpu.py --out gpu.json        # on a GPU: < 6 min on one H100, compile included
    python bench/gpu.py --quick --out q.json  # tiny sizes on CPU (CI runs this)
    python bench/gpu.py --sections epoch,eval # some sections only

`--budget-s` bounds the run: compiled configurations (the slow part) are skipped, and listed
under `skipped`, once the next one would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for path in (REPO_ROOT, BENCH_DIR, REPO_ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pipeline  # noqa: E402  (bench/pipeline.py: synthetic data, the DataLoader baseline)
from ltexp.concurrency import run_at_once  # noqa: E402
from ltexp.config import resolve_config  # noqa: E402
from ltexp.data.device import DeviceImages, build_augment  # noqa: E402
from ltexp.data.sampling import build_sampler  # noqa: E402
from ltexp.choices import COMPILE_CUDA_GRAPHS, COMPILE_NONE  # noqa: E402
from ltexp.engine import predict_logits, resolve_device, train_step  # noqa: E402
from ltexp.training import build_experts, expert_view, prepare, train_expert  # noqa: E402
from ltexp.models import build_model, channel_stats  # noqa: E402
from ltexp.threads import configure_threads  # noqa: E402

MODES = ("fp32", "bf16_cl", "bf16_cl_compile", "bf16_cl_cudagraphs")
COMPILE_MODES = {"bf16_cl_compile": "default", "bf16_cl_cudagraphs": "reduce-overhead"}
TARGETS = {"resnet18_bf16_batch512_images_per_s_min": 40_000, "baseline_200_epochs_s_max": 120.0,
           "split_over_baseline_max": 1.1, "eval_10k_s_max": 0.5, "dataloader_ratio_min": 1.0}


SECTIONS = ("epoch", "eval", "experts", "dataloader", "throughput")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="ltexp on one CUDA device: throughput, epochs, evaluation, memory.")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and step counts (a CPU smoke run, CI)")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default: auto)")
    parser.add_argument("--out", default="", help="also write the JSON here")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="wall-clock budget; compiled configurations that would overrun it are skipped "
                             "(default: 330)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per throughput config "
                                                                "(default: 40 on a GPU, 3 with --quick)")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader workers of the torchvision baseline (default: min(8, CPUs), 1 with --quick)")
    args = parser.parse_args(argv)
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown or not args.sections:
        parser.error(f"--sections {','.join(unknown) or '(none)'}: allowed are {', '.join(SECTIONS)}")
    return args


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


RUN_PEAK = [0]  # the run's peak allocation, kept across the per-config resets below


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        RUN_PEAK[0] = max(RUN_PEAK[0], int(torch.cuda.max_memory_allocated(device)))
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


class Stepper:
    """`ltexp.engine.train_step` with the precision/layout/compile mode as a parameter: bf16
    autocast + channels_last on CUDA for the bf16 modes, cross-entropy, fused SGD, the model
    itself or `torch.compile` of it."""

    def __init__(self, model: torch.nn.Module, device: torch.device, mode: str, clip_norm: float = 0.0):
        self.device, self.mode, self.clip_norm = device, mode, clip_norm
        self.low_precision = device.type == "cuda" and mode != "fp32"
        if self.low_precision:
            model.to(memory_format=torch.channels_last)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=0.1, momentum=0.9, weight_decay=2e-4,
                                         fused=device.type == "cuda" or None)
        self.forward = (torch.compile(model, mode=COMPILE_MODES[mode], dynamic=False)
                        if mode in COMPILE_MODES else model)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return train_step(self.forward, self.optimizer, images, labels, F.cross_entropy, clip_norm=self.clip_norm,
                          low_precision=self.low_precision)[0]


def device_batches(train: DeviceImages, batch_size: int, seed: int):
    """Endless augmented uint8 batches made on the device by ltexp's pipeline (bench/pipeline.py's
    `ltexp_forever`: instance-sampler indices per epoch, gather, crop+flip)."""
    generator = torch.Generator(device=train.images.device)
    generator.manual_seed(seed)
    return pipeline.ltexp_forever(train, build_sampler("instance"), build_augment("crop_flip", 32), generator,
                                  batch_size)


def new_model(arch: str, num_classes: int, mean, std, device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, (32, 32, 3), num_classes, mean, std).to(device).train()


def timed_steps(step: Stepper, batches, device: torch.device, warmup: int, steps: int) -> dict:
    """`warmup` untimed steps (compilation, cuDNN autotuning), then `steps` timed ones."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        loss = step(*next(batches))
    sync(device)
    warm_s = time.perf_counter() - t0
    images = 0
    t0 = time.perf_counter()
    for _ in range(steps):
        batch_images, labels = next(batches)
        loss = step(batch_images, labels)
        images += labels.shape[0]
    final_loss = float(loss)
    sync(device)
    seconds = time.perf_counter() - t0
    return {"images_per_s": images / seconds, "ms_per_step": 1000 * seconds / steps, "warmup_s": warm_s,
            "final_loss": final_loss}


def bench_throughput(ctx, result: dict) -> None:
    images_nhwc, labels, _ = pipeline.make_synthetic_data(ctx.images)
    mean, std = channel_stats(images_nhwc[:pipeline.STATS_SAMPLE])
    train = DeviceImages.from_numpy(images_nhwc, labels, ctx.device)
    rows = result["throughput"]
    configs = [(arch, batch, mode) for mode in ctx.modes[:2] for arch in ("resnet18", "resnet32")
               for batch in ctx.batches]
    # Compiled configs last, most wanted first (their compile time is what the budget bounds).
    compiled = [("resnet18", ctx.batches[1], "bf16_cl_compile"), ("resnet18", ctx.batches[0], "bf16_cl_compile"),
                ("resnet18", ctx.batches[0], "bf16_cl_cudagraphs"), ("resnet32", ctx.batches[0], "bf16_cl_compile"),
                ("resnet32", ctx.batches[0], "bf16_cl_cudagraphs"), ("resnet18", ctx.batches[1], "bf16_cl_cudagraphs"),
                ("resnet32", ctx.batches[1], "bf16_cl_compile"), ("resnet32", ctx.batches[1], "bf16_cl_cudagraphs")]
    configs += [c for c in compiled if c[2] in ctx.modes]
    # Seconds the next compiled config is expected to take: the last one's warm-up, or a guess.
    compile_cost = 60.0
    for arch, batch, mode in configs:
        name = f"{arch} batch {batch} {mode}"
        if mode in COMPILE_MODES:
            left = ctx.budget_s - (time.perf_counter() - ctx.started) - ctx.reserve_s
            if compile_cost > left:
                result["skipped"].append(f"{name}: would overrun --budget-s (last compile took {compile_cost:.0f} s)")
                continue
            torch._dynamo.reset()  # each config compiles its own graphs, no cache-size fallbacks
        reset_peak(ctx.device)
        model = new_model(arch, 10, mean, std, ctx.device)
        step = Stepper(model, ctx.device, mode)
        batches = device_batches(train, batch, seed=0)
        warmup = ctx.warmup + (2 if mode in COMPILE_MODES else 0)
        try:
            row = timed_steps(step, batches, ctx.device, warmup, ctx.steps)
        except Exception as exc:  # a compile failure is a result to report, not a crash
            result["skipped"].append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            continue
        finally:
            batches.close()
        if mode in COMPILE_MODES:
            compile_cost = row["warmup_s"]
            row["cudagraph_skips"] = cudagraph_skips()
        row.update({"arch": arch, "batch": batch, "mode": mode, "peak_memory_bytes": peak(ctx.device)})
        rows.append(row)
        ctx.save(result)
        ctx.log(f"{name:38s} {row['images_per_s']:>10,.0f} img/s  {row['ms_per_step']:7.2f} ms/step  "
                f"warm-up {row['warmup_s']:.1f} s")
        del model, step
    torch._dynamo.reset()


def cudagraph_skips() -> int:
    """How many graphs inductor refused to capture as CUDA graphs (0 = all captured)."""
    try:
        from torch._dynamo.utils import counters

        return int(sum(counters["inductor"].get(k, 0) for k in counters["inductor"] if "cudagraph_skip" in k))
    except Exception:
        return -1


def write_archive(ctx) -> str:
    """A generated CIFAR-10 archive (the official python format) in a temporary folder."""
    from conftest import write_cifar_archive

    root = Path(ctx.tmp) / "data"
    t0 = time.perf_counter()
    write_cifar_archive(root, "cifar10", ctx.train_per_class, ctx.test_per_class)
    ctx.log(f"generated CIFAR-10 archive ({ctx.train_per_class}/{ctx.test_per_class} per class) in "
            f"{time.perf_counter() - t0:.1f} s")
    return str(root)


def epoch_config(ctx, data_dir: str, method: str, expert_mode: str = "own", compile_mode: str = COMPILE_NONE):
    return resolve_config({
        "data": {"dataset": "cifar10", "data_dir": data_dir, "download": False, "imb_type": "exp",
                 "imb_factor": 0.01, "val_per_class": ctx.val_per_class},
        "model": {"model": ctx.epoch_model},
        "optim": {"epochs": EPOCHS_EACH, "compile": compile_mode},
        # The paper's split: LWS trained jointly (no extra scale-only stage), gradients clipped at 5.
        "method": {"method": method, "lws_mode": "joint"},
        "split": {"expert_mode": expert_mode},
    }, seed=0, device=ctx.device.type)


EPOCHS_EACH = 2  # epochs of each row of the epoch section: the first pays set-up, the second is steady
PAPER_EPOCHS = 200


def epoch_rows(device: torch.device) -> list[tuple[str, str, str, bool, str]]:
    """(row, method, expert mode, experts at once, --compile) of the epoch section, in order."""
    rows = [("baseline", "baseline", "own", False, COMPILE_NONE),
            ("split_own", "split", "own", False, COMPILE_NONE),
            ("split_other", "split", "other", False, COMPILE_NONE),
            # Split own again, one expert after the other and then at once (one thread and stream
            # each, `--expert-concurrency threads`), both warm, so their walls compare fairly.
            ("split_own_warm", "split", "own", False, COMPILE_NONE),
            ("split_own_at_once", "split", "own", True, COMPILE_NONE)]
    if device.type == "cuda":  # the training step as CUDA graphs (`--compile reduce-overhead`)
        rows += [("baseline_compiled", "baseline", "own", False, COMPILE_CUDA_GRAPHS),
                 ("split_own_compiled", "split", "own", False, COMPILE_CUDA_GRAPHS)]
    else:  # inductor's CPU kernels: the same code path, at CPU cost (CI's --quick run)
        rows += [("baseline_compiled", "baseline", "own", False, "default")]
    return rows


def bench_epochs(ctx, result: dict, data_dir: str):
    """Baseline and split (own, other) through `train_expert`, eager and compiled; returns the data
    for later sections.

    Each row's `cycle_s` is measured: the time between its last two epoch records, i.e. one whole
    steady epoch (training, validation, keeping the best weights), summed over its experts.
    `projected_200_epochs_s` = the row's measured wall + (200 - 2) cycles: the paper's run length.
    """
    cfg = epoch_config(ctx, data_dir, "baseline")
    t0 = time.perf_counter()
    prep = prepare(cfg)
    prepare_s = time.perf_counter() - t0
    out = {"dataset": f"generated CIFAR-10-LT exp 0.01, {len(prep.data.train_labels)} training images",
           "model": cfg.model.model, "batch": cfg.optim.batch_size, "epochs_each": EPOCHS_EACH,
           "prepare_s": prepare_s}
    for name, method, mode, at_once, compile_mode in epoch_rows(ctx.device):
        cfg = epoch_config(ctx, data_dir, method, mode, compile_mode)
        method_obj, specs, _ = build_experts(cfg, prep.data.info)
        reset_peak(ctx.device)
        sync(ctx.device)
        t0 = time.perf_counter()
        stamps: dict[str, list[float]] = {spec.name: [] for spec in specs}

        def training(spec):
            def on_epoch(record, times=stamps[spec.name]):
                times.append(time.perf_counter())
            return lambda: train_expert(cfg, method_obj, spec, prep, on_epoch, False)[1]
        trainings = [training(spec) for spec in specs]
        experts = run_at_once(trainings, ctx.device, [spec.name for spec in specs]) if at_once else \
            [train() for train in trainings]
        sync(ctx.device)
        wall = time.perf_counter() - t0
        main = [[h for h in fit.history if h["stage"] == fit.history[0]["stage"]] for fit in experts]
        row = {"experts": len(specs), "compile": compile_mode, "wall_s": wall,
               "first_epoch_s": sum(m[0]["epoch_time_s"] for m in main),
               "steady_epoch_s": sum(m[-1]["epoch_time_s"] for m in main),
               "train_time_s": sum(fit.train_time_s for fit in experts),
               "images_per_epoch": sum(fit.images_seen for fit in experts) // sum(fit.epochs_run for fit in experts),
               "other_stages_s": sum(h["epoch_time_s"] for fit, m in zip(experts, main) for h in fit.history
                                     if h not in m),
               "peak_memory_bytes": peak(ctx.device)}
        if not at_once and all(len(m) == EPOCHS_EACH for m in main):  # at once, the experts' epochs overlap
            row["cycle_s"] = sum(times[EPOCHS_EACH - 1] - times[EPOCHS_EACH - 2] for times in stamps.values())
            row["projected_200_epochs_s"] = wall + (PAPER_EPOCHS - EPOCHS_EACH) * row["cycle_s"]
        out[name] = row
        ctx.save({**result, "epoch": out})
        ctx.log(f"epoch {name:18s} wall {wall:6.2f} s ({EPOCHS_EACH} epochs), steady epoch "
                f"{row['steady_epoch_s']:.3f} s" + (f", cycle {row['cycle_s']:.3f} s, 200 epochs "
                                                    f"{row['projected_200_epochs_s']:.0f} s" if "cycle_s" in row else ""))
    base = out["baseline"]
    for name in ("split_own", "split_other"):
        out[f"{name}_over_baseline_wall"] = out[name]["wall_s"] / base["wall_s"]
        out[f"{name}_over_baseline_steady_epoch"] = out[name]["steady_epoch_s"] / base["steady_epoch_s"]
        out[f"{name}_over_baseline_200_epochs"] = (out[name]["projected_200_epochs_s"]
                                                   / base["projected_200_epochs_s"])
    # Below 1: the experts trained at once finish sooner than one after the other.
    out["split_at_once_over_sequential_wall"] = out["split_own_at_once"]["wall_s"] / out["split_own_warm"]["wall_s"]
    out["baseline_200_epochs_projected_s"] = base["projected_200_epochs_s"]
    if "baseline_compiled" in out:
        out["compiled_over_eager_200_epochs"] = (out["baseline_compiled"]["projected_200_epochs_s"]
                                                 / base["projected_200_epochs_s"])
    if "split_own_compiled" in out:
        out["split_own_compiled_over_baseline_compiled_200_epochs"] = (
            out["split_own_compiled"]["projected_200_epochs_s"] / out["baseline_compiled"]["projected_200_epochs_s"])
    result["epoch"] = out
    return prep, epoch_config(ctx, data_dir, "split", "own")


def bench_eval(ctx, result: dict, prep) -> None:
    model = new_model(ctx.epoch_model, prep.data.info.num_classes, *channel_stats(prep.data.train_images[:2048]),
                      ctx.device)
    if ctx.device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    test = prep.splits.test.images
    predict_logits(model, test[:2048])  # warm-up: cuDNN picks its eval kernels
    times = []
    for _ in range(3):
        sync(ctx.device)
        t0 = time.perf_counter()
        logits = predict_logits(model, test)
        sync(ctx.device)
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[1]
    result["eval"] = {"images": int(test.shape[0]), "seconds": seconds, "images_per_s": test.shape[0] / seconds,
                      "runs": times, "finite": bool(torch.isfinite(logits).all())}
    ctx.log(f"eval {test.shape[0]:,} test images: {seconds:.3f} s (median of 3)")


def bench_dataloader(ctx, result: dict) -> None:
    """Same model, step and batch; batches from bench/pipeline.py's DataLoader+PIL baseline vs ltexp's."""
    images_nhwc, labels, _ = pipeline.make_synthetic_data(ctx.images)
    mean, std = channel_stats(images_nhwc[:pipeline.STATS_SAMPLE])
    args = SimpleNamespace(batch_size=ctx.batches[0], workers=ctx.workers)
    out = {"arch": ctx.dataloader_model, "batch": args.batch_size, "workers": args.workers, "steps": ctx.steps}
    for name in ("ltexp", "torchvision"):
        model = new_model(ctx.dataloader_model, 10, mean, std, ctx.device)
        step = Stepper(model, ctx.device, "bf16_cl")
        if name == "ltexp":
            stream = device_batches(DeviceImages.from_numpy(images_nhwc, labels, ctx.device), args.batch_size, 0)
        else:
            from torchvision import transforms

            transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                            transforms.PILToTensor()])
            dataset = pipeline.PilCifarDataset(images_nhwc, labels, transform)
            stream = pipeline.torchvision_forever(pipeline.torchvision_loader(dataset, args, ctx.device, True),
                                                  ctx.device)
        row = timed_steps(step, stream, ctx.device, ctx.warmup, ctx.steps)
        stream.close()
        out[f"{name}_images_per_s"] = row["images_per_s"]
    out["ratio"] = out["ltexp_images_per_s"] / out["torchvision_images_per_s"]
    result["dataloader"] = out
    ctx.log(f"dataloader: ltexp {out['ltexp_images_per_s']:,.0f} vs torchvision {out['torchvision_images_per_s']:,.0f} "
            f"img/s ({args.workers} workers): {out['ratio']:.2f}x")


def bench_experts(ctx, result: dict, prep, cfg) -> None:
    """The split's two experts (own mode), `steps` steps each: one after the other, then concurrently."""
    _, specs, _ = build_experts(cfg, prep.data.info)
    k = prep.data.info.num_classes
    views = [expert_view(prep.splits.train, spec, k) for spec in specs]
    mean, std = channel_stats(prep.data.train_images[:2048])
    batch = cfg.optim.batch_size

    def setup():
        steppers = [Stepper(new_model(ctx.epoch_model, spec.num_outputs, mean, std, ctx.device, seed=i), ctx.device,
                            "bf16_cl", clip_norm=cfg.optim.clip_norm) for i, spec in enumerate(specs)]
        streams = [device_batches(view, min(batch, len(view)), seed=i) for i, view in enumerate(views)]
        for stepper, stream in zip(steppers, streams):  # warm-up each (cuDNN autotuning)
            for _ in range(ctx.warmup):
                stepper(*next(stream))
        sync(ctx.device)
        return steppers, streams

    def run(steppers, streams, how: str) -> float:
        sync(ctx.device)
        t0 = time.perf_counter()
        if how == "sequential":
            for stepper, stream in zip(steppers, streams):
                for _ in range(ctx.steps):
                    stepper(*next(stream))
        elif how == "streams":
            cuda_streams = [torch.cuda.Stream(ctx.device) for _ in steppers]
            for s in cuda_streams:
                s.wait_stream(torch.cuda.current_stream(ctx.device))
            for _ in range(ctx.steps):
                for stepper, stream, s in zip(steppers, streams, cuda_streams):
                    with torch.cuda.stream(s):
                        stepper(*next(stream))
        else:  # threads: each expert's steps issued by its own Python thread on its own stream
            def work(stepper, stream):
                with torch.cuda.stream(torch.cuda.Stream(ctx.device)):
                    for _ in range(ctx.steps):
                        stepper(*next(stream))
                    torch.cuda.current_stream(ctx.device).synchronize()

            workers = [threading.Thread(target=work, args=pair) for pair in zip(steppers, streams)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
        sync(ctx.device)
        return time.perf_counter() - t0

    ways = ["sequential"] + (["streams", "threads"] if ctx.device.type == "cuda" else [])
    out = {"experts": len(specs), "model": ctx.epoch_model, "batch": batch, "steps_each": ctx.steps}
    for how in ways:
        steppers, streams = setup()
        seconds = run(steppers, streams, how)
        for stream in streams:
            stream.close()
        out[f"{how}_s"] = seconds
        out[f"{how}_images_per_s"] = sum(min(batch, len(view)) for view in views) * ctx.steps / seconds
    for how in ways[1:]:
        out[f"{how}_speedup"] = out["sequential_s"] / out[f"{how}_s"]
    result["experts"] = out
    ctx.log("experts: " + ", ".join(f"{how} {out[f'{how}_s']:.3f} s" for how in ways))


def environment(device: torch.device) -> dict:
    info = {"device": pipeline.device_description(device), "torch": torch.__version__,
            "python": platform.python_version(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_bytes": int(props.total_memory),
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()})
    return info


def check_targets(result: dict, on_gpu: bool) -> dict:
    """Each target with the measured value and whether it is met (None: not measured in this run,
    or measured on a CPU: the targets are for one H100)."""
    def find(arch, batch, mode):
        rows = [r for r in result["throughput"] if (r["arch"], r["batch"], r["mode"]) == (arch, batch, mode)]
        return rows[0]["images_per_s"] if rows else None

    best18 = max([v for v in (find("resnet18", 512, m) for m in MODES[1:]) if v is not None], default=None)
    epoch = result.get("epoch", {})
    # The paper's 200-epoch run as ltexp's fastest way makes it: compiled where that was measured.
    fastest = "_compiled" if on_gpu and "split_own_compiled" in epoch else ""
    baseline_200 = epoch.get(f"baseline{fastest}", {}).get("projected_200_epochs_s")
    split_200 = epoch.get(f"split_own{fastest}", {}).get("projected_200_epochs_s")
    values = {"resnet18_bf16_batch512_images_per_s_min": best18,
              "baseline_200_epochs_s_max": baseline_200,
              "split_over_baseline_max": split_200 / baseline_200 if baseline_200 and split_200 else None,
              "eval_10k_s_max": result.get("eval", {}).get("seconds") if result.get("eval", {}).get("images") == 10_000
              else None,
              "dataloader_ratio_min": result.get("dataloader", {}).get("ratio")}
    basis = {"baseline_200_epochs_s_max": f"epoch.baseline{fastest}.projected_200_epochs_s",
             "split_over_baseline_max": f"epoch.split_own{fastest} / epoch.baseline{fastest}, projected_200_epochs_s"}
    out = {}
    for key, target in TARGETS.items():
        value = values[key]
        met = None if value is None or not on_gpu else (value >= target if key.endswith("_min") else value <= target)
        out[key] = {"target": target, "value": value, "met": met, **({"from": basis[key]} if key in basis else {})}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = resolve_device(args.device)
    if device.type == "cpu":
        configure_threads()
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.backends.cudnn.benchmark = True  # as ltexp.engine does on CUDA
    quick = args.quick
    ctx = SimpleNamespace(
        device=device, started=started, budget_s=args.budget_s, tmp=None,
        quick=quick,
        # Throughput data: all 20,431 images of bench/pipeline.py's set, or 256 for a smoke run.
        images=256 if quick else None,
        batches=(8, 16) if quick else (128, 512),
        modes=MODES if on_gpu else ("fp32",),
        warmup=1 if quick else 5,
        steps=args.steps or (2 if quick else 40),
        workers=args.workers if args.workers is not None else (1 if quick else min(8, os.cpu_count() or 1)),
        # Epoch data: CIFAR-10's 5,000 / 1,000 images per class, or a tiny set.
        train_per_class=110 if quick else 5000, test_per_class=10 if quick else 1000,
        val_per_class=5 if quick else 100,
        epoch_model="smallcnn" if quick else "resnet18",
        dataloader_model="resnet32" if quick else "resnet18",
        # Time kept free for the sections after the compiled throughput configs.
        reserve_s=0.0,
        log=lambda text: print(f"[{time.perf_counter() - started:6.1f} s] {text}", flush=True),
    )
    result: dict = {"quick": quick, **environment(device), "throughput": [], "skipped": []}

    def save(partial: dict) -> None:
        """Write what is measured so far: a run stopped from outside still leaves its numbers."""
        if args.out:
            Path(args.out).write_text(json.dumps({**partial, "partial": True}, indent=2, default=float) + "\n")

    ctx.save = save
    if not on_gpu:
        result["skipped"].append("bf16 / channels_last / compile / CUDA graphs / concurrent experts: CUDA only")
    wanted = set(args.sections)
    result["sections"] = [name for name in SECTIONS if name in wanted]
    # The epoch, evaluation, DataLoader and expert sections first: they are cheap and always
    # wanted; the compiled throughput configs then get whatever budget is left.
    if wanted & {"epoch", "eval", "experts"}:
        with tempfile.TemporaryDirectory() as tmp:
            ctx.tmp = tmp
            data_dir = write_archive(ctx)
            if "epoch" in wanted:
                prep, cfg = bench_epochs(ctx, result, data_dir)
                save(result)
            else:  # the evaluation and experts sections need only the data
                cfg = epoch_config(ctx, data_dir, "split", "own")
                prep = prepare(cfg)
            if "eval" in wanted:
                bench_eval(ctx, result, prep)
            if "experts" in wanted:
                bench_experts(ctx, result, prep, cfg)
            save(result)
            del prep
    if "dataloader" in wanted:
        bench_dataloader(ctx, result)
        save(result)
    if "throughput" in wanted:
        bench_throughput(ctx, result)
    reset_peak(device)
    result["peak_memory_bytes"] = RUN_PEAK[0]
    result["targets"] = check_targets(result, on_gpu)
    result["wall_s"] = time.perf_counter() - started
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ctx.log(f"done in {result['wall_s']:.0f} s" + (f"; JSON in {args.out}" if args.out else ""))
    return result


if __name__ == "__main__":
    main()
