"""configs/imagenet/paper/: every paper row's recipe loads, builds its model with the recipe's
pieces (authors' heads, BN momentum, weight decay on everything, jitter, crop scale, val
preprocessing) and trains two steps on the tiny demo set at 64 px on CPU (real FFCV loaders)."""
import math

import pytest
import torch
from torch import nn

from pipeline.train import engine
from pipeline.train.config import REPO_ROOT, load_config
from pipeline.train.optim import lr_factor
from pipeline.train.trainer import Trainer
from pipeline.train import dist as dist_util

PAPER = sorted((REPO_ROOT / "configs" / "imagenet" / "paper").rglob("*.yaml"))
# ResNet-152 and the 100 M-parameter ResNet-50 DKS / DS models take minutes on a loaded 2-core box
HEAVY = {"dks/resnet152_baseline", "dks/resnet152_ds", "dks/resnet152_dks", "dks/resnet50_ds", "dks/resnet50_dks"}
CASES = [pytest.param(p, id=f"{p.parent.name}/{p.stem}",
                      marks=[pytest.mark.slow] if f"{p.parent.name}/{p.stem}" in HEAVY else [])
         for p in PAPER]

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_one_config_per_paper_row():
    names = {str(p.relative_to(REPO_ROOT / "configs" / "imagenet" / "paper")) for p in PAPER}
    assert names == {"ssal/resnet50_baseline.yaml", "ssal/resnet50_ssal3.yaml", "ssal/resnet50_gapcat.yaml"} | {
        f"dks/{arch}_{method}.yaml" for arch in ("resnet18", "resnet50", "resnet152")
        for method in ("baseline", "ds", "dks")}


@pytest.mark.parametrize("recipe", CASES)
def test_paper_config_trains_two_steps_on_the_demo_set(recipe, tiny_demo, tmp_path):
    overrides = [f"data.root={tiny_demo}", "data.dataset=demo", "data.batch_size=4", "data.val_batch_size=16", "data.num_workers=1",
                 "data.min_res=64", "data.max_res=64", "data.val_res=64", "schedule.epochs=1",
                 "schedule.peak_epoch=0.5", "train.max_steps_per_epoch=2", "train.device=cpu",
                 "tracking.enabled=false", f"output_dir={tmp_path / 'run'}", "method.groups_file=",
                 "method.num_groups=[2,4,8]"]  # the tiny set has 16 classes: seeded random groupings
    cfg = load_config(recipe, overrides)
    paper = load_config(recipe, ["method.groups_file="])  # the recipe as shipped
    assert paper.optim.decay_norm_and_bias and paper.optim.label_smoothing == 0 and not paper.model.blurpool
    assert paper.schedule.epochs == 90 and paper.data.min_res == paper.data.max_res == paper.data.val_res == 224
    threads = torch.get_num_threads()
    try:
        check_and_train(recipe, cfg, paper)
    finally:
        torch.set_num_threads(threads)  # Trainer.setup sizes torch's thread pool for training


def check_and_train(recipe, cfg, paper):
    trainer = Trainer(cfg, dist_util.init_distributed_mode("cpu"), resume="")
    trainer.setup()
    model = trainer.model_without_ddp
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(m.momentum == paper.model.bn_momentum for m in norms)
    optimizer = trainer.method_training.optimizers["net"]
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 1e-4 for p in g["params"]}
    assert decayed == {id(p) for p in model.parameters()}  # BN weights and biases too
    if recipe.parent.name == "ssal":
        assert paper.data.color_jitter == 0.4 and paper.data.rrc_scale == pytest.approx([0.3, 4 / 3])
        assert trainer.train_loader._decoder.color_jitter == 0.4
        assert trainer.train_loader._decoder.scale == pytest.approx((0.3, 4 / 3))
        if cfg.method.name != "baseline":
            assert type(model.branches[0]).__name__ == "AuthorsSSALHead" and len(model.branches) == 3
    else:
        assert paper.data.val_preprocess == "squash256" and paper.schedule.milestones == [30, 60]
        assert (len(model.branches) == 2) == (cfg.method.name in ("ds", "dks"))
        if cfg.method.name == "dks":
            assert model.method.eps == 1e-8
    # two real training steps through the engine, on the recipe's loader and optimiser
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train_loader.set_resolution(64)
    trainer.train_loader.set_epoch(0)
    meter = engine.EpochMeter()
    engine.train_one_epoch(trainer.method_training, trainer.train_loader, epoch=0, steps=2, start_step=0, meter=meter,
                           global_step=0, stop_requested=lambda: False,
                           lr_factor_at=lambda it: lr_factor(cfg.schedule, it, trainer.steps_per_epoch))
    trainer.train_loader.close()
    assert meter.samples == 8 and math.isfinite(meter.loss_sum)
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, model.parameters()))
    # and the evaluation pipeline of the recipe yields a batch
    images, labels = next(iter(trainer.val_loader))
    trainer.val_loader.close()
    assert images.shape[1:] == (3, 64, 64) and labels.shape[0] == images.shape[0]
