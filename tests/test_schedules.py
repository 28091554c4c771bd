"""Learning-rate schedules: the factor per epoch, and the rate the optimiser really used."""

import pytest

from ltexp import LtexpError
from ltexp.config import OptimConfig, resolve_config
from ltexp.schedules import Schedule, parse_milestones


def test_the_fields_schedule_is_cao_et_al_s_adjust_learning_rate():
    field = Schedule("multistep", epochs=200, gamma=0.01, milestones=(160, 180), warmup=5)

    def cao(epoch):  # kaidic/LDAM-DRW cifar_train.py, with its `epoch = epoch + 1` (1-based)
        return epoch / 5 if epoch <= 5 else 0.0001 if epoch > 180 else 0.01 if epoch > 160 else 1.0

    assert [field.factor(e) for e in range(1, 201)] == pytest.approx([cao(e) for e in range(1, 201)])


def test_step_cosine_and_constant_factors():
    assert [Schedule("step", step=2, gamma=0.5).factor(e) for e in range(1, 6)] == [1, 1, 0.5, 0.5, 0.25]
    cosine = Schedule("cosine", epochs=4)
    assert [cosine.factor(e) for e in range(1, 5)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)
    assert {Schedule().factor(e) for e in range(1, 10)} == {1.0}


def test_milestones_and_warmup_are_checked_naming_the_flag():
    assert parse_milestones("160, 180") == (160, 180)
    for bad in ("", "180,160", "0", "x"):
        with pytest.raises(LtexpError, match="--lr-milestones .* must be increasing epochs in \\[1, 200\\]"):
            OptimConfig(lr_schedule="multistep", lr_milestones=bad)
    with pytest.raises(LtexpError, match="--lr-milestones '160,250' must be increasing epochs in \\[1, 200\\]"):
        OptimConfig(lr_schedule="multistep", lr_milestones="160,250")
    with pytest.raises(LtexpError, match=r"--warmup-epochs 200 must be in \[0, --epochs 200\)"):
        OptimConfig(warmup_epochs=200)
    with pytest.raises(LtexpError, match="unknown --lr-schedule 'linear'"):
        OptimConfig(lr_schedule="linear")


def test_preset_field_is_cao_et_al_s_protocol_every_part_a_setting():
    cfg = resolve_config({"data": {"dataset": "cifar10"}, "method": {"method": "ldam_drw"}}, preset="field")
    o, loss = cfg.optim, cfg.loss
    assert (cfg.model.model, o.epochs, o.batch_size, o.lr, o.momentum, o.weight_decay) == ("resnet32", 200, 128, 0.1,
                                                                                            0.9, 2e-4)
    assert (o.lr_schedule, o.lr_milestones, o.lr_gamma, o.warmup_epochs) == ("multistep", "160,180", 0.01, 5)
    assert (loss.loss, loss.ldam_max_margin, loss.ldam_scale, loss.drw_epoch, loss.drw_beta) == ("ldam", 0.5, 30.0,
                                                                                                 161, 0.9999)
    assert cfg.data.augment == "crop_flip" and cfg.data.val_source == "holdout"  # selected on training images
    # What the user sets wins over the preset.
    assert resolve_config({"optim": {"epochs": 20, "lr_milestones": "10,15"}}, preset="field").optim.epochs == 20


def test_the_optimiser_follows_the_schedule_epoch_by_epoch():
    """The `lr` each epoch logged is the rate SGD used in it (read from the optimiser)."""
    from ltexp.training import prepare, train_expert
    from ltexp.methods import ExpertSpec, build_method

    cfg = resolve_config({"optim": {"epochs": 8, "lr": 0.05, "lr_schedule": "multistep", "lr_milestones": "4,6",
                                    "lr_gamma": 0.1, "warmup_epochs": 2}})
    prep = prepare(cfg)
    method = build_method(cfg)
    spec = ExpertSpec("all", tuple(range(prep.data.info.num_classes)))
    _, result, _ = train_expert(cfg, method, spec, prep, None, False, None, None)
    assert [h["lr"] for h in result.history] == pytest.approx(
        [0.025, 0.05, 0.05, 0.05, 0.005, 0.005, 0.0005, 0.0005])
