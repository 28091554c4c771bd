"""Logged = used: every config field either changes what is trained or evaluated, or is on the
documented bookkeeping list (config.BOOKKEEPING_FIELDS).

For each field the test trains tiny models twice, with the field at a base value and at another,
and compares a fingerprint of everything training produced: the long-tailed data, the stages, the
experts' weights (post-hoc step included), a split's router and student when it trains them, and
the fusion rules the method may choose from.
"""

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_cifar_archive, write_image_folder
from ltexp.cli import TRAIN_SECTIONS, SECTIONS
from ltexp.config import BOOKKEEPING_FIELDS, RunConfig, resolve_config, setting_fields, used_settings
from ltexp.training import build_experts, expert_info, prepare, teacher_targets, train_expert

# field -> (base settings, the field's other value); base settings make the field apply.
DIGITS = {"epochs": 1, "batch_size": 128}
TWO = {"epochs": 2}  # for settings that act from the second epoch on
CASES = {
    "dataset": ({"imb_factor": 0.1}, "cifar10"),
    "data_dir": ({"dataset": "cifar10", "imb_factor": 0.1}, "other"),
    "imb_type": ({}, "step"),
    "imb_factor": ({}, 0.1),
    "val_source": ({}, "paper"),
    "val_per_class": ({}, 10),
    "image_size": ({"dataset": "folder", "imb_factor": 0.5}, 12),
    "augment": ({}, "none"),
    "data_seed": ({}, 1),
    "model": ({}, "resnet32"),
    "weights": ({}, "smallcnn.pt"),  # a file the fixture writes: the digits smallcnn body, all weights 0.01
    "epochs": ({}, 2),
    "batch_size": ({}, 64),
    "lr": ({}, 0.01),
    "momentum": ({}, 0.5),
    "weight_decay": ({}, 0.01),
    "lr_step": ({**TWO, "lr_gamma": 0.1}, 1),
    "lr_gamma": ({**TWO, "lr_step": 1}, 0.5),
    "lr_schedule": (TWO, "cosine"),
    "lr_milestones": ({**TWO, "lr_schedule": "multistep", "lr_milestones": "2"}, "1"),
    "warmup_epochs": ({"epochs": 3}, 2),  # epoch 1 at half the rate (warm-up 1 would change nothing)
    "clip_norm": ({}, 0.01),
    "method": ({}, "resample"),
    "sampling": ({"method": "resample"}, "under"),
    "lws_mode": ({"method": "lws"}, "joint"),
    "lws_epochs": ({"method": "lws", "lws_mode": "decoupled"}, 2),
    "lws_lr": ({"method": "lws", "lws_mode": "decoupled"}, 0.5),
    "crt_epochs": ({"method": "crt"}, 2),
    "crt_lr": ({"method": "crt"}, 0.5),
    "loss": ({}, "focal"),
    "tau": ({"loss": "logit_adjust"}, 2.0),
    "ldam_max_margin": ({"loss": "ldam"}, 0.2),
    "ldam_scale": ({"loss": "ldam"}, 10.0),
    "drw_epoch": ({"loss": "ldam"}, 0),
    "drw_beta": ({"loss": "ldam", "drw_epoch": 1}, 0.99),
    "focal_gamma": ({"loss": "focal"}, 3.0),
    "num_groups": ({"method": "split"}, 3),
    "split_at": ({"method": "split"}, "3"),
    "expert_mode": ({"method": "split"}, "other"),
    "other_size": ({"method": "split", "expert_mode": "other"}, "min"),
    "fusion": ({"method": "split"}, "concat"),
    "lws": ({"method": "split"}, False),
    "router": ({"method": "split"}, True),
    "distill": ({"method": "split"}, True),
    "distill_temperature": ({"method": "split", "distill": True}, 4.0),
    "distill_weight": ({"method": "split", "distill": True}, 0.1),
    "student_sampling": ({"method": "split", "distill": True}, "balanced"),
    "seed": ({}, 1),
    "preset": ({}, "paper"),
}


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("coverage")
    write_cifar_archive(root / "cifar", "cifar10", 30, 5, seed=0)
    write_cifar_archive(root / "other", "cifar10", 30, 5, seed=1)
    write_image_folder(root / "images", 24, 6)
    from ltexp.models import build_model
    body = build_model("smallcnn", (8, 8, 1), 10, [0.0], [1.0]).body
    torch.save({k: torch.full_like(v, 0.01) if v.is_floating_point() else v for k, v in body.state_dict().items()},
               root / "smallcnn.pt")
    return root


