"""The one engine: stages from methods, LWS decoupled, re-sampling, clipping, bad losses."""

import numpy as np
import pytest
import torch

from ltexp import LtexpError
from ltexp.config import LossConfig, MethodConfig, OptimConfig, RunConfig
from ltexp.data import build_long_tail
from ltexp.data.device import DeviceImages, build_augment
from ltexp.data.sources import load_digits_source
from ltexp import engine
from ltexp.engine import fit, predict_logits
from ltexp.methods import TRAIN_SCALES, build_method
from ltexp.models import build_model, channel_stats


@pytest.fixture(scope="module")
def digits():
    return build_long_tail(load_digits_source(), "exp", 0.1, "holdout", 20, seed=0)


def _setup(data, arch="smallcnn"):
    torch.manual_seed(0)
    mean, std = channel_stats(data.train_images)
    model = build_model(arch, data.image_shape, data.info.num_classes, mean, std)
    train = DeviceImages.from_numpy(data.train_images, data.train_labels, "cpu")
    val = DeviceImages.from_numpy(data.val_images, data.val_labels, "cpu")
    return model, train, val


def _stages(method_cfg, optim, info, loss="ce", **loss_options):
    """The stages a method gives one model trained on classes with `info`'s counts."""
    cfg = RunConfig(optim=optim, method=method_cfg, loss=LossConfig(loss=loss, **loss_options))
    return build_method(cfg).stages(info)


def _fit(model, train, val, data, method_cfg, epochs=3, **kw):
    optim = OptimConfig(epochs=epochs, batch_size=64, lr=0.05, lr_step=100)
    stages = _stages(method_cfg, optim, data.info)
    return fit(model, train, val, stages, data.info, batch_size=64, clip_norm=kw.pop("clip_norm", 0.0),
               augment=build_augment("crop", 8), seed=0, **kw)


def test_baseline_learns_digits(digits):
    model, train, val = _setup(digits)
    result = _fit(model, train, val, digits, MethodConfig("baseline"), epochs=8)
    assert result.best_val_acc > 0.6  # chance is 0.1
    assert len(result.history) == 8 and result.images_seen == 8 * len(train)
    assert {"train_loss", "train_acc", "lr", "epoch_time_s", "val_acc", "val_head_acc", "val_ece"} <= set(result.history[0])
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_same_seed_is_repeatable_on_cpu(digits):
    runs = []
    for _ in range(2):
        model, train, val = _setup(digits)
        _fit(model, train, val, digits, MethodConfig("baseline"), epochs=2)
        runs.append(predict_logits(model, val.images))
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("sampling", ["over", "under", "balanced"])
def test_resampling_changes_class_frequencies_seen(digits, sampling):
    model, train, val = _setup(digits)
    result = _fit(model, train, val, digits, MethodConfig("resample", sampling=sampling), epochs=2)
    natural = np.bincount(digits.train_labels).tolist()
    seen = result.seen_per_class
    if sampling == "over":
        assert seen == [[max(natural)] * 10] * 2
    elif sampling == "under":
        assert seen == [[min(natural)] * 10] * 2
    else:
        # Epoch length stays the data set's; each class expects 2 * 406 / 10 = 81 draws over two
        # epochs (natural sampling would give 200 and 20).
        assert all(sum(epoch) == len(digits.train_labels) for epoch in seen)
        assert all(50 < a + b < 115 for a, b in zip(*seen))
    baseline = _fit(*_setup(digits), digits, MethodConfig("baseline"), epochs=1)
    assert baseline.seen_per_class == [natural]


def test_lws_decoupled_changes_only_the_scales(digits):
    model, train, val = _setup(digits)
    stages = _stages(MethodConfig("lws", lws_mode="decoupled", lws_epochs=3, lws_lr=0.5),
                     OptimConfig(epochs=2, lr=0.05, lr_step=100), digits.info)
    assert [s.trainable for s in stages][-1] == TRAIN_SCALES and stages[-1].sampler == "balanced"
    fit(model, train, val, stages[:1], digits.info, batch_size=64, clip_norm=0, augment=build_augment("crop", 8), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert torch.equal(model.head.scales.detach(), torch.ones(10))
    fit(model, train, val, stages[1:], digits.info, batch_size=64, clip_norm=0, augment=build_augment("crop", 8), seed=0)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["head.scales"]  # weights, biases and BatchNorm statistics untouched
    assert not torch.allclose(after["head.scales"], torch.ones(10))


def test_lws_joint_learns_scales_with_the_network(digits):
    model, train, val = _setup(digits)
    _fit(model, train, val, digits, MethodConfig("lws", lws_mode="joint"), epochs=2)
    assert not torch.allclose(model.head.scales.detach(), torch.ones(10))
    assert len(_stages(MethodConfig("lws", lws_mode="joint"), OptimConfig(), digits.info)) == 1


def test_baseline_keeps_scales_at_one(digits):
    model, train, val = _setup(digits)
    _fit(model, train, val, digits, MethodConfig("baseline"), epochs=1)
    assert torch.equal(model.head.scales.detach(), torch.ones(10))


def test_gradient_clipping_bounds_the_update(digits):
    # One step at lr 1 without momentum history: the update's norm equals the clipped gradient's.
    model, train, val = _setup(digits)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters() if p.requires_grad])
    optim = OptimConfig(epochs=1, batch_size=len(train), lr=1.0, weight_decay=0.0, lr_step=10)
    stages = _stages(MethodConfig("baseline"), optim, digits.info)
    stages = [type(stages[0])(**{**stages[0].__dict__, "weight_decay": 0.0, "momentum": 0.0})]
    fit(model, train, val, stages, digits.info, batch_size=len(train), clip_norm=0.5,
        augment=build_augment("none", 8), seed=0)
    moved = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad]) - start
    assert moved.norm().item() == pytest.approx(0.5, rel=1e-3)


