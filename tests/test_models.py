"""Models: the torchvision ImageNet-scale bodies train under ltexp's head, a body's weights load
from a local state_dict file (and only a fitting one), and the large benchmarks' presets resolve."""

import pytest
import torch
from torchvision import models as tv

from ltexp import LtexpError
from ltexp.config import resolve_config, used_settings
from ltexp.engine import train_step
from ltexp.models import build_model

CLASSES = 5
# Body -> width of the pooled features it hands the head.
LARGE_BODIES = {"resnet10": 512, "resnet50": 2048, "resnet152": 2048, "resnext50_32x4d": 2048}


def _images(n: int, side: int, channels: int = 3, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, side, side), dtype=torch.uint8, generator=generator)


def _model(arch: str, side: int = 32, channels: int = 3, seed: int = 0, weights: str = ""):
    torch.manual_seed(seed)
    return build_model(arch, (side, side, channels), CLASSES, [127.0] * channels, [60.0] * channels, weights=weights)


@pytest.mark.parametrize("arch", sorted(LARGE_BODIES))
def test_each_large_body_trains_one_step_under_the_ltexp_head(arch):
    """Forward and backward at 32 px on CPU: the body ends at pooled features (torchvision's fc is
    gone), ltexp's head gives one logit per class, and the step moves the stem and the head."""
    model = _model(arch).train()
    images, labels = _images(2, 32), torch.tensor([0, 3])
    assert model.features(images).shape == (2, LARGE_BODIES[arch]) and model.num_features == LARGE_BODIES[arch]
    assert isinstance(model.body.fc, torch.nn.Identity)
    stem, head = model.body.conv1.weight.detach().clone(), model.head.linear.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss, logits = train_step(model, optimizer, images, labels, torch.nn.functional.cross_entropy)
    assert logits.shape == (2, CLASSES) and torch.isfinite(loss)
    assert not torch.equal(model.body.conv1.weight, stem) and not torch.equal(model.head.linear.weight, head)


def test_resnet10_is_one_basic_block_per_stage():
    """OLTR's / classifier balancing's ResNet-10: torchvision's BasicBlock, layers [1, 1, 1, 1]."""
    body = _model("resnet10").body
    stages = [body.layer1, body.layer2, body.layer3, body.layer4]
    assert [len(stage) for stage in stages] == [1, 1, 1, 1]
    assert all(isinstance(stage[0], tv.resnet.BasicBlock) for stage in stages)
    assert [stage[0].conv2.out_channels for stage in stages] == [64, 128, 256, 512]


def test_grey_images_get_a_one_channel_stem():
    """Digits (8x8, one channel) run through an ImageNet body: its stem takes what the images have."""
    model = _model("resnet10", side=8, channels=1).train()
    assert model.body.conv1.weight.shape == (64, 1, 7, 7)
    logits = model(_images(2, 8, channels=1))
    logits.sum().backward()
    assert logits.shape == (2, CLASSES) and model.body.conv1.weight.grad is not None


def test_weights_file_is_what_the_body_starts_from(tmp_path):
    """A torchvision state_dict (its fc included, which is skipped) becomes the body's parameters
    and buffers exactly; the head keeps its own initialisation; without the file the body differs."""
    torch.manual_seed(123)
    reference = tv.resnet.ResNet(tv.resnet.BasicBlock, [1, 1, 1, 1])
    reference.bn1.running_mean.uniform_()  # buffers travel too
    path = tmp_path / "resnet10.pt"
    torch.save(reference.state_dict(), path)
    loaded, fresh = _model("resnet10", weights=str(path)), _model("resnet10")
    saved = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    body = loaded.body.state_dict()
    assert body.keys() == saved.keys()
    assert all(torch.equal(body[k], saved[k]) for k in saved)
    assert not torch.equal(fresh.body.conv1.weight, loaded.body.conv1.weight)
    assert torch.equal(fresh.head.linear.weight, loaded.head.linear.weight)  # same seed, head untouched


def test_weights_setting_reaches_the_trained_model(tmp_path):
    """Logged = used: `--weights` in a resolved config is what an expert's model starts from."""
    from ltexp.training import build_experts, new_expert_model, prepare

    body = _model("smallcnn", side=8, channels=1, seed=7).body
    with torch.no_grad():
        body[0].weight.fill_(0.25)
    path = tmp_path / "smallcnn.pt"
    torch.save(body.state_dict(), path)
    cfg = resolve_config({"model": {"model": "smallcnn", "weights": str(path)}, "optim": {"epochs": 1}}, device="cpu")
    assert used_settings(cfg)["weights"] == str(path)
    prep = prepare(cfg)
    method, specs, _ = build_experts(cfg, prep.data.info)
    model = new_expert_model(cfg, method, specs[0], prep)
    assert all(torch.equal(model.body.state_dict()[k], v) for k, v in body.state_dict().items())


