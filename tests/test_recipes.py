"""The recipes' numbers and the recipe card: the fast ImageNet recipes at FFCV's learning rate per 256 images and at
their per-GPU batch floors (read from the YAML files), and `launch.py --dry-run` printing the card of what would run
(--local and SLURM; the values recomputed here), training and submitting nothing."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, str(REPO / "pipeline" / "launch.py")]
FAST_IMAGENET = sorted((REPO / "configs" / "imagenet").glob("*.yaml"))  # not paper/: the authors' recipes
IMAGENET_TRAIN_IMAGES = 1_281_167
# FFCV's lr per 256 images: rn50_configs lr 1.7 at 8 GPUs x 512 (the batch is per process), rn18_configs 0.5 at 1024
FFCV_LR_PER_256 = {"resnet50": 1.7 * 256 / (8 * 512), "resnet152": 1.7 * 256 / (8 * 512), "resnet18": 0.5 * 256 / 1024}
BATCH_FLOOR = {("resnet50", "maxl"): 128, "resnet50": 256, "resnet152": 128}
# the README's table of estimated A100 GPU-hours (fast recipes, 40 epochs, 160->192 px)
README_GPU_HOURS = {"resnet50_baseline": 4.7, "resnet50_ssal3": 5.1, "resnet50_dks2": 10.2, "resnet50_ds2": 10.2,
                    "resnet152_baseline": 13.1, "resnet152_dks2": 22.2}


def recipe(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_the_fast_imagenet_recipes_use_ffcvs_lr_and_full_batches():
    assert len(FAST_IMAGENET) == 8
    for path in FAST_IMAGENET:
        values = recipe(path)
        arch, method = values["model"]["arch"], values["method"]["name"]
        lr, batch = values["optim"]["lr"], values["data"]["batch_size"]
        assert abs(lr / FFCV_LR_PER_256[arch] - 1) <= 0.30, (path.name, lr)
        assert batch >= BATCH_FLOOR.get((arch, method), BATCH_FLOOR[arch]), (path.name, batch)
        assert values["data"]["max_res"] == 192 and values["schedule"]["epochs"] == 40, path.name


@pytest.mark.parametrize("paper, batch", [("ssal", 100), ("dks", 32)])  # SSAL's train.py; DHM's 256 over 8 GPUs
def test_the_paper_recipes_keep_their_authors_batch(paper, batch):
    batches = {recipe(p)["data"]["batch_size"] for p in (REPO / "configs/imagenet/paper" / paper).glob("*.yaml")}
    assert batches == {batch}


def run_launch(*args, cwd):
    return subprocess.run(LAUNCH + list(args), cwd=str(cwd), capture_output=True, text=True, timeout=300)


def card(stdout: str) -> dict:
    """The printed card's numbers."""
    text = stdout[stdout.index("# recipe card:"):]

    def number(pattern):
        found = re.search(pattern, text)
        assert found, (pattern, text)
        return float(found.group(1))

    return {"ranks": number(r"ranks: +(\d+)"), "global_batch": number(r"global batch: +(\d+)"),
            "peak_lr": number(r"peak lr: +([\d.e-]+)"), "epochs": number(r"epochs: +(\d+)"),
            "steps": number(r"steps per epoch: (\d+)"), "train_images": number(r"steps per epoch: \d+ \((\d+) train"),
            "gpu_hours": number(r"GPU-hours: +([\d.]+)")}


def test_local_dry_run_prints_the_card_and_trains_nothing(tmp_path):
    config = REPO / "configs/imagenet/resnet50_baseline.yaml"
    values = recipe(config)
    result = run_launch("--local", "--nproc", "2", "--dry-run", "--config", str(config), "--output-dir",
                        str(tmp_path / "run"), f"runs_root={tmp_path / 'runs'}", f"data.root={tmp_path / 'none'}",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    got = card(result.stdout)
    global_batch = values["data"]["batch_size"] * 2
    assert got["ranks"] == 2 and got["global_batch"] == global_batch and got["epochs"] == 40
    assert got["peak_lr"] == pytest.approx(values["optim"]["lr"] * global_batch / 256, rel=1e-5)
    assert got["train_images"] == IMAGENET_TRAIN_IMAGES and got["steps"] == IMAGENET_TRAIN_IMAGES // global_batch
    assert got["gpu_hours"] == pytest.approx(README_GPU_HOURS["resnet50_baseline"], abs=0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no MLflow store: nothing ran


def test_local_dry_run_counts_the_manifests_images(tiny_demo, tmp_path):
    manifest = json.loads((tiny_demo / "manifest.json").read_text())
    result = run_launch("--local", "--dry-run", f"data.root={tiny_demo}", "data.batch_size=16",
                        f"runs_root={tmp_path / 'runs'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    got = card(result.stdout)
    assert got["train_images"] == manifest["splits"]["train"]["count"]
    assert got["steps"] == manifest["splits"]["train"]["count"] // 16 and "manifest in" in result.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name, nodes", [("resnet152_dks2", 2), ("resnet50_dks2", 1)])
def test_slurm_dry_run_prints_the_card_of_the_job(name, nodes, tmp_path):
    config = REPO / "configs/imagenet" / f"{name}.yaml"
    values = recipe(config)
    result = run_launch("--cluster", "example_gpu", "--nodes", str(nodes), "--dry-run", "--config", str(config),
                        "--output-dir", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    got = card(result.stdout)
    ranks = nodes * 8  # example_gpu: 8 GPUs per node, one task each
    global_batch = values["data"]["batch_size"] * ranks
    assert got["ranks"] == ranks and got["global_batch"] == global_batch
    assert got["peak_lr"] == pytest.approx(values["optim"]["lr"] * global_batch / 256, rel=1e-5)
    assert got["steps"] == IMAGENET_TRAIN_IMAGES // global_batch
    # the README's table by the same rule (FFCV's ResNet-50 img/s scaled by forward multiply-adds)
    assert got["gpu_hours"] == pytest.approx(README_GPU_HOURS[name], rel=0.06)
    assert "#SBATCH" in result.stdout and not (tmp_path / "run").exists()
