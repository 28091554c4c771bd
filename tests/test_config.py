"""Configs: presets, flattening to MLflow params, validation messages."""

import pytest

from ltexp import LtexpError
from ltexp.config import DataConfig, MethodConfig, OptimConfig, flatten, resolve_config


def test_presets_fill_auto_by_data_set():
    cifar = resolve_config({"data": {"dataset": "cifar10"}, "optim": {"epochs": "auto"}})
    assert (cifar.optim.epochs, cifar.optim.lr, cifar.optim.batch_size, cifar.optim.lr_step) == (200, 0.1, 128, 150)
    assert cifar.optim.weight_decay == 2e-4 and cifar.model.model == "resnet18"
    assert cifar.data.augment == "crop_flip" and cifar.data.val_per_class == 100
    digits = resolve_config({"data": {"dataset": "digits"}, "optim": {"epochs": 7}})
    assert digits.optim.epochs == 7 and digits.model.model == "smallcnn" and digits.data.augment == "crop"
    assert resolve_config({"data": {"dataset": "cifar100"}}).data.val_per_class == 20


def test_flatten_uses_flag_names():
    flat = flatten(resolve_config({}))
    assert {"dataset", "imb_type", "imb_factor", "val_source", "method", "clip_norm", "lws_mode", "seed", "epochs"} <= set(flat)
    assert not any("." in key for key in flat)


@pytest.mark.parametrize("make,match", [
    (lambda: DataConfig(dataset="mnist"), "unknown --dataset 'mnist': allowed are digits, cifar10, cifar100, folder:<path>, list:<root>:<train.txt>,<test.txt> or pack:<file>"),
    (lambda: DataConfig(imb_factor=0), r"--imb-factor 0 is outside \(0, 1\]"),
    (lambda: DataConfig(imb_factor=1.5), r"--imb-factor 1.5 is outside \(0, 1\]"),
    (lambda: DataConfig(imb_type="linear"), "unknown --imb-type 'linear': allowed are exp, step"),
    (lambda: DataConfig(val_source="test"), "unknown --val-source 'test'"),
    (lambda: MethodConfig(method="mixup"), "unknown --method 'mixup': allowed are baseline, resample, lws"),
    (lambda: OptimConfig(epochs=0), "--epochs 0 must be >= 1"),
    (lambda: OptimConfig(clip_norm=-1), "--clip-norm -1 must be >= 0"),
])
def test_bad_values_name_the_value_and_what_is_allowed(make, match):
    with pytest.raises(LtexpError, match=match):
        make()


@pytest.mark.parametrize("sections,seed,message", [
    ({"optim": {"weight_decay": float("nan")}}, 0, "--weight-decay nan is not a finite number"),
    ({"optim": {"weight_decay": float("inf")}}, 0, "--weight-decay inf is not a finite number"),
    ({"loss": {"focal_gamma": float("nan")}}, 0, "--focal-gamma nan is not a finite number"),
    ({"loss": {"ldam_max_margin": float("nan")}}, 0, "--ldam-max-margin nan is not a finite number"),
    ({"optim": {"lr": 1e308}}, 0, r"--lr 1e\+308 is beyond float32's range \(\|x\| <= 3.402823e\+38\)"),
    ({"optim": {"weight_decay": -1e39}}, 0, r"--weight-decay -1e\+39 is beyond float32's range"),
    ({}, -1, r"--seed -1 is outside \[0, 4294967295\]"),
    ({}, 99999999999999999999, r"--seed 99999999999999999999 is outside \[0, 4294967295\]"),
    ({"data": {"data_seed": -1}}, 0, r"--data-seed -1 is outside \[0, 4294967295\]"),
])
def test_every_float_is_finite_and_every_seed_in_range_naming_itself(sections, seed, message):
    with pytest.raises(LtexpError, match=message):
        resolve_config(sections, seed=seed)
