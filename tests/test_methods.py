"""Methods: one name per setting, each choice list validated against its implementing module,
and the settings each method logs."""

import pytest

from ltexp import LtexpError
from ltexp.config import FUSIONS, MODELS, RunConfig, resolve_config, setting_fields, used_settings
from ltexp.data import sampling
from ltexp.data.device import AUGMENTS, build_augment
from ltexp.data.longtail import IMB_TYPES, long_tail_counts
from ltexp.choices import (DEVICES, LOSS_OPTIONS, METHOD_LOSS, RESAMPLINGS, STUDENT, STUDENT_SAMPLINGS)
from ltexp.fusion import FUSIONS as FUSION_RULES
from ltexp.losses import LOSSES
from ltexp.methods import METHODS
from ltexp.models import BODIES


def test_every_choice_list_is_declared_once_and_keys_its_registry():
    fields = setting_fields(RunConfig())
    assert fields["method"].metadata["choices"] == tuple(METHODS)
    assert fields["loss"].metadata["choices"] == ("auto", *LOSSES)
    assert fields["fusion"].metadata["choices"] == FUSIONS == ("auto", *FUSION_RULES, STUDENT)
    assert fields["model"].metadata["choices"] == MODELS == ("auto", *BODIES)
    assert fields["device"].metadata["choices"] == DEVICES
    assert fields["augment"].metadata["choices"] == ("auto", *AUGMENTS)
    assert set(RESAMPLINGS) <= set(sampling.SAMPLERS)          # each re-sampling is a real sampler
    assert fields["student_sampling"].metadata["choices"] == STUDENT_SAMPLINGS
    assert set(STUDENT_SAMPLINGS) <= set(sampling.SAMPLERS)
    assert set(LOSS_OPTIONS) == set(LOSSES)                     # every loss says which options it reads
    for name in AUGMENTS:
        build_augment(name, 32)
    for imb_type in IMB_TYPES:
        long_tail_counts(10, 3, imb_type, 0.1)
    # Every field carries its help text beside it.
    assert all(f.metadata.get("help") for f in fields.values())


def test_every_method_resolves_and_has_stages():
    from ltexp.data import build_long_tail
    from ltexp.data.sources import load_digits_source
    from ltexp.training import expert_info
    from ltexp.methods import build_method

    info = build_long_tail(load_digits_source(), "exp", 0.1, "holdout", 20, seed=0).info
    for name in METHODS:
        cfg = resolve_config({"method": {"method": name}, "optim": {"epochs": 2}})
        method = build_method(cfg)
        spec = method.experts(info)[0]
        stages = method.stages(expert_info(info, spec), spec)
        assert stages and all(s.loss is not None for s in stages)
        if METHOD_LOSS[name]:  # a method defined by its loss trains with it
            assert cfg.loss.loss == METHOD_LOSS[name] and stages[0].loss.name == METHOD_LOSS[name]


def test_a_registry_that_disagrees_with_the_declared_names_is_refused_at_import():
    from ltexp.choices import registry

    assert registry("loss", ("a", "b"), {"a": 1, "b": 2}) == {"a": 1, "b": 2}
    with pytest.raises(RuntimeError, match=r"the loss registry \['a', 'c'\] disagrees .* \(missing \['b'\], not declared \['c'\]\)"):
        registry("loss", ("a", "b"), {"a": 1, "c": 2})
    with pytest.raises(RuntimeError, match="disagrees"):  # the order is what --help lists and a grid runs
        registry("loss", ("a", "b"), {"b": 2, "a": 1})


def test_a_method_defined_by_its_loss_refuses_another_loss():
    with pytest.raises(LtexpError, match="--method balanced_softmax trains with --loss balanced_softmax, not 'ce'"):
        resolve_config({"method": {"method": "balanced_softmax"}, "loss": {"loss": "ce"}})
    assert resolve_config({"method": {"method": "split"}, "loss": {"loss": "balanced_softmax"}}).loss.loss == "balanced_softmax"


def test_drw_epoch_auto_follows_cao_et_al():
    cfg = resolve_config({"method": {"method": "ldam_drw"}, "optim": {"epochs": 200}})
    assert cfg.loss.drw_epoch == 161  # re-weighting from the 161st epoch, as 160 of 200 (0-based)


@pytest.mark.parametrize("method,present,absent", [
    ("baseline", {"method", "loss", "momentum", "epochs"},
     {"sampling", "fusion", "expert_mode", "lws_mode", "tau", "experiment", "register_as", "crt_epochs", "data_dir"}),
    ("resample", {"sampling"}, {"fusion", "lws_mode"}),
    ("lws", {"lws_mode", "lws_epochs"}, {"sampling", "fusion"}),
    ("split", {"fusion", "expert_mode", "num_groups", "lws", "lws_mode"}, {"sampling", "other_size", "split_at"}),
    ("logit_adjust", {"tau"}, {"ldam_scale"}),
    ("ldam_drw", {"drw_epoch", "ldam_scale"}, {"tau"}),
    ("crt", {"crt_epochs", "crt_lr"}, {"lws_epochs"}),
])
def test_a_run_logs_only_the_settings_its_method_uses(method, present, absent):
    used = used_settings(resolve_config({"method": {"method": method}}))
    assert present <= set(used) and not absent & set(used)


def test_other_size_is_logged_only_for_other_experts():
    cfg = resolve_config({"method": {"method": "split"}, "split": {"expert_mode": "other"}})
    assert "other_size" in used_settings(cfg)


def test_split_experts_use_the_loss_with_their_own_counts():
    """--loss reaches every expert of a split run, built from that expert's classes (and its
    "other" label, counted as the images it draws per epoch)."""
    from ltexp.data import build_long_tail
    from ltexp.data.sources import load_digits_source
    from ltexp.training import expert_info
    from ltexp.losses import BalancedSoftmax, log_prior
    from ltexp.methods import build_method

    info = build_long_tail(load_digits_source(), "exp", 0.01, "holdout", 20, seed=0).info
    cfg = resolve_config({"method": {"method": "split"}, "loss": {"loss": "balanced_softmax"},
                          "split": {"expert_mode": "other"}})
    method = build_method(cfg)
    for spec in method.experts(info):
        own = expert_info(info, spec)
        loss = method.stages(own, spec)[0].loss
        assert isinstance(loss, BalancedSoftmax)
        assert loss.counts == [*info.train_counts[list(spec.classes)].tolist(), spec.other_per_epoch]
        assert loss.offset.tolist() == log_prior(loss.counts).tolist()
        # No more "other" images are drawn per epoch than the other groups hold.
        assert spec.other_per_epoch <= int(info.train_counts.sum() - info.train_counts[list(spec.classes)].sum())
