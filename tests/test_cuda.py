"""The CUDA path: bf16 training, channels_last + torch.compile, a GPU-trained model served on CPU.

Marked `cuda` and skipped where torch sees no CUDA device (CI, laptops); a GPU machine runs them
with `pytest -m cuda tests/test_cuda.py` (bench/gpu_check.sh does).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from ltexp.config import resolve_config
from ltexp.data import build_long_tail
from ltexp.data.device import DeviceImages, build_augment
from ltexp.data.sources import load_digits_source
from ltexp.engine import fit, predict_logits
from ltexp.methods import build_method
from ltexp.models import build_model, channel_stats

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def digits():
    return build_long_tail(load_digits_source(), "exp", 0.1, "holdout", 20, seed=0)


def test_bf16_training_is_finite_and_learns(digits):
    """`ltexp.engine.fit` on CUDA: convolutions run in bf16, the loss stays finite and falls."""
    torch.manual_seed(0)
    mean, std = channel_stats(digits.train_images)
    model = build_model("smallcnn", digits.image_shape, 10, mean, std).cuda()
    train = DeviceImages.from_numpy(digits.train_images, digits.train_labels, "cuda")
    val = DeviceImages.from_numpy(digits.val_images, digits.val_labels, "cuda")
    dtypes = set()
    hook = model.body[0].register_forward_hook(lambda module, args, out: dtypes.add(out.dtype))
    cfg = resolve_config({"optim": {"epochs": 6, "batch_size": 64, "lr": 0.05, "lr_step": 100}}, seed=0, device="cuda")
    stages = build_method(cfg).stages(digits.info)
    result = fit(model, train, val, stages, digits.info, batch_size=64, clip_norm=0.0,
                 augment=build_augment("crop", 8), seed=0)
    hook.remove()
    losses = [h["train_loss"] for h in result.history]
    assert all(np.isfinite(losses)), losses
    assert losses[-1] < 0.8 * losses[0], losses
    assert torch.bfloat16 in dtypes  # autocast really ran the convolutions in bf16
    assert model.body[0].weight.dtype == torch.float32  # weights stay fp32
    assert model.body[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert result.best_val_acc > 0.4  # chance is 0.1


def test_cuda_graphs_training_learns_like_eager(digits):
    """`--compile reduce-overhead`: full batches' forward and backward replay as CUDA graphs (none
    skipped by inductor), the loss falls, and the model ends close to eager bf16 training."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = resolve_config({"optim": {"epochs": 6, "batch_size": 64, "lr": 0.05, "lr_step": 100}}, seed=0, device="cuda")
    runs = {}
    for mode in ("reduce-overhead", "none"):
        torch.manual_seed(0)
        mean, std = channel_stats(digits.train_images)
        model = build_model("smallcnn", digits.image_shape, 10, mean, std).cuda()
        train = DeviceImages.from_numpy(digits.train_images, digits.train_labels, "cuda")
        val = DeviceImages.from_numpy(digits.val_images, digits.val_labels, "cuda")
        result = fit(model, train, val, build_method(cfg).stages(digits.info), digits.info, batch_size=64,
                     clip_norm=5.0, augment=build_augment("crop", 8), seed=0, compile_mode=mode)
        runs[mode] = (result, predict_logits(model, val.images).argmax(1))
    graphs, eager = runs["reduce-overhead"], runs["none"]
    losses = [h["train_loss"] for h in graphs[0].history]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert counters["stats"]["unique_graphs"] >= 1
    assert sum(v for k, v in counters["inductor"].items() if "cudagraph_skip" in k) == 0, dict(counters["inductor"])
    assert graphs[0].best_val_acc > 0.4 and abs(graphs[0].best_val_acc - eager[0].best_val_acc) < 0.1
    assert (graphs[1] == eager[1]).float().mean().item() >= 0.9


