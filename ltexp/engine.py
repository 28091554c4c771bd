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
from typing import Callable

import torch
import torch.nn.functional as F

from ltexp import LtexpError
from ltexp.data.device import CropFlip, DeviceImages
from ltexp.data.longtail import ClassInfo
from ltexp.data.sampling import build_sampler
from ltexp.methods import TRAIN_NETWORK, TRAIN_NETWORK_AND_SCALES, TRAIN_SCALES, Stage
from ltexp.metrics import classification_metrics

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
    return torch.device(name)


def _autocast(device: torch.device):
    # bf16 keeps fp32's exponent range, so no loss scaling is needed; CPU stays fp32.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


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

    @property
    def train_images_per_s(self) -> float:
        return self.images_seen / self.train_time_s if self.train_time_s > 0 else float("nan")


def _set_trainable(model: torch.nn.Module, trainable: str) -> list[torch.nn.Parameter]:
    scales = model.head.scales
    for p in model.parameters():
        p.requires_grad_(trainable in (TRAIN_NETWORK, TRAIN_NETWORK_AND_SCALES))
    scales.requires_grad_(trainable in (TRAIN_NETWORK_AND_SCALES, TRAIN_SCALES))
    return [p for p in model.parameters() if p.requires_grad]


def _train_mode(model: torch.nn.Module, trainable: str) -> None:
    model.train()
    if trainable == TRAIN_SCALES:
        model.body.eval()  # frozen features: BatchNorm statistics must not move either


def fit(model: torch.nn.Module, train: DeviceImages, val: DeviceImages, stages: list[Stage], info: ClassInfo,
        *, batch_size: int, clip_norm: float, augment: CropFlip, seed: int,
        on_epoch: Callable[[dict], None] | None = None, progress: bool = False,
        select_metric: str = "acc") -> FitResult:
    """Train `model` through `stages`; after each stage keep its best epoch on validation.

    The best epoch maximises `select_metric` on validation (`acc`; experts with an unbalanced
    "other" label use `macro_acc`).

    `on_epoch` receives one dict per epoch: `epoch` (global, from 1), `stage`, `train_loss`,
    `train_acc`, `lr`, `epoch_time_s` and the `val_*` metrics. A non-finite training loss
    raises `LtexpError` at the end of the epoch it happened in.
    """
    device = train.images.device
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    num_classes = info.num_classes
    history: list[dict] = []
    seen_per_class: list[list[int]] = []
    global_epoch, images_seen, train_time = 0, 0, 0.0
    best_acc, best_epoch = -1.0, 0
    for stage in stages:
        params = _set_trainable(model, stage.trainable)
        optimizer = torch.optim.SGD(params, lr=stage.lr, momentum=0.9, weight_decay=stage.weight_decay,
                                    fused=device.type == "cuda" or None)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=stage.lr_step, gamma=stage.lr_gamma)
        sampler = build_sampler(stage.sampler, **stage.sampler_options)
        stage_best_acc, stage_best_state = -1.0, None
        for stage_epoch in range(1, stage.epochs + 1):
            global_epoch += 1
            _train_mode(model, stage.trainable)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            order = sampler(train.labels, num_classes, generator)
            seen = torch.bincount(train.labels[order], minlength=num_classes)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            steps = math.ceil(len(order) / batch_size)
            bar = _progress(progress, steps, f"{stage.name} {stage_epoch}/{stage.epochs}")
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                images = augment(train.images[idx], generator)
                labels = train.labels[idx]
                if device.type == "cuda":
                    images = images.contiguous(memory_format=torch.channels_last)
                with _autocast(device):
                    logits = model(images)
                    loss = F.cross_entropy(logits.float(), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if clip_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip_norm)
                optimizer.step()
                loss_sum += loss.detach() * len(idx)
                correct += (logits.argmax(1) == labels).sum()
                if bar is not None:
                    bar.update()
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
                if bar is not None:
                    bar.close()
                raise LtexpError(f"training loss is {train_loss} in stage {stage.name!r} epoch {stage_epoch}: "
                                 "lower --lr or set --clip-norm (e.g. 5)")
            val_metrics = classification_metrics(predict_logits(model, val.images), val.labels, info)
            record = {"epoch": global_epoch, "stage": stage.name, "train_loss": train_loss,
                      "train_acc": correct.item() / len(order), "lr": lr, "epoch_time_s": epoch_time,
                      **{f"val_{k}": v for k, v in val_metrics.items()}}
            history.append(record)
            if bar is not None:
                bar.set_postfix(loss=f"{train_loss:.3f}", val_acc=f"{val_metrics['acc']:.3f}")
                bar.close()
            if on_epoch is not None:
                on_epoch(record)
            if val_metrics[select_metric] > stage_best_acc:
                stage_best_acc = val_metrics[select_metric]
                stage_best_state = copy.deepcopy(model.state_dict())
                best_acc, best_epoch = stage_best_acc, global_epoch
        if stage_best_state is not None:
            model.load_state_dict(stage_best_state)
    _set_trainable(model, TRAIN_NETWORK)
    model.eval()
    return FitResult(best_acc, best_epoch, global_epoch, train_time, images_seen, history, seen_per_class)


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", leave=True, dynamic_ncols=True)
