"""Per-iteration learning-rate schedules and the weight-decay split."""
import pytest
from torch import nn

from pipeline.train.config import OptimConfig, ScheduleConfig
from pipeline.train.optim import build_optimizer, lr_factor, parameter_groups, scaled_lr

ITERS = 10  # iterations per epoch


def curve(cfg):
    return [lr_factor(cfg, it, ITERS) for it in range(cfg.epochs * ITERS)]


def test_triangular_ramps_to_the_peak_then_down():
    cfg = ScheduleConfig(kind="triangular", epochs=5, peak_epoch=2, end_lr_ratio=0.0)
    lrs = curve(cfg)
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(1.0)
    assert peak == 2 * ITERS - 1  # the last iteration before the peak epoch reaches it
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # strictly up
    assert lrs[peak + 1] == pytest.approx(1.0)  # the first iteration of the peak epoch is still at the peak
    assert all(a > b for a, b in zip(lrs[peak + 1:], lrs[peak + 2:]))  # then strictly down
    assert 0 < lrs[0] <= 1 / (2 * ITERS) + 1e-12 and lrs[-1] < 0.05


def test_cosine_with_warmup():
    cfg = ScheduleConfig(kind="cosine", epochs=10, warmup_epochs=1, end_lr_ratio=0.1)
    lrs = curve(cfg)
    assert lrs[ITERS - 1] == pytest.approx(1.0)  # end of warm-up
    assert lrs[ITERS] == pytest.approx(1.0)
    assert lrs[5 * ITERS + ITERS // 2] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)  # half way through the decay
    assert lrs[-1] == pytest.approx(0.1, abs=0.01)


def test_step_schedule_multiplies_by_gamma_at_each_milestone():
    cfg = ScheduleConfig(kind="step", epochs=9, milestones=[3, 6], gamma=0.1)
    lrs = curve(cfg)
    assert lrs[3 * ITERS - 1] == 1.0 and lrs[3 * ITERS] == pytest.approx(0.1)
    assert lrs[6 * ITERS] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.01)


def test_no_weight_decay_on_batchnorm_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                   id(model[3].bias)}


def test_lr_scales_with_the_global_batch():
    cfg = OptimConfig(lr=0.5, nesterov=True)
    assert scaled_lr(cfg, 1024) == pytest.approx(2.0)
    optimizer = build_optimizer(nn.Linear(2, 2), cfg, global_batch=128)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.25)
    assert optimizer.param_groups[0]["nesterov"] is True


def test_decay_norm_and_bias_puts_weight_decay_on_every_parameter():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decay, no_decay = parameter_groups(model, 1e-4, decay_norm_and_bias=True)
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters()} and not no_decay["params"]
    optimizer = build_optimizer(model, OptimConfig(weight_decay=1e-4, decay_norm_and_bias=True), global_batch=256)
    assert sum(len(g["params"]) for g in optimizer.param_groups if g["weight_decay"] == 1e-4) == 6
