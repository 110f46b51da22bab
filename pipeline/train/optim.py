"""Optimiser and per-iteration learning-rate schedules.

The schedule is a pure function of the global iteration, so resuming needs only the
iteration number (kept in the checkpoint) and no scheduler state.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.train.config import OptimConfig, ScheduleConfig


def parameter_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Weight decay on conv/linear weights only: not on BatchNorm weights, nor on any bias
    (FFCV's recipe); with ``decay_norm_and_bias`` on every parameter (plain SGD, the papers')."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            is_norm = isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm))
            excluded = (is_norm or name == "bias") and not decay_norm_and_bias
            (no_decay if excluded else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """The linear scaling rule: optim.lr is quoted per 256 images of global batch."""
    return cfg.lr * global_batch / 256


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.SGD:
    return torch.optim.SGD(parameter_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias),
                           lr=scaled_lr(cfg, global_batch),
                           momentum=cfg.momentum, nesterov=cfg.nesterov)


def lr_factor(cfg: ScheduleConfig, iteration: int, iters_per_epoch: int) -> float:
    """Multiplier of the peak lr at a (0-based) global iteration; evaluated before the step."""
    epoch = iteration / iters_per_epoch  # fractional epoch
    total = cfg.epochs
    if cfg.kind == "triangular":  # FFCV's cyclic schedule: 0 -> peak at peak_epoch -> end ratio at the end
        if epoch < cfg.peak_epoch:
            return (epoch + 1 / iters_per_epoch) / cfg.peak_epoch if cfg.peak_epoch > 0 else 1.0
        span = max(total - cfg.peak_epoch, 1e-12)
        return 1.0 + (cfg.end_lr_ratio - 1.0) * (epoch - cfg.peak_epoch) / span
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        return (epoch + 1 / iters_per_epoch) / cfg.warmup_epochs
    if cfg.kind == "cosine":
        progress = (epoch - cfg.warmup_epochs) / max(total - cfg.warmup_epochs, 1e-12)
        return cfg.end_lr_ratio + (1 - cfg.end_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.kind == "step":
        return cfg.gamma ** sum(1 for m in cfg.milestones if epoch >= m)
    raise ValueError(f"schedule.kind: unknown '{cfg.kind}'")
