"""bench/gpu.py --quick: the GPU benchmark's smoke run on CPU, so the script a GPU session runs works."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO


def _numbers(value, path=""):
    """Every number in a JSON tree, with its path."""
    if isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]")


def test_quick_run_writes_complete_json(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--quick", "--device", "cpu",
                           "--out", str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["device"].startswith("cpu")
    assert {"throughput", "epoch", "eval", "dataloader", "experts", "peak_memory_bytes", "targets", "skipped",
            "wall_s"} <= set(result)
    # Throughput: both networks at both batch sizes; CPU runs fp32 only, the rest is listed as skipped.
    assert {(r["arch"], r["batch"], r["mode"]) for r in result["throughput"]} == {
        (arch, batch, "fp32") for arch in ("resnet18", "resnet32") for batch in (8, 16)}
    assert any("CUDA only" in s for s in result["skipped"])
    epoch = result["epoch"]
    assert epoch["baseline"]["experts"] == 1
    assert epoch["split_own"]["experts"] == 2 and epoch["split_other"]["experts"] == 2
    # The "other" experts see extra images: more per epoch than the own-mode experts.
    assert epoch["split_other"]["images_per_epoch"] > epoch["split_own"]["images_per_epoch"]
    assert epoch["split_own_over_baseline_wall"] == epoch["split_own"]["wall_s"] / epoch["baseline"]["wall_s"]
    # The paper's 200 epochs: each row's measured wall plus 198 measured steady cycles (an epoch's
    # training and validation, between its last two epoch records), summed over the experts.
    for name in ("baseline", "split_own", "split_other", "split_own_warm", "baseline_compiled"):
        row = epoch[name]
        assert row["cycle_s"] >= row["steady_epoch_s"] / row["experts"] > 0
        assert row["projected_200_epochs_s"] == pytest.approx(row["wall_s"] + 198 * row["cycle_s"])
    assert "cycle_s" not in epoch["split_own_at_once"]  # at once, the experts' epochs overlap
    assert epoch["baseline_200_epochs_projected_s"] == epoch["baseline"]["projected_200_epochs_s"]
    assert epoch["split_own_over_baseline_200_epochs"] == pytest.approx(
        epoch["split_own"]["projected_200_epochs_s"] / epoch["baseline"]["projected_200_epochs_s"])
    # CPU: the compiled row is the baseline through inductor's CPU kernels (CUDA graphs need CUDA).
    assert epoch["baseline_compiled"]["compile"] == "default" and epoch["baseline"]["compile"] == "none"
    assert "split_own_compiled" not in epoch
    assert epoch["baseline_compiled"]["images_per_epoch"] == epoch["baseline"]["images_per_epoch"]
    # The split's experts one after the other and at once, both warm: the same images either way.
    assert epoch["split_own_at_once"]["images_per_epoch"] == epoch["split_own_warm"]["images_per_epoch"]
    assert epoch["split_at_once_over_sequential_wall"] == \
        epoch["split_own_at_once"]["wall_s"] / epoch["split_own_warm"]["wall_s"]
    assert result["eval"]["images"] == 100 and result["eval"]["finite"]
    assert result["dataloader"]["ratio"] == (result["dataloader"]["ltexp_images_per_s"]
                                             / result["dataloader"]["torchvision_images_per_s"])
    assert set(result["experts"]) >= {"sequential_s", "sequential_images_per_s"}
    assert "streams_s" not in result["experts"]  # CPU: sequential only
    assert set(result["targets"]) == {"resnet18_bf16_batch512_images_per_s_min", "baseline_200_epochs_s_max",
                                      "split_over_baseline_max", "eval_10k_s_max", "dataloader_ratio_min"}
    assert all(t["met"] is None for t in result["targets"].values())  # GPU targets are not judged on CPU
    numbers = dict(_numbers({k: v for k, v in result.items() if k not in ("targets", "peak_memory_bytes")}))
    assert numbers and all(math.isfinite(v) for v in numbers.values()), numbers
    timings = {p: v for p, v in numbers.items() if p.endswith(("_s", "images_per_s", "ms_per_step", "ratio"))
               and "prepare_s" not in p and "other_stages_s" not in p}
    assert timings and all(v > 0 for v in timings.values()), timings
    assert result["peak_memory_bytes"] == 0  # no CUDA allocator on CPU


def test_sections_run_only_what_is_asked_and_bad_names_are_one_line(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--quick", "--device", "cpu",
                           "--sections", "eval,dataloader", "--out", str(out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["sections"] == ["eval", "dataloader"]
    assert "epoch" not in result and "experts" not in result and result["throughput"] == []
    assert result["eval"]["images"] == 100 and result["dataloader"]["ratio"] > 0
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--sections", "epoch,speed"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--sections speed: allowed are epoch, eval, experts, dataloader, throughput" in proc.stderr


def test_device_script_reads_its_generated_archives():
    """bench/gpu_check.sh trains on CIFAR archives it generates, which are not the published files:
    without LTEXP_UNVERIFIED_CIFAR=1, ltexp's MD5 check refuses them and the one device call's
    mlflow and jobs parts fail (they did, rehearsed on CPU, before the script exported it)."""
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    assert subprocess.run(["bash", "-n", str(REPO / "bench" / "gpu_check.sh")]).returncode == 0
    exported = script.index("export LTEXP_UNVERIFIED_CIFAR=1")
    assert all(exported < i for i in (script.index("from conftest import write_cifar_archive"),
                                      script.index("python3 -m mlflow run"),
                                      script.index("-m ltexp tune")))
    default_parts = script.split('PARTS="${*:-', 1)[1].split('}"', 1)[0].split()
    assert default_parts == ["tests", "mlflow", "bench", "jobs"]
    assert all(f'*" {part} "*' in script for part in default_parts)  # each part has its block