def _config(settings: dict, data_dirs: Path) -> RunConfig:
    sections: dict = {"optim": dict(DIGITS), "data": {"augment": "crop"}}
    settings = dict(settings)
    for name, value in settings.items():
        if name == "dataset":
            value = f"folder:{data_dirs / 'images'}" if value == "folder" else value
            sections["data"]["data_dir"] = str(data_dirs / "cifar")
            sections["model"] = {"model": "smallcnn"}
            if value == "cifar10":
                sections["data"]["val_per_class"] = 5
        if name in ("data_dir", "weights"):
            value = str(data_dirs / value)
        if name in ("seed", "preset"):
            continue
        section = next(sec for sec in TRAIN_SECTIONS if name in SECTIONS[sec].__dataclass_fields__)
        sections.setdefault(section, {})[name] = value
    return resolve_config(sections, seed=settings.get("seed", 0), device="cpu", preset=settings.get("preset", "ltexp"))


_FINGERPRINTS: dict[str, str] = {}  # repr(config) -> digest: a base config many fields share is trained once


def fingerprint(cfg: RunConfig) -> str:
    """A digest of the data, the stages and the trained experts (weights after any post-hoc step)."""
    if repr(cfg) not in _FINGERPRINTS:
        _FINGERPRINTS[repr(cfg)] = _fingerprint(cfg)
    return _FINGERPRINTS[repr(cfg)]


def _fingerprint(cfg: RunConfig) -> str:
    torch.set_num_threads(1)
    prep = prepare(cfg)
    digest = hashlib.sha256()
    for array in (prep.data.train_images, prep.data.train_labels, prep.data.val_labels, prep.data.test_labels):
        digest.update(np.ascontiguousarray(array).tobytes())
    method, specs, layout = build_experts(cfg, prep.data.info)
    digest.update(repr(method.fusion_rules(layout)).encode())

    def train(spec, teacher=None):
        model, result, _ = train_expert(cfg, method, spec, prep, None, False, teacher=teacher)
        stages = method.stages(expert_info(prep.data.info, spec), spec)
        digest.update(repr([(s.name, s.epochs, s.sampler, s.lr, s.momentum, s.weight_decay) for s in stages]).encode())
        for value in model.state_dict().values():
            digest.update(value.detach().cpu().numpy().tobytes())
        return model

    experts = [train(spec) for spec in specs]
    router, student = method.router(specs), method.student(prep.data.info)  # the split's extra models
    if router is not None:
        train(router)
    if student is not None:
        train(student, teacher_targets(experts, layout, prep.splits.train))
    return digest.hexdigest()


def test_every_field_is_covered_or_bookkeeping():
    every = set(setting_fields(RunConfig()))
    assert every == set(CASES) | set(BOOKKEEPING_FIELDS), "a new config field needs a case here or a bookkeeping reason"
    assert not set(CASES) & set(BOOKKEEPING_FIELDS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_field_changes_what_is_trained(name, data_dirs):
    base_settings, other = CASES[name]
    base = _config(base_settings, data_dirs)
    changed = _config({**base_settings, name: other}, data_dirs)
    assert name in used_settings(base) or name == "split_at"  # logged when it applies
    assert name in used_settings(changed)
    assert fingerprint(base) != fingerprint(changed), f"--{name} is logged but changes nothing"
