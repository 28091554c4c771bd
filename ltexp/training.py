"""The one training path: how an expert of any method is built, fed and trained.

An expert's view of the data (`expert_view`, `expert_info`), its seed and cache key, its model
(`new_expert_model`) and the engine's arguments (`fit_inputs`); the two ways experts train:
alone (`train_expert`: the engine's `fit`, then the method's post-hoc step) or several in
lock-step (`Lockstep`: a tuning trial, pruned between rounds); the checkpoint that resumes
either; the data prepared once on the device (`prepare`). `ltexp.experiment` runs these inside
an MLflow run; `ltexp.tune` inside a trial; `bench/` times the engine step they share.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ltexp import concurrency, lifecycle, tracking
from ltexp.config import RunConfig, used_settings
from ltexp.data import ClassInfo, LongTailData, build_dataset
from ltexp.data.device import DeviceImages, build_augment
from ltexp.engine import FitResult, fit, fit_epochs, predict_logits, resolve_device
from ltexp.fusion import ExpertLayout
from ltexp.methods import EXPERT, ROUTER, ExpertSpec, build_method
from ltexp.models import build_model, channel_stats
from ltexp.progress import Progress


@dataclass
class DeviceSplits:
    train: DeviceImages
    val: DeviceImages
    test: DeviceImages


def expert_view(images: DeviceImages, spec: ExpertSpec, num_classes: int) -> DeviceImages:
    """The images an expert sees, labelled in its own output space.

    Without "other": only its classes' images (a copy of that subset). With "other": every image
    (the same device tensor, no copy), the rest labelled `len(spec.classes)`. A router sees every
    image labelled by its group.
    """
    device = images.labels.device
    if spec.role == ROUTER:  # every image, labelled by its group
        groups = ExpertLayout(spec.routes, (False,) * len(spec.routes), num_classes).group_of().to(device)
        return DeviceImages(images.images, groups[images.labels])
    local = torch.full((num_classes,), len(spec.classes), dtype=torch.long, device=device)
    local[list(spec.classes)] = torch.arange(len(spec.classes), device=device)
    labels = local[images.labels]
    if spec.other:
        return DeviceImages(images.images, labels)
    keep = labels < len(spec.classes)
    return DeviceImages(images.images[keep], labels[keep])


def expert_info(info: ClassInfo, spec: ExpertSpec) -> ClassInfo:
    """Class names and training counts of an expert's outputs; its "other" label counts the
    images it draws per epoch (what its loss and sampler see). A router's outputs are the groups,
    each counting its classes' images."""
    if spec.role == ROUTER:
        counts = [int(info.train_counts[list(classes)].sum()) for classes in spec.routes]
        return ClassInfo(spec.route_names, np.asarray(counts, dtype=np.int64))
    names = tuple(info.class_names[c] for c in spec.classes) + (("other",) if spec.other else ())
    counts = info.train_counts[list(spec.classes)].tolist() + ([spec.other_per_epoch] if spec.other else [])
    return ClassInfo(names, np.asarray(counts, dtype=np.int64))


def expert_seed(cfg: RunConfig, spec: ExpertSpec) -> int:
    """Seed of an expert's initialisation and sampling: the run seed and the classes it owns, so
    the same expert gets the same seed whatever its position among the groups (and can be reused)."""
    identity = (spec.classes, spec.other, spec.other_per_epoch) + ((spec.role, spec.routes) if spec.role != EXPERT else ())
    return cfg.seed * 1_000_003 + zlib.crc32(repr(identity).encode()) % 1_000_003


def expert_key(cfg: RunConfig, spec: ExpertSpec) -> str:
    """Everything that changes how an expert trains; equal keys give bit-identical experts on CPU."""
    if spec.role == EXPERT:
        settings = {k: v for k, v in used_settings(cfg).items() if k not in UNUSED_BY_EXPERT_TRAINING}
        identity = {}
    else:  # a router depends on the groups, a student on every expert that teaches it
        settings = {k: v for k, v in used_settings(cfg).items() if k not in ("fusion", "device")}
        identity = {"role": spec.role, "routes": spec.routes}
    return json.dumps({"settings": settings, "classes": spec.classes, "other": spec.other,
                       "other_per_epoch": spec.other_per_epoch, **identity}, sort_keys=True, default=str)