@pytest.mark.parametrize("arch", ["resnet18", "resnet32"])
def test_channels_last_compile_matches_eager(arch):
    """channels_last + torch.compile gives the eager logits up to bf16 rounding."""
    torch.manual_seed(0)
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device="cuda")
    model = build_model(arch, (32, 32, 3), 10, [125.0] * 3, [60.0] * 3).cuda().eval()
    with torch.no_grad():
        model.train()  # a few batches move BatchNorm's running statistics off their initial values
        for _ in range(3):
            model(images)
        model.eval()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager = model(images).float()
        model.to(memory_format=torch.channels_last)
        compiled = torch.compile(model, dynamic=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            fast = compiled(images.contiguous(memory_format=torch.channels_last)).float()
    scale = eager.abs().max().item()
    assert torch.isfinite(fast).all()
    assert (fast - eager).abs().max().item() <= 0.05 * scale + 1e-3
    assert (fast.argmax(1) == eager.argmax(1)).float().mean().item() >= 0.97


def test_gpu_trained_model_predicts_the_same_on_cpu(subprocess_env, tmp_path):
    """Train on CUDA (run_experiment, sqlite store), then load the logged pyfunc in a process that
    sees no GPU: its labels match the GPU's on >= 99% of the test images."""
    import mlflow

    from ltexp.experiment import run_experiment

    cfg = resolve_config({"optim": {"epochs": 5}, "method": {"method": "split"}}, seed=0, device="cuda")
    result = run_experiment(cfg)
    run = mlflow.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["ltexp.device"] == "cuda"
    images = load_digits_source().test_images  # (500, 8, 8, 1) uint8
    np.save(tmp_path / "images.npy", images)

    os.environ["LTEXP_SERVE_DEVICE"] = "cuda"
    try:
        gpu = mlflow.pyfunc.load_model(result.model_uri).predict(images)
    finally:
        del os.environ["LTEXP_SERVE_DEVICE"]
    code = ("import sys, json, numpy as np, torch, mlflow\n"
            "assert not torch.cuda.is_available()\n"
            "frame = mlflow.pyfunc.load_model(sys.argv[1]).predict(np.load(sys.argv[2]))\n"
            "print(json.dumps(frame['label'].tolist()))\n")
    # The repository first; whatever else was on the path (e.g. carried wheels) after it.
    path = os.pathsep.join(p for p in (str(REPO), subprocess_env.get("PYTHONPATH", "")) if p)
    env = {**subprocess_env, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": path}
    env.pop("LTEXP_SERVE_DEVICE", None)
    proc = subprocess.run([sys.executable, "-c", code, result.model_uri, str(tmp_path / "images.npy")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu_labels = np.array(json.loads(proc.stdout.strip().splitlines()[-1]))
    agreement = (cpu_labels == gpu["label"].to_numpy()).mean()
    assert agreement >= 0.99, agreement
    assert (gpu["label"].to_numpy() == load_digits_source().test_labels).mean() > 0.3  # a trained model, not chance


def test_split_experts_train_at_once_on_their_own_streams(mlflow_store):
    """`--expert-concurrency threads` on CUDA: each expert's thread on its own stream; both expert
    runs finish and overlap, and the fused model scores as one trained one after the other does
    (bf16 and a different order of kernels: close, not equal)."""
    import mlflow

    from ltexp.experiment import run_experiment

    def run(way):
        cfg = resolve_config({"optim": {"epochs": 30}, "method": {"method": "split", "lws_epochs": 2},
                              "split": {"expert_concurrency": way}}, seed=0, device="cuda")
        return run_experiment(cfg)

    at_once, one_by_one = run("threads"), run("sequential")
    assert mlflow.get_run(at_once.run_id).data.tags["ltexp.expert_concurrency"] == "threads"
    head, tail = mlflow.search_runs(search_all_experiments=True, output_format="list",
                                    filter_string=f"tags.mlflow.parentRunId = '{at_once.run_id}'")
    assert head.info.status == tail.info.status == "FINISHED"
    assert head.info.start_time < tail.info.end_time and tail.info.start_time < head.info.end_time
    assert at_once.metrics["test_acc"] > 0.5
    assert abs(at_once.metrics["test_acc"] - one_by_one.metrics["test_acc"]) < 0.05