def test_non_finite_loss_is_a_clear_error(digits):
    model, train, val = _setup(digits)
    with pytest.raises(LtexpError, match=r"training loss is nan in stage 'train' epoch 1: lower --lr"):
        optim = OptimConfig(epochs=2, batch_size=64, lr=1e30, lr_step=100)
        fit(model, train, val, _stages(MethodConfig("baseline"), optim, digits.info), digits.info,
            batch_size=64, clip_norm=0, augment=build_augment("crop", 8), seed=0)


@pytest.mark.parametrize("arch,shape", [("resnet18", (32, 32, 3)), ("resnet32", (32, 32, 3)), ("smallcnn", (8, 8, 1))])
def test_every_model_has_features_and_head(arch, shape):
    model = build_model(arch, shape, 7, [100.0] * shape[2], [50.0] * shape[2]).eval()
    images = torch.randint(0, 255, (2, shape[2], shape[0], shape[1]), dtype=torch.uint8)
    features = model.features(images)
    assert features.shape == (2, model.num_features)
    assert torch.allclose(model.head(features), model(images))
    assert model(images).shape == (2, 7)


def test_momentum_is_the_one_configured(digits):
    """--momentum reaches SGD: 0.5 and 0.9 train different weights from the same start."""
    weights = []
    for momentum in (0.5, 0.9):
        model, train, val = _setup(digits)
        optim = OptimConfig(epochs=1, batch_size=64, lr=0.05, lr_step=100, momentum=momentum)
        stages = _stages(MethodConfig("baseline"), optim, digits.info)
        assert stages[0].momentum == momentum
        fit(model, train, val, stages, digits.info, batch_size=64, clip_norm=0, augment=build_augment("crop", 8), seed=0)
        weights.append(model.head.linear.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])


def test_crt_retrains_only_a_fresh_classifier(digits):
    model, train, val = _setup(digits)
    stages = _stages(MethodConfig("crt", crt_epochs=2), OptimConfig(epochs=2, lr=0.05, lr_step=100), digits.info)
    assert [s.name for s in stages] == ["train", "crt"] and stages[1].reset_head and stages[1].sampler == "balanced"
    fit(model, train, val, stages[:1], digits.info, batch_size=64, clip_norm=0, augment=build_augment("crop", 8), seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fit(model, train, val, stages[1:], digits.info, batch_size=64, clip_norm=0, augment=build_augment("crop", 8), seed=0)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"head.linear.weight", "head.linear.bias"}  # body and BatchNorm statistics frozen


def test_stage_loss_is_what_the_engine_minimises(digits):
    """The engine calls the stage's loss: LDAM (cosine head, margins) reports a larger loss than CE
    on the same first batch, and its DRW weights switch on at --drw-epoch."""
    optim = OptimConfig(epochs=3, batch_size=64, lr=0.05, lr_step=100)
    ldam = _stages(MethodConfig("baseline"), optim, digits.info, "ldam", drw_epoch=2)[0].loss
    ldam.start_epoch(1)
    assert ldam.weight is None
    ldam.start_epoch(2)
    assert ldam.weight is not None and ldam.weight[-1] > ldam.weight[0]
    losses = {}
    for name in ("ce", "balanced_softmax"):
        model, train, val = _setup(digits)
        stages = _stages(MethodConfig("baseline"), OptimConfig(epochs=1, batch_size=64, lr=0.05, lr_step=100), digits.info,
                         name)
        losses[name] = fit(model, train, val, stages, digits.info, batch_size=64, clip_norm=0,
                           augment=build_augment("crop", 8), seed=0).history[0]["train_loss"]
    assert losses["ce"] != losses["balanced_softmax"]


