"""MAXL's networks: the multi-task net, the label generator and their heads.

The modules that hold parameters, apart from the method (``ssal_models.maxl``), which owns a
:class:`LabelGenerator` and trains it through the meta step (``ssal_models.maxl_meta``).
:class:`MultiTaskNet` is the standalone multi-task net (``build_maxl_model``); inside the
models library the backbone is ``BranchedResNet``'s and the auxiliary head an :class:`AuxHead`
branch on ``layer4``.  Generators are built with :func:`torchvision_backbone` (a random-init
torchvision ResNet), by default the family's small copy (:func:`default_generator_arch`).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .maxl_losses import hierarchy_mask, mask_log_softmax

__all__ = [
    "BackboneBuilder", "torchvision_backbone", "default_generator_arch", "MultiTaskNet", "LabelGenerator",
    "AuxHead", "unwrap",
]

#: ``builder(arch) -> (module, feature_dim)``: a backbone without its classifier
BackboneBuilder = Callable[[str], Tuple[nn.Module, int]]


def torchvision_backbone(arch: str) -> Tuple[nn.Module, int]:
    """Randomly initialised torchvision ResNet without its ``fc``: ``(module, feature_dim)``.

    ``resnet10`` = BasicBlock ``[1, 1, 1, 1]`` (the default generator of the ResNet family).
    Stand-in until the models library's backbone builder is wired in (``backbone_builder=``).
    """
    import torchvision.models as tvm
    if arch == "resnet10":
        m = tvm.resnet.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1])
    elif arch.startswith("resnet") or arch.startswith("wide_resnet") or arch.startswith("resnext"):
        m = getattr(tvm, arch)(weights=None)
    else:
        raise ValueError(f"torchvision_backbone: unsupported arch {arch!r}")
    dim = m.fc.in_features
    m.fc = nn.Identity()
    return m, dim


def default_generator_arch(arch: str) -> str:
    """Small copy of the backbone family: ``resnet10`` for any ``resnet*``, else ``arch``."""
    return "resnet10" if arch.startswith("resnet") else arch


class MultiTaskNet(nn.Module):
    """backbone (x -> (N, D) features) + primary head ``fc`` (C) + auxiliary head ``aux_fc`` (A)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, num_aux: int):
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, num_classes)
        self.aux_fc = nn.Linear(feature_dim, num_aux)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        f = self.backbone(x).flatten(1)
        return OrderedDict(main=self.fc(f), aux=self.aux_fc(f))


class LabelGenerator(nn.Module):
    """backbone + head (``Linear-ReLU-Linear`` as in the authors' code, or one ``Linear``
    with ``hidden=0``) -> (N, A) raw logits; :meth:`log_probs` applies the mask softmax."""

    def __init__(self, backbone: nn.Module, feature_dim: int, psi: Sequence[int], hidden: Optional[int] = None):
        super().__init__()
        self.psi = tuple(int(k) for k in psi)
        a = sum(self.psi)
        hidden = feature_dim if hidden is None else int(hidden)
        self.backbone = backbone
        self.head = (nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, a))
                     if hidden > 0 else nn.Linear(feature_dim, a))
        self.register_buffer("mask", hierarchy_mask(self.psi), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x).flatten(1))

    def log_probs(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return mask_log_softmax(self(x), targets, self.mask)


class AuxHead(nn.Module):
    """Auxiliary head on a (N, D, H, W) feature map: global average pool + Linear(D, A)."""

    def __init__(self, feature_dim: int, num_aux: int):
        super().__init__()
        self.fc = nn.Linear(feature_dim, num_aux)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(f, 1), 1))


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under the DDP / ``torch.compile`` wrappers."""
    model = getattr(model, "module", model)          # DDP
    return getattr(model, "_orig_mod", model)        # torch.compile
