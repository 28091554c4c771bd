"""The one training / evaluation loop. It knows stages, never method names.

Device-agnostic: the same code runs on CPU (fp32) and CUDA (bf16 autocast, channels_last,
fused SGD). Per-step work stays on the device: the running loss and accuracy are accumulated as
tensors and read once per epoch, so there is no host sync per step.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

from ltexp import LtexpError
from ltexp.choices import COMPILE_CUDA_GRAPHS, COMPILE_MODES, COMPILE_NONE, DEVICES
from ltexp.concurrency import between_steps
from ltexp.data.device import CropFlip, DeviceImages
from ltexp.data.longtail import ClassInfo
from ltexp.data.sampling import build_sampler
from ltexp.methods import TRAIN_HEAD, TRAIN_NETWORK, TRAIN_NETWORK_AND_SCALES, TRAIN_SCALES, Stage
from ltexp.metrics import classification_metrics
from ltexp.progress import Progress

# On a GPU at batch 128 a ResNet step is bound by the host launching its kernels, which only CUDA
# graphs (--compile reduce-overhead) remove; bench/gpu.py measures each of `COMPILE_MODES`.

if TYPE_CHECKING:
    from ltexp.lifecycle import Checkpointer

EVAL_BATCH = 1024  # images per forward pass at evaluation; memory, not accuracy, bounds it


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` = CUDA if present, else Apple MPS, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LtexpError("--device cuda asked for, but torch sees no CUDA device: use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise LtexpError("--device mps asked for, but torch sees no Apple MPS device: use --device auto or cpu")
    if name not in DEVICES:
        raise LtexpError(f"unknown --device {name!r}: allowed are {', '.join(DEVICES)}")
    return torch.device(name)


def _autocast(device: torch.device, low_precision: bool = True):
    # bf16 keeps fp32's exponent range, so no loss scaling is needed; other devices stay fp32.
    if low_precision and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def train_step(forward, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor, loss,
               *, clip_norm: float = 0.0, soft_targets: torch.Tensor | None = None,
               low_precision: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step, the one `fit` takes (and bench/ times): on CUDA the images go channels_last
    and the forward pass runs under bf16 autocast (`low_precision`); the loss is taken on float32
    logits (with each image's teacher targets when `soft_targets` is given: distillation), then
    zero_grad(set_to_none), backward, the gradient of the optimiser's parameters clipped to norm
    `clip_norm` (0 = no clipping), and the optimiser's step. `forward` is the module called: the
    model or its `compile_step` form. Returns the detached loss and the logits."""
    if low_precision and images.device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    with _autocast(images.device, low_precision):
        logits = forward(images)
        value = loss(logits.float(), labels) if soft_targets is None else loss(logits.float(), labels, soft_targets)
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    if clip_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], clip_norm)
    optimizer.step()
    return value.detach(), logits


def compile_step(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """The module a training step calls: `model` itself (`none`), or `torch.compile` of it in
    `mode`, compiled afresh. It shares `model`'s parameters and buffers, so weights, checkpoints
    and evaluation stay on the plain module. Shapes are static (`dynamic=False`): the engine sends only full
    batches through it, so one compilation serves a whole stage."""
    if mode not in COMPILE_MODES:
        raise LtexpError(f"unknown --compile {mode!r}: allowed are {', '.join(COMPILE_MODES)}")
    if mode == COMPILE_NONE:
        return model
    # A model compiled earlier in this process (a grid's previous cell, a split's previous expert)
    # has finished training (tuning and experts in threads refuse --compile): drop its code and
    # CUDA-graph memory, so that this model is compiled as asked instead of running eagerly once
    # torch's recompile limit (8 per function) is reached.
    torch._dynamo.reset()
    return torch.compile(model, mode=mode, dynamic=False)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Float32 logits (N, K) for uint8 images (N, C, H, W) already on the model's device."""
    was_training = model.training
    model.eval()
    device = images.device
    out = []
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size]
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with _autocast(device):
            out.append(model(batch).float())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, device=device)


@dataclass
class FitResult:
    """What training produced besides the weights (the model holds the best-epoch weights)."""

    best_val_acc: float
    best_epoch: int
    epochs_run: int
    train_time_s: float          # training steps only, validation excluded
    images_seen: int
    history: list[dict] = field(default_factory=list)
    # Images drawn per class in each epoch (label order): what the sampler really fed the model.
    seen_per_class: list[list[int]] = field(default_factory=list)
    # What a method's post-hoc step chose on validation after training (e.g. posthoc_tau).
    posthoc: dict = field(default_factory=dict)
    # The weights of the last epoch (CPU), when the best validation epoch of the last stage was
    # an earlier one: so a run can report its last-epoch model beside the selected one. Not kept
    # in caches or checkpoints; None after a run resumed from a finished checkpoint.
    last_state: dict | None = field(default=None, repr=False, compare=False)

    @property
    def train_images_per_s(self) -> float:
        return self.images_seen / self.train_time_s if self.train_time_s > 0 else float("nan")