def _fails(path, arch="resnet10", channels=3) -> str:
    with pytest.raises(LtexpError) as err:
        _model(arch, channels=channels, weights=str(path))
    message = str(err.value)
    assert "\n" not in message and f"--weights {str(path)!r}" in message
    return message


def test_a_weights_file_that_does_not_fit_is_one_line_naming_file_and_keys(tmp_path):
    assert "no such file" in _fails(tmp_path / "absent.pt")
    resnet10 = tmp_path / "resnet10.pt"
    torch.save(_model("resnet10").body.state_dict(), resnet10)
    message = _fails(resnet10, arch="resnet50")
    assert "does not fit --model resnet50" in message and "missing keys ['layer1.0.conv3.weight'" in message
    assert "'layer1.0.bn2.weight'" not in message.split("unexpected")[0]  # keys both have are not named
    assert "(64, 3, 7, 7) in the file, the body needs (64, 1, 7, 7)" in _fails(resnet10, channels=1)
    extra = tmp_path / "extra.pt"
    torch.save({**_model("resnet10").body.state_dict(), "projector.weight": torch.zeros(2)}, extra)
    assert "1 unexpected keys ['projector.weight']" in _fails(extra)
    wrapped = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "state_dict": _model("resnet10").body.state_dict()}, wrapped)
    assert "its entry 'epoch' is a int, not a tensor" in _fails(wrapped)
    pickled = tmp_path / "pickled.pt"
    torch.save({"head": torch.nn.Linear(2, 2)}, pickled)  # a module: code, which weights_only refuses
    assert "Unsupported global: GLOBAL torch.nn.modules.linear.Linear was not an allowed global" in _fails(pickled)
    garbage = tmp_path / "notes.txt"
    garbage.write_text("not a torch file")
    assert "is not a state_dict file that torch.load(weights_only=True) reads" in _fails(garbage)


@pytest.mark.parametrize("preset,expected", [
    ("imagenet_lt", {"model": "resnext50_32x4d", "epochs": 90, "batch_size": 512, "lr": 0.2, "weight_decay": 5e-4}),
    ("places_lt", {"model": "resnet152", "epochs": 30, "batch_size": 256, "lr": 0.01, "weight_decay": 5e-4}),
    ("inat18", {"model": "resnet50", "epochs": 90, "batch_size": 512, "lr": 0.2, "weight_decay": 1e-4}),
])
def test_large_benchmark_presets_resolve(preset, expected):
    cfg = resolve_config({"data": {"dataset": "folder:/images"}}, preset=preset)
    got = {"model": cfg.model.model, "epochs": cfg.optim.epochs, "batch_size": cfg.optim.batch_size,
           "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay}
    assert got == expected
    assert (cfg.optim.lr_schedule, cfg.optim.momentum, cfg.data.augment, cfg.data.image_size) == ("cosine", 0.9,
                                                                                                  "crop_flip", 224)
    assert cfg.data.imb_factor == 1.0  # the benchmark's split files are long-tailed already: counts kept
    assert cfg.model.weights == ""  # weights are the user's local file, never a preset's
    mine = resolve_config({"data": {"dataset": "folder:/images"}, "optim": {"epochs": 3}}, preset=preset)
    assert mine.optim.epochs == 3  # what the user sets wins over the preset


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_large_body_trains_in_bf16_channels_last_on_cuda():
    """The engine's CUDA path (bf16 autocast, channels_last) holds for the torchvision bodies: the
    convolutions compute in bf16, the weights stay float32, the loss is finite."""
    images = _images(8, 64).cuda()
    model = _model("resnet50").cuda().to(memory_format=torch.channels_last).train()
    dtypes = set()
    hook = model.body.conv1.register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss, logits = train_step(model, optimizer, images, torch.arange(8, device="cuda") % CLASSES,
                              torch.nn.functional.cross_entropy)
    hook.remove()
    assert dtypes == {torch.bfloat16} and torch.isfinite(loss) and logits.shape == (8, CLASSES)
    assert model.body.conv1.weight.dtype == torch.float32
    assert model.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