# Config fields that never reach an expert's training (they pick groups or fusion; the groups
# themselves are part of the key through the expert's classes). Bookkeeping fields are not in
# `used_settings` at all.
UNUSED_BY_EXPERT_TRAINING = {"fusion", "num_groups", "split_at", "expert_mode", "other_size", "device", "router",
                             "distill", "distill_temperature", "distill_weight", "student_sampling"}


@dataclass
class ExpertCache:
    """Trained experts by `expert_key`, so a tuning study never trains the same expert twice.

    `directory`: also kept there, for the processes of one `ltexp tune --jobs N` (one machine), so
    that an expert one job trained is reused by the others and by the command's final test
    evaluation. One file per expert (`<hash>.pt`: its CPU weights and its `FitResult` as a dict,
    written whole by `lifecycle.save_whole`); the command removes the folder when the study ends."""

    entries: dict = field(default_factory=dict)
    hits: int = 0
    misses: int = 0
    directory: Path | None = None

    def _path(self, key: str) -> Path:
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def _load(self, key: str) -> bool:
        """Read an expert another process put into `directory`."""
        if self.directory is None or not self._path(key).exists():
            return False
        saved = torch.load(self._path(key), map_location="cpu", weights_only=True)
        self.entries[key] = (saved["state"], FitResult(**saved["result"]))
        return True

    def has(self, key: str) -> bool:
        return key in self.entries or self._load(key)

    def get(self, key: str):
        if self.has(key):
            self.hits += 1
            return self.entries[key]
        self.misses += 1
        return None

    def put(self, key: str, model: torch.nn.Module, result: FitResult) -> None:
        result = dataclasses.replace(result, last_state=None)  # the selected weights are what is shared
        self.entries[key] = (copy.deepcopy(model.state_dict()), result)
        if self.directory is not None:
            lifecycle.save_whole({"state": {k: v.detach().cpu() for k, v in self.entries[key][0].items()},
                                  "result": dataclasses.asdict(result)}, self._path(key), "trained expert")


def train_expert(cfg: RunConfig, method, spec: ExpertSpec, prep: "Prepared", on_epoch, progress: bool,
                 cache: ExpertCache | None = None, checkpoint: lifecycle.Checkpointer | None = None,
                 teacher: torch.Tensor | None = None) -> tuple[torch.nn.Module, FitResult, bool]:
    """Train one expert with the one engine, resuming from `checkpoint`, then apply the method's
    post-hoc step (or take the finished expert from `cache`).

    Returns the model (best validation epoch, post-hoc step applied), its `FitResult`, and
    whether it was reused.
    """
    key = expert_key(cfg, spec)
    model = new_expert_model(cfg, method, spec, prep)
    cached = cache.get(key) if cache is not None else None
    if cached is not None:
        model.load_state_dict(cached[0])
        return model.eval(), cached[1], True
    inputs = fit_inputs(cfg, method, spec, prep, teacher)
    result = fit(model, **inputs, on_epoch=on_epoch, progress=Progress(spec.name) if progress else None,
                 checkpoint=checkpoint)
    val = inputs["val"]
    result.posthoc = method.posthoc(model, predict_logits(model, val.images), val.labels, inputs["info"])
    if cache is not None:
        cache.put(key, model, result)
    return model, result, False


def new_expert_model(cfg: RunConfig, method, spec: ExpertSpec, prep: "Prepared") -> torch.nn.Module:
    """An expert's freshly initialised model (seeded by `expert_seed`), on the training device."""
    mean, std = channel_stats(prep.data.train_images)
    with concurrency.GLOBAL_RNG:  # seeding and drawing the weights, as one step for each thread
        torch.manual_seed(expert_seed(cfg, spec))
        model = build_model(cfg.model.model, prep.data.image_shape, spec.num_outputs, mean, std, head=method.head,
                            weights=cfg.model.weights)
    return model.to(prep.device)


