"""ResNet backbones (torchvision definitions, random init) and the pieces branches build on.

* :data:`ARCHS` / :func:`build_backbone`: ``resnet18``, ``resnet34``, ``resnet50``,
  ``resnet152`` from :mod:`torchvision.models` with ``weights=None`` (never a download).
* Tap points (where a branch attaches): ``"layer1"`` .. ``"layer4"`` (a stage's output) or
  ``"layerN.i"`` (the output of block ``i`` of stage ``N``, 0-based), resolved by
  :meth:`BackboneInfo.parse_tap`.  Every block of a stage works at the stage's resolution
  (torchvision down-samples in the first block), so a tap inside a stage has the stage's
  channels and stride.
* :func:`apply_blurpool`: FFCV's recipe, a depthwise ``[1,2,1]x[1,2,1]/16`` blur before every
  strided conv with at least 16 input channels (so not the RGB stem conv).
* :func:`make_stage` / :func:`init_like_torchvision`: a ResNet stage of the backbone's own block
  type, initialised exactly as torchvision initialises its ResNets (DKS branches use these).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.resnet import BasicBlock, Bottleneck

Block = Type[Union[BasicBlock, Bottleneck]]

STAGES: Tuple[str, ...] = ("layer1", "layer2", "layer3", "layer4")
# base widths ("planes") of torchvision's four stages; output channels = planes * block.expansion
STAGE_PLANES: Tuple[int, ...] = (64, 128, 256, 512)
# total down-sampling of the input at each stage's output (stem: conv s2 + maxpool s2)
STAGE_STRIDES: Tuple[int, ...] = (4, 8, 16, 32)

ARCHS: dict[str, tuple[Callable[..., tv_resnet.ResNet], Block, Tuple[int, int, int, int]]] = {
    "resnet18": (tv_resnet.resnet18, BasicBlock, (2, 2, 2, 2)),
    "resnet34": (tv_resnet.resnet34, BasicBlock, (3, 4, 6, 3)),
    "resnet50": (tv_resnet.resnet50, Bottleneck, (3, 4, 6, 3)),
    "resnet152": (tv_resnet.resnet152, Bottleneck, (3, 8, 36, 3)),
}

_TAP_RE = re.compile(r"^(layer[1-4])(?:\.(\d+))?$")


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about an arch that branch builders need (no module is built)."""

    arch: str
    block: Block
    layers: Tuple[int, int, int, int]

    @property
    def feature_dim(self) -> int:
        """Channels of the main pooled features (input width of the main classifier)."""
        return STAGE_PLANES[-1] * self.block.expansion

    def valid_taps(self) -> list[str]:
        taps = []
        for stage, blocks in zip(STAGES, self.layers):
            taps.append(stage)
            taps.extend(f"{stage}.{i}" for i in range(blocks))
        return taps

    def parse_tap(self, tap: str) -> Tuple[int, Optional[int]]:
        """``"layer3"`` -> ``(2, None)``; ``"layer3.1"`` -> ``(2, 1)``; the last block of a
        stage is the stage's output, so ``"layer3.5"`` on ResNet-50 -> ``(2, None)``.
        Raises ValueError naming the valid taps."""
        match = _TAP_RE.match(tap) if isinstance(tap, str) else None
        if match is not None:
            stage_index = STAGES.index(match.group(1))
            if match.group(2) is None:
                return stage_index, None
            block_index = int(match.group(2))
            if block_index < self.layers[stage_index]:
                return stage_index, (None if block_index == self.layers[stage_index] - 1 else block_index)
        raise ValueError(
            f"bad stage {tap!r} for {self.arch}: use layer1..layer4 or layerN.i with i < blocks of "
            f"that stage ({', '.join(f'{s}: {n} blocks' for s, n in zip(STAGES, self.layers))})")

    def canonical_tap(self, tap: str) -> str:
        stage_index, block_index = self.parse_tap(tap)
        return STAGES[stage_index] if block_index is None else f"{STAGES[stage_index]}.{block_index}"

    def tap_channels(self, tap: str) -> int:
        return STAGE_PLANES[self.parse_tap(tap)[0]] * self.block.expansion

    def tap_stride(self, tap: str) -> int:
        return STAGE_STRIDES[self.parse_tap(tap)[0]]


def backbone_info(arch: str) -> BackboneInfo:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}")
    _, block, layers = ARCHS[arch]
    return BackboneInfo(arch, block, layers)


def build_backbone(arch: str, num_classes: int, zero_init_residual: bool = False) -> tv_resnet.ResNet:
    """The torchvision ResNet with random init; its ``fc`` is the main classifier."""
    constructor, _, _ = ARCHS[arch]
    return constructor(weights=None, num_classes=num_classes, zero_init_residual=zero_init_residual)


def make_stage(block: Block, inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """A ResNet stage exactly as ``torchvision.models.ResNet._make_layer`` builds it."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            tv_resnet.conv1x1(inplanes, planes * block.expansion, stride),
            nn.BatchNorm2d(planes * block.expansion),
        )
    layers = [block(inplanes, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def init_like_torchvision(module: nn.Module, zero_init_residual: bool = False) -> None:
    """torchvision's ResNet init: kaiming-normal (fan_out) convs, BN weight 1 / bias 0, and
    optionally the last BN of every residual block at 0 (each block starts as the identity).
    Linear layers keep PyTorch's default init, as torchvision's ``fc`` does."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
    if zero_init_residual:
        for m in module.modules():
            if isinstance(m, Bottleneck):
                nn.init.constant_(m.bn3.weight, 0)
            elif isinstance(m, BasicBlock):
                nn.init.constant_(m.bn2.weight, 0)


class BlurPoolConv2d(nn.Module):
    """A strided conv preceded by a fixed depthwise [1,2,1]x[1,2,1]/16 blur (anti-aliasing,
    Zhang 2019), as in FFCV's ImageNet recipe.  The wrapped conv keeps its name ``conv``."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv
        kernel_1d = torch.tensor([1.0, 2.0, 1.0])
        kernel = (kernel_1d[:, None] * kernel_1d[None, :]) / 16.0
        # persistent: a model built on the meta device gets the filter back from a checkpoint
        self.register_buffer("blur_filter", kernel.expand(conv.in_channels, 1, 3, 3).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blurred = F.conv2d(x, self.blur_filter.to(x.dtype), stride=1, padding=1, groups=self.conv.in_channels)
        return self.conv(blurred)


def apply_blurpool(module: nn.Module) -> int:
    """Wrap every strided conv with >= 16 input channels in :class:`BlurPoolConv2d` (in place,
    recursively); returns how many were wrapped."""
    wrapped = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, BlurPoolConv2d(child))
            wrapped += 1
        elif not isinstance(child, BlurPoolConv2d):
            wrapped += apply_blurpool(child)
    return wrapped