def _set_trainable(model: torch.nn.Module, trainable: str) -> list[torch.nn.Parameter]:
    for p in model.parameters():
        p.requires_grad_(trainable in (TRAIN_NETWORK, TRAIN_NETWORK_AND_SCALES))
    model.head.scales.requires_grad_(trainable in (TRAIN_NETWORK_AND_SCALES, TRAIN_SCALES))
    if trainable == TRAIN_HEAD:
        model.head.linear.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def _train_mode(model: torch.nn.Module, trainable: str) -> None:
    model.train()
    if trainable in (TRAIN_SCALES, TRAIN_HEAD):
        model.body.eval()  # frozen features: BatchNorm statistics must not move either


def fit(model: torch.nn.Module, train: DeviceImages, val: DeviceImages, stages: list[Stage], info: ClassInfo,
        *, batch_size: int, clip_norm: float, augment: CropFlip, seed: int,
        on_epoch: Callable[[dict], None] | None = None, progress: Progress | None = None,
        select_metric: str = "acc", checkpoint: "Checkpointer | None" = None,
        compile_mode: str = COMPILE_NONE) -> FitResult:
    """Train `model` through `stages`; after each stage keep its best epoch on validation.

    The best epoch maximises `select_metric` on validation (`acc`; experts with an unbalanced
    "other" label use `macro_acc`).

    `on_epoch` receives one dict per epoch: `epoch` (global, from 1), `stage`, `train_loss`,
    `train_acc`, `lr`, `epoch_time_s`, `epoch_images_per_s` and the `val_*` metrics. Each
    stage's loss (`stage.loss`) is called on the batch's logits and labels; the engine knows no
    loss by name. A non-finite training loss raises `LtexpError` at the end of the epoch it
    happened in. `progress` reports epochs to a person (bars or lines). With a `checkpoint`
    (`ltexp.lifecycle.Checkpointer`), training continues from its saved state, whose epochs are
    passed to `on_epoch` again first, and saves state as its cadence asks. `compile_mode`
    (`COMPILE_MODES`) is how full batches' forward and backward run (`compile_step`); the last,
    smaller batch of an epoch runs eagerly, so that no second shape is compiled.
    """
    steps = fit_epochs(model, train, val, stages, info, batch_size=batch_size, clip_norm=clip_norm,
                       augment=augment, seed=seed, progress=progress, select_metric=select_metric,
                       checkpoint=checkpoint, compile_mode=compile_mode)
    while True:
        try:
            record = next(steps)
        except StopIteration as done:
            return done.value
        if on_epoch is not None:
            on_epoch(record)