def fit_inputs(cfg: RunConfig, method, spec: ExpertSpec, prep: "Prepared", teacher: torch.Tensor | None = None) -> dict:
    """The engine's arguments for one expert: its view of the data, stages, classes and seed
    (and, for a student, the teacher logits of every training image as soft targets)."""
    data, splits = prep.data, prep.splits
    k = data.info.num_classes
    train, val = expert_view(splits.train, spec, k), expert_view(splits.val, spec, k)
    if teacher is not None:
        train = DeviceImages(train.images, train.labels, teacher)
    info = expert_info(data.info, spec)
    return dict(train=train, val=val, stages=method.stages(info, spec), info=info, batch_size=cfg.optim.batch_size,
                clip_norm=cfg.optim.clip_norm, augment=build_augment(cfg.data.augment, data.image_shape[0]),
                seed=expert_seed(cfg, spec), select_metric="macro_acc" if spec.other else "acc",
                compile_mode=cfg.optim.compile)


def expert_steps(cfg: RunConfig, method, spec: ExpertSpec, prep: "Prepared",
                 checkpoint: lifecycle.Checkpointer | None = None):
    """A fresh expert model and its training as a generator of epoch records (`engine.fit_epochs`),
    for training several experts in lockstep; the generator returns the `FitResult`. (Tuning uses
    it for split experts, whose method has no post-hoc step.)"""
    model = new_expert_model(cfg, method, spec, prep)
    return model, fit_epochs(model, **fit_inputs(cfg, method, spec, prep), checkpoint=checkpoint)


class Lockstep:
    """Several experts trained one epoch each in turn (a tuning trial: after each round the
    pruner reads the fused validation score of all experts). An expert the `cache` holds is
    taken from it and takes no turns; one that finishes is put there. `checkpoint_for(spec)` gives
    each expert's checkpoint (or None), whose epochs, when a trial is retried, are replayed (`rounds`
    says which rounds were)."""

    def __init__(self, cfg: RunConfig, method, specs: list[ExpertSpec], prep: "Prepared", cache: ExpertCache,
                 checkpoint_for):
        self.models: list[torch.nn.Module] = []
        self._steps, self._keys, self._checkpoints = [], [], []
        for spec in specs:
            key = expert_key(cfg, spec)
            if cache.has(key):
                model, _, _ = train_expert(cfg, method, spec, prep, None, False, cache)
                steps, checkpoint = None, None
            else:
                cache.misses += 1
                checkpoint = checkpoint_for(spec)
                model, steps = expert_steps(cfg, method, spec, prep, checkpoint)
            self.models.append(model)
            self._steps.append(steps)
            self._keys.append(key)
            self._checkpoints.append(checkpoint)
        self.specs, self.cache = specs, cache

    def rounds(self):
        """Yield `(round, records, replayed)` after each round: `records` maps the name of each
        expert that trained an epoch to its epoch record; `replayed` when every one of those
        epochs came back from a checkpoint (reported by the trial this one retries)."""
        number = 0
        while True:
            records = {}
            for i, spec in enumerate(self.specs):
                if self._steps[i] is None:
                    continue
                try:
                    records[spec.name] = next(self._steps[i])
                except StopIteration as done:
                    self._steps[i] = None
                    self.cache.put(self._keys[i], self.models[i], done.value)
            if not records:
                return
            number += 1
            replayed = all(c is not None and number <= c.resumed_epoch for spec, c in zip(self.specs, self._checkpoints)
                           if spec.name in records)
            yield number, records, replayed

    def clear_checkpoints(self) -> None:
        """Drop the experts' checkpoints (the trial ended: complete or pruned)."""
        for checkpoint in filter(None, self._checkpoints):
            checkpoint.clear()