def test_compile_runs_full_batches_through_one_compiled_graph(digits, monkeypatch):
    """`--compile default`: every full batch's forward and backward go through `torch.compile`'s
    module, one graph for the whole stage (the last, smaller batch of an epoch runs eagerly, so
    no second shape is compiled); the model learns as eager training does."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled_calls = []
    real_compile_step = engine.compile_step

    def counting_compile_step(model, mode):
        compiled = real_compile_step(model, mode)
        assert compiled is not model

        def call(images):
            compiled_calls.append(len(images))
            return compiled(images)
        return call

    monkeypatch.setattr(engine, "compile_step", counting_compile_step)
    model, train, val = _setup(digits)
    assert len(train) % 64 != 0  # so each epoch ends with a smaller batch
    compiled = _fit(model, train, val, digits, MethodConfig("baseline"), epochs=3, compile_mode="default")
    compiled_logits = predict_logits(model, val.images)
    assert compiled_calls == [64] * (3 * (len(train) // 64))
    assert counters["stats"]["unique_graphs"] == 1  # one shape, one graph: no recompilation per epoch

    monkeypatch.setattr(engine, "compile_step", real_compile_step)
    model, train, val = _setup(digits)
    eager = _fit(model, train, val, digits, MethodConfig("baseline"), epochs=3)
    assert compiled.images_seen == eager.images_seen
    assert np.isfinite([h["train_loss"] for h in compiled.history]).all()
    assert compiled.best_val_acc > 0.2 and abs(compiled.best_val_acc - eager.best_val_acc) < 0.1  # chance: 0.1
    agreement = (compiled_logits.argmax(1) == predict_logits(model, val.images).argmax(1)).float().mean().item()
    assert agreement >= 0.9, agreement


def test_compile_none_is_the_model_itself_and_bad_modes_are_one_line():
    model = torch.nn.Linear(2, 2)
    assert engine.compile_step(model, "none") is model
    with pytest.raises(LtexpError, match="unknown --compile 'max': allowed are none, default, reduce-overhead"):
        engine.compile_step(model, "max")


def test_each_compiled_model_is_compiled_afresh(monkeypatch):
    """A process that trains many compiled models one after the other (a grid's cells, a split's
    experts) compiles each of them: none falls back to eager past torch's recompile limit."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 1)  # torch's default is 8
    counters.clear()
    images = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    for outputs in (10, 7, 4):  # each head's shape needs a graph of its own
        torch.manual_seed(0)
        model = build_model("smallcnn", (8, 8, 1), outputs, [8.0], [4.0])
        assert engine.compile_step(model, "default")(images).shape == (4, outputs)
    assert counters["stats"]["unique_graphs"] == 3


def test_the_last_epochs_weights_come_back_beside_the_selected_ones(digits):
    """Validation on the head class alone: early epochs, predicting it for most images, score
    best, so the selected epoch is an early one and the last epoch's weights differ from it."""
    model, train, _ = _setup(digits)
    head = digits.val_labels == 0
    val = DeviceImages.from_numpy(digits.val_images[head], digits.val_labels[head], "cpu")
    last_seen = {}

    def keep_weights(record):  # called after each epoch's training, before any restore
        last_seen.update({k: v.detach().clone() for k, v in model.state_dict().items()})

    result = _fit(model, train, val, digits, MethodConfig("baseline"), epochs=8, on_epoch=keep_weights)
    assert result.best_epoch < 8 and result.last_state is not None
    assert all(torch.equal(result.last_state[k], last_seen[k]) for k in last_seen)  # the last epoch's
    assert not all(torch.equal(v, last_seen[k]) for k, v in model.state_dict().items())  # the model: the best's
    # When the last epoch is the best one there is nothing else to report.
    model, train, val = _setup(digits)
    result = _fit(model, train, val, digits, MethodConfig("baseline"), epochs=1)
    assert result.best_epoch == 1 and result.last_state is None


def test_train_step_is_one_sgd_step_on_the_given_loss_with_clipping_and_teacher_targets():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    images, labels = torch.randn(8, 4) * 100, torch.arange(8) % 3  # large inputs: a gradient norm well over 0.5
    soft = torch.softmax(torch.randn(8, 3), 1)
    teachers = []

    def loss(logits, targets, teacher=None):
        teachers.append(teacher)
        return torch.nn.functional.cross_entropy(logits, targets)

    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # no momentum or decay: update = -gradient
    value, logits = engine.train_step(model, optimizer, images, labels, loss, clip_norm=0.5, soft_targets=soft)
    assert teachers[-1] is soft and logits.shape == (8, 3) and not value.requires_grad
    assert value.item() == pytest.approx(torch.nn.functional.cross_entropy(images @ before[0].T + before[1], labels).item())
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert torch.linalg.vector_norm(update).item() == pytest.approx(0.5, rel=1e-4)  # clipped to norm 0.5
    before = [p.detach().clone() for p in model.parameters()]
    engine.train_step(model, optimizer, images, labels, loss)
    assert teachers[-1] is None  # no teacher: the loss is called with (logits, labels) only
    update = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, model.parameters())])
    assert torch.linalg.vector_norm(update).item() > 1.0  # unclipped