def fit_epochs(model: torch.nn.Module, train: DeviceImages, val: DeviceImages, stages: list[Stage], info: ClassInfo,
               *, batch_size: int, clip_norm: float, augment: CropFlip, seed: int, progress: Progress | None = None,
               select_metric: str = "acc", checkpoint: "Checkpointer | None" = None,
               compile_mode: str = COMPILE_NONE):
    """`fit` as a generator: yields each epoch's record, returns the `FitResult`. Several experts
    can so be trained in lockstep, one epoch each in turn (tuning prunes on their fused score)."""
    device = train.images.device
    step_model = compile_step(model, compile_mode)
    # CUDA graphs overwrite their outputs at each replay: each step is marked as a new one.
    cuda_graphs = compile_mode == COMPILE_CUDA_GRAPHS and device.type == "cuda"
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    num_classes = info.num_classes
    history: list[dict] = []
    seen_per_class: list[list[int]] = []
    global_epoch, images_seen, train_time = 0, 0, 0.0
    best_acc, best_epoch, last_state = -1.0, 0, None
    resumed = checkpoint.restore(model, generator) if checkpoint is not None else None
    if resumed is not None:
        history, seen_per_class = resumed["history"], resumed["seen_per_class"]
        global_epoch, images_seen, train_time = resumed["global_epoch"], resumed["images_seen"], resumed["train_time"]
        best_acc, best_epoch = resumed["best_acc"], resumed["best_epoch"]
        yield from history
    for stage_index, stage in enumerate(stages):
        if resumed is not None and stage_index < resumed["stage_index"]:
            continue  # finished before the checkpoint: its best weights are already in the model
        resuming_stage = resumed is not None and stage_index == resumed["stage_index"]
        if stage.reset_head and not resuming_stage:
            # Its own seeded generator, not torch's global one: experts may train at once in threads.
            head_generator = torch.Generator(device=device)
            head_generator.manual_seed(seed * 1009 + stage_index)
            model.head.reset_classifier(head_generator)
        params = _set_trainable(model, stage.trainable)
        optimizer = torch.optim.SGD(params, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay,
                                    fused=device.type == "cuda" or None)
        # The stage's schedule as a factor of the base rate per 1-based epoch (LambdaLR counts
        # its steps from 0); its step count is what a checkpoint keeps.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: stage.schedule.factor(done + 1))
        sampler = build_sampler(stage.sampler, **stage.sampler_options)
        stage_best_acc, stage_best_state, first_epoch = -1.0, None, 1
        if resuming_stage:
            optimizer.load_state_dict(resumed["optimizer"])
            schedule.load_state_dict(resumed["scheduler"])
            stage_best_acc, stage_best_state = resumed["stage_best_acc"], resumed["stage_best_state"]
            first_epoch = resumed["stage_epoch"] + 1
        if progress is not None:
            progress.start_stage(stage.name, stage.epochs)
        for stage_epoch in range(first_epoch, stage.epochs + 1):
            global_epoch += 1
            stage.loss.start_epoch(stage_epoch)
            _train_mode(model, stage.trainable)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            order = sampler(train.labels, num_classes, generator)
            seen = torch.bincount(train.labels[order], minlength=num_classes)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            for start in range(0, len(order), batch_size):
                between_steps()  # experts training at once: Ctrl-C / SIGTERM, their share of threads
                idx = order[start:start + batch_size]
                images = augment(train.images[idx], generator)
                labels = train.labels[idx]
                full = len(idx) == batch_size
                if cuda_graphs and full:
                    torch.compiler.cudagraph_mark_step_begin()
                loss, logits = train_step(step_model if full else model, optimizer, images, labels, stage.loss,
                                          clip_norm=clip_norm,
                                          soft_targets=None if train.soft_targets is None else train.soft_targets[idx])
                loss_sum += loss * len(idx)
                correct += (logits.argmax(1) == labels).sum()
            lr = optimizer.param_groups[0]["lr"]
            schedule.step()
            train_loss = loss_sum.item() / len(order)  # the one sync of the epoch
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_time = time.perf_counter() - started
            train_time += epoch_time
            images_seen += len(order)
            seen_per_class.append(seen.tolist())
            if not math.isfinite(train_loss):
                if progress is not None:
                    progress.close()
                raise LtexpError(f"training loss is {train_loss} in stage {stage.name!r} epoch {stage_epoch}: "
                                 "lower --lr or set --clip-norm (e.g. 5)")
            val_metrics = classification_metrics(predict_logits(model, val.images), val.labels, info)
            record = {"epoch": global_epoch, "stage": stage.name, "train_loss": train_loss,
                      "train_acc": correct.item() / len(order), "lr": lr, "epoch_time_s": epoch_time,
                      "epoch_images_per_s": len(order) / epoch_time if epoch_time > 0 else 0.0,
                      **{f"val_{k}": v for k, v in val_metrics.items()}}
            history.append(record)
            if progress is not None:
                progress.end_epoch(stage.name, stage_epoch, stage.epochs, record)
            yield record
            if val_metrics[select_metric] > stage_best_acc:
                stage_best_acc = val_metrics[select_metric]
                stage_best_state = copy.deepcopy(model.state_dict())
                best_acc, best_epoch = stage_best_acc, global_epoch
            if checkpoint is not None:
                checkpoint.save(model, generator, optimizer, schedule, dict(
                    stage_index=stage_index, stage_epoch=stage_epoch, global_epoch=global_epoch,
                    images_seen=images_seen, train_time=train_time, best_acc=best_acc, best_epoch=best_epoch,
                    history=history, seen_per_class=seen_per_class, stage_best_acc=stage_best_acc,
                    stage_best_state=stage_best_state))
        if stage_index == len(stages) - 1 and stage_best_state is not None and best_epoch != global_epoch:
            last_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        if stage_best_state is not None:
            model.load_state_dict(stage_best_state)
    _set_trainable(model, TRAIN_NETWORK)
    model.eval()
    if checkpoint is not None and (resumed is None or resumed["stage_index"] < len(stages)):
        checkpoint.finish(model, generator, dict(
            finished=True, stage_index=len(stages), stage_epoch=0, global_epoch=global_epoch, images_seen=images_seen,
            train_time=train_time, best_acc=best_acc, best_epoch=best_epoch, history=history,
            seen_per_class=seen_per_class, stage_best_acc=-1.0, stage_best_state=None))
    return FitResult(best_acc, best_epoch, global_epoch, train_time, images_seen, history, seen_per_class,
                     last_state=last_state)