def checkpoint_key(cfg: RunConfig, spec: ExpertSpec) -> str:
    """The expert's key plus what its checkpoint belongs to: the tracking store its runs live in
    (hashed, since a URI can carry a password; the store is where the resumed run is linked) and
    the torch build and device type that compute its numbers. Another store or build trains afresh."""
    store = hashlib.sha256(tracking.store_identity().encode()).hexdigest()[:16]
    return json.dumps({"expert": expert_key(cfg, spec), "store": store, "torch": torch.__version__,
                       "device": resolve_device(cfg.device).type}, sort_keys=True)


def checkpointer(cfg: RunConfig, spec: ExpertSpec, run_id: str, root_run_id: str, label: str = "",
                 cadence: lifecycle.Cadence | None = None) -> lifecycle.Checkpointer:
    """The checkpoint of one expert of the run `root_run_id` (epochs logged to `run_id`).

    When it resumes it says so on the terminal, and the interrupted runs are closed KILLED and
    linked to the runs that continue them (`ltexp.resumed_by` / `ltexp.resumed_from`).
    """
    def announce(state: dict) -> None:
        old_root, old_run = state.get("root_run_id", ""), state.get("run_id", "")
        done = bool(state.get("finished"))  # training had ended; only the evaluation was lost
        detail = f" ({label}{', finished' if done else ''}, run {old_run})" if label and old_run != old_root else \
            (" (finished)" if done else "")
        written_with, now = state.get("torch_threads"), torch.get_num_threads()
        if written_with and written_with != now:
            # Not a key part: the default thread count follows the machine's load, and a kill
            # should not cost the epochs done. Float sums taken in another order may differ in
            # their last digits, so the run says it.
            detail += (f"; written with {written_with} torch threads, now {now}: the last digits may differ "
                       "from an uninterrupted run")
        tracking.link_resumed(old_run, run_id)
        if old_root != old_run:
            tracking.link_resumed(old_root, root_run_id)
        print(f"resuming from epoch {state['global_epoch']} of run {old_root or '(unknown)'}{detail}", flush=True)

    return lifecycle.Checkpointer(checkpoint_key(cfg, spec), lifecycle.Every.parse(cfg.tracking.checkpoint_every),
                                  cfg.tracking.resume, run_id, root_run_id, label, cadence, announce)


@dataclass
class Prepared:
    """A data set loaded once and placed on the device (a tuning study reuses it for every trial)."""

    data: LongTailData
    splits: DeviceSplits
    device: torch.device


def prepare(cfg: RunConfig) -> Prepared:
    """Load and long-tail the configured data and put its three splits on the training device."""
    device = resolve_device(cfg.device)
    data = build_dataset(cfg.data)
    splits = DeviceSplits(*(DeviceImages.from_numpy(x, y, device) for x, y in (
        (data.train_images, data.train_labels), (data.val_images, data.val_labels),
        (data.test_images, data.test_labels))))
    return Prepared(data, splits, device)


def build_experts(cfg: RunConfig, info: ClassInfo):
    """The method object, its expert specs, and their layout (validates `split_at`)."""
    method = build_method(cfg)
    specs = method.experts(info)
    layout = ExpertLayout(tuple(s.classes for s in specs), tuple(s.other for s in specs), info.num_classes,
                          router=method.router(specs) is not None)
    return method, specs, layout


def teacher_targets(experts: list[torch.nn.Module], layout: ExpertLayout, images: DeviceImages) -> torch.Tensor:
    """(N, K) teacher logits for a student: each image gets its *own* group's expert's logits on
    that expert's classes (training labels are known, so this routing is legitimate), -inf on
    every other class."""
    k = layout.num_classes
    labels = images.labels
    group = layout.group_of().to(labels.device)[labels]
    targets = torch.full((len(labels), k), float("-inf"), device=labels.device)
    for e, (model, classes) in enumerate(zip(experts, layout.owners)):
        rows = (group == e).nonzero().squeeze(1)
        if len(rows):
            logits = predict_logits(model, images.images[rows])[:, :len(classes)]
            targets[rows[:, None], torch.as_tensor(classes, device=labels.device)[None, :]] = logits
    return targets
