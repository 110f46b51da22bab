"""The model: a torchvision ResNet, branches on tap points, and the method object.

``build_model(arch, method, num_classes, **options)`` is the one public constructor; see
``ssal_models/__init__.py`` for the contract.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Any, Dict, List

import torch
from torch import nn

from .backbones import (ARCHS, STAGES, BackboneInfo, apply_blurpool, backbone_info, backbone_stem,
                        build_backbone)
from .base import CAPACITY_OPTIONS, METHODS, Method, MethodBuild


class BranchedResNet(nn.Module):
    """A ResNet whose forward also feeds named intermediate features to branch modules.

    ``forward(x)`` returns an ``OrderedDict``: ``"main"`` (the backbone's classifier) first,
    then one entry per branch in build order (``"ssal.0"``, ``"dks.1"``, ...).  A method with
    ``concat_branch_features`` (GapCat) instead concatenates the branch outputs to the main
    pooled features and returns ``"main"`` alone.  A method with ``extra_outputs(images,
    outputs)`` (MAXL) gets the last word on the returned dict.
    """

    def __init__(self, info: BackboneInfo, backbone: nn.Module, build: MethodBuild):
        super().__init__()
        self.arch = info.arch
        self.backbone = backbone
        self.branches = nn.ModuleList([spec.module for spec in build.branches])
        self.branch_names: List[str] = [spec.name for spec in build.branches]
        self.branch_taps: List[str] = [spec.tap for spec in build.branches]
        self.method: Method = build.method
        # per stage, the block indices whose outputs a branch reads (taps inside a stage);
        # a stage without inner taps runs as one nn.Sequential call
        self._inner_taps: Dict[str, set] = {}
        for tap in self.branch_taps:
            stage_index, block_index = info.parse_tap(tap)
            if block_index is not None:
                self._inner_taps.setdefault(STAGES[stage_index], set()).add(block_index)
        self._needed_stages = {tap for tap in self.branch_taps if "." not in tap}

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        bb = self.backbone
        x = backbone_stem(bb, images)
        tapped: Dict[str, torch.Tensor] = {}
        for stage_name in STAGES:
            stage = getattr(bb, stage_name)
            inner = self._inner_taps.get(stage_name)
            if inner:
                for index, block in enumerate(stage):
                    x = block(x)
                    if index in inner:
                        tapped[f"{stage_name}.{index}"] = x
            else:
                x = stage(x)
            if stage_name in self._needed_stages:
                tapped[stage_name] = x
        pooled = torch.flatten(bb.avgpool(x), 1)
        branch_outputs = [branch(tapped[tap]) for branch, tap in zip(self.branches, self.branch_taps)]
        if getattr(self.method, "concat_branch_features", False):
            outputs = OrderedDict(main=bb.fc(torch.cat([pooled, *branch_outputs], dim=1)))
        else:
            outputs = OrderedDict(main=bb.fc(pooled))
            outputs.update(zip(self.branch_names, branch_outputs))
        # a method may add outputs computed from the images themselves (MAXL's label generator)
        extra_outputs = getattr(self.method, "extra_outputs", None)
        return outputs if extra_outputs is None else extra_outputs(images, outputs)


def available_archs() -> List[str]:
    return list(ARCHS)


def available_methods() -> List[str]:
    return sorted(METHODS)


def build_model(arch: str, method: str, num_classes: int, **options: Any) -> BranchedResNet:
    """Build ``arch`` with ``method``'s branches, loss and prediction rules.

    Backbone options (every method): ``blurpool`` (bool), ``zero_init_residual`` (bool), and
    the capacity options ``width_multiplier`` (number > 0, default 1.0: scales the stem and
    every stage), ``stem_convs`` (int >= 0, default 0: extra 3x3 conv-BN-ReLU layers before
    ``layer1``) and ``stem_conv_width`` (int >= 1, default 256: their filters); see
    :mod:`ssal_models.backbones`.  Branches see the scaled channel counts.
    Method options: see the method's module (``ssal_models.ssal``, ``.dks``, ...).
    Every bad argument raises ``ValueError`` with a one-line message naming it and the valid
    choices.  Works under ``with torch.device("meta"):`` (no data-dependent code at build).
    """
    options = dict(options)
    info = backbone_info(arch, **{key: options.pop(key) for key in CAPACITY_OPTIONS if key in options})
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(available_methods())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    num_classes = int(num_classes)
    blurpool = options.pop("blurpool", False)
    zero_init_residual = options.pop("zero_init_residual", False)
    for key, value in (("blurpool", blurpool), ("zero_init_residual", zero_init_residual)):
        if not isinstance(value, bool):
            raise ValueError(f"option {key!r} must be true or false, got {value!r}")
    options["zero_init_residual"] = zero_init_residual  # branch builders of the backbone's block type need it

    backbone = build_backbone(info, num_classes, zero_init_residual)
    build = METHODS[method](info, num_classes, options)
    if build.main_extra_features:
        # the main classifier reads the pooled features plus the branch features (GapCat)
        backbone.fc = nn.Linear(info.feature_dim + build.main_extra_features, num_classes)
    model = BranchedResNet(info, backbone, build)
    if blurpool:
        # the whole model, branches included: every strided conv sees an anti-aliased input
        apply_blurpool(model)
    return model


def count_parameters(model: nn.Module) -> Dict[str, int]:
    """``{"backbone": n, "<branch name>": n, ..., ["<method submodule>": n,] "total": n}``.

    ``backbone`` includes the main classifier (for GapCat, widened by the branch features).
    Parameters the method object owns are listed per submodule: SSAL's separately fitted
    ``lc_head`` when one is attached, MAXL's label ``generator``.
    """
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)

    def numel(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    counts: Dict[str, int] = {"backbone": numel(model.backbone)}
    names = getattr(model, "branch_names", [])
    for name, branch in zip(names, getattr(model, "branches", [])):
        counts[name] = numel(branch)
    method = getattr(model, "method", None)
    if method is not None:
        for name, child in method.named_children():
            if numel(child):
                counts[name] = numel(child)
    counts["total"] = numel(model)
    return counts
